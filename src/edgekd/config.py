"""Typed, validated view of params.yaml.

Every stage calls `load_params()` first, so a bad value (`dvc exp run -S student.width=-1`) fails
in one line naming the parameter, the value and what is allowed, before any work starts.
Unknown keys are rejected too: a typo must not silently fall back to a default.

Every field read after loading is recorded (`read_keys`): DVC reruns a stage only for the params
its `dvc.yaml` entry declares, and tests/test_dvc_contract.py checks that declaration against what
each stage really read.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from edgekd.errors import UserError

TEACHER_ARCHS = ("resnet18", "mobilenet_v2", "densenet121")
STUDENT_ARCHS = ("mobilenet_v3_small", "mobilenet_v3_small_relu", "mobilenet_v3_small_minimal",
                 "mobilenet_v3_small_fused", "mobilenet_v2")
# The network's first layers: torchvision's ImageNet stem, or one for small inputs such as CIFAR's
# 32 px, where the ImageNet stem leaves 1x1 feature maps before the last stage (edgekd.train.models).
STEMS = ("imagenet", "small")
# Training augmentations (edgekd.train.augment): the 8 square symmetries + colour jitter for objects
# seen from above (rice grains), a padded crop + left-right flip for upright objects (CIFAR-10).
AUGMENTATIONS = ("dihedral", "crop_flip")
DEVICES = ("auto", "cpu", "cuda")
# How the student stages combine the teachers' stored logits (soft_targets keeps each teacher's):
# plain mean, or per-sample weights from how well each teacher fits the sample's true label
# (losses.confidence_weights).
ENSEMBLES = ("mean", "confidence")


class ParamError(UserError, ValueError):
    """A params.yaml value is missing, of the wrong type or out of range."""


_READ: set[str] = set()  # "section.key" of every field read since the params were loaded


class _Recorded:
    """Mixin of the params dataclasses: reading a field records its dotted key in `_READ`.

    Reading a section (`params.train`) records nothing; reading its fields, one by one or all at
    once with `as_dict`, records each of them.
    """

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        prefix = _SECTION_PREFIX.get(type(self))
        if prefix is not None and name in _LEAVES[type(self)]:
            _READ.add(prefix + name)
        return value


def read_keys() -> set[str]:
    """Dotted params keys read since the last `load_params` (e.g. {"seed", "train.threads"})."""
    return set(_READ)


@dataclass(frozen=True)
class DataConfig(_Recorded):
    root: str = "data/rice-demo"  # any ImageFolder tree (class folders of images)
    split_seed: int = 42  # the train/val/test split alone: a new training seed never re-splits
    image_size: int = 64  # square side in px that every model sees; rice grains need no 224
    val_fraction: float = 0.15  # for model selection / early stopping
    test_fraction: float = 0.2  # touched only by final evaluation
    near_duplicate_bits: int = 4  # max perceptual-hash Hamming distance grouped as near-duplicates
    max_image_pixels: int = 40_000_000  # decompression-bomb guard, per image
    cache_limit_mb: int = 4096  # refuse to build a decoded cache larger than this

    def check(self) -> None:
        _require(0 <= self.split_seed < 2**32, "data.split_seed", self.split_seed, "an integer in 0..2**32-1")
        _require(self.image_size >= 32, "data.image_size", self.image_size, "an integer >= 32")
        _require(0 < self.val_fraction < 1, "data.val_fraction", self.val_fraction, "0 < x < 1")
        _require(0 < self.test_fraction < 1, "data.test_fraction", self.test_fraction, "0 < x < 1")
        _require(
            self.val_fraction + self.test_fraction < 1,
            "data.val_fraction + data.test_fraction",
            self.val_fraction + self.test_fraction,
            "a sum < 1 (something must be left to train on)",
        )
        _require(0 <= self.near_duplicate_bits <= 32, "data.near_duplicate_bits",
                 self.near_duplicate_bits, "0..32")
        _require(self.max_image_pixels >= 1024, "data.max_image_pixels", self.max_image_pixels,
                 ">= 1024")
        _require(self.cache_limit_mb >= 1, "data.cache_limit_mb", self.cache_limit_mb, ">= 1")


@dataclass(frozen=True)
class TrainConfig(_Recorded):
    device: str = "auto"  # auto = CUDA when present, else CPU
    threads: int = 2  # torch intra-op threads on CPU
    batch_size: int = 64
    eval_batch_size: int = 256
    weight_decay: float = 0.05
    label_smoothing: float = 0.1  # as in the seed framework
    patience: int = 0  # early stopping on val accuracy; 0 = off
    augment: str = "dihedral"  # one of AUGMENTATIONS (edgekd.train.augment)
    max_steps_per_epoch: int | None = None  # None = the whole train split every epoch

    def check(self) -> None:
        _require(self.device in DEVICES, "train.device", self.device, f"one of {list(DEVICES)}")
        _require(self.threads >= 1, "train.threads", self.threads, ">= 1")
        _require(self.batch_size >= 1, "train.batch_size", self.batch_size, ">= 1")
        _require(self.eval_batch_size >= 1, "train.eval_batch_size", self.eval_batch_size, ">= 1")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, ">= 0")
        _require(0 <= self.label_smoothing < 1, "train.label_smoothing", self.label_smoothing,
                 "0 <= x < 1")
        _require(self.patience >= 0, "train.patience", self.patience, ">= 0")
        _require(self.augment in AUGMENTATIONS, "train.augment", self.augment, f"one of {list(AUGMENTATIONS)}")
        _require(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1, "train.max_steps_per_epoch",
                 self.max_steps_per_epoch, "null or >= 1")


@dataclass(frozen=True)
class DistributedConfig(_Recorded):
    """Data-parallel training with torchrun (edgekd.train.distributed): teachers and students."""

    nproc_per_node: int = 1  # training processes on each machine (one per GPU); 1 = no torchrun
    nnodes: int = 1  # machines, each running the same stage command
    rdzv_endpoint: str = "localhost:29500"  # host:port on the first machine, when nnodes > 1

    def check(self) -> None:
        _require(self.nproc_per_node >= 1, "distributed.nproc_per_node", self.nproc_per_node, ">= 1")
        _require(self.nnodes >= 1, "distributed.nnodes", self.nnodes, ">= 1")
        _require(bool(re.fullmatch(r"[\w.\-]+:\d+", self.rdzv_endpoint)), "distributed.rdzv_endpoint",
                 self.rdzv_endpoint, "host:port")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


@dataclass(frozen=True)
class TeachersConfig(_Recorded):
    archs: tuple[str, ...] = TEACHER_ARCHS
    epochs: int = 10
    lr: float = 0.003
    # One of STEMS per teacher: at 32 px a small stem costs mobilenet_v2 1.4x its ImageNet stem's
    # time per image, resnet18 ~7x and densenet121 ~20x, so each teacher chooses its own.
    stems: dict[str, str] = field(default_factory=lambda: dict.fromkeys(TEACHER_ARCHS, "imagenet"))

    def check(self) -> None:
        _require(len(self.archs) >= 1, "teachers.archs", list(self.archs), "at least one name")
        for arch in self.archs:
            _require(arch in TEACHER_ARCHS, "teachers.archs", arch, f"one of {list(TEACHER_ARCHS)}")
            _require(arch in self.stems, f"teachers.stems.{arch}", None, f"one of {list(STEMS)}")
        for arch, stem in self.stems.items():
            _require(arch in TEACHER_ARCHS, "teachers.stems", arch, f"keys among {list(TEACHER_ARCHS)}")
            _require(stem in STEMS, f"teachers.stems.{arch}", stem, f"one of {list(STEMS)}")
        _require(self.epochs >= 1, "teachers.epochs", self.epochs, ">= 1")
        _require(self.lr > 0, "teachers.lr", self.lr, "> 0")


@dataclass(frozen=True)
class StudentConfig(_Recorded):
    arch: str = "mobilenet_v3_small_fused"  # integer-fast ops: INT8 faster than FP32 in onnxruntime
    width: float = 0.25  # MobileNet width multiplier
    stem: str = "imagenet"  # one of STEMS
    epochs: int = 20
    lr: float = 0.005
    # Input side in px; None = data.image_size. Smaller sides trade accuracy for latency without
    # retraining the teachers: the student sees the teachers' views downscaled.
    image_size: int | None = None
    # Student training alone (initialisation, batch order, QAT): apart from `seed`, which also drives
    # the teachers and the views they label, so a sweep over it never reruns a teacher.
    seed: int = 42

    def check(self) -> None:
        _require(0 <= self.seed < 2**32, "student.seed", self.seed, "an integer in 0..2**32-1")
        _require(self.arch in STUDENT_ARCHS, "student.arch", self.arch,
                 f"one of {list(STUDENT_ARCHS)}")
        _require(self.stem in STEMS, "student.stem", self.stem, f"one of {list(STEMS)}")
        _require(0 < self.width <= 4, "student.width", self.width, "0 < width <= 4")
        _require(self.image_size is None or self.image_size >= 16, "student.image_size", self.image_size,
                 "null or an integer >= 16")
        _require(self.epochs >= 1, "student.epochs", self.epochs, ">= 1")
        _require(self.lr > 0, "student.lr", self.lr, "> 0")


@dataclass(frozen=True)
class KDConfig(_Recorded):
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the KD term; 0 = plain cross-entropy
    views: int = 8  # augmented copies of the training set the teachers label once (soft_targets)
    ensemble: str = "mean"  # one of ENSEMBLES

    def check(self) -> None:
        _require(self.ensemble in ENSEMBLES, "kd.ensemble", self.ensemble, f"one of {list(ENSEMBLES)}")
        _require(self.temperature > 0, "kd.temperature", self.temperature, "> 0")
        _require(0 <= self.alpha <= 1, "kd.alpha", self.alpha, "0 <= alpha <= 1")
        _require(self.views >= 1, "kd.views", self.views, ">= 1")


@dataclass(frozen=True)
class QATConfig(_Recorded):
    epochs: int = 10
    lr: float = 0.0005
    freeze_bn_epoch: int = 6  # from this epoch on, BN running statistics stay fixed
    freeze_observer_epoch: int = 8  # from this epoch on, quantization ranges stay fixed
    # Layer-wise mixed precision (stage allocate_bits): the average weight bits over all layers, and
    # whether the first and last layers keep 8 bits whatever their sensitivity. 4.25 keeps 1/16 of the
    # weights at 8 bits: the mixed file's bytes are then <= 0.65x the INT8 file's for this student.
    avg_weight_bits: float = 4.25
    keep_first_last_8bit: bool = True
    # Mixed 16/8: the share of layers whose outputs keep 16 bits (largest KL gain first).
    act16_share: float = 0.25

    def recipe(self) -> dict:
        """The fields the QAT training itself reads (not the bit allocation's): its fingerprint."""
        return {"epochs": self.epochs, "lr": self.lr, "freeze_bn_epoch": self.freeze_bn_epoch,
                "freeze_observer_epoch": self.freeze_observer_epoch}

    def check(self) -> None:
        _require(4 <= self.avg_weight_bits <= 8, "qat.avg_weight_bits", self.avg_weight_bits, "4..8")
        _require(0 <= self.act16_share <= 1, "qat.act16_share", self.act16_share, "0..1")
        _require(self.epochs >= 1, "qat.epochs", self.epochs, ">= 1")
        _require(self.lr > 0, "qat.lr", self.lr, "> 0")
        _require(self.freeze_bn_epoch >= 0, "qat.freeze_bn_epoch", self.freeze_bn_epoch, ">= 0")
        # Observers must see at least one epoch of data before their ranges are frozen.
        _require(self.freeze_observer_epoch >= 1, "qat.freeze_observer_epoch",
                 self.freeze_observer_epoch, ">= 1")


@dataclass(frozen=True)
class PTQConfig(_Recorded):
    calibration_images: int = 2048  # train images (unaugmented) the observers see; the first ones, in order

    def check(self) -> None:
        _require(self.calibration_images >= 1, "ptq.calibration_images", self.calibration_images, ">= 1")


@dataclass(frozen=True)
class ExportConfig(_Recorded):
    opset: int = 17
    parity_atol: float = 1e-3  # max |logit| difference FP32 ONNX vs torch
    # INT8 ONNX vs the converted integer torch model: two integer engines on the same integers.
    # They differ only where onnxruntime computes in float what torch computes in integers
    # (HardSigmoid, global average pooling) and in requantization rounding ties: a few steps of the
    # output grid (4-6 measured on the demo student; params.yaml). Other ranges give 20+.
    int8_logit_tolerance_steps: int = 16  # max |logit| difference, in steps of the INT8 output grid
    min_int8_agreement: float = 0.97  # top-1 agreement on val

    def check(self) -> None:
        _require(13 <= self.opset <= 21, "export.opset", self.opset, "13..21")
        _require(self.parity_atol > 0, "export.parity_atol", self.parity_atol, "> 0")
        _require(self.int8_logit_tolerance_steps >= 0, "export.int8_logit_tolerance_steps",
                 self.int8_logit_tolerance_steps, ">= 0")
        _require(0 <= self.min_int8_agreement <= 1, "export.min_int8_agreement",
                 self.min_int8_agreement, "0..1")


@dataclass(frozen=True)
class BenchConfig(_Recorded):
    threads: int = 1  # onnxruntime intra-op threads for latency
    warmup: int = 50
    runs: int = 300  # timed batch-1 runs for p50/p90
    batch: int = 32  # batch size for throughput

    def check(self) -> None:
        _require(self.threads >= 1, "bench.threads", self.threads, ">= 1")
        _require(self.warmup >= 0, "bench.warmup", self.warmup, ">= 0")
        _require(self.runs >= 10, "bench.runs", self.runs, ">= 10")
        _require(self.batch >= 1, "bench.batch", self.batch, ">= 1")


@dataclass(frozen=True)
class Params(_Recorded):
    seed: int = 42  # teachers (each derives its own stream) and the views they label (soft_targets)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    ptq: PTQConfig = field(default_factory=PTQConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)

    def check(self) -> None:
        _require(0 <= self.seed < 2**32, "seed", self.seed, "an integer in 0..2**32-1")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "check"):
                section.check()
        _require(self.kd.ensemble == "mean" or len(self.teachers.archs) >= 2, "kd.ensemble", self.kd.ensemble,
                 "mean when teachers.archs holds one teacher (weights compare teachers)")
        _require(self.train.batch_size % self.distributed.world_size == 0, "train.batch_size", self.train.batch_size,
                 f"a multiple of the {self.distributed.world_size} training processes (distributed.*): "
                 "each takes an equal share of every batch")
        _require(self.student_image_size <= self.data.image_size, "student.image_size", self.student.image_size,
                 f"null or <= data.image_size ({self.data.image_size}): students are trained on the cached images")

    @property
    def student_image_size(self) -> int:
        return self.student.image_size or self.data.image_size


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ParamError(f"params: {name}={value!r} is invalid; allowed: {allowed}")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert a YAML value to the annotated type, or say which parameter is wrong."""
    origin = get_origin(hint)
    if origin is types.UnionType and type(None) in get_args(hint):  # `X | None`
        if value is None:
            return None
        (inner,) = [arg for arg in get_args(hint) if arg is not type(None)]
        return _coerce(name, value, inner)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ParamError(f"params: {name} must be a mapping, got {value!r}")
        return _build(hint, value, prefix=f"{name}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ParamError(f"params: {name}={value!r} is invalid; allowed: a list")
        (item_type, _) = get_args(hint)
        return tuple(_coerce(name, v, item_type) for v in value)
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ParamError(f"params: {name}={value!r} is invalid; allowed: a mapping")
        return {str(k): str(v) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamError(f"params: {name}={value!r} is invalid; allowed: true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(f"params: {name}={value!r} is invalid; allowed: an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ParamError(f"params: {name}={value!r} is invalid; allowed: a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParamError(f"params: {name}={value!r} is invalid; allowed: a string")
        return value
    raise TypeError(f"unsupported annotation {hint!r} for {name}")


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ParamError(f"params: unknown key {prefix}{unknown[0]}; known: {sorted(names)}")
    kwargs = {k: _coerce(f"{prefix}{k}", v, hints[k]) for k, v in raw.items()}
    return cls(**kwargs)


def params_from_dict(raw: dict) -> Params:
    params = _build(Params, raw or {})
    params.check()
    return params


_SECTION_PREFIX: dict[type, str] = {Params: "", **{
    hint: f"{name}." for name, hint in get_type_hints(Params).items() if dataclasses.is_dataclass(hint)}}
_LEAVES: dict[type, frozenset[str]] = {
    cls: frozenset(name for name, hint in get_type_hints(cls).items() if not dataclasses.is_dataclass(hint))
    for cls in _SECTION_PREFIX}


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
    """Plain dict of a config section, for checkpoints and metrics."""
    return dataclasses.asdict(section)
