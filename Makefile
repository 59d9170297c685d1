# One-command setup, serve and test.  Everything installs from this repo's own files.
#   make serve SLIDES=./slides   set up (first time only) and serve a folder of slides
#   make test                    set up (first time only) and run lint, type checks and tests
PYTHON ?= python3.11
VENV   ?= .venv
SLIDES ?= ./slides
PORT   ?= 8080
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ASSETS := tileserver/static/vendor/openseadragon/openseadragon.min.js

.PHONY: setup system-deps serve test lint typecheck pytest assets static clean

setup: $(STAMP) $(ASSETS)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Viewer assets: OpenSeadragon from the npm registry (static/package-lock.json).
$(ASSETS): static/package.json static/package-lock.json static/build.sh
	bash static/build.sh

assets: $(ASSETS)
static: $(ASSETS)

# Browser and Prometheus integration tests need Debian's chromium, chromedriver and prometheus.
system-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v prometheus >/dev/null; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver prometheus >/dev/null; } \
			|| echo "note: apt-get failed; browser and Prometheus tests will skip"; \
	else \
		echo "note: chromium/chromedriver/prometheus missing and cannot apt-get; browser and Prometheus tests will skip"; \
	fi

serve: setup
	$(BIN)/tileserver serve $(SLIDES) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: setup system-deps
	$(BIN)/pytest -q -ra

test: lint typecheck pytest

clean:
	rm -rf $(VENV) static/node_modules tileserver/static/vendor .pytest_cache .mypy_cache .ruff_cache
