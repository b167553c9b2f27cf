# Quick start: `make train` (pretrain + evaluate on Fashion-MNIST) and `make test`.
# Each target creates the virtual environment in $(VENV) on first use and installs the package.
# `make test` covers both ends of the supported versions: the suite on $(PYTHON) (the oldest
# supported Python, with the newest JAX it gets), and a subset plus an installed-wheel training
# run on $(NEWEST_PYTHON) (the newest Python, newest JAX and Flax: what Colab users have).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NEWEST_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3) $(shell command -v python3.12 2>/dev/null))
NEWEST_VENV ?= .venv-newest
# The newest-versions leg: the method's core, the CPU kernels against the newest JAX FFI, and
# end-to-end training (tests/test_wheel.py runs the installed wheel on $(NEWEST_PYTHON) as well).
NEWEST_TESTS ?= test_losses.py test_blockwise_loss.py test_models.py test_step.py test_optim.py \
  test_kernels.py test_batch_norm.py test_onednn_conv.py test_checkpointing.py test_configs.py \
  test_trainer.py test_workdir_lock.py test_jsonio.py test_config_checks.py
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist
# pytest-xdist workers, each taking whole test files: one test alone keeps two cores about 60%
# busy (compiling, starting command lines), so two workers finish the suite sooner on 2 cores.
TEST_WORKERS ?= 2
PYTEST_WORKERS := -n $(TEST_WORKERS) --dist loadfile

.PHONY: install tpu-compiler fashion-mnist-files train evaluate test test-newest lint format

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --editable '.[onednn,test]'
	touch $@

install: $(VENV)/.installed

# libtpu, for `python -m simclr_jax.compile_check` and its tests, which compile the train step
# for TPU topologies on this CPU host (no TPU needed): the version the installed jax asks for,
# kept in $(TPU_COMPILER_DIR) rather than in the environment, so that JAX never tries to open a
# TPU at start-up. x86-64 Linux only; elsewhere those tests skip.
TPU_COMPILER_DIR := .tpu-compiler
tpu-compiler: $(VENV)/.installed
	@if [ "$$(uname -sm)" = "Linux x86_64" ] && [ ! -f $(TPU_COMPILER_DIR)/libtpu/libtpu.so ]; then \
	  $(BIN)/python -m pip install --quiet --no-deps --target $(TPU_COMPILER_DIR) "$$($(BIN)/python -c \
	    "import importlib.metadata as m; print([r for r in m.requires('jax') if r.startswith('libtpu')][0].split(';')[0])")"; \
	fi

$(NEWEST_VENV)/.installed: pyproject.toml $(shell find simclr_jax -name '*.py' -o -name '*.cc')
	@test -n "$(NEWEST_PYTHON)" || { echo "error: no Python 3.12 found: set NEWEST_PYTHON"; exit 1; }
	$(NEWEST_PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(NEWEST_VENV)/bin/python -m pip install --quiet '.[onednn,test]'
	$(NEWEST_VENV)/bin/python -m pip install --quiet --no-deps --force-reinstall .
	touch $@

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

test: install tpu-compiler fashion-mnist-files lint
	$(BIN)/python -m pytest $(PYTEST_WORKERS)
	SIMCLR_JAX_WHEEL_PYTHON=$(NEWEST_PYTHON) $(BIN)/python -m pytest -m slow tests/test_wheel.py
	@if [ -n "$(NEWEST_PYTHON)" ]; then $(MAKE) test-newest; else \
	  echo "note: no Python 3.12 here (set NEWEST_PYTHON): the newest-versions leg did not run"; fi

# The installed (not editable) package on the newest Python: run from tests/, so that
# `import simclr_jax` finds the installed copy, not the checkout.
test-newest: $(NEWEST_VENV)/.installed fashion-mnist-files
	cd tests && ../$(NEWEST_VENV)/bin/python -m pytest -p no:cacheprovider $(PYTEST_WORKERS) $(NEWEST_TESTS)

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
