# Two entry points, both bootstrap .venv on a fresh machine (idempotent):
#   make demo   the main job on built-in presets: no download, no GPU
#   make test   lint + the test suite
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned to the CPU build first, so nothing pulls a CUDA build
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/collie-compile estimate llama-65b --gpus 8 --gpu rtx3090 --optimizer adamw \
		--zero 3 --seq-len 512 --recompute full
	@echo
	$(BIN)/collie-compile estimate llama-65b --gpus 8 --gpu rtx3090 --optimizer lomo \
		--zero 3 --seq-len 512 --recompute full

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info
