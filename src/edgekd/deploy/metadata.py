"""What makes an exported file self-describing: its preprocessing (classes, input size, mean/std,
resize rule) and origin as ONNX metadata, written at export and read by every consumer, so that
`predict` and `evaluate` never guess. Imports neither torch nor torchvision.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import onnx

from edgekd.data.images import RESIZE_METHOD
from edgekd.errors import UserError

INPUT_NAME, OUTPUT_NAME = "input", "logits"
REQUIRED_METADATA = ("classes", "image_size", "mean", "std", "resize")
EXPORT_CHECKS = "export_checks"  # metadata key: the checks the file passed at export (JSON)


@dataclass(frozen=True)
class ModelMeta:
    """Everything inference needs besides the weights; stored as ONNX metadata_props."""

    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    resize: str = RESIZE_METHOD
    arch: str = ""
    width: float = 0.0
    stem: str = ""
    precision: str = "fp32"
    params: int = 0  # parameter count of the FP32 network (INT8 initializers add scales)

    def to_props(self) -> dict[str, str]:
        return {
            "classes": json.dumps(self.classes),
            "image_size": str(self.image_size),
            "mean": json.dumps(self.mean),
            "std": json.dumps(self.std),
            "resize": self.resize,
            "arch": self.arch,
            "width": str(self.width),
            "stem": self.stem,
            "precision": self.precision,
            "params": str(self.params),
        }


def read_metadata(path: str | Path) -> ModelMeta:
    """Parse and validate the metadata of an ONNX file; a file without it is refused, not guessed."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf decode errors have many types
        raise UserError(f"{path}: not a readable ONNX model ({type(err).__name__})") from None
    props = {p.key: p.value for p in model.metadata_props}
    missing = [k for k in REQUIRED_METADATA if k not in props]
    if missing:
        raise UserError(
            f"{path}: ONNX metadata lacks {missing}; export it with `python -m "
            "stages.export` so preprocessing is not guessed"
        )
    try:
        meta = ModelMeta(
            classes=[str(c) for c in json.loads(props["classes"])],
            image_size=int(props["image_size"]),
            mean=[float(v) for v in json.loads(props["mean"])],
            std=[float(v) for v in json.loads(props["std"])],
            resize=props["resize"],
            arch=props.get("arch", ""),
            width=float(props.get("width", 0) or 0),
            stem=props.get("stem", ""),
            precision=props.get("precision", ""),
            params=int(props.get("params", 0) or 0),
        )
    except (ValueError, TypeError) as err:
        raise UserError(f"{path}: malformed ONNX metadata ({err})") from None
    if meta.resize != RESIZE_METHOD:
        raise UserError(f"{path}: unknown resize rule {meta.resize!r}; this code implements {RESIZE_METHOD!r}")
    if len(meta.mean) != 3 or len(meta.std) != 3 or min(meta.std) <= 0 or meta.image_size < 1 or not meta.classes:
        raise UserError(f"{path}: ONNX metadata out of range (need 3 mean, 3 positive std, classes)")
    return meta


def meta_from_checkpoint(payload: dict, precision: str, params: int) -> ModelMeta:
    """Metadata from a checkpoint's own preprocessing fields (the contract in
    edgekd.train.checkpoints.model_payload)."""
    spec = payload["model"]
    return ModelMeta(
        classes=list(payload["classes"]),
        image_size=int(payload["image_size"]),
        mean=list(payload["mean"]),
        std=list(payload["std"]),
        arch=spec["arch"],
        width=float(spec["width"]),
        stem=spec["stem"],
        precision=precision,
        params=params,
    )


def attach_export_checks(path: str | Path, checks: dict) -> None:
    """Record in the file the checks it passed at export (parity with torch on val, integer kernels,
    opset): a file carries its own evidence, and `read_export_checks` gives it back."""
    path = Path(path)
    model = onnx.load(str(path))
    onnx.helper.set_model_props(
        model, {**{p.key: p.value for p in model.metadata_props}, EXPORT_CHECKS: json.dumps(checks, sort_keys=True)}
    )
    tmp_path = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp_path))
    tmp_path.replace(path)


def read_export_checks(path: str | Path) -> dict:
    """The checks an exported file passed (`attach_export_checks`)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
        return json.loads({p.key: p.value for p in model.metadata_props}[EXPORT_CHECKS])
    except KeyError:
        raise UserError(f"{path}: no {EXPORT_CHECKS} metadata; export it with `python -m stages.export`") from None
    except Exception as err:  # protobuf decode errors have many types
        raise UserError(f"{path}: not a readable ONNX model ({type(err).__name__})") from None
