# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install test demo clean

install: $(STAMP)

# Reinstalls when the dependency pins change. `pip check` fails the install on any conflict.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/python -m pip check
	$(BIN)/python -m components.preprocess.nltk_data
	touch $@

test: install
	$(BIN)/pytest

demo: install
	$(BIN)/clipline run --recipe configs/demo.yaml

clean:
	-$(BIN)/clipline store down 2>/dev/null
	rm -rf $(VENV) .clipline .pytest_cache
