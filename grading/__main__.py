"""python -m grading exercise|grade|progress|hint  (what `make exercise`, `make grade`,
`make progress` and `make hint` run)."""

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from grading.exercises import (
    EXERCISES,
    PRODUCT_NOTE,
    PRODUCT_STEP,
    ROOT,
    STEPS,
    Task,
    grading_command,
    load_tasks,
    shown,
    stale_note,
    start_exercise,
    tasks_of,
)
from grading.pytest_plugin import PROGRESS

VALID = ", ".join(str(step) for step in STEPS)


def step_number(text: str) -> int:
    if not text.isdigit() or int(text) not in STEPS:
        raise argparse.ArgumentTypeError(f"STEP must be one of {VALID} (got {text!r}), e.g. STEP=1")
    return int(text)


def step_or_current(text: str) -> int | None:
    """For `make hint`: with no STEP, the first started step that has a task left (None: none has)."""
    if text:
        return step_number(text)
    done = load_progress()
    for step, package in STEPS.items():
        if (EXERCISES / package).is_dir() and not all(done.get(t.id, {}).get("done") for t in tasks_of(step)):
            return step
    return None


def grade(step: int, code: str = "exercises") -> int:
    """Run the step's fast tests against the learner's copy (or, for `check`, the reference)."""
    if code == "exercises" and step == PRODUCT_STEP:
        print(PRODUCT_NOTE)
        return 2
    if code == "exercises" and not (EXERCISES / STEPS[step]).is_dir():
        print(f"There is no exercise for step {step} yet. Start it with:  make exercise STEP={step}")
        return 2
    note = stale_note(step, EXERCISES / STEPS[step]) if code == "exercises" else None
    if note:
        print(note + "\n")
    command = grading_command(step, code)
    command.insert(command.index("--tb=no") + 1, "-rN")
    print("$", shown_command(command))  # the command, so a learner can add options to it
    return subprocess.run(command, cwd=ROOT).returncode


def shown_command(command: list[str]) -> str:
    """A command as it can be pasted into this machine's shell, from the repository root."""
    python = Path(command[0])
    if python.is_relative_to(ROOT):  # .venv/bin/python, not /home/.../.venv/bin/python
        python = python.relative_to(ROOT)
    words = [str(python), *command[1:]]
    return subprocess.list2cmdline(words) if os.name == "nt" else shlex.join(words)


def load_progress() -> dict:
    return json.loads(PROGRESS.read_text()) if PROGRESS.is_file() else {}


def changed_since(step: int, moment: float) -> bool:
    folder = EXERCISES / STEPS[step]
    return any(path.stat().st_mtime > moment for path in folder.rglob("*.py"))


def progress() -> int:
    done = load_progress()
    for step, package in STEPS.items():
        if step == PRODUCT_STEP:
            print(f"Step {step} ({package}): the product, with no tasks: read it and copy it")
            continue
        folder = EXERCISES / package
        started = folder.is_dir()
        print(f"Step {step} ({package}){'' if started else f': not started (make exercise STEP={step})'}")
        for task in tasks_of(step):
            state = done.get(task.id, {})
            mark = "✓ done " if state.get("done") else "✗ to do"
            note = ""
            if "graded_at" in state and started and changed_since(step, state["graded_at"]):
                note = f"  (edited since graded: make grade STEP={step})"
            elif "graded_at" not in state and started:
                note = "  (not graded yet)"
            hints = f"  hints {state['hints_seen']}/{len(task.hints)}" if state.get("hints_seen") else ""
            print(f"  {mark}  Task {task.id}  {task.title} (~{task.minutes} min){hints}{note}")
    return 0


def watch(step: int) -> int:
    """rustlings' watch mode: grade the exercise again every time one of its files is saved."""
    from watchfiles import PythonFilter  # installed with uvicorn[standard]
    from watchfiles import watch as changes

    folder = EXERCISES / STEPS[step]
    if step == PRODUCT_STEP or not folder.is_dir():
        return grade(step)  # says why there is nothing to watch
    # One watcher for the whole session, started before the first grade: a save made while a
    # grade runs is kept, and starts the next grade at once.
    saves = changes(folder, watch_filter=PythonFilter(), debounce=300, yield_on_timeout=True, rust_timeout=200)
    try:
        next(saves)  # starts watching (an empty answer after 0.2 s)
        while True:
            print("\033[2J\033[H", end="")  # a clear screen for every run
            grade(step)
            print(f"\nWatching {shown(folder)}/: save a file to grade again, Ctrl-C to stop.", flush=True)
            while not next(saves):
                pass
    except KeyboardInterrupt:
        print("\nStopped watching.")
        return 0


LEVELS = ("the idea", "the shape", "nearly the code")


def next_task(step: int) -> Task | None:
    """The task the grader named as next: the first "to do" (not one that only waits on it)."""
    done = load_progress()
    todo = [task for task in tasks_of(step) if not done.get(task.id, {}).get("done")]
    todo.sort(key=lambda task: done.get(task.id, {}).get("state", "to do") != "to do")
    return todo[0] if todo else None


def hint(step: int | None, task_id: str | None, level: int | None = None) -> int:
    """One level of a task's hint: the next one not yet shown, or `level`."""
    if step is None:
        print("Every exercise you started passed when last graded. Start the next: make exercise STEP=<N>")
        return 0
    if step == PRODUCT_STEP:
        print(PRODUCT_NOTE)
        return 0
    tasks = load_tasks()
    if task_id is None:
        task = next_task(step)
        if task is None:
            print(
                f"Every task of step {step} passed when last graded. Compare with the reference:\n"
                f"  git diff --no-index {STEPS[step]} exercises/{STEPS[step]}"
            )
            return 0
    elif task_id in tasks and tasks[task_id].step == step:
        task = tasks[task_id]
    else:
        print(f"Step {step} has no task {task_id!r}: its tasks are " + ", ".join(task.id for task in tasks_of(step)))
        return 2
    progress = load_progress()
    seen = progress.get(task.id, {}).get("hints_seen", 0)
    last = len(task.hints)
    if level is None:
        level = min(seen + 1, last)
    elif not 1 <= level <= last:
        print(f"LEVEL must be 1 to {last}.")
        return 2
    print(f"Task {task.id}: {task.title}")
    print(f"Hint, level {level} of {last} ({LEVELS[level - 1]}):\n")
    print(task.hints[level - 1].strip())
    if level < last:
        print(
            f"\nStill stuck? The same command gives level {level + 1} "
            f"(or: make hint STEP={step} TASK={task.id} LEVEL={level + 1})."
        )
    else:
        print(f"\nThat was the last level. The whole answer: the step folder, {STEPS[step]}/.")
    progress.setdefault(task.id, {})["hints_seen"] = max(seen, level)
    PROGRESS.parent.mkdir(exist_ok=True)
    PROGRESS.write_text(json.dumps(progress, indent=1, sort_keys=True))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m grading")
    commands = parser.add_subparsers(dest="command", required=True)
    exercise = commands.add_parser("exercise", help="write exercises/step0N_*/ (never overwrites)")
    exercise.add_argument("step", type=step_number)
    exercise.add_argument("--fresh", action="store_true", help="move your copy aside and start over")
    commands.add_parser("grade", help="grade your exercise").add_argument("step", type=step_number)
    commands.add_parser("check", help="the reference step's tests").add_argument("step", type=step_number)
    commands.add_parser("watch", help="grade again on every save").add_argument("step", type=step_number)
    commands.add_parser("progress", help="every task, done or to do")
    hint_parser = commands.add_parser("hint", help="the hint for your next task")
    hint_parser.add_argument("step", type=step_or_current)
    hint_parser.add_argument("task", nargs="?", default=None)
    hint_parser.add_argument("--level", type=int, default=None, help="1 the idea, 2 the shape, 3 nearly the code")
    args = parser.parse_args()
    if args.command == "exercise":
        print(start_exercise(args.step, args.fresh))
        return 0
    if args.command in ("grade", "check"):
        return grade(args.step, "exercises" if args.command == "grade" else "reference")
    if args.command == "watch":
        return watch(args.step)
    if args.command == "progress":
        return progress()
    return hint(args.step, args.task, args.level)


if __name__ == "__main__":
    sys.exit(main())
