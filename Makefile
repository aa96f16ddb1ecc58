# Two commands on a fresh machine: `make demo` and `make test` (each creates .venv when missing).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
FASHION_DIR ?= /usr/share/datasets/fashion-mnist
# pyproject.toml declares ranges; every install here pins through constraints.txt
# (torch==2.13.0, the CPU build on this machine's disk, never a multi-GB CUDA build).
PIP    := pip install --quiet --disable-pip-version-check -c constraints.txt

# The device side without PyTorch: numpy, onnxruntime, httpx, zstandard (requirements/edge.txt).
EDGE_VENV    ?= .venv-edge
EDGE_BIN     := $(EDGE_VENV)/bin
EDGE_STAMP   := $(EDGE_VENV)/.installed-stamp
EDGE_BUNDLES ?= runs/edge-bundles

.PHONY: demo test test-fast test-edge edge-venv lint data bench clean

TEST_STAMP := $(VENV)/.installed-test-stamp

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/$(PIP) -e ".[dev]"
	touch $(STAMP)

# The tests also exercise the Ray Serve deployment (two local replicas).
$(TEST_STAMP): $(STAMP)
	$(BIN)/$(PIP) -e ".[dev,ray]"
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/python -m benchmarks demo --out runs/demo

# Fashion-MNIST is a Debian package (needs root or sudo); the tests that use it say so if it is absent.
data:
	@test -f $(FASHION_DIR)/t10k-images-idx3-ubyte.gz || \
	  { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	    ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist) \
	    || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped"; }

test: $(TEST_STAMP) data
	$(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory test-edge

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The torch-free edge install: the edge requirements, then splitexit itself with --no-deps
# (editable, so it runs this checkout). torch must not be importable there.
$(EDGE_STAMP): requirements/edge.txt pyproject.toml constraints.txt
	test -x $(EDGE_BIN)/python || $(PYTHON) -m venv $(EDGE_VENV)
	echo '*' > $(EDGE_VENV)/.gitignore  # .gitignore lists .venv/ only
	$(EDGE_BIN)/$(PIP) -r requirements/edge.txt
	$(EDGE_BIN)/$(PIP) --no-deps -e .
	touch $(EDGE_STAMP)

edge-venv: $(EDGE_STAMP)
	@if $(EDGE_BIN)/python -c "import torch" 2>/dev/null; then \
	  echo "error: torch is importable in $(EDGE_VENV); it must not be"; exit 1; fi
	@echo "$(EDGE_VENV): splitexit without torch ($$(du -sh $(EDGE_VENV) | cut -f1))"

# Bundles written by the main venv (with torch), then loaded and run in .venv-edge (without).
test-edge: edge-venv $(STAMP)
	rm -rf $(EDGE_BUNDLES)
	$(BIN)/python scripts/edge_bundles.py $(EDGE_BUNDLES)
	$(EDGE_BIN)/python scripts/edge_smoke.py $(EDGE_BUNDLES)/split $(EDGE_BUNDLES)/device
	$(EDGE_BIN)/splitexit edge --help > /dev/null  # the command line too, without torch

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP) data
	$(BIN)/python -m benchmarks early-exit --out reports/early-exit

clean:
	rm -rf $(VENV) $(EDGE_VENV) runs .pytest_cache
