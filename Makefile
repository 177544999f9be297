# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Each creates .venv on its own (torch pinned to the 2.13 CPU build) and installs Fashion-MNIST
# with apt where it runs as root; without it the demo falls back to sklearn's digits and says so.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.*
FMNIST := /usr/share/datasets/fashion-mnist
WORKDIR ?= runs/demo
PROFILE ?= quick

.PHONY: demo test unit lint format bench check-wheel data clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml setup.py | $(BIN)/activate
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[all]"
	touch $@

data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST: $(FMNIST)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || \
		echo "apt could not install dataset-fashion-mnist: the demo will use sklearn digits instead"; \
	else \
		echo "Fashion-MNIST is not installed and this is not root: run 'sudo apt-get install dataset-fashion-mnist'."; \
		echo "Until then the demo uses sklearn's digits and the Fashion-MNIST tests are skipped."; \
	fi

demo: $(VENV)/.installed data
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then ds=fashion-mnist; else \
		ds=digits; echo "Fashion-MNIST missing: running the demo on sklearn digits."; fi; \
	$(BIN)/rrise demo --workdir $(WORKDIR) --profile $(PROFILE) --dataset $$ds

test: $(VENV)/.installed data
	$(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory check-wheel

unit: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not integration"

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# A built wheel, installed in a fresh venv with the runtime extra only, imports and runs without torch.
check-wheel: $(VENV)/.installed
	bash scripts/check_wheel.sh $(BIN)/python

bench: $(VENV)/.installed data
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info runs
