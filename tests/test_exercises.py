"""The exercises are graded in both directions, for every task of every step.

For each step, the exercise is generated into a temporary folder and graded with the
step's own tests (`--code=<folder>`):
- with every task unwritten, it imports, its server starts and serves the page and the
  socket, and every task's tests fail;
- with only one task unwritten (the others as in the reference), that task's tests fail:
  a task whose tests pass while it is unwritten grades nothing;
- the same tests all pass against the reference;
- the exercise differs from the reference only inside task regions, and every task has a
  hint and a section in its step's README.
"""

import ast
import difflib
import json
import re
import subprocess
import textwrap
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from grading.exercises import (
    ROOT,
    STEPS,
    find_regions,
    grading_command,
    links_from,
    load_tasks,
    own_run_command,
    regions_in_step,
    stale_note,
    tasks_of,
    write_exercise,
)
from harness.support import LiveServer

pytestmark = pytest.mark.slow

GRADED_STEPS = [step for step in STEPS if tasks_of(step)]


def grade(step: int, code: Path | str, tmp_path: Path, task: str | None = None) -> dict[str, list]:
    """Each task's test results ({task: [failure message or None, ...]}) for `code`."""
    results = tmp_path / f"results-{step}-{task or 'all'}-{Path(str(code)).name}.json"
    command = [*grading_command(step, str(code)), f"--results-json={results}"]
    if task:
        command.append(f"--task={task}")
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert results.exists(), f"pytest did not run:\n{finished.stdout[-3000:]}{finished.stderr[-3000:]}"
    return json.loads(results.read_text())


@pytest.mark.parametrize("step", GRADED_STEPS)
def test_every_task_has_tests_that_pass_on_the_reference(step, tmp_path):
    results = grade(step, "reference", tmp_path)
    for task in tasks_of(step):
        assert results.get(task.id), f"Task {task.id} has no tests (mark them @pytest.mark.task)"
        failures = [f for f in results[task.id] if f]
        assert not failures, f"Task {task.id}'s tests fail on the reference: {failures}"


@pytest.mark.parametrize("step", GRADED_STEPS)
def test_the_unsolved_exercise_runs_and_fails_every_task(step, tmp_path):
    write_exercise(step, tmp_path)
    package = STEPS[step]
    with LiveServer(f"{package}.main:app", extra_args=("--app-dir", str(tmp_path))) as server:
        assert httpx.get(server.url + "/").status_code == 200  # the page loads
        with connect(server.ws_url, open_timeout=10):  # and the socket connects
            pass
    results = grade(step, tmp_path, tmp_path)
    for task in tasks_of(step):
        passing = [i for i, failure in enumerate(results.get(task.id, [])) if not failure]
        assert results.get(task.id) and not passing, f"Task {task.id}: tests pass while it is unwritten"


@pytest.mark.parametrize("task", [t.id for step in GRADED_STEPS for t in tasks_of(step)])
def test_each_task_alone_unwritten_fails_its_own_tests(task, tmp_path):
    step = int(task.split(".")[0])
    write_exercise(step, tmp_path, only={task})
    results = grade(step, tmp_path, tmp_path, task=task)
    assert results.get(task), f"Task {task} has no tests"
    passing = [index for index, failure in enumerate(results[task]) if not failure]
    assert not passing, f"Task {task}: {len(passing)} of its tests pass while only it is unwritten"


@pytest.mark.parametrize("step", GRADED_STEPS)
def test_every_command_in_the_exercise_runs_the_learners_copy_not_the_answer_key(step, tmp_path):
    exercise = write_exercise(step, tmp_path)
    for path in [exercise / "README.md", *exercise.rglob("*.py")]:
        text = path.read_text()
        for command in ("uvicorn ", "python -m "):
            assert f"{command}{STEPS[step]}." not in text, f"{path.name} runs the reference: {command}{STEPS[step]}..."


@pytest.mark.parametrize("step", GRADED_STEPS)
def test_the_exercise_differs_from_the_reference_only_inside_task_regions(step, tmp_path):
    exercise = write_exercise(step, tmp_path)
    reference = ROOT / STEPS[step]
    for path in reference.rglob("*"):
        if path.is_dir() or "__pycache__" in path.parts:
            continue
        copy = exercise / path.relative_to(reference)
        if path == reference / "README.md":  # its rules: links made right from the copy, run commands its own
            assert copy.read_text() == own_run_command(links_from(path.read_text(), exercise), STEPS[step])
            continue
        if path.suffix != ".py":
            assert copy.read_bytes() == path.read_bytes(), f"{copy} differs from {path}"
            continue
        lines = path.read_text().splitlines(keepends=True)
        inside = {i for region in find_regions(lines) for i in range(region.begin, region.end + 1)}
        # ...except the run command, which points at the learner's copy.
        copied = copy.read_text()
        for command in ("uvicorn ", "python -m "):
            copied = copied.replace(f"{command}exercises.{STEPS[step]}.", f"{command}{STEPS[step]}.")
        matcher = difflib.SequenceMatcher(None, lines, copied.splitlines(keepends=True), autojunk=False)
        for kind, first, last, _, _ in matcher.get_opcodes():
            changed = set(range(first, last))
            assert kind == "equal" or changed <= inside, (
                f"{copy} changed lines outside a task: {sorted(changed - inside)}"
            )


@pytest.mark.parametrize("step", GRADED_STEPS)
def test_the_exercise_says_to_run_the_learners_copy(step, tmp_path):
    main = (write_exercise(step, tmp_path) / "main.py").read_text()
    assert f"uvicorn exercises.{STEPS[step]}.main:app" in main and f"uvicorn {STEPS[step]}." not in main


@pytest.mark.parametrize("step", GRADED_STEPS)
def test_every_task_is_marked_in_the_code_and_has_a_hint_and_a_readme_section(step):
    marked = regions_in_step(step)
    readme = (ROOT / STEPS[step] / "README.md").read_text()
    for task in tasks_of(step):
        assert task.id in marked, f"Task {task.id} has no BEGIN/END TASK region in {STEPS[step]}"
        assert len(task.hints) == 3 and all(h.strip() for h in task.hints) and task.todo.strip() and task.minutes > 0
        assert "https://" in task.hints[0], f"Task {task.id}'s first hint level links no official doc"
        assert f"### Task {task.id}:" in readme, f"{STEPS[step]}/README.md has no '### Task {task.id}:' section"
    assert set(marked) <= {task.id for task in tasks_of(step)}, "a region names a task that tasks.toml lacks"


def code_lines(path: Path, region) -> list[str]:
    """The statements a task's region holds, without comments, as a learner would type them."""
    lines = path.read_text().splitlines()[region.begin + 1 : region.end]
    code = [re.sub(r"\s+#.*$", "", line).strip() for line in lines if not line.strip().startswith("#")]
    return [line for line in code if len(line) >= 12]  # `return`, `else:`, `raise` give nothing away


def region_source(path: Path, region) -> str:
    return textwrap.dedent("".join(path.read_text().splitlines(keepends=True)[region.begin + 1 : region.end]))


def names_a_solution_uses(source: str) -> set[str]:
    """The names a learner must know to write a region: what it reads without binding it, its
    attributes and keyword arguments. Not `self`, and not the learner's own local names."""
    tree = ast.parse(source)
    own = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    own |= {node.name for node in ast.walk(tree) if isinstance(node, ast.ExceptHandler) and node.name}
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in own:
            used.add(node.id)
        elif isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            used.add(node.arg)
    return used - {"self"}


def names_given(names: set[str], prose: str) -> set[str]:
    """The names a text hands over: a code-shaped name (with `_` or a capital: create_task, BUSY,
    StreamCutOff) wherever it stands, and any name written as code between backticks outside
    quotes (in `{"type": "stop"}` the word stop is data; in `stop()` it is a name)."""
    fenced = re.findall(r"```(.*?)```", prose, flags=re.S)
    spans = fenced + re.findall(r"`([^`]+)`", re.sub(r"```.*?```", " ", prose, flags=re.S))
    code = " ".join(re.sub(r'"[^"]*"', " ", span) for span in spans)

    def shows(name: str, text: str) -> bool:
        return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text) is not None

    return {name for name in names if shows(name, code) or (name != name.lower() or "_" in name) and shows(name, prose)}


def your_turn(readme: str) -> str:
    """The README's 'Your turn' section, where the tasks are introduced."""
    found = re.search(r"^## Your turn.*?(?=^## |\Z)", readme, flags=re.S | re.M)
    assert found, "the README has no '## Your turn' section"
    return found.group(0)


@pytest.mark.parametrize("step", GRADED_STEPS)
def test_no_line_of_a_solution_is_written_in_a_todo_an_early_hint_or_the_readme(step):
    readme = " ".join((ROOT / STEPS[step] / "README.md").read_text().split())
    # Every TODO of the step: a learner reads them all, so one task's text must not hold another's line.
    todos = {task.id: " ".join(f"{task.title} {task.todo}".split()) for task in tasks_of(step)}
    for task_id, places in regions_in_step(step).items():
        for path, region in places:
            for line in code_lines(path, region):
                for todo_id, todo in todos.items():
                    assert line not in todo, f"Task {todo_id}'s TODO gives away {line!r} (task {task_id})"
                for level, hint in enumerate(load_tasks()[task_id].hints[:2], start=1):  # level 3 is nearly the code
                    assert line not in " ".join(hint.split()), f"Task {task_id}'s hint {level} gives away {line!r}"
                assert line not in readme, f"{STEPS[step]}/README.md gives away {line!r} (task {task_id})"


@pytest.mark.parametrize("step", GRADED_STEPS)
def test_a_todo_leaves_the_learner_to_find_the_names_of_its_solution(step):
    """A learner should find the names from the code around the TODO and from the docs, not copy
    them from its text: the TODO, its title and the README's 'Your turn' name at most a third
    of them (none when the solution uses fewer than three)."""
    readme = your_turn((ROOT / STEPS[step] / "README.md").read_text())
    too_telling = []
    for task_id, places in sorted(regions_in_step(step).items()):
        task = load_tasks()[task_id]
        needed = set().union(*(names_a_solution_uses(region_source(path, region)) for path, region in places))
        given = names_given(needed, f"{task.title}\n{task.todo}\n{readme}")
        if len(given) > len(needed) // 3:
            too_telling.append(f"{task_id}: {len(given)} of {len(needed)} ({', '.join(sorted(given))})")
    assert not too_telling, (
        "these TODOs (with their title and the README's 'Your turn') hand over the names their solution "
        f"uses; say what must be true, not what to call: {'; '.join(too_telling)}"
    )


@pytest.mark.parametrize("step", GRADED_STEPS)
def test_the_exercise_readmes_links_lead_where_the_steps_do(step, tmp_path):
    exercise = write_exercise(step, tmp_path)
    text = re.sub(r"```.*?```", "", (exercise / "README.md").read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:", target) and not target.startswith("#"):
            assert (exercise / target.split("#")[0]).resolve().exists(), f"{target} leads nowhere"


def test_an_exercise_from_an_older_step_says_so_when_graded(tmp_path):
    exercise = write_exercise(1, tmp_path)
    assert stale_note(1, exercise) is None
    (exercise / ".made-from").write_text("0123456789abcdef\n")  # as if made before a `git pull`
    note = stale_note(1, exercise)
    assert "step 1 has changed since your copy was made" in note and "FRESH=1" in note
