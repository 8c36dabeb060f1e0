"""Classification metrics of a model's predictions, and its predictions over a whole split."""

from __future__ import annotations

import numpy as np

from edgekd.deploy.sessions import Runner


def classification_metrics(labels: np.ndarray, preds: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro-F1, per-class recall and the confusion matrix (rows = actual), numpy only.

    A class never predicted and never present scores F1 0 and counts in the macro mean, so a model
    that ignores a class is not flattered.
    """
    k = len(classes)
    confusion = np.bincount(labels * k + preds, minlength=k * k).reshape(k, k)  # (actual, predicted)
    tp = np.diag(confusion).astype(np.float64)
    actual, predicted = confusion.sum(1), confusion.sum(0)
    recall = np.divide(tp, actual, out=np.zeros(k), where=actual > 0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    return {
        "accuracy": float(tp.sum() / max(1, len(labels))),
        "macro_f1": float(f1.mean()),
        "per_class_recall": dict(zip(classes, recall.round(6).tolist())),
        "confusion": confusion.tolist(),
    }


def predict_all(run: Runner, x, batch: int = 256) -> np.ndarray:
    """Logits (N, C) for float inputs (N, 3, H, W) (an array or `ModelInputs`), in batches (the files
    have a dynamic batch axis)."""
    return np.concatenate([run(np.asarray(x[i : i + batch])) for i in range(0, len(x), batch)])
