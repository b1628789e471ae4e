# shardrec — the two set-up commands of the README are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# The stamp depends on the files that define the stack, so editing them re-runs setup;
# otherwise a second `make setup` finds the stamp and does nothing.
STAMP := $(VENV)/.shardrec-setup
NPROC ?= 2
DEMO_CONFIG := launch/configs/deepfm_synthetic.toml
DEMO_DATA := datasets/synthetic_ctr_demo

.PHONY: setup demo test test-fast clean-data help

# `make help` prints every target that has a `## ` comment on its rule line (a test checks
# that every target in .PHONY has one).
help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-zA-Z_-]+):.*## /make \1\t- /' | expand -t 20

setup: $(STAMP) ## create .venv with the pinned stack (idempotent)

$(STAMP): setup.cfg Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	@# torchrec declares the CUDA fbgemm-gpu as a dependency: install it without deps, then
	@# the fbgemm build that matches this machine and torchrec's real runtime needs.
	$(PIP) install -q --no-deps torchrec==1.8.0
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing fbgemm-gpu 1.8.0"; \
		$(PIP) install -q --no-deps fbgemm-gpu==1.8.0; \
	else \
		echo "no NVIDIA GPU: installing fbgemm-gpu-cpu 1.8.0"; \
		$(PIP) install -q --no-deps fbgemm-gpu-cpu==1.8.0; \
	fi
	@# triton: the HSTU attention kernels (compiled on CUDA, interpreted on CPU in the tests).
	@# matplotlib: the plots of `python -m bench.report` (the [bench] extra; pulls no torch).
	@# crc32c: the checksum manifest of checkpoints (hardware CRC-32C; no dependencies).
	@# aiohttp: python -m trainer.serve; faiss-cpu: approximate top-K and the
	@# retrieval models' ANN index.
	$(PIP) install -q torchmetrics==1.0.3 tensordict tqdm pyre-extensions iopath pyarrow numpy pytest tomli-w==1.2.0 \
		triton==3.9.0 matplotlib==3.11.2 tensorboard==2.21.0 crc32c==2.9.post0 aiohttp==3.14.5 \
		faiss-cpu==1.15.1
	@# The [torchx] extra of setup.cfg, named here because the project itself is installed with
	@# --no-deps below; neither package touches the torch/torchrec/fbgemm pins above.
	$(PIP) install -q "torchx==0.7.0" "kubernetes==36.0.3"
	@# --no-deps: the stack above is already resolved, and pip would otherwise try to pull the
	@# CUDA fbgemm-gpu back in through torchrec's metadata.
	$(PIP) install -q --no-deps -e .
	@# The compiled_jagged HSTU attention kernel (C++, cached under ~/.cache/torch_extensions);
	@# without a compiler it logs why and the op falls back to pytorch_jagged.
	-$(PY) -m models.hstu.compiled --build
	@$(PY) -c "import torch, torchrec, fbgemm_gpu, pyarrow, torchx; print('stack ok: torch', torch.__version__, '| torchrec', torchrec.__version__, '| torchx', torchx.__version__)"
	@touch $(STAMP)

$(DEMO_DATA)/meta.json: | $(STAMP)
	$(PY) -m data.synth ctr --out $(DEMO_DATA) --preset demo

demo: $(STAMP) $(DEMO_DATA)/meta.json ## generate the demo dataset and train DeepFM on 2 CPU ranks
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m trainer --config $(DEMO_CONFIG)

test: $(STAMP) ## run the whole test suite
	$(PY) -m pytest -q --durations=25 tests

test-fast: $(STAMP) ## run the tests not marked slow
	$(PY) -m pytest -q tests -m "not slow"

clean-data: ## delete datasets/ and runs/
	rm -rf datasets runs
