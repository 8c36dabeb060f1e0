"""Stage `evaluate@<model>`: test-split accuracy, size, latency and throughput of one exported ONNX file.

One file per stage instance (`foreach`, beside `export@<model>`): a file whose export failed leaves
the others measured. Its confusion matrix and its point of the accuracy-vs-p50 trade-off are plot
files; the `tradeoff` plots draw every model's point in one chart. Runs without torch: numpy reads
the prepared split, onnxruntime runs the file, and a training-code change never reruns it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from edgekd.config import load_params
from edgekd.data.prepared import load_info, read_split
from edgekd.deploy.metadata import read_metadata
from edgekd.deploy.sessions import make_runner
from edgekd.errors import UserError
from edgekd.eval.inputs import ArrayInputs
from edgekd.eval.latency import measure_speed
from edgekd.eval.metrics import classification_metrics, predict_all
from edgekd.parallel import whole_machine
from edgekd.plot_files import write_csv
from edgekd.runtime import run_stage, write_metrics

log = logging.getLogger("edgekd")

HEADLINE = ("accuracy", "size_bytes", "latency_p50_ms")  # test accuracy, file size, batch-1 p50


def measure(path: Path, images, labels: np.ndarray, classes: list[str], bench) -> tuple[dict, np.ndarray]:
    """Metrics of one ONNX file on onnxruntime (plus OpenVINO latency for the record)."""
    meta = read_metadata(path)
    if meta.classes != classes:
        raise UserError(f"{path}: classes {meta.classes} differ from the prepared data {classes}")
    x = ArrayInputs(images, meta.image_size, meta.mean, meta.std)
    run = make_runner(path, "onnxruntime", bench.threads)
    logits = predict_all(run, x)
    preds = logits.argmax(1)
    m = classification_metrics(labels, preds, classes)
    del m["confusion"]  # written as a dvc plot instead (confusion_<name>.csv)
    # Two views, each image and its mirror, logits averaged: what test-time flip averaging would buy.
    # For the record only: the deployed file runs one view, and `accuracy` is that view's.
    mirrored = predict_all(lambda batch: run(np.ascontiguousarray(batch[..., ::-1])), x)
    m["accuracy_flip"] = float(((logits + mirrored).argmax(1) == labels).mean())
    m.update(size_bytes=path.stat().st_size, params=meta.params, **measure_speed(path, x, bench))
    return m, preds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="prepared-data folder (test split)")
    parser.add_argument(
        "--model",
        nargs=2,
        required=True,
        metavar=("NAME", "ONNX"),
        help="name (fp32, int8, baseline, ...) and ONNX file",
    )
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--plots", required=True, help="folder for confusion_<name>.csv, tradeoff/<name>.csv")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    p = load_params(args.params)
    images, labels = read_split(args.data, "test")
    classes = load_info(args.data).classes
    name, path = args.model
    with whole_machine():  # latency of one model at a time, never beside another experiment's stage
        result, pred = measure(Path(path), images, labels, classes, p.bench)
    log.info(
        "evaluate %s: acc %.4f p50 %.3f ms size %d B",
        name,
        result["accuracy"],
        result["latency_p50_ms"],
        result["size_bytes"],
    )
    plots = Path(args.plots)
    write_csv(
        plots / f"confusion_{name}.csv",
        ["actual", "predicted"],
        [(classes[a], classes[b]) for a, b in zip(labels, pred)],
    )
    write_csv(plots / "recall" / f"{name}.csv", ["class", "recall"], list(result.pop("per_class_recall").items()))
    # The figures a user decides by are the metrics; every other one is a column of the trade-off row.
    headline = {key: result.pop(key) for key in HEADLINE}
    write_csv(
        plots / "tradeoff" / f"{name}.csv",
        ["model", *HEADLINE, *result],
        [(name, *headline.values(), *result.values())],
    )
    write_metrics(args.metrics, headline)


if __name__ == "__main__":
    run_stage(main)
