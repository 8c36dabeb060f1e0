"""params.yaml validation: every bad value fails with one line naming the parameter and what is allowed."""

from pathlib import Path

import pytest
import yaml

from edgekd.config import KDConfig, ParamError, Params, as_dict, load_params, params_from_dict

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
        loaded = as_dict(getattr(params, section))
        for key, value in values.items():
            assert loaded[key] == (tuple(value) if isinstance(value, list) else value), f"{section}.{key}"


def test_a_value_in_the_file_replaces_the_dataclass_default(tmp_path):
    raw = with_override("kd.views", KDConfig().views + 3)
    raw["teachers"]["archs"] = ["densenet121"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    params = load_params(path)
    assert params.kd.views == KDConfig().views + 3 and params.teachers.archs == ("densenet121",)


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
        ("train.max_steps_per_epoch", 0, "null or >= 1"),
        ("student.width", "wide", "a finite number"),
        ("student.epochs", 2.5, "an integer"),
        ("data.val_fraction", 1.2, "0 < x < 1"),
        ("student.image_size", 8, "null or an integer >= 16"),
        ("student.image_size", 96, "null or <= data.image_size (64)"),
        ("student.image_size", "big", "an integer"),
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
