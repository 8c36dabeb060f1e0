"""`make bench`: the pipeline on the real rice sample as DVC experiments, compared in one report
(config and goals: tools/benchmark/rice.yaml)."""
