# Two commands on a fresh machine: `make demo` and `make test` (each creates .venv when missing).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
FASHION_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: demo test test-fast lint data bench clean

TEST_STAMP := $(VENV)/.installed-test-stamp

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

# The tests also exercise the Ray Serve deployment (two local replicas).
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,ray]"
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/splitexit demo --out runs/demo

# Fashion-MNIST is a Debian package (needs root or sudo); the tests that use it say so if it is absent.
data:
	@test -f $(FASHION_DIR)/t10k-images-idx3-ubyte.gz || \
	  { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	    ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist) \
	    || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped"; }

test: $(TEST_STAMP) data
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests

bench: $(STAMP) data
	$(BIN)/splitexit bench early-exit --out reports/early-exit

clean:
	rm -rf $(VENV) runs .pytest_cache
