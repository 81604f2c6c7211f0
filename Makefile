# Two entry points, both bootstrap .venv on a fresh machine (idempotent):
#   make demo   the main job on built-in presets: no download, no GPU
#   make test   lint + the test suite (what CI runs)
#   make test-fast  unit tests only, one process (about a minute)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned to the CPU build first, so nothing pulls a CUDA build
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
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
		--warmup-steps 3 --check 2>&1 | grep -v "^W\|warn"

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) *.egg-info
