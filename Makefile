# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Real images installed offline for the demo source (emoji font + CLDR names, public-domain clipart).
APT_PACKAGES := fonts-noto-color-emoji unicode-data openclipart-png openclipart-svg
# Headless browser: a test renders the evaluation report the way a person sees it.
APT_PACKAGES += chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install sysdeps test demo bench clean

install: sysdeps $(STAMP)

sysdeps:
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends $(APT_PACKAGES))

# Reinstalls when the dependency pins change. A conflict reported by `pip check` fails the install.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	# A data-only package (Animal-MNIST) declares tensorflow and scikit-learn, which it does not need: it is installed
	# without them, and `pip check` ignores only its complaint (it is already there when the pins change and this reruns).
	@problems="$$($(BIN)/python -m pip check | grep -v -e '^animal-mnist 0.4 requires' -e '^No broken requirements')"; \
		if [ -n "$$problems" ]; then echo "$$problems"; exit 1; fi
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps animal-mnist==0.4
	$(BIN)/python -m components.preprocess.nltk_data
	touch $@

# The linter first (seconds; config in pyproject.toml [tool.ruff]), then the suite.
test: install
	$(BIN)/ruff check components pipelines tests benchmarks
	$(BIN)/pytest

demo: install
	$(BIN)/clipline run --recipe configs/demo.yaml

# Every benchmark in one run: tables on stdout; results.json, logs and plots in bench-results/ (~2 h 20 min on 2 cores).
bench: install
	$(BIN)/python benchmarks/run_all.py --out bench-results

clean:
	-$(BIN)/clipline store down 2>/dev/null
	rm -rf $(VENV) .clipline .pytest_cache
