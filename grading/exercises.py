"""Turn a reference step into an exercise: every task region becomes a TODO that raises.

A region is the lines between `# BEGIN TASK N.M` and `# END TASK N.M` (whole statements,
one indentation level). The exercise is a copy of the step's package in which each region
is replaced by a comment saying what to write and `raise NotImplementedError(...)`, never
`pass`: a stub that quietly returns None could pass a test by accident.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import re
import shutil
import sys
import textwrap
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The learner's copies (git-ignored); the tests of the grader point it elsewhere.
EXERCISES = Path(os.environ.get("WORKSHOP_EXERCISES") or ROOT / "exercises")
STEPS = {
    1: "step01_echo_ws",
    2: "step02_llm_stream",
    3: "step03_pocketflow_node",
    4: "step04_full_chat",
    5: "step05_production",
}
PRODUCT_STEP = 5  # the production chat: no tasks, it is there to read and to copy
PRODUCT_NOTE = (
    "Step 05 is the product, not an exercise: it has no tasks. Read step05_production/README.md "
    "and copy the folder into your own project (make chat runs it)."
)
# What steps 04 and 05 both promise is tested once, on both (tests/test_chat_contract.py).
SHARED_TESTS = {4: ["test_chat_contract.py"], 5: ["test_chat_contract.py"]}

BEGIN = re.compile(r"^(?P<indent>\s*)# BEGIN TASK (?P<task>\d+\.\d+)\s*$")
END = re.compile(r"^\s*# END TASK (?P<task>\d+\.\d+)\s*$")


@dataclass(frozen=True)
class Task:
    id: str
    title: str
    minutes: int
    todo: str
    hints: tuple[str, ...]  # level 1: the idea, 2: the shape, 3: nearly the code

    @property
    def step(self) -> int:
        return int(self.id.split(".")[0])


@dataclass(frozen=True)
class Region:
    task: str
    begin: int  # index of the BEGIN line
    end: int  # index of the END line
    indent: str
    has_yield: bool  # the region makes its function a generator: the stub must stay one


@functools.cache  # a static file: read once per process
def load_tasks() -> dict[str, Task]:
    with open(ROOT / "grading" / "tasks.toml", "rb") as file:
        entries = tomllib.load(file)["task"]
    return {
        entry["id"]: Task(entry["id"], entry["title"], entry["minutes"], entry["todo"], tuple(entry["hints"]))
        for entry in entries
    }


def tasks_of(step: int) -> list[Task]:
    return [task for task in load_tasks().values() if task.step == step]


def grading_command(step: int, code: str) -> list[str]:
    """The pytest command that grades a step's code (`make grade`, `make check`, the two-sided
    check): its fast tests, in process only, against `code` (reference, exercises or a folder)."""
    return [
        sys.executable,
        "-m",
        "pytest",
        *grading_tests(step),
        "-m",
        "not slow",
        f"--code={code}",
        f"--step={step}",
        "--in-process-only",
        "-q",
        "--tb=no",
        # Plugins these tests do not use cost a second of start-up on every grade.
        *("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:anyio", "-p", "no:platformdirs"),
    ]


def grading_tests(step: int) -> list[str]:
    """The test files that grade a step, relative to the repository root."""
    own = sorted((ROOT / "tests").glob(f"test_step0{step}_*.py"))
    shared = [ROOT / "tests" / name for name in SHARED_TESTS.get(step, [])]
    return [str(path.relative_to(ROOT)) for path in own + shared]


def find_regions(lines: list[str], where: str = "") -> list[Region]:
    regions, open_at = [], None
    for index, line in enumerate(lines):
        if begin := BEGIN.match(line):
            if open_at is not None:
                raise ValueError(f"{where}:{index + 1}: task {begin['task']} begins inside another task")
            open_at = (index, begin)
        elif end := END.match(line):
            if open_at is None or open_at[1]["task"] != end["task"]:
                raise ValueError(f"{where}:{index + 1}: END TASK {end['task']} without its BEGIN")
            start, begin = open_at
            body = ast.parse(textwrap.dedent("".join(lines[start + 1 : index])))
            has_yield = any(isinstance(node, (ast.Yield, ast.YieldFrom)) for node in ast.walk(body))
            regions.append(Region(begin["task"], start, index, begin["indent"], has_yield))
            open_at = None
    if open_at is not None:
        raise ValueError(f"{where}:{open_at[0] + 1}: task {open_at[1]['task']} never ends")
    return regions


def stub(task: Task, region: Region, part: int = 1, files: tuple[str, ...] = ("",)) -> list[str]:
    """What a learner finds in place of a region. A task written in several places (`files`:
    the file of each of its regions, in order) has its text once, at part 1; the others point there."""
    pad = region.indent
    if part == 1:  # (the TODO's text says where its other parts are)
        lines = [f"{pad}# TODO Task {task.id}: {task.title} (about {task.minutes} min)\n"]
        lines += [f"{pad}#   {line}\n" if line else f"{pad}#\n" for line in task.todo.strip().splitlines()]
    else:
        lines = [
            f"{pad}# TODO Task {task.id}, part {part} of {len(files)}: {task.title}. What must be true\n",
            f"{pad}#   is in the TODO of part 1, in {files[0]}.\n",
        ]
    lines += [
        f"{pad}#   Stuck? make hint STEP={task.step}    Done? make grade STEP={task.step}\n",
        f'{pad}raise NotImplementedError("Task {task.id} ({task.title}) is not written yet: '
        f"see README.md in this folder, 'Your turn'\")\n",
    ]
    if region.has_yield:
        lines.append(f"{pad}yield  # keeps this function a generator until you write it; then delete this line\n")
    return lines


def exercise_source(
    text: str, package: str, only: set[str] | None = None, where: str = "", parts: dict | None = None
) -> str:
    """The source with its task regions (or only those in `only`) replaced by stubs. `parts`:
    {task: [(file, BEGIN line index), ...]} over the whole step, to number a task's places."""
    tasks = load_tasks()
    lines = text.splitlines(keepends=True)
    for region in reversed(find_regions(lines, where)):
        if region.task not in tasks or STEPS[tasks[region.task].step] != package:
            raise ValueError(f"{where}: task {region.task} is not a task of {package} in tasks.toml")
        if only is None or region.task in only:
            places = (parts or {}).get(region.task) or [(where, region.begin)]
            part = places.index((where, region.begin)) + 1
            files = tuple(Path(file).name for file, _ in places)
            lines[region.begin : region.end + 1] = stub(tasks[region.task], region, part, files)
    source = "".join(lines)
    ast.parse(source, filename=where)  # a region must be whole statements
    return source


def regions_in_step(step: int) -> dict[str, list[tuple[Path, Region]]]:
    """Every task region of a reference step, by task id."""
    found: dict[str, list[tuple[Path, Region]]] = {}
    for path in sorted((ROOT / STEPS[step]).rglob("*.py")):
        for region in find_regions(path.read_text().splitlines(keepends=True), str(path)):
            found.setdefault(region.task, []).append((path, region))
    return found


def write_exercise(step: int, into: Path, only: set[str] | None = None) -> Path:
    """Copy the step's package into `into/<package>`, task regions replaced. Returns that folder."""
    package = STEPS[step]
    source, target = ROOT / package, into / package
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    parts = {  # each task's regions, as the files of the copy name them
        task: [(str((target / path.relative_to(source)).relative_to(into)), region.begin) for path, region in places]
        for task, places in regions_in_step(step).items()
    }
    for path in sorted(target.rglob("*.py")):
        text = path.read_text()
        if "# BEGIN TASK" in text:
            text = exercise_source(text, package, only, str(path.relative_to(into)), parts)
        path.write_text(own_run_command(text, package))
    readme = target / "README.md"
    readme.write_text(own_run_command(links_from(readme.read_text(), target), package))
    (target / STAMP).write_text(reference_version(step) + "\n")
    return target


STAMP = ".made-from"  # in an exercise: the version of the step it was made from


def reference_version(step: int) -> str:
    """A fingerprint of the reference step's files: it changes when `git pull` changes the step."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / STEPS[step]).rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def stale_note(step: int, folder: Path) -> str | None:
    """What to say when an exercise was made from another version of its step, or None."""
    stamp = folder / STAMP
    if not stamp.is_file() or stamp.read_text().strip() == reference_version(step):
        return None
    return (
        f"Note: step {step} has changed since your copy was made (a `git pull`?). The tests grade the\n"
        f"new version, so a task you solved may fail. See what changed with\n"
        f"  git diff --no-index {STEPS[step]} {shown(folder)}\n"
        f"or start this step over (your copy is kept aside): make exercise STEP={step} FRESH=1"
    )


def links_from(readme: str, folder: Path) -> str:
    """The step README's links to the rest of the repository (../docs/...), made right from
    the exercise copy's folder, which sits deeper than the step's own."""
    up = Path(os.path.relpath(ROOT, folder)).as_posix()
    return readme.replace("](../", f"]({up}/").replace('src="../', f'src="{up}/')


def own_run_command(text: str, package: str) -> str:
    """The run commands (uvicorn, python -m), pointed at the learner's copy instead of the reference."""
    for command in ("uvicorn ", "python -m "):
        text = text.replace(f"{command}{package}.", f"{command}exercises.{package}.")
    return text


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def start_exercise(step: int, fresh: bool = False, into: Path = EXERCISES) -> str:
    """`make exercise`: never overwrites a learner's work; `fresh` moves it aside first."""
    if step == PRODUCT_STEP:
        return PRODUCT_NOTE
    target = into / STEPS[step]
    if target.exists():
        if not fresh:
            return (
                f"{shown(target)}/ already exists: nothing was changed, your work is safe.\n"
                f"To start this step over, run `make exercise STEP={step} FRESH=1` "
                f"(your current copy is moved aside, not deleted)."
            )
        kept = target.with_name(f"{target.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        target.rename(kept)
        moved = (
            f"Your previous copy is now {shown(kept)}/ (to go back to it: delete the new "
            f"{shown(target)}/ and rename that folder to {target.name}).\n"
        )
    else:
        moved = ""
    into.mkdir(exist_ok=True)
    write_exercise(step, into)
    titles = "\n".join(f"  Task {t.id}: {t.title} (about {t.minutes} min)" for t in tasks_of(step))
    return (
        f"{moved}Wrote {shown(target)}/ with these tasks (look for TODO):\n{titles}\n"
        f"Read {shown(target)}/README.md ('Your turn'), write the code, then: make grade STEP={step}\n"
        f"Run it: .venv/bin/uvicorn exercises.{STEPS[step]}.main:app --reload"
        f"{' --ws-max-size 65536' if step == 4 else ''}"
    )
