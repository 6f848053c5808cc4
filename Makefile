# The workshop's commands. `make chat` and `make test` do all the set-up themselves.
# Each target runs `python -m workshop <target>` (workshop/__main__.py), which works without
# make too, on any OS: the Makefile is only a shorter way to type it.
PYTHON ?= python3
W      := $(PYTHON) -m workshop
STEP   ?=
PORT   ?= 8000
# The model's port for make llm / make fake (the steps look at 8808 unless OPENAI_BASE_URL says otherwise).
LLM_PORT ?= 8808

.PHONY: help setup kit doctor lock chat llm fake lab test lint grade watch check exercise progress hint notebooks screenshots bench clean

help:
	@echo "Start here"
	@echo "  make setup                 create .venv with a learner's packages (the other targets do it too)"
	@echo "  make setup KIT=<dir>       the same from an instructor's kit, with no network"
	@echo "  make chat [PORT=8000]      start the embedded model and the production chat (step 05)"
	@echo "  make doctor                check this machine for the workshop: one line per problem, with its fix"
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
	@echo "  make fake [LLM_PORT=8808]  the fake LLM (scripted replies that show the history), same address;"
	@echo "                             SLOW=1: long replies, slowly, to try Stop by hand"
	@echo "                             (another LLM_PORT: put OPENAI_BASE_URL=http://127.0.0.1:<port>/v1 before a step's command)"
	@echo "For maintainers"
	@echo "  make test                  set up, lint and run every test (browser, model and campaign included)"
	@echo "  make lint                  ruff check and ruff format --check over the whole repository"
	@echo "  make kit [KIT=kit]         write a kit for a room with no network (README, 'Instructors')"
	@echo "  make lock                  resolve locks/learn.txt and locks/dev.txt again (newest versions in pyproject's ranges)"
	@echo "  make check STEP=N          the reference step's fast tests (what grading compares against)"
	@echo "  make notebooks             re-run the notebooks against the fake LLM and save their outputs"
	@echo "  make screenshots           regenerate docs/screenshots from a real browser run"
	@echo "  make bench                 measure the relay and the embedded model (a few minutes)"
	@echo "Without make (any OS, Windows too): python -m workshop <target> [STEP] (py -m workshop on Windows)"

setup:
	@$(W) setup $(if $(KIT),--kit "$(KIT)")

# Every file a learner's set-up needs, for each platform and Python (README, "Instructors").
# KIT_PLATFORMS=linux-x86_64 KIT_PYTHONS=3.11 build only those (make passes them on).
kit:
	@$(W) kit $(if $(KIT),--out "$(KIT)")

doctor:
	@$(W) doctor

chat:
	@$(W) chat --port $(PORT)

llm:
	@$(W) llm --port $(LLM_PORT)

fake:
	@$(W) fake --port $(LLM_PORT)$(if $(SLOW), --slow)

lab:
	@$(W) lab

# Installs Chromium and redis-server (Debian's) when missing, then lints and runs every test.
test:
	@$(W) test

lint:
	@$(W) lint

exercise:
	@$(W) exercise "$(STEP)" $(if $(FRESH),--fresh)

grade:
	@$(W) grade "$(STEP)"

watch:
	@$(W) watch "$(STEP)"

progress:
	@$(W) progress

hint:
	@$(W) hint "$(STEP)" $(TASK) $(if $(LEVEL),--level $(LEVEL))

# The reference steps' fast tests: what the exercises are graded against.
check:
	@$(W) check "$(STEP)"

notebooks:
	@$(W) notebooks

screenshots:
	@$(W) screenshots

# The full benchmark (`make test` runs only a tiny smoke run of it).
bench:
	@$(W) bench

# The lock files (locks/): the tested versions, resolved for every platform and Python.
lock:
	@$(W) lock

clean:
	rm -rf .venv .pytest_cache .hypothesis
