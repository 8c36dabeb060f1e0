# Two commands set up everything on a fresh clone: `make repro` and `make test`.
PYTHON ?= python3
PIP_STAMP := .deps-installed

.PHONY: deps demo-data repro studies lint test bench bench-cifar10 bench-cifar10-gpu report clean

# The pinned requirements, then the edgekd package itself (editable: src/edgekd is what runs), once
# per change of requirements.txt or pyproject.toml.
$(PIP_STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m pip install -q --root-user-action=ignore -r requirements.txt
	$(PYTHON) -m pip install -q --root-user-action=ignore --no-deps --no-build-isolation -e .
	touch $(PIP_STAMP)

deps: $(PIP_STAMP)

# The bundled offline demo dataset; bytes pinned by data.dvc.
demo-data: deps
	@if [ ! -d data/rice-demo ]; then $(PYTHON) -m tools.make_demo_data --out data/rice-demo; fi

# The deployed model's pipeline (dvc.yaml). --keep-going: a file that fails (its export gate, say) stops
# only the stages that need it; every other file is still exported and measured, and the command
# still exits non-zero.
repro: demo-data
	dvc repro --keep-going

# The same, and the studies beside it (studies/dvc.yaml: PTQ, QAT from scratch, mixed precision,
# 16-bit activations): -P runs every pipeline file of the project.
studies: demo-data
	dvc repro -P --keep-going

# ruff's lint rules and formatting (pyproject.toml), checked, never rewritten: `ruff check --fix .`
# and `ruff format .` apply them.
lint: deps
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# Lint, then one pytest worker per CPU core (pytest-xdist); workers that run out of tests take some
# from the others (worksteal), since the end-to-end tests take minutes and the unit tests seconds.
test: lint
	$(PYTHON) -m pytest -n auto --dist worksteal

# PR report: params/metrics/plots of the workspace vs BASE -> reports/pr/report.md + plots/*.png.
# `make report BASE=origin/main`; CI adds PLOTS_URL (the run page) to link the images.
BASE ?= main
report: deps
	$(PYTHON) -m tools.pr_report.run --base $(BASE) --out reports/pr $(if $(PLOTS_URL),--plots-url "$(PLOTS_URL)")

# The benchmark on the real rice sample (../shared/datasets/rice-image): reports/benchmark.{md,json}.
bench: demo-data
	$(PYTHON) -m tools.benchmark.run --config tools/benchmark/rice.yaml --out reports

# The same generator on the shared CIFAR-10 training images: reports/cifar10/benchmark.{md,json}.
bench-cifar10: demo-data
	$(PYTHON) -m tools.benchmark.run --config tools/benchmark/cifar10.yaml --out reports/cifar10

# Its full-length recipe, for a CUDA machine: reports/cifar10_gpu/benchmark.{md,json}.
bench-cifar10-gpu: demo-data
	$(PYTHON) -m tools.benchmark.run --config tools/benchmark/cifar10_gpu.yaml --out reports/cifar10_gpu
