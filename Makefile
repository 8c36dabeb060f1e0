# Two commands set up everything on a fresh clone: `make repro` and `make test`.
PYTHON ?= python3
PIP_STAMP := .deps-installed

.PHONY: deps demo-data repro test bench report clean

# Install the pinned requirements once per change of requirements.txt.
$(PIP_STAMP): requirements.txt
	$(PYTHON) -m pip install -q -r requirements.txt
	touch $(PIP_STAMP)

deps: $(PIP_STAMP)

# The bundled offline demo dataset; bytes pinned by data.dvc.
demo-data: deps
	@if [ ! -d data/rice-demo ]; then $(PYTHON) -m src.make_demo_data --out data/rice-demo; fi

repro: demo-data
	dvc repro

test: deps
	$(PYTHON) -m pytest -q tests
