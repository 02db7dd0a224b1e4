# msrl — `make demo` and `make test` are the two commands a fresh machine needs.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.msrl-installed
DOCS_STAMP := $(VENV)/.msrl-docs-installed
# pip's notes about this machine's local package mirrors are noise, not problems.
# Braces keep grep's "no line left" status from hiding pip's own (pipefail reports pip's failure).
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

CONFIG ?= configs/pretrain/template.yaml
GPUS ?=
LOGDIR ?= runs
CKPT ?=
SAMPLES ?= 8
OUT ?= samples

.PHONY: install demo demo-mask study test test-full pretrain sample tensorboard lint bench docs docs-serve clean

install: $(STAMP)  ## create .venv and install msrl (idempotent)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: here the CPU build on local disk, on a GPU cluster the CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0 2>&1 | $(QUIET_PIP)
	$(BIN)/python -m pip install -q -e ".[dev]" 2>&1 | $(QUIET_PIP)
	touch $(STAMP)

# The docs extra (MkDocs, Material, mkdocstrings) on top of the install; make test does not need it.
$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[docs]" 2>&1 | $(QUIET_PIP)
	touch $(DOCS_STAMP)

demo: install  ## embedded data → VQ-GAN → latent pretrain → rewards → PPO → samples → evaluate → report
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

demo-mask: install  ## embedded data → VQ-GAN → latent pretrain → ControlNet on lesion masks → volumes with labels → segmentation utility, mask fidelity
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo_mask.sh

study: install  ## the CPU-sized study (4 reward arms x 3 seeds, paired evaluations) -> study_out/results.md (< 60 min)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/study.sh

# Two pytest-xdist workers, one per core (tests/conftest.py gives each one torch thread); a test file stays
# on one worker, so its module fixtures (a PPO run, trained critics) are built once.
XDIST := -n 2 --dist loadfile

test: install  ## the default test suite (< 10 minutes on 2 cores)
	$(BIN)/python -m pytest -q $(XDIST)

test-full: install  ## every test, the slow ones included
	$(BIN)/python -m pytest -q $(XDIST) -m "slow or not slow"

pretrain: install  ## CONFIG=… GPUS=…: srun inside a SLURM allocation, else all local GPUs (or CPU)
	PATH="$(CURDIR)/$(BIN):$$PATH" CONFIG="$(CONFIG)" GPUS="$(GPUS)" bash scripts/pretrain.sh

sample: install  ## CKPT=… SAMPLES=… OUT=…
	test -n "$(CKPT)" || { echo "make sample needs CKPT=<path to a .ckpt>"; exit 2; }
	$(BIN)/msrl sample --checkpoint "$(CKPT)" --num-samples $(SAMPLES) --out "$(OUT)"

tensorboard: install  ## LOGDIR=runs
	$(BIN)/tensorboard --logdir "$(LOGDIR)"

lint: install
	$(BIN)/ruff check .

bench: install  ## A/B ratio benchmarks against plain PyTorch/MONAI and the memory plan (~15 min on 2 cores, not yet timed whole); GPU=1: the prepared GPU run (<= 8 min)
	MSRL_BENCH_COMMAND="make bench$(if $(GPU), GPU=$(GPU))" \
		$(BIN)/python -m benchmarks $(if $(filter 1 yes true,$(GPU)),--gpu)

# The docs extra pins MkDocs 1.x; these turn off the banners its theme and plugins print about MkDocs 2.0.
MKDOCS := NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(BIN)/mkdocs

docs: $(DOCS_STAMP)  ## the documentation site (docs/, mkdocs.yml) into site/; a broken link or missing symbol fails
	$(MKDOCS) build --strict --site-dir site

docs-serve: $(DOCS_STAMP)  ## serve the documentation at http://127.0.0.1:8000, rebuilt on every save
	$(MKDOCS) serve

clean:
	rm -rf $(VENV) data/cache runs samples demo_out demo_mask_out study_out site .pytest_cache .ruff_cache *.egg-info
