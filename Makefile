# Entry points; each builds its venv on a fresh machine (idempotent):
#   make demo         the main job on built-in presets: no download, no GPU
#   make test         lint + the test suite (what CI runs), on the locked set
#   make test-fast    unit tests only, one process (about a minute)
#   make test-latest  a second venv with the newest versions pyproject's ranges allow:
#                     test-fast and the conformance slice, versions recorded
#   make lock         constraints.txt from the venv test-latest built and passed
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c  # a failing step fails the target, also inside a pipe

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LATEST := .venv-latest
LATEST_STAMP := $(LATEST)/.tested
# The only CPU build of torch a machine of this project can install (the CUDA builds on
# PyPI are several GB); GPU users keep their own (`pip install -e .`, torch>=2.11).
TORCH := torch==2.13.0
VERSIONS := benchmarks/results/cpu-2core/latest-versions.txt

.PHONY: demo test test-fast test-latest lock lint clean

# install(venv, pip options): build tools first, so the package builds with them (no
# isolated build environment that fetches whatever setuptools is newest).
define install
	test -x $(1)/bin/python || python3 -m venv $(1)
	$(1)/bin/pip install -q --upgrade $(2) pip setuptools wheel
	$(1)/bin/pip install -q $(2) $(TORCH)
	$(1)/bin/pip install -q $(2) --no-build-isolation -e ".[dev]"
endef

$(STAMP): pyproject.toml constraints.txt
	$(call install,$(VENV),-c constraints.txt)
	# everything installed must be pinned in the lock (a new dependency means `make lock`)
	extra=$$($(BIN)/pip freeze --all --exclude-editable | sed 's/+cpu$$//' \
		| grep -vxFf constraints.txt || true); \
	if [ -n "$$extra" ]; then echo "not pinned in constraints.txt (run make lock):"; \
		echo "$$extra"; exit 1; fi
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/collie-compile plan llama-2-7b --gpus 8 --gpu a100-80gb --seq-len 4096
	@echo
	$(BIN)/collie-compile estimate llama-65b --gpus 8 --gpu rtx3090 --optimizer lomo \
		--zero 3 --seq-len 512 --recompute full
	@echo
	# train the tiny preset on 4 CPU processes (gloo) with the auto plan on this
	# repository's documents (one held out for evaluation), cosine schedule, then check
	# it against one process training the same model on the same batches
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node 4 -m collie_compile \
		train tiny-llama --data README.md docs --eval-split 0.2 --eval-every 10 \
		--steps 30 --seq-len 64 --global-batch 16 --lr 3e-3 --lr-schedule cosine \
		--warmup-steps 3 --check 2>&1 | { grep -v "^W\|warn" || true; }

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Always from nothing, so "newest" means today's. torch stays the CPU build above (its
# newer releases are tracked on the GPU machine: benchmarks/gpu.sh).
test-latest:
	rm -rf $(LATEST)
	$(call install,$(LATEST),)
	{ echo "# make test-latest resolved these on $$(date -u +%F) ($$($(LATEST)/bin/python -V))"; \
	  $(LATEST)/bin/pip freeze --all --exclude-editable; } > $(VERSIONS)
	$(LATEST)/bin/python -m pytest -q -m "not slow"
	$(LATEST)/bin/python -m pytest -q tests/test_conformance.py
	echo "# and passed make test-fast and tests/test_conformance.py with them" >> $(VERSIONS)
	touch $(LATEST_STAMP)

lock:
	test -f $(LATEST_STAMP) || { echo "make test-latest first: the lock is what it passed"; exit 1; }
	{ echo "# The locked set make demo/test install. make test-latest resolved and passed"; \
	  echo "# these on $$(date -u +%F) ($$($(LATEST)/bin/python -V), $$(uname -m)); make lock"; \
	  echo "# wrote this file from that venv. pyproject.toml keeps the ranges."; \
	  $(LATEST)/bin/pip freeze --all --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt

clean:
	rm -rf $(VENV) $(LATEST) *.egg-info
