# The two commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU wheel first, so pip never pulls the CUDA build on CPU-only machines.
# On a GPU machine, install your own torch into .venv before `make`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: venv
	$(PY) jobs/demo.py

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/bench_model.py

clean:
	rm -rf $(VENV) build *.egg-info
