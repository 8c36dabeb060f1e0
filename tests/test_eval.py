"""edgekd.eval: latency measurement and the numpy classification metrics used by `evaluate`."""

from __future__ import annotations

import numpy as np
import pytest

from edgekd.deploy.sessions import make_runner
from edgekd.errors import UserError
from edgekd.eval import latency
from edgekd.eval.latency import measure_latency, measure_throughput
from edgekd.eval.metrics import classification_metrics


class _FakeClock:
    """Stands in for the `time` module inside edgekd.eval.latency: `perf_counter_ns` reads a counter
    that only the fake model advances, by the duration scripted for each of its calls."""

    def __init__(self, durations_ms):
        self.now_ns = 0
        self.durations_ns = iter(round(d * 1_000_000) for d in durations_ms)
        self.calls = []

    def perf_counter_ns(self) -> int:
        return self.now_ns

    def run(self, x):
        self.calls.append(x)
        self.now_ns += next(self.durations_ns)
        return x


def test_latency_excludes_warmup_and_takes_percentiles_of_the_timed_calls(monkeypatch):
    # 5 warm-up calls of 100 ms (must be discarded), then 20 timed: 16 x 1 ms, 2 x 3 ms, 2 x 11 ms
    clock = _FakeClock([100.0] * 5 + [1.0] * 8 + [11.0, 3.0] + [1.0] * 8 + [3.0, 11.0])
    monkeypatch.setattr(latency, "time", clock)
    lat = measure_latency(clock.run, np.zeros(1), warmup=5, runs=20)
    assert len(clock.calls) == 25 and lat.runs == 20
    # sorted: 16 x 1, 2 x 3, 2 x 11; numpy's linear percentile: p50 = 1, p90 at rank 17.1 = 3 + 0.1 * 8
    assert lat.p50_ms == pytest.approx(1.0)
    assert lat.p90_ms == pytest.approx(3.8)
    assert lat.mean_ms == pytest.approx((16 * 1 + 2 * 3 + 2 * 11) / 20)  # 2.2 ms; warm-up would add 25 ms


def test_throughput_is_batch_over_median_batch_time(monkeypatch):
    # 1 warm-up call of 50 ms, then 10 timed batches: median 4 ms despite a 2 ms and a 40 ms outlier
    clock = _FakeClock([50.0, 2.0, 4.0, 4.0, 40.0, 4.0, 4.0, 4.0, 4.0, 4.0, 5.0])
    monkeypatch.setattr(latency, "time", clock)
    ips = measure_throughput(clock.run, np.zeros((8, 3)), warmup=1, runs=10)
    assert len(clock.calls) == 11
    assert ips == pytest.approx(8 / 0.004)  # 2000 images/s; the mean (7.3 ms) would give ~1096


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
