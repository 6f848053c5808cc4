"""python -m grading exercise|grade|progress|hint  (what `make exercise`, `make grade`,
`make progress` and `make hint` run)."""

import argparse
import json
import subprocess
import sys

from grading.exercises import (
    EXERCISES,
    PRODUCT_NOTE,
    PRODUCT_STEP,
    ROOT,
    STEPS,
    load_tasks,
    start_exercise,
    tasks_of,
    test_files,
)
from grading.pytest_plugin import PROGRESS

VALID = ", ".join(str(step) for step in STEPS)


def step_number(text: str) -> int:
    if not text.isdigit() or int(text) not in STEPS:
        raise argparse.ArgumentTypeError(f"STEP must be one of {VALID} (got {text!r}), e.g. STEP=1")
    return int(text)


def step_or_current(text: str) -> int:
    """For `make hint`: with no STEP, the first started step that has a task left."""
    if text:
        return step_number(text)
    done = load_progress()
    for step, package in STEPS.items():
        if (EXERCISES / package).is_dir() and not all(done.get(t.id, {}).get("done") for t in tasks_of(step)):
            return step
    raise argparse.ArgumentTypeError(f"STEP must be one of {VALID}: no started exercise has a task left")


def grade(step: int, code: str = "exercises") -> int:
    """Run the step's fast tests against the learner's copy (or, for `check`, the reference)."""
    if code == "exercises" and step == PRODUCT_STEP:
        print(PRODUCT_NOTE)
        return 2
    if code == "exercises" and not (EXERCISES / STEPS[step]).is_dir():
        print(f"There is no exercise for step {step} yet. Start it with:  make exercise STEP={step}")
        return 2
    command = [
        sys.executable,
        "-m",
        "pytest",
        *test_files(step),
        "-m",
        "not slow",
        f"--code={code}",
        "-q",
        "--tb=no",
        "-rN",
        "-p",
        "no:cacheprovider",
    ]
    print("$", " ".join(command[2:]))  # the command, so a learner can add options to it
    return subprocess.run(command, cwd=ROOT).returncode


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
            state = done.get(task.id)
            mark = "✓ done " if state and state["done"] else "✗ to do"
            note = ""
            if state and started and changed_since(step, state["graded_at"]):
                note = f"  (edited since graded: make grade STEP={step})"
            elif state is None and started:
                note = "  (not graded yet)"
            print(f"  {mark}  Task {task.id}  {task.title} (~{task.minutes} min){note}")
    return 0


def hint(step: int, task_id: str | None) -> int:
    if step == PRODUCT_STEP:
        print(PRODUCT_NOTE)
        return 0
    tasks = load_tasks()
    if task_id is None:
        done = load_progress()
        todo = [task for task in tasks_of(step) if not done.get(task.id, {}).get("done")]
        # The task the grader named as next: the first "to do", not one that only waits on it.
        todo.sort(key=lambda task: done.get(task.id, {}).get("state", "to do") != "to do")
        if not todo:
            print(
                f"Every task of step {step} passed when last graded. Compare with the reference:\n"
                f"  git diff --no-index {STEPS[step]} exercises/{STEPS[step]}"
            )
            return 0
        task = todo[0]
    elif task_id in tasks and tasks[task_id].step == step:
        task = tasks[task_id]
    else:
        print(f"Step {step} has no task {task_id!r}: its tasks are " + ", ".join(task.id for task in tasks_of(step)))
        return 2
    print(f"Task {task.id}: {task.title} (about {task.minutes} min)\n")
    print(task.todo.strip(), "\n\nHint:\n" + task.hint.strip())
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m grading")
    commands = parser.add_subparsers(dest="command", required=True)
    exercise = commands.add_parser("exercise", help="write exercises/step0N_*/ (never overwrites)")
    exercise.add_argument("step", type=step_number)
    exercise.add_argument("--fresh", action="store_true", help="move your copy aside and start over")
    commands.add_parser("grade", help="grade your exercise").add_argument("step", type=step_number)
    commands.add_parser("check", help="the reference step's tests").add_argument("step", type=step_number)
    commands.add_parser("progress", help="every task, done or to do")
    hint_parser = commands.add_parser("hint", help="the hint for your next task")
    hint_parser.add_argument("step", type=step_or_current)
    hint_parser.add_argument("task", nargs="?", default=None)
    args = parser.parse_args()
    if args.command == "exercise":
        print(start_exercise(args.step, args.fresh))
        return 0
    if args.command in ("grade", "check"):
        return grade(args.step, "exercises" if args.command == "grade" else "reference")
    if args.command == "progress":
        return progress()
    return hint(args.step, args.task)


if __name__ == "__main__":
    sys.exit(main())
