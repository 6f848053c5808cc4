"""pytest plugin: grade the reference steps or a learner's exercises with the same tests.

  --code=reference   (default) the step folders at the repository root
  --code=exercises   the learner's copies in exercises/ (what `make grade` uses)
  --code=DIR         any folder holding step0N_* packages (the two-sided check uses this)
  --task=N.M         run only the tests of one task

Tests name their task with `@pytest.mark.task("2.1")`. With --code set, a table of tasks
(passed or not) and the hint for the first unfinished task are printed at the end.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import re
import sys
import time
from pathlib import Path

import pytest

from grading.exercises import EXERCISES, ROOT, STEPS, load_tasks

PROGRESS = EXERCISES / ".progress.json"
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
    group.addoption("--code", default="reference",
                    help="reference | exercises | a folder of step0N_* packages (default: reference)")
    group.addoption("--task", default=None, help="run only the tests of this task, e.g. 2.1")
    group.addoption("--results-json", default=None,
                    help="write each task's test failures (null for a pass) to this file")


def code_folder(config) -> Path | None:
    """The folder whose step packages are under test, or None for the reference steps."""
    code = config.getoption("code")
    if code == "reference":
        return None
    return EXERCISES if code == "exercises" else Path(code).resolve()


def pytest_configure(config):
    config.addinivalue_line("markers", "task(id, ...): the exercise task(s) this test grades")
    folder = code_folder(config)
    if folder is not None:
        sys.meta_path.insert(0, FromFolder(folder))
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
    folder = code_folder(session.config)
    if folder is None:
        return
    for package in STEPS.values():
        module = sys.modules.get(package)
        if module is not None and (folder / package).is_dir():
            assert Path(module.__file__).is_relative_to(folder), (
                f"{package} was imported from {module.__file__}, not from {folder}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    tasks = tasks_of_item(item)
    results = item.config._task_results
    if report.failed and results.get(item.nodeid, (tasks, None))[1] is None:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash else str(report.longrepr).strip().splitlines()[-1]
        results[item.nodeid] = (tasks, f"{item.name}: {message.splitlines()[0][:300]}")
        if tasks:  # name the task right in the failure, with what to do about it
            catalogue = load_tasks()
            lines = [f"Task {t}: {catalogue[t].title}. Stuck? make hint STEP={catalogue[t].step}"
                     for t in tasks if t in catalogue]
            report.sections.append(("this test grades", "\n".join(lines)))


def summarise(results: dict) -> dict[str, list[tuple[bool, str | None]]]:
    """Per task, each of its tests as (grades this task alone, first failure or None). The
    tests that grade the task alone come first: their failures say most about it."""
    by_task: dict[str, list[tuple[bool, str | None]]] = {}
    for tasks, failure in results.values():
        for task in tasks or ("other",):
            by_task.setdefault(task, []).append((len(tasks) <= 1, failure))
    return {task: sorted(entries, key=lambda entry: not entry[0]) for task, entries in by_task.items()}


def state_of(entries) -> str:
    if all(failure is None for _, failure in entries):
        return "✓ done   "
    if all(failure is None for alone, failure in entries if alone) and any(alone for alone, _ in entries):
        return "◐ almost "  # its own tests pass; the ones it shares with another task do not yet
    return "✗ to do  "


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
    for task in order:
        entries = by_task[task]
        title = catalogue[task].title if task in catalogue else "the step's other checks"
        label = f"Task {task}" if task in catalogue else "Other"
        passed = sum(failure is None for _, failure in entries)
        write(f"  {state_of(entries)}{label:<9} {title:<50} {passed}/{len(entries)} tests pass"
              + ("  (still a TODO)" if task in todo else ""))
    # Next: a task still left as a TODO, else the first with a failing test of its own,
    # else the first with any failure.
    unfinished = [t for t in order if t in todo] or \
                 [t for t in order if state_of(by_task[t]).startswith("✗")] or \
                 [t for t in order if not state_of(by_task[t]).startswith("✓")]
    if unfinished:
        task = unfinished[0]
        first_failure = next(failure for _, failure in by_task[task] if failure)
        write(f"\nNext: {'Task ' + task if task in catalogue else 'the other checks'}. First failure:")
        write(f"  {first_failure}")
        if task in catalogue:
            write("Hint:")
            for line in catalogue[task].hint.strip().splitlines():
                write(f"  {line}")
        if any(state_of(by_task[t]).startswith("◐") for t in order):
            write("(◐ almost: the task's own tests pass; tests it shares with a later task wait for that one.)")
    else:
        steps = sorted({catalogue[task].step for task in by_task if task in catalogue})
        write("\nEvery task passes. Compare your code with the reference:")
        for step in steps:
            write(f"  git diff --no-index {STEPS[step]} exercises/{STEPS[step]}")
    if config.getoption("code") == "exercises" and not config.getoption("task"):
        record_progress(by_task, catalogue)


def stubs_left(folder: Path | None, steps: set[int]) -> set[str]:
    """The tasks whose `raise NotImplementedError` stub is still in the code under test."""
    if folder is None:
        return set()
    return {match for step in steps for path in (folder / STEPS[step]).rglob("*.py")
            for match in STUB.findall(path.read_text())}


def record_progress(by_task: dict[str, list[tuple[bool, str | None]]], catalogue) -> None:
    """Remember what passed, for `make progress` and `make hint`."""
    progress = json.loads(PROGRESS.read_text()) if PROGRESS.is_file() else {}
    now = time.time()
    for task, outcomes in by_task.items():
        if task in catalogue:
            progress[task] = {"done": all(failure is None for _, failure in outcomes), "graded_at": now}
    PROGRESS.parent.mkdir(exist_ok=True)
    PROGRESS.write_text(json.dumps(progress, indent=1, sort_keys=True))
