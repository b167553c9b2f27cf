# Quick start: `make train` (pretrain + evaluate on Fashion-MNIST) and `make test`.
# Each target creates the virtual environment in $(VENV) on first use and installs the package.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: install fashion-mnist-files train evaluate test lint format

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --editable '.[onednn,test]'
	touch $@

install: $(VENV)/.installed

# The embedded default dataset offline: Debian's Fashion-MNIST files (about 30 MB).
fashion-mnist-files:
	@if [ -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	else \
	  echo "note: Debian's Fashion-MNIST files are missing ($(FASHION_MNIST_DIR))."; \
	  echo "      Install them with 'sudo apt-get install dataset-fashion-mnist', or run with"; \
	  echo "      network access so that TensorFlow Datasets downloads fashion_mnist itself."; \
	fi

train: install fashion-mnist-files
	$(BIN)/python -m simclr_jax.train

# Every evaluation protocol on the run `make train` wrote (tables, JSON and PNGs in its eval/).
evaluate: install fashion-mnist-files
	$(BIN)/python -m simclr_jax.evaluate --workdir=workdirs/fashion_mnist

test: install fashion-mnist-files lint
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
