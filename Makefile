# The two commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU wheel first, so pip never pulls the CUDA build on CPU-only machines.
# On a GPU machine, install your own torch into .venv before `make`.
TORCH_SPEC ?= torch==2.13.0
CN_CLIP_REF := cn_clip==1.6.0

.PHONY: venv demo test bench gpu-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# The reference implementation for parity tests only; its declared deps (torchvision, timm) are not needed.
	$(PY) -m pip install -q --no-deps "$(CN_CLIP_REF)"
	touch $@

demo: venv
	$(PY) jobs/demo.py

test: venv
	$(PY) -m pytest -q

bench: venv
	for script in benchmarks/*.py; do [ $$script = benchmarks/gpu_check.py ] || $(PY) $$script || exit 1; done

# On a machine with a CUDA GPU (and its torch in .venv): GPU tests, backends, TensorRT, training figures.
gpu-check: venv
	$(PY) benchmarks/gpu_check.py --output gpu_check.json

clean:
	rm -rf $(VENV) build *.egg-info
