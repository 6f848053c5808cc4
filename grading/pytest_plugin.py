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
import sys
import time
from pathlib import Path

import pytest

from grading.exercises import EXERCISES, ROOT, STEPS, load_tasks

PROGRESS = EXERCISES / ".progress.json"


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


def summarise(results: dict) -> dict[str, list[str | None]]:
    """Per task, each of its tests' first failure (None for a test that passed)."""
    by_task: dict[str, list[str | None]] = {}
    for tasks, failure in results.values():
        for task in tasks or ("other",):
            by_task.setdefault(task, []).append(failure)
    return by_task


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    by_task = summarise(config._task_results)
    if config.getoption("results_json"):
        Path(config.getoption("results_json")).write_text(json.dumps(by_task, indent=1))
    if config.getoption("code") == "reference" or not config._task_results:
        return
    catalogue = load_tasks()
    write = terminalreporter.write_line
    terminalreporter.section("tasks")
    first_unfinished = None
    for task in sorted(by_task, key=lambda t: (t == "other", t)):
        failures = [failure for failure in by_task[task] if failure]
        title = catalogue[task].title if task in catalogue else "the step's other checks"
        label = f"Task {task}" if task in catalogue else "Other"
        passed = len(by_task[task]) - len(failures)
        write(f"  {'✗ to do' if failures else '✓ done '}  {label:<9} {title:<50} "
              f"{passed}/{len(by_task[task])} tests pass")
        if failures and first_unfinished is None:
            first_unfinished, first_failure = task, failures[0]
    if first_unfinished is not None:
        write(f"\nNext: {'Task ' + first_unfinished if first_unfinished in catalogue else 'the other checks'}."
              f" First failure:\n  {first_failure}")
    if first_unfinished in catalogue:
        write("Hint:")
        for line in catalogue[first_unfinished].hint.strip().splitlines():
            write(f"  {line}")
    elif first_unfinished is None:
        steps = sorted({catalogue[task].step for task in by_task if task in catalogue})
        write("\nEvery task passes. Compare your code with the reference:")
        for step in steps:
            write(f"  git diff --no-index {STEPS[step]} exercises/{STEPS[step]}")
    if config.getoption("code") == "exercises" and not config.getoption("task"):
        record_progress(by_task, catalogue)


def record_progress(by_task: dict[str, list[str | None]], catalogue) -> None:
    """Remember what passed, for `make progress` and `make hint`."""
    progress = json.loads(PROGRESS.read_text()) if PROGRESS.is_file() else {}
    now = time.time()
    for task, outcomes in by_task.items():
        if task in catalogue:
            progress[task] = {"done": not any(outcomes), "graded_at": now}
    PROGRESS.parent.mkdir(exist_ok=True)
    PROGRESS.write_text(json.dumps(progress, indent=1, sort_keys=True))
