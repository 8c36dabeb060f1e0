"""tools/formatting.py: the one formatter behind the benchmark report, the PR report and the studies."""

from tools import formatting as fmt
from tools.benchmark.report import markdown_table
from tools.pr_report.diff import MetricChange, format_change


def test_each_quantity_has_one_unit():
    assert fmt.metric("accuracy", 0.99804) == "99.80 %"
    assert fmt.metric("test.val_acc", 0.5) == "50.00 %"
    assert fmt.metric("int8.top1_agreement", 0.97) == "97.00 %"
    assert fmt.metric("size_bytes", 130250) == "0.130 MB"
    assert fmt.metric("fp32_size_bytes", 48000) == "48.0 KB"
    assert fmt.metric("params", 1_520_000) == "1.52 M"
    assert fmt.metric("params", 152_300) == "152.3 K"
    assert fmt.metric("params", 15_230) == "15.2 K"
    assert fmt.metric("latency_p50_ms", 1.23456) == "1.235 ms"
    assert fmt.metric("throughput_ips", 12345.6) == "12,346 img/s"
    assert fmt.metric("macro_f1", 0.987654) == "0.9877"
    assert fmt.metric("p50_vs_seed_int8", 0.1234) == "0.12x"
    assert fmt.metric("latency_p50_ms", None) == fmt.MISSING
    assert fmt.metric("model", "teacher resnet18") == "teacher resnet18"


def test_changes_of_accuracies_are_points_and_of_others_relative():
    assert fmt.metric_change("accuracy", 0.98, 0.99) == "+1.00 points"
    assert fmt.metric_change("size_bytes", 200_000, 150_000) == "-50.0 KB (-25.0%)"
    assert fmt.metric_change("latency_p50_ms", 0.0, 0.5) == "+0.500 ms"


def test_benchmark_and_pr_report_write_a_value_the_same_way():
    table = markdown_table(
        [{"model": "m", "size_bytes": 141_900, "accuracy": 0.988}],
        [("model", "model"), ("size_bytes", "size"), ("accuracy", "acc")],
    )
    assert table.splitlines()[2] == "| m | 0.142 MB | 98.80 % |"
    assert format_change(MetricChange("m", "size_bytes", 141_900, 283_800)) == "+0.142 MB (+100.0%)"
