"""Typed, validated view of params.yaml.

Every stage calls `load_params()` first, so a bad value (`dvc exp run -S student.width=-1`) fails
in one line naming the parameter, the value and what is allowed, before any work starts.
Unknown keys are rejected too, and so are missing ones: the models below declare types and ranges
only, never a value, so params.yaml (which DVC tracks) is the one place every default is written.

Every field read after loading is recorded (`read_keys`): DVC reruns a stage only for the params
its `dvc.yaml` entry declares, and tests/test_dvc_contract.py checks that declaration against what
each stage really read.
"""

import copy
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from edgekd.errors import UserError

TorchvisionTeacher = Literal["resnet18", "mobilenet_v2", "densenet121"]
TorchvisionStudent = Literal[
    "mobilenet_v3_small",
    "mobilenet_v3_small_relu",
    "mobilenet_v3_small_minimal",
    "mobilenet_v3_small_fused",
    "mobilenet_v2",
]
# The network's first layers: torchvision's ImageNet stem, or one for small inputs such as CIFAR's
# 32 px, where the ImageNet stem leaves 1x1 feature maps before the last stage (edgekd.train.models).
Stem = Literal["imagenet", "small"]
# Training augmentations (edgekd.train.augment): the 8 square symmetries + colour jitter for objects
# seen from above (rice grains), a padded crop + left-right flip for upright objects (CIFAR-10), or
# airbench's 2 px reflected shift + flip.
Augmentation = Literal["dihedral", "crop_flip", "flip_translate"]
# A training recipe's optimizer and lr schedule (edgekd.train.engine.make_optimizer).
Optimizer = Literal["adamw_onecycle", "nesterov_triangle"]
# The arithmetic of training steps (not of QAT, evaluation or export): float32, or bfloat16 autocast
# (convs and matmuls in bfloat16, ~3x faster on CPUs with AMX, slower on those without).
Precision = Literal["float32", "bfloat16"]
# What the teachers label (edgekd.train.soft_targets): `kd.views` augmented copies of the training
# set, or each training image once, their logits averaged over it and its mirror (flip_mean).
SoftTargets = Literal["views", "flip_mean"]
Device = Literal["auto", "cpu", "cuda"]
# How the student stages combine the teachers' stored logits (soft_targets keeps each teacher's):
# plain mean, or per-sample weights from how well each teacher fits the sample's true label
# (losses.confidence_weights).
Ensemble = Literal["mean", "confidence"]

TEACHER_ARCHS: tuple[str, ...] = get_args(TorchvisionTeacher)
STUDENT_ARCHS: tuple[str, ...] = get_args(TorchvisionStudent)

# The compact conv-BN-ReLU family (edgekd.train.models.ConvNet), teacher or student alike, named by its
# shape as WRN-28-10 is: `convnet_d<convs per stage>_<width of stage 1>_<stage 2>_...`, e.g.
# convnet_d2_64_128_128 (airbench93's shape). A name, so that teachers of one family are stage keys.
CONVNET = re.compile(r"convnet_d([1-9]\d*)((?:_[1-9]\d*)+)")
CONVNET_FORM = "convnet_d<depth>_<width>_<width>... (e.g. convnet_d2_64_128_128)"
WHITEN_KERNEL = 2  # a convnet's whitening first conv: 2x2 patches of 3 channels, 12 directions


def convnet_shape(arch: str) -> tuple[int, tuple[int, ...]] | None:
    """(convs per stage, stage widths) of a convnet arch name; None for any other name."""
    match = CONVNET.fullmatch(arch)
    if match is None:
        return None
    return int(match.group(1)), tuple(int(w) for w in match.group(2).split("_")[1:])


def _arch(allowed: tuple[str, ...], key: str):
    def check(value: str) -> str:
        _require(
            value in allowed or convnet_shape(value) is not None,
            key,
            value,
            f"one of {list(allowed)} or {CONVNET_FORM}",
        )
        return value

    return AfterValidator(check)


TeacherArch = Annotated[str, _arch(TEACHER_ARCHS, "teachers.archs")]
StudentArch = Annotated[str, _arch(STUDENT_ARCHS, "student.arch")]
STEMS: tuple[str, ...] = get_args(Stem)
AUGMENTATIONS: tuple[str, ...] = get_args(Augmentation)
DEVICES: tuple[str, ...] = get_args(Device)
ENSEMBLES: tuple[str, ...] = get_args(Ensemble)

Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
AtLeastOne = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
Share = Annotated[float, Field(ge=0, le=1)]


class ParamError(UserError, ValueError):
    """A params.yaml value is missing, of the wrong type or out of range."""


_READ: set[str] = set()  # "section.key" of every field read since the params were loaded


def read_keys() -> set[str]:
    """Dotted params keys read since the last `load_params` (e.g. {"seed", "train.threads"})."""
    return set(_READ)


# Every params mapping: no unknown key, values of exactly their type, no NaN, read-only once loaded.
STRICT = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class _Section(BaseModel):
    """A params.yaml mapping: every key required, none unknown, values of exactly their type.

    Reading a field records its dotted key in `_READ`; reading a section (`params.train`) records
    nothing, reading its fields, one by one or all at once with `as_dict`, records each of them.
    """

    model_config = STRICT

    def __init__(self, **values: Any) -> None:  # built in code: the same one-line errors
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise _param_error(err, type(self)) from None

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if name in _LEAVES.get(type(self), ()):
            _READ.add(_SECTION_PREFIX[type(self)] + name)
        return value


class DataConfig(_Section):
    root: str  # any ImageFolder tree (class folders of images)
    split_seed: Seed  # the train/val/test split alone: a new training seed never re-splits
    image_size: Annotated[int, Field(ge=32)]  # square side in px that every model sees
    val_fraction: Annotated[float, Field(gt=0, lt=1)]  # model selection / early stopping
    test_fraction: Annotated[float, Field(gt=0, lt=1)]  # touched only by final evaluation
    near_duplicate_bits: Annotated[int, Field(ge=0, le=32)]  # max pHash distance of near-duplicates
    max_image_pixels: Annotated[int, Field(ge=1024)]  # decompression-bomb guard, per image
    cache_limit_mb: AtLeastOne  # refuse to build a decoded cache larger than this

    @model_validator(mode="after")
    def _leaves_images_to_train_on(self) -> "DataConfig":
        _require(
            self.val_fraction + self.test_fraction < 1,
            "data.val_fraction + data.test_fraction",
            self.val_fraction + self.test_fraction,
            "a sum < 1 (something must be left to train on)",
        )
        return self


class TrainConfig(_Section):
    device: Device  # auto = CUDA when present, else CPU
    threads: AtLeastOne  # torch intra-op threads on CPU
    batch_size: AtLeastOne
    eval_batch_size: AtLeastOne
    weight_decay: Annotated[float, Field(ge=0)]
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]
    patience: NonNegative  # early stopping on val accuracy; 0 = off
    augment: Augmentation
    max_steps_per_epoch: Annotated[int | None, Field(ge=1)]  # null = the whole train split every epoch
    optimizer: Optimizer
    momentum: Annotated[float, Field(ge=0, lt=1)]  # Nesterov momentum (nesterov_triangle)
    bn_bias_lr_scale: Positive  # BN biases learn at this multiple of the lr
    lr_end: Annotated[float, Field(ge=0, le=1)]  # nesterov_triangle: the last step's lr as a fraction of the peak
    ema_decay: Annotated[float, Field(ge=0, lt=1)]  # per-step decay of the weight average; 0 = none
    lookahead: bool  # pull the trained weights toward their running average every few steps (airbench's)
    precision: Precision
    norm_after_pool: bool  # convnets: train each stage's first block as conv -> max-pool -> BN -> ReLU
    alternating_flip: bool  # each image mirrored in every other epoch instead of at random (airbench's)

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> "TrainConfig":
        _require(
            self.optimizer != "nesterov_triangle" or self.momentum > 0,
            "train.momentum",
            self.momentum,
            "> 0 with train.optimizer nesterov_triangle (Nesterov steps need momentum)",
        )
        return self

    @model_validator(mode="after")
    def _alternating_flip_needs_flips(self) -> "TrainConfig":
        _require(
            not self.alternating_flip or self.augment in ("crop_flip", "flip_translate"),
            "train.alternating_flip",
            self.alternating_flip,
            f"false with train.augment {self.augment} (it has no left-right flip to alternate)",
        )
        return self


class DistributedConfig(_Section):
    """Data-parallel training with torchrun (edgekd.train.distributed): teachers and students."""

    nproc_per_node: AtLeastOne  # training processes on each machine (one per GPU); 1 = no torchrun
    nnodes: AtLeastOne  # machines, each running the same stage command
    rdzv_endpoint: Annotated[str, Field(pattern=r"^[\w.\-]+:\d+$", description="host:port")]

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


class TeachersConfig(_Section):
    archs: Annotated[tuple[TeacherArch, ...], Field(min_length=1, strict=False)]  # a YAML list
    epochs: AtLeastOne
    lr: Positive
    # A stem per torchvision teacher: at 32 px a small stem costs mobilenet_v2 1.4x its ImageNet stem's
    # time per image, resnet18 ~7x and densenet121 ~20x, so each teacher chooses its own (a convnet
    # has one stem, its whitening conv).
    stems: dict[TorchvisionTeacher, Stem]

    @model_validator(mode="after")
    def _a_stem_per_teacher(self) -> "TeachersConfig":
        for arch in self.archs:
            if convnet_shape(arch) is None:
                _require(arch in self.stems, f"teachers.stems.{arch}", None, f"one of {list(STEMS)}")
        _require(len(set(self.archs)) == len(self.archs), "teachers.archs", list(self.archs), "distinct names")
        return self

    def stem(self, arch: str) -> Stem:
        """A teacher's stem: its entry in `stems`, or a convnet's one stem (its whitening conv)."""
        return "small" if convnet_shape(arch) is not None else self.stems[arch]


class StudentConfig(_Section):
    arch: StudentArch
    width: Annotated[float, Field(gt=0, le=4)]  # MobileNet width multiplier
    stem: Stem
    epochs: AtLeastOne
    lr: Positive
    # Input side in px; null = data.image_size. Smaller sides trade accuracy for latency without
    # retraining the teachers: the student sees the teachers' views downscaled.
    image_size: Annotated[int | None, Field(ge=16)]
    # Student training alone (initialisation, batch order, QAT): apart from `seed`, which also drives
    # the teachers and the views they label, so a sweep over it never reruns a teacher.
    seed: Seed


class KDConfig(_Section):
    targets: SoftTargets
    temperature: Positive
    alpha: Share  # weight of the KD term; 0 = plain cross-entropy
    views: AtLeastOne  # augmented copies of the training set the teachers label once (soft_targets)
    ensemble: Ensemble


class QATConfig(_Section):
    epochs: AtLeastOne
    lr: Positive
    freeze_bn_epoch: NonNegative  # from this epoch on, BN running statistics stay fixed
    # From this epoch on, quantization ranges stay fixed: observers see at least one epoch of data.
    freeze_observer_epoch: AtLeastOne
    # Layer-wise mixed precision (stage allocate_bits): the average weight bits over all layers, and
    # whether the first and last layers keep 8 bits whatever their sensitivity.
    avg_weight_bits: Annotated[float, Field(ge=4, le=8)]
    keep_first_last_8bit: bool
    act16_share: Share  # mixed 16/8: the share of layers whose outputs keep 16 bits

    def recipe(self) -> dict:
        """The fields the QAT training itself reads (not the bit allocation's): its fingerprint."""
        return {
            "epochs": self.epochs,
            "lr": self.lr,
            "freeze_bn_epoch": self.freeze_bn_epoch,
            "freeze_observer_epoch": self.freeze_observer_epoch,
        }


class PTQConfig(_Section):
    calibration_images: AtLeastOne  # unaugmented train images the observers see: a class-stratified random sample


class _Gates(BaseModel):
    """A group of export gates: one params key to DVC (`export.fp32`, `export.quantized`), so each
    `export@<model>` declares exactly the gates its kind of file is checked by."""

    model_config = STRICT


class Fp32Gates(_Gates):
    parity_atol: Positive  # max |logit| difference FP32 ONNX vs torch


class QuantizedGates(_Gates):
    # vs the reference (the integer torch model; the fake-quant one for 16-bit activations); how
    # both were sized: docs/int8.md#export-checks
    max_logit_steps: NonNegative  # max |logit| difference, in output steps
    min_agreement: Share  # top-1 agreement on val


class ExportConfig(_Section):
    opset: Annotated[int, Field(ge=13, le=21)]
    fp32: Fp32Gates
    quantized: QuantizedGates


class BenchConfig(_Section):
    threads: AtLeastOne  # onnxruntime intra-op threads for latency
    warmup: NonNegative
    runs: Annotated[int, Field(ge=10)]  # timed batch-1 runs for p50/p90
    batch: AtLeastOne  # batch size for throughput


class Params(_Section):
    seed: Seed  # teachers (each derives its own stream) and the views they label (soft_targets)
    data: DataConfig
    train: TrainConfig
    distributed: DistributedConfig
    teachers: TeachersConfig
    student: StudentConfig
    kd: KDConfig
    qat: QATConfig
    ptq: PTQConfig
    export: ExportConfig
    bench: BenchConfig

    @model_validator(mode="after")
    def _sections_agree(self) -> "Params":
        kd, batch, world = self.kd, self.train.batch_size, self.distributed.world_size
        size = self.data.image_size
        _require(
            kd.ensemble == "mean" or len(self.teachers.archs) >= 2,
            "kd.ensemble",
            kd.ensemble,
            "mean when teachers.archs holds one teacher (weights compare teachers)",
        )
        _require(
            batch % world == 0,
            "train.batch_size",
            batch,
            f"a multiple of the {world} training processes (distributed.*): each takes an equal share of every batch",
        )
        _require(
            self.student_image_size <= size,
            "student.image_size",
            self.student.image_size,
            f"null or <= data.image_size ({size}): students are trained on the cached images",
        )
        for key, arch, side in [
            *(("teachers.archs", arch, size) for arch in self.teachers.archs),
            ("student.arch", self.student.arch, self.student_image_size),
        ]:
            if (shape := convnet_shape(arch)) is not None:
                _require(
                    convnet_output_side(side, len(shape[1])) >= 1,
                    key,
                    arch,
                    f"at most {max_convnet_stages(side)} stages at {side} px (each halves the maps)",
                )
        _require(
            convnet_shape(self.student.arch) is None or self.student.stem == "small",
            "student.stem",
            self.student.stem,
            "small for a convnet student (its one stem: a 2x2 whitening conv)",
        )
        return self

    @property
    def student_image_size(self) -> int:
        return self.student.image_size or self.data.image_size


def convnet_output_side(image_size: int, stages: int) -> int:
    """Side of a convnet's last maps: its whitening conv (no padding) takes WHITEN_KERNEL - 1 pixels,
    each stage halves."""
    side = image_size - (WHITEN_KERNEL - 1)
    for _ in range(stages):
        side //= 2
    return side


def max_convnet_stages(image_size: int) -> int:
    stages = 0
    while convnet_output_side(image_size, stages + 1) >= 1:
        stages += 1
    return stages


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, _Section)


_SECTION_PREFIX: dict[type, str] = {
    Params: "",
    **{f.annotation: f"{name}." for name, f in Params.model_fields.items() if _is_section(f.annotation)},
}
_LEAVES: dict[type, frozenset[str]] = {
    cls: frozenset(name for name, f in cls.model_fields.items() if not _is_section(f.annotation))
    for cls in _SECTION_PREFIX
}


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ParamError(f"params: {name}={value!r} is invalid; allowed: {allowed}")


_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _bounds(field: FieldInfo, name: str) -> tuple[str, bool]:
    """A field's range, e.g. (">= 32", False) or ("0 < width <= 4", True): its text, two-sided or not."""
    lower = [
        (op, v)
        for m in field.metadata
        for op, key in (("<", "gt"), ("<=", "ge"))
        if (v := getattr(m, key, None)) is not None
    ]
    upper = [
        (op, v)
        for m in field.metadata
        for op, key in (("<", "lt"), ("<=", "le"))
        if (v := getattr(m, key, None)) is not None
    ]
    if lower and upper:
        return f"{lower[0][1]} {lower[0][0]} {name} {upper[0][0]} {upper[0][1]}", True
    if lower:
        return f"{lower[0][0].replace('<', '>')} {lower[0][1]}", False
    if upper:
        return f"{upper[0][0]} {upper[0][1]}", False
    return "", False


def _describe(annotation: Any, field: FieldInfo, name: str, bound_error: bool = False) -> str:
    """What a field allows, in words: "an integer >= 32", "one of ['mean', 'confidence']", ..."""
    if get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation):
        (inner,) = [a for a in get_args(annotation) if a is not type(None)]
        return "null or " + _describe(inner, field, name, bound_error)
    if get_origin(annotation) is Literal:
        return f"one of {list(get_args(annotation))}"
    if get_origin(annotation) is tuple:
        non_empty = "non-empty " if any(getattr(m, "min_length", 0) for m in field.metadata) else ""
        return f"a {non_empty}list, each {_describe(get_args(annotation)[0], FieldInfo(), name)}"
    if get_origin(annotation) is dict:
        keys, values = get_args(annotation)
        return f"a mapping, keys among {list(get_args(keys))}, values {_describe(values, FieldInfo(), name)}"
    if annotation is bool:
        return "true or false"
    if annotation is str:
        return field.description or "a string"
    bounds, two_sided = _bounds(field, name)
    if annotation is int:
        return f"an integer{',' if two_sided else ''} {bounds}".rstrip()
    if bound_error:  # float: the range says it
        return bounds
    return f"a finite number{',' if two_sided else ''} {bounds}".rstrip()


def _param_error(err: ValidationError, model: type[_Section]) -> ParamError:
    """The first of pydantic's errors as one line: the dotted key, the bad value, what is allowed."""
    first = err.errors()[0]
    if isinstance(first.get("ctx", {}).get("error"), ParamError):  # a check across fields
        return first["ctx"]["error"]
    loc, path, field = list(first["loc"]), [_SECTION_PREFIX.get(model, "").rstrip(".")], None
    while loc and field is None:
        name = loc.pop(0)
        path.append(str(name))
        field = model.model_fields.get(name)
        if field is None:
            break
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):  # sections, gates
            model, field = field.annotation, None
    key, value = ".".join(p for p in path if p), first.get("input")
    if first["type"] == "extra_forbidden":
        return ParamError(f"params: unknown key {key}; known: {sorted(model.model_fields)}")
    if first["type"] == "missing":
        return ParamError(f"params: missing key {key} (params.yaml sets every parameter)")
    if field is None:  # a section that is not a mapping
        return ParamError(f"params: {key} must be a mapping, got {value!r}")
    annotation, origin = field.annotation, get_origin(field.annotation)
    if loc and loc[-1] == "[key]":  # a mapping's key: teachers.stems='vgg16'
        keys = list(get_args(get_args(annotation)[0]))
        return ParamError(f"params: {key}={loc[0]!r} is invalid; allowed: keys among {keys}")
    if loc and origin is dict:  # a mapping's value: teachers.stems.resnet18='tiny'
        key, annotation, field = f"{key}.{loc[0]}", get_args(annotation)[1], FieldInfo()
    elif loc and origin is tuple:  # a list's item: teachers.archs='vgg16'
        annotation, field = get_args(annotation)[0], FieldInfo()
    allowed = _describe(annotation, field, path[-1], first["type"] in _BOUND_ERRORS)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # shown as the number it was read as: -1.0
    return ParamError(f"params: {key}={value!r} is invalid; allowed: {allowed}")


def params_from_dict(raw: dict) -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise _param_error(err, Params) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamError(f"params: file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ParamError(f"params: {path} is not valid YAML: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ParamError(f"params: {path} must hold a mapping at top level")
    params = params_from_dict(raw or {})
    _READ.clear()  # validation reads every field; what counts is what the caller reads next
    return params


def as_dict(section: Any) -> dict:
    """Plain dict of a config section, for checkpoints and metrics (records every field as read)."""
    return {
        name: as_dict(v) if isinstance(v := getattr(section, name), BaseModel) else copy.deepcopy(v)
        for name in type(section).model_fields
    }
