"""Latency measurement and the numpy classification metrics used by `evaluate`."""

from __future__ import annotations

import time

import numpy as np
import pytest

from src.edgekd.bench import classification_metrics, make_runner, measure_latency, measure_throughput
from src.edgekd.errors import UserError


def test_latency_counts_runs_excludes_warmup_and_orders_percentiles():
    calls = []
    delays = iter([0.0] * 5 + [0.001] * 18 + [0.006] * 2)  # 5 warm-up, 20 timed: 2 slow outliers

    def run(x):
        calls.append(x)
        time.sleep(next(delays))
        return x

    lat = measure_latency(run, np.zeros(1), warmup=5, runs=20)
    assert len(calls) == 25 and lat.runs == 20
    assert 0.9 <= lat.p50_ms < 5.0  # the median ignores the two 6 ms outliers
    assert lat.p50_ms <= lat.p90_ms and lat.mean_ms > lat.p50_ms


def test_throughput_is_batch_over_median_time():
    ips = measure_throughput(lambda x: time.sleep(0.002), np.zeros((8, 3)), warmup=1, runs=10)
    assert 8 / 0.004 < ips <= 8 / 0.002


def test_classification_metrics_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    preds = np.array([0, 0, 1, 1, 1, 1])
    m = classification_metrics(labels, preds, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion"] == [[2, 1, 0], [0, 2, 0], [0, 1, 0]]
    assert m["per_class_recall"] == {"a": pytest.approx(2 / 3), "b": 1.0, "c": 0.0}
    f1_a = 2 * 1.0 * (2 / 3) / (1 + 2 / 3)
    f1_b = 2 * 0.5 * 1.0 / 1.5
    assert m["macro_f1"] == pytest.approx((f1_a + f1_b + 0.0) / 3)


def test_unknown_runtime_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="bench.runtime"):
        make_runner(tmp_path / "m.onnx", "tensorrt")
