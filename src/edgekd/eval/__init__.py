"""Evaluation of exported models: classification metrics and CPU latency/throughput."""
