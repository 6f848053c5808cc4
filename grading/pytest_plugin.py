"""pytest plugin: grade the reference steps or a learner's exercises with the same tests.

  --code=reference   (default) the step folders at the repository root
  --code=exercises   the learner's copies in exercises/ (what `make grade` uses)
  --code=DIR         any folder holding step0N_* packages (the two-sided check uses this)
  --task=N.M         run only the tests of one task

Tests name their task with `@pytest.mark.task("2.1")`. With --code set, a table of tasks
(passed or not) and the hint for the first unfinished task are printed at the end.
"""

from __future__ import annotations

import gc
import importlib.abc
import importlib.machinery
import json
import re
import sys
import time
from pathlib import Path

import pytest

from grading.exercises import EXERCISES, STEPS, load_tasks

PROGRESS = EXERCISES / ".progress.json"
COUNTS_NOTE = "  (A test can grade two tasks: the counts above add up to more than the tests pytest ran.)"
STUB = re.compile(r'raise NotImplementedError\("Task (\d+\.\d+) ')


class FromFolder(importlib.abc.MetaPathFinder):
    """Import the step packages found in `folder` instead of the reference ones, under
    the same names, so `import step02_llm_stream.main` in a test loads the learner's code."""

    def __init__(self, folder: Path):
        self.folder = folder

    def find_spec(self, name, path=None, target=None):
        if "." in name or not (self.folder / name / "__init__.py").is_file():
            return None
        return importlib.machinery.PathFinder.find_spec(name, [str(self.folder)])


def pytest_addoption(parser):
    group = parser.getgroup("grading")
    group.addoption(
        "--code", default="reference", help="reference | exercises | a folder of step0N_* packages (default: reference)"
    )
    group.addoption("--task", default=None, help="run only the tests of this task, e.g. 2.1")
    group.addoption(
        "--results-json", default=None, help="write each task's test failures (null for a pass) to this file"
    )


def code_folder(config) -> Path | None:
    """The folder whose step packages are under test, or None for the reference steps."""
    code = config.getoption("code")
    if code == "reference":
        return None
    return EXERCISES if code == "exercises" else Path(code).resolve()


@pytest.hookimpl(tryfirst=True)  # before pytest-timeout reads its setting
def pytest_configure(config):
    config.addinivalue_line("markers", "task(id, ...): the exercise task(s) this test grades")
    folder = code_folder(config)
    # Where the code under test lives, for fixtures that start a server on it (tests/conftest.py
    # reads it from the config, so tests and grading never import each other).
    config.workshop_code_folder = folder
    if folder is not None:
        sys.meta_path.insert(0, FromFolder(folder))
        from harness.support import RECEIVE_TIMEOUT  # a learner's stuck loop fails in seconds

        RECEIVE_TIMEOUT.seconds = 5.0
        if getattr(config.option, "timeout", None) is None:  # no --timeout given: 20 s a test
            config.option.timeout = 20
    config._task_results = {}  # nodeid -> (tasks, first failure's message or None)


def tasks_of_item(item) -> tuple[str, ...]:
    return tuple(task for mark in item.iter_markers("task") for task in mark.args)


def pytest_collection_modifyitems(config, items):
    wanted = config.getoption("task")
    if wanted:
        keep = [item for item in items if wanted in tasks_of_item(item)]
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep
    for item in items:
        config._task_results[item.nodeid] = (tasks_of_item(item), None)


def pytest_collection_finish(session):
    """Refuse to grade the wrong code: every step package imported must come from --code."""
    # What is imported by now (openai's and pydantic's hundreds of classes, FastAPI...) lives
    # until the process ends: freezing it keeps the collector from walking it again in every
    # full collection during the run and once more at exit: 0.6 s less CPU in step 04's grade.
    gc.freeze()
    folder = code_folder(session.config)
    if folder is None:
        return
    for package in STEPS.values():
        module = sys.modules.get(package)
        if module is not None and (folder / package).is_dir():
            assert Path(module.__file__).is_relative_to(folder), (
                f"{package} was imported from {module.__file__}, not from {folder}"
            )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    tasks = tasks_of_item(item)
    results = item.config._task_results
    if report.failed and results.get(item.nodeid, (tasks, None))[1] is None:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash else str(report.longrepr).strip().splitlines()[-1]
        message = message.splitlines()[0][:300]
        if TIMED_OUT in message:  # pytest-timeout's words name no behaviour: say what it means
            message = HUNG.format(seconds=item.config.option.timeout)
        results[item.nodeid] = (tasks, f"{item.name}: {message}")
        if tasks:  # name the task right in the failure, with what to do about it
            catalogue = load_tasks()
            lines = [
                f"Task {t}: {catalogue[t].title}. Stuck? make hint STEP={catalogue[t].step}"
                for t in tasks
                if t in catalogue
            ]
            report.sections.append(("this test grades", "\n".join(lines)))


TIMED_OUT = "Timeout (>"  # how pytest-timeout's failure begins
HUNG = (
    "it never finished ({seconds} s): something waits for ever, e.g. a reply awaited where it "
    "should run on its own, or a task waited for that nobody ends. Other failing tests may say more"
)


def hung(failure: str | None) -> bool:
    return failure is not None and "it never finished (" in failure


def summarise(results: dict) -> dict[str, list[tuple[tuple[str, ...], str | None]]]:
    """Per task, each of its tests as (the tasks it grades, first failure or None); the
    tests that grade this task alone come first: their failures say most about it."""
    by_task: dict[str, list[tuple[tuple[str, ...], str | None]]] = {}
    for tasks, failure in results.values():
        for task in tasks or ("other",):
            by_task.setdefault(task, []).append((tasks, failure))
    return {task: sorted(entries, key=lambda entry: len(entry[0])) for task, entries in by_task.items()}


def states(by_task, todo: set[str]) -> dict[str, str]:
    """done; to do (still a TODO, or a test of its own fails); waits (its only failing tests
    also grade another task that is to do: finish that one first)."""

    def own_failure(task):
        return any(failure and len(tasks) <= 1 for tasks, failure in by_task[task])

    blocking = {task for task in by_task if task in todo or own_failure(task)}
    result = {}
    for task, entries in by_task.items():
        failing = [tasks for tasks, failure in entries if failure]
        if not failing and task not in todo:
            result[task] = "done"
        elif task in blocking or not all(set(tasks) & (blocking - {task}) for tasks in failing):
            result[task] = "to do"
        else:
            result[task] = "waits on " + ", ".join(sorted(set().union(*failing) & (blocking - {task})))
    return result


MARKS = {"done": "✓ done   ", "to do": "✗ to do  "}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    by_task = summarise(config._task_results)
    if config.getoption("results_json"):
        failures = {task: [failure for _, failure in entries] for task, entries in by_task.items()}
        Path(config.getoption("results_json")).write_text(json.dumps(failures, indent=1))
    if config.getoption("code") == "reference" or not config._task_results:
        return
    catalogue = load_tasks()
    write = terminalreporter.write_line
    terminalreporter.section("tasks")
    order = sorted(by_task, key=lambda t: (t == "other", t))
    todo = stubs_left(code_folder(config), {catalogue[t].step for t in by_task if t in catalogue})
    state = states(by_task, todo)
    for task in order:
        entries = by_task[task]
        title = catalogue[task].title if task in catalogue else "checks of the code outside the tasks"
        label = f"Task {task}" if task in catalogue else "Other"
        passed = sum(failure is None for _, failure in entries)
        mark = MARKS.get(state[task], "◐ waits  ")
        note = "  (still a TODO)" if task in todo else (f"  ({state[task]})" if mark.startswith("◐") else "")
        write(f"  {mark}{label:<9} {title:<50} {passed}/{len(entries)} tests pass{note}")
    unfinished = [task for task in order if state[task] == "to do"]
    if unfinished:
        # A test that hung says least about where: a task whose failure names a behaviour goes first.
        task = min(unfinished, key=lambda t: all(hung(f) for _, f in by_task[t] if f) and t not in todo)
        failures = [failure for _, failure in by_task[task] if failure]
        failure = min(failures, key=hung, default="its TODO is still there")
        if task in catalogue:
            write(f"\nNext: Task {task}, {catalogue[task].title}. Stuck? make hint STEP={catalogue[task].step}")
        else:
            write(
                "\nNext: the other checks test code outside the tasks: did an edit outside a TODO "
                "break it? Compare with the step folder (git diff --no-index <step> exercises/<step>)."
            )
        write(f"  First failing test: {failure}")
        write("  (All the details: add --tb=short to the command above, or run it with -x.)")
        write(COUNTS_NOTE)
        write("make will now say 'Error 1': that only means not every task passes yet.")
    else:
        steps = sorted({catalogue[task].step for task in by_task if task in catalogue})
        write(COUNTS_NOTE)
        write("\nEvery task passes. Compare your code with the reference:")
        for step in steps:
            write(f"  git diff --no-index {STEPS[step]} exercises/{STEPS[step]}")
    if config.getoption("code") == "exercises" and not config.getoption("task"):
        record_progress(state, catalogue)


def stubs_left(folder: Path | None, steps: set[int]) -> set[str]:
    """The tasks whose `raise NotImplementedError` stub is still in the code under test."""
    if folder is None:
        return set()
    return {
        match
        for step in steps
        for path in (folder / STEPS[step]).rglob("*.py")
        for match in STUB.findall(path.read_text())
    }


def record_progress(state: dict[str, str], catalogue) -> None:
    """Remember what passed, for `make progress` and `make hint`."""
    progress = json.loads(PROGRESS.read_text()) if PROGRESS.is_file() else {}
    now = time.time()
    for task, value in state.items():
        if task in catalogue:
            progress[task] = {**progress.get(task, {}), "done": value == "done", "state": value, "graded_at": now}
    PROGRESS.parent.mkdir(exist_ok=True)
    PROGRESS.write_text(json.dumps(progress, indent=1, sort_keys=True))
