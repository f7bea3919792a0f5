# make run: set up and run the default pipeline on digits; make test: set up and run the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export RAY_USAGE_STATS_ENABLED := 0
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: setup data browser run flow ui test test-all lint docs bench clean

setup: $(VENV)/.ready

# constraints.txt pins every package, so every fresh set-up resolves the same versions.
$(VENV)/.ready: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,peers]'
	@test -d .dvc || dvc init --quiet $$(git rev-parse --git-dir >/dev/null 2>&1 || echo --no-scm)
	python -m pipeline.vega  # Vega from the npm registry, so `dvc plots show` pages render offline
	touch $@

# Fashion-MNIST from Debian's package (the benchmark dataset; digits needs nothing).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
data:
	@test -d /usr/share/datasets/fashion-mnist || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

# Debian's Chromium and ChromeDriver, for the test that renders report.html in a real browser.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver; }

run: setup
	dvc repro
	@echo "report: outputs/report/report.html   metrics: outputs/report/metrics.json   runs and flows: make ui"

flow: setup
	python -m pipeline flow

# MLflow UI and Prefect server on 127.0.0.1 (ports 5000 and 4200); Ctrl-C stops both.
ui: setup
	python -m pipeline ui

# Two pytest workers (one per core), each test module on one worker so its fixtures are built once.
test: setup
	python -m pytest -n 2 --dist loadfile

test-all: setup
	python -m pytest -m ''

lint: setup
	ruff check . && ruff format --check .

# docs/params.md, docs/results.md and the README's results block, generated from config.py and benchmarks/results/.
docs: setup
	python -m pipeline.docs

bench: setup
	python benchmarks/speed.py

clean:
	rm -rf outputs mlflow.db mlartifacts
