# Two commands set up everything on a fresh clone: `make repro` and `make test`.
PYTHON ?= python3
PIP_STAMP := .deps-installed

.PHONY: deps demo-data repro test bench report clean

# Install the pinned requirements once per change of requirements.txt.
$(PIP_STAMP): requirements.txt
	$(PYTHON) -m pip install -q --root-user-action=ignore -r requirements.txt
	touch $(PIP_STAMP)

deps: $(PIP_STAMP)

# The bundled offline demo dataset; bytes pinned by data.dvc.
demo-data: deps
	@if [ ! -d data/rice-demo ]; then $(PYTHON) -m src.make_demo_data --out data/rice-demo; fi

repro: demo-data
	dvc repro

test: deps
	$(PYTHON) -m pytest -q tests

# PR report: params/metrics/plots of the workspace vs BASE -> reports/pr/report.md + plots/*.png.
# `make report BASE=origin/main`; CI adds PLOTS_URL (the run page) to link the images.
BASE ?= main
report: deps
	$(PYTHON) -m src.pr_report --base $(BASE) --out reports/pr $(if $(PLOTS_URL),--plots-url "$(PLOTS_URL)")

# The benchmark on the real rice sample (../shared/datasets/rice-image): reports/benchmark.{md,json}.
bench: demo-data
	$(PYTHON) -m src.benchmark --config benchmarks/rice.yaml --out reports
