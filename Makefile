# SPDX-License-Identifier: Apache-2.0
# make demo: set up .venv and run the main job.  make test: set up .venv and run every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
BUILD_DEPS := 'scikit-build-core>=0.10' 'pybind11>=2.12'  # quoted: >= is a shell redirect
SOURCES := $(shell find csrc src/epdrt/kernels -type f \( -name '*.cc' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null) CMakeLists.txt pyproject.toml
STAMP := $(VENV)/.epdrt-installed

.PHONY: setup demo test lint format bench clean

setup: $(STAMP)

# torch first, pinned, and only if absent: any unpinned torch spec pulls the CUDA wheels.
$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q $(BUILD_DEPS)
	$(PIP) install -q --no-build-isolation -e '.[test,triton,serve,nixl]'
	touch $@

demo: setup
	$(VENV)/bin/epdrt info
	$(VENV)/bin/epdrt demo --out out/demo

test: setup lint
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: setup
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

clean:
	rm -rf build out $(STAMP)
