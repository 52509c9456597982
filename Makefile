# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=

.PHONY: demo test install clean test-kernels-jax011

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so diffusers does not pull a CUDA build
	$(PY) -m pip install -q "torch==2.13.0" $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m pqjax.demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

# Optional, for kernel work: the Pallas kernel tests (GPU interpreter + lowering for CUDA) on
# the JAX 0.11 the GPU machines run, on the CPU. JAX 0.11 needs Python >= 3.12; the Mosaic GPU
# lowering of 0.11 rejects code that 0.10.2 lowers (benchmarks/NOTES_kernels.md, version 6).
PYTHON312 ?= python3.12
VENV011 := .venv-jax011

$(VENV011)/.installed:
	test -x $(VENV011)/bin/python || $(PYTHON312) -m venv $(VENV011)
	$(VENV011)/bin/python -m pip install -q "jax==0.11.2" "jaxlib==0.11.2" pytest
	touch $@

test-kernels-jax011: $(VENV011)/.installed
	PYTHONPATH=. $(VENV011)/bin/python -m pytest -q -p no:cacheprovider \
	  tests/test_kernels_norm_kernel.py tests/test_kernels_matmul.py

clean:
	rm -rf $(VENV) $(VENV011) .pytest_cache
