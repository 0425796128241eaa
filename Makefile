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

.PHONY: install sysdeps test demo clean

install: sysdeps $(STAMP)

sysdeps:
	@dpkg -s $(APT_PACKAGES) >/dev/null 2>&1 || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends $(APT_PACKAGES))

# Reinstalls when the dependency pins change. `pip check` fails the install on any conflict.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/python -m pip check
	# A data-only package (Animal-MNIST) whose metadata asks for tensorflow and scikit-learn, which it does not need:
	# installed without them, after `pip check` has vetted the real dependency set.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps animal-mnist==0.4
	$(BIN)/python -m components.preprocess.nltk_data
	touch $@

test: install
	$(BIN)/pytest

demo: install
	$(BIN)/clipline run --recipe configs/demo.yaml

clean:
	-$(BIN)/clipline store down 2>/dev/null
	rm -rf $(VENV) .clipline .pytest_cache
