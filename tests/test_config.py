"""params.yaml validation: every bad value fails with one line naming the parameter and what is allowed;
params.yaml is the one place every value is written (the config models declare none)."""

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from edgekd.config import (
    _LEAVES,
    _SECTION_PREFIX,
    DataConfig,
    Fp32Gates,
    ParamError,
    Params,
    QuantizedGates,
    as_dict,
    load_params,
    params_from_dict,
    read_keys,
)

REPO = Path(__file__).resolve().parents[1]


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def with_override(key: str, value) -> dict:
    raw = repo_params()
    *parents, leaf = key.split(".")
    node = raw
    for name in parents:
        node = node[name]
    node[leaf] = value
    return raw


def test_repo_params_load_with_every_value_taken_from_the_file():
    raw = repo_params()
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params) and params.seed == raw["seed"]
    sections = {name: values for name, values in raw.items() if isinstance(values, dict)}
    assert sections  # the file has sections, and each of their values is the one loaded
    for section, values in sections.items():
        loaded = as_dict(getattr(params, section))  # nested groups (export.fp32) as dicts too
        for key, value in values.items():
            assert loaded[key] == (tuple(value) if isinstance(value, list) else value), f"{section}.{key}"


def test_a_value_in_the_file_is_the_value_loaded(tmp_path):
    views = repo_params()["kd"]["views"] + 3
    raw = with_override("kd.views", views)
    raw["teachers"]["archs"] = ["densenet121"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    params = load_params(path)
    assert params.kd.views == views and params.teachers.archs == ("densenet121",)


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("student.width", -1, "0 < width"),
        ("student.width", 0, "0 < width"),
        ("kd.temperature", 0, "> 0"),
        ("kd.alpha", 1.5, "0 <= alpha <= 1"),
        ("kd.alpha", -0.1, "0 <= alpha <= 1"),
        ("student.epochs", 0, ">= 1"),
        ("teachers.epochs", 0, ">= 1"),
        ("qat.epochs", 0, ">= 1"),
        ("student.arch", "resnet9000", "one of"),
        ("teachers.archs", ["resnet18", "vgg16"], "one of"),
        ("data.image_size", 16, ">= 32"),
        ("train.device", "tpu", "one of"),
        ("train.augment", "rotate", "one of"),
        ("train.max_steps_per_epoch", 0, "null or an integer >= 1"),
        ("student.width", "wide", "a finite number"),
        ("student.epochs", 2.5, "an integer"),
        ("data.val_fraction", 1.2, "0 < val_fraction < 1"),
        ("export.quantized.min_agreement", 1.5, "0 <= min_agreement <= 1"),
        ("export.opset", 12, "an integer, 13 <= opset <= 21"),
        ("data.near_duplicate_bits", 33, "an integer, 0 <= near_duplicate_bits <= 32"),
        ("bench.runs", 9, "an integer >= 10"),
        ("qat.avg_weight_bits", 3.5, "4 <= avg_weight_bits <= 8"),
        ("qat.freeze_observer_epoch", 0, "an integer >= 1"),
        ("qat.act16_share", 1.1, "0 <= act16_share <= 1"),
        ("qat.keep_first_last_8bit", "yes", "true or false"),
        ("kd.views", 0, "an integer >= 1"),
        ("kd.ensemble", "max", "one of ['mean', 'confidence']"),
        ("distributed.nnodes", 0, "an integer >= 1"),
        ("distributed.rdzv_endpoint", "localhost", "host:port"),
        ("ptq.calibration_images", 0, "an integer >= 1"),
        ("train.label_smoothing", 1.0, "0 <= label_smoothing < 1"),
        ("train.threads", True, "an integer >= 1"),
        ("train.weight_decay", float("nan"), "a finite number >= 0"),
        ("seed", 2**32, "an integer, 0 <= seed <= 4294967295"),
        ("student.seed", -1, "an integer, 0 <= seed <= 4294967295"),
        ("data.root", 5, "a string"),
        ("student.image_size", 8, "null or an integer >= 16"),
        ("student.image_size", 96, "null or <= data.image_size (64)"),
        ("student.image_size", "big", "an integer"),
        ("student.arch", "convnet_d2_8_8_8_8_8_8", "at most 5 stages at 64 px"),
        ("student.arch", "convnet_d0_8", "convnet_d<depth>_<width>"),
        ("teachers.archs", ["resnet18", "convnet_d2_8_8_8_8_8_8"], "at most 5 stages at 64 px"),
        ("teachers.archs", ["convnet_d2_8", "convnet_d2_8"], "distinct names"),
        ("train.optimizer", "sgd", "one of ['adamw_onecycle', 'nesterov_triangle']"),
        ("train.precision", "float16", "one of ['float32', 'bfloat16']"),
        ("train.ema_decay", 1.0, "0 <= ema_decay < 1"),
        ("train.momentum", -0.1, "0 <= momentum < 1"),
        ("train.bn_bias_lr_scale", 0, "> 0"),
        ("kd.targets", "all", "one of ['views', 'flip_mean']"),
    ],
)
def test_bad_values_fail_with_one_line_naming_param(key, value, allowed):
    with pytest.raises(ParamError) as info:
        params_from_dict(with_override(key, value))
    message = str(info.value)
    assert "\n" not in message
    assert key in message
    shown = value[-1] if isinstance(value, list) else value  # a list names its bad item
    assert repr(shown) in message
    assert allowed in message


def test_nesterov_steps_need_momentum():
    raw = with_override("train.momentum", 0.0)
    assert params_from_dict(raw).train.momentum == 0.0  # AdamW (the default) reads no momentum
    raw["train"]["optimizer"] = "nesterov_triangle"
    with pytest.raises(ParamError, match=r"^params: train.momentum=0.0 is invalid; allowed: > 0 with train.optimizer"):
        params_from_dict(raw)


def test_alternating_flip_needs_an_augmentation_with_flips():
    raw = with_override("train.augment", "flip_translate")
    raw["train"]["alternating_flip"] = True
    assert params_from_dict(raw).train.alternating_flip
    raw["train"]["augment"] = "dihedral"
    allowed = "false with train.augment dihedral"
    with pytest.raises(ParamError, match=rf"^params: train.alternating_flip=True is invalid; allowed: {allowed}"):
        params_from_dict(raw)


def test_teacher_stems_are_checked_per_teacher():
    raw = with_override("teachers.stems", {"resnet18": "imagenet", "mobilenet_v2": "small", "densenet121": "imagenet"})
    assert params_from_dict(raw).teachers.stems["mobilenet_v2"] == "small"
    raw["teachers"]["stems"]["mobilenet_v2"] = "tiny"
    with pytest.raises(ParamError, match=r"^params: teachers.stems.mobilenet_v2='tiny' is invalid; allowed: one of"):
        params_from_dict(raw)
    del raw["teachers"]["stems"]["mobilenet_v2"]  # a teacher without a stem
    with pytest.raises(ParamError, match=r"^params: teachers.stems.mobilenet_v2=None is invalid"):
        params_from_dict(raw)
    raw["teachers"]["stems"].update(mobilenet_v2="small", vgg16="small")
    with pytest.raises(ParamError, match=r"^params: teachers.stems='vgg16' is invalid; allowed: keys among"):
        params_from_dict(raw)


def test_a_convnet_must_fit_its_input_and_has_one_stem():
    """A convnet's stages halve the maps after its 2x2 whitening conv: 4 stages fit 32 px, 5 do not;
    the student's own input side counts. It has no ImageNet stem, and no entry in teachers.stems."""
    raw = with_override("data.image_size", 32)
    raw["student"].update(arch="convnet_d1_8_8_8_8", stem="small")
    raw["teachers"].update(archs=["convnet_d3_8_8_8_8"], stems={})
    params_from_dict(raw)
    raw["student"]["image_size"] = 16
    with pytest.raises(
        ParamError, match=r"^params: student.arch='convnet_d1_8_8_8_8' is invalid; allowed: at most 3 stages at 16 px"
    ):
        params_from_dict(raw)
    raw["student"].update(image_size=None, stem="imagenet")
    with pytest.raises(ParamError, match=r"^params: student.stem='imagenet' is invalid; allowed: small for a convnet"):
        params_from_dict(raw)


def test_student_image_size_defaults_to_the_data_size():
    raw = with_override("data.image_size", 48)  # not the file's size, nor the dataclass default
    raw["student"]["image_size"] = None
    assert params_from_dict(raw).student_image_size == 48
    raw["student"]["image_size"] = 40
    assert params_from_dict(raw).student_image_size == 40


def test_fractions_that_leave_nothing_to_train_on():
    raw = with_override("data.val_fraction", 0.9)
    with pytest.raises(ParamError, match=r"data.val_fraction \+ data.test_fraction.*a sum < 1"):
        params_from_dict(raw)


def test_unknown_key_is_rejected():
    raw = repo_params()
    raw["student"]["widht"] = 0.5
    with pytest.raises(ParamError, match="unknown key student.widht"):
        params_from_dict(raw)


def test_missing_and_invalid_params_file(tmp_path):
    with pytest.raises(ParamError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("student: [unclosed")
    with pytest.raises(ParamError, match="not valid YAML"):
        load_params(bad)


def test_messages_the_stages_print_word_for_word():
    """tests/test_recovery.py and tests/test_prepare_stage.py read these lines from a real run."""
    with pytest.raises(ParamError) as info:
        params_from_dict(with_override("student.width", -1))  # `-S student.width=-1` writes an int
    assert str(info.value) == "params: student.width=-1.0 is invalid; allowed: 0 < width <= 4"
    with pytest.raises(ParamError) as info:
        params_from_dict(with_override("data.image_size", 16))
    assert str(info.value) == "params: data.image_size=16 is invalid; allowed: an integer >= 32"


SECTIONS = sorted(name for name, value in repo_params().items() if isinstance(value, dict))


@pytest.mark.parametrize("section", SECTIONS)
def test_every_section_rejects_an_unknown_key_naming_it(section):
    raw = repo_params()
    raw[section]["bogus_key"] = 1
    with pytest.raises(ParamError) as info:
        params_from_dict(raw)
    assert re.fullmatch(rf"params: unknown key {section}\.bogus_key; known: \[.*\]", str(info.value))


def test_an_unknown_top_level_key_and_a_section_that_is_no_mapping():
    with pytest.raises(ParamError, match=r"^params: unknown key sed; known: \['bench', 'data',"):
        params_from_dict({**repo_params(), "sed": 1})
    with pytest.raises(ParamError, match=r"^params: kd must be a mapping, got 3$"):
        params_from_dict({**repo_params(), "kd": 3})


def flat(raw: dict) -> dict:
    """params.yaml's fields by dotted key ("seed": 42, "kd.views": 20; "teachers.stems" is one field)."""
    fields = {}
    for name, value in raw.items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        fields.update({f"{name}.{key}".rstrip("."): v for key, v in items})
    return fields


def leaves(raw: dict, prefix: str = "") -> dict:
    """Every value of params.yaml by its full dotted key, nested groups included
    ("export.quantized.min_agreement": 0.95, "teachers.stems.resnet18": "imagenet")."""
    out = {}
    for name, value in raw.items():
        out.update(leaves(value, f"{prefix}{name}.") if isinstance(value, dict) else {prefix + name: value})
    return out


def dotted_keys(raw: dict, prefix: str = "") -> list[str]:
    """Every key of params.yaml, sections and their fields ("kd", "kd.views", ...; stems is one field)."""
    keys = []
    for name, value in raw.items():
        keys.append(prefix + name)
        if isinstance(value, dict) and not prefix:
            keys += dotted_keys(value, f"{name}.")
    return keys


@pytest.mark.parametrize("key", dotted_keys(repo_params()))
def test_a_missing_key_is_an_error_naming_it(key):
    raw = repo_params()
    *parents, leaf = key.split(".")
    node = raw
    for name in parents:
        node = node[name]
    del node[leaf]
    with pytest.raises(ParamError) as info:
        params_from_dict(raw)
    assert str(info.value) == f"params: missing key {key} (params.yaml sets every parameter)"


def test_an_empty_params_file_misses_the_first_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("")
    with pytest.raises(ParamError, match=r"^params: missing key seed "):
        load_params(path)


def test_no_value_is_written_in_code():
    """params.yaml is the one source of every value: each model field is required (a `null` in the
    file is a value too), and the models hold exactly the file's keys."""
    models = {**_SECTION_PREFIX, Fp32Gates: "export.fp32.", QuantizedGates: "export.quantized."}
    with_defaults = [
        f"{prefix}{name}"
        for cls, prefix in models.items()
        for name, field in cls.model_fields.items()
        if not field.is_required()
    ]
    assert not with_defaults
    in_models = {f"{prefix}{leaf}" for cls, prefix in _SECTION_PREFIX.items() for leaf in _LEAVES[cls]}
    assert in_models == set(flat(repo_params()))


def test_a_section_built_in_code_needs_every_value_and_checks_it():
    data = repo_params()["data"]
    assert DataConfig(**data | {"image_size": 32}).image_size == 32
    with pytest.raises(ParamError, match=r"^params: missing key data.root "):
        DataConfig(image_size=32)
    with pytest.raises(ParamError) as info:
        DataConfig(**data | {"image_size": 31})
    assert str(info.value) == "params: data.image_size=31 is invalid; allowed: an integer >= 32"


def test_sections_are_immutable():
    params = load_params(REPO / "params.yaml")
    with pytest.raises(ValidationError, match="frozen"):
        params.student.width = 1.0  # a stage cannot change what its fingerprint and DVC recorded


def test_reads_after_loading_are_recorded_field_by_field():
    """What tests/test_dvc_contract.py compares with each stage's declared params."""
    params = load_params(REPO / "params.yaml")
    assert read_keys() == set()  # validation reads every field, loading forgets it
    assert params.train is not None and read_keys() == set()  # a section alone is no read
    assert params.seed and params.student.width and params.distributed.world_size
    assert read_keys() == {"seed", "student.width", "distributed.nproc_per_node", "distributed.nnodes"}
    assert as_dict(params.kd).keys() == {"targets", "temperature", "alpha", "views", "ensemble"}
    assert {"kd.temperature", "kd.alpha", "kd.views", "kd.ensemble"} <= read_keys()
    params.qat.recipe()
    assert {"qat.epochs", "qat.lr", "qat.freeze_bn_epoch", "qat.freeze_observer_epoch"} <= read_keys()
    assert "qat.act16_share" not in read_keys()
    load_params(REPO / "params.yaml")
    assert read_keys() == set()


# Keys the docs quote as the value in force wherever they give one; for other keys only a parenthesised
# quote counts ("`ptq.calibration_images` (2048)"): a bare one may name an experiment's value
# ("`kd.temperature` 2 did not help").
ALWAYS_QUOTED = ("export.quantized.min_agreement", "kd.views")


def doc_quotes(text: str, keys: list[str]) -> list[tuple[str, str]]:
    """(key, value) of "`kd.views` (20", "`kd.views` (default `20`", "`kd.views` = 20", "`kd.views` 20"."""
    names = "|".join(re.escape(k) for k in sorted(keys, key=len, reverse=True))
    value = r"-?\d[\d.]*(?:e-?\d+)?|null|true|false"
    found = re.findall(rf"`({names})`\s*(\(|=)?\s*(?:default\s+)?`?({value})\b", text)
    return [(key, value) for key, opener, value in found if opener == "(" or key in ALWAYS_QUOTED]


def test_the_docs_quote_the_values_params_yaml_sets():
    values = leaves(repo_params())
    quotes = [
        (doc.name, key, value)
        for doc in sorted((REPO / "docs").glob("*.md"))
        for key, value in doc_quotes(doc.read_text(), list(values))
    ]
    assert {key for _, key, _ in quotes} >= {"export.quantized.min_agreement", "ptq.calibration_images"}
    # PyYAML reads 1e-3 as a string: numbers compare as numbers
    read = {
        value: yaml.safe_load(value) if value in ("null", "true", "false") else float(value) for _, _, value in quotes
    }
    wrong = [
        f"{doc}: `{key}` {value}, params.yaml {values[key]}" for doc, key, value in quotes if read[value] != values[key]
    ]
    assert not wrong, wrong
