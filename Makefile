# Quick start: `make run` (the default experiment) and `make test` (the whole suite).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# torch is pinned: this version has a CPU build; an unpinned torch pulls a multi-GB CUDA build
TORCH  := torch==2.13.0

.PHONY: run test lint bench proto clean

$(VENV)/.run-ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH)
	$(PIP) install -e ".[torch,data]"
	touch $@

$(VENV)/.test-ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH)
	$(PIP) install -e ".[torch,data,ray,deploy,privacy,analytics,hf,tracking,keras,jax,sklearn,xgboost,dev]"
	touch $@ $(VENV)/.run-ready

run: $(VENV)/.run-ready
	$(VENV)/bin/pollinate run $(ARGS)

lint: $(VENV)/.test-ready
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy pollinate

test: $(VENV)/.test-ready lint
	$(PY) -m pytest -q -rs --durations=15

bench: $(VENV)/.test-ready
	$(PY) bench/run_all.py

# regenerate the gRPC modules after editing pollinate.proto (a test checks they match)
proto: $(VENV)/.test-ready
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
		pollinate/transport/grpc/pollinate.proto

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
