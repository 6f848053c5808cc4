"""The learner's commands around the exercises: start, start over, grade with nothing yet."""

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from grading.exercises import ROOT, STEPS, load_tasks, start_exercise, write_exercise


def test_make_exercise_never_overwrites_and_fresh_moves_the_old_copy_aside(tmp_path):
    first = start_exercise(1, into=tmp_path)
    assert "Task 1.1" in first and "Echo until the client leaves" in first
    main = tmp_path / STEPS[1] / "main.py"
    assert 'raise NotImplementedError("Task 1.1' in main.read_text()
    main.write_text(main.read_text() + "\n# my own work\n")

    again = start_exercise(1, into=tmp_path)
    assert "already exists" in again and "FRESH=1" in again
    assert main.read_text().endswith("# my own work\n"), "the learner's work was changed"

    fresh = start_exercise(1, fresh=True, into=tmp_path)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(f"{STEPS[1]}.old-")]
    assert len(kept) == 1 and (kept[0] / "main.py").read_text().endswith("# my own work\n")
    assert "previous copy" in fresh and "# my own work" not in main.read_text()


def test_a_task_in_several_places_has_its_todo_once_and_the_other_places_point_to_it(tmp_path):
    exercise = write_exercise(4, tmp_path)
    session, main = (exercise / "session.py").read_text(), (exercise / "main.py").read_text()
    task = load_tasks()["4.1"]
    first_line = task.todo.strip().splitlines()[0]
    assert main.count(first_line) == 1 and first_line not in session, "the TODO must be written once, at part 1"
    assert "TODO Task 4.1, part 2 of 3" in session and "TODO Task 4.1, part 3 of 3" in session
    assert "is in the TODO of part 1, in main.py" in session
    assert session.count('raise NotImplementedError("Task 4.1') == 2, "every part still raises until written"


def run_grading(*args, exercises=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WORKSHOP_EXERCISES": str(exercises)} if exercises else None
    return subprocess.run(
        [sys.executable, "-m", "grading", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env
    )


def test_hint_names_the_task_and_refuses_one_from_another_step(tmp_path):
    hint = run_grading("hint", "2", "2.1", exercises=tmp_path)
    assert hint.returncode == 0 and "Task 2.1" in hint.stdout and "Hint, level 1 of 3" in hint.stdout
    wrong = run_grading("hint", "2", "3.1")
    assert wrong.returncode == 2 and "its tasks are 2.1, 2.2" in wrong.stdout


def test_progress_lists_every_task_of_every_step():
    progress = run_grading("progress")
    assert progress.returncode == 0
    for step in STEPS:
        assert f"Step {step} ({STEPS[step]})" in progress.stdout
    assert "Task 3.2" in progress.stdout and "Task 4.2" in progress.stdout


def test_each_hint_gives_the_next_level_and_progress_counts_them(tmp_path):
    task = load_tasks()["3.1"]
    for level in (1, 2, 3, 3):  # the last level stays the last
        shown = run_grading("hint", "3", "3.1", exercises=tmp_path)
        assert shown.returncode == 0 and f"level {level} of 3" in shown.stdout, shown.stdout
        assert task.hints[level - 1].strip() in shown.stdout
    assert "last level" in shown.stdout
    picked = run_grading("hint", "3", "3.1", "--level", "1", exercises=tmp_path)
    assert "level 1 of 3" in picked.stdout
    (tmp_path / STEPS[3]).mkdir()
    progress = run_grading("progress", exercises=tmp_path)
    line = next(line for line in progress.stdout.splitlines() if "Task 3.1" in line)
    assert "hints 3/3" in line and "not graded yet" in line


def test_hint_with_nothing_left_says_so_and_succeeds(tmp_path):
    result = run_grading("hint", "", exercises=tmp_path)  # `make hint` with no STEP, nothing started
    assert result.returncode == 0 and "make exercise STEP=" in result.stdout


@pytest.mark.slow
def test_watch_grades_again_when_a_file_is_saved_and_stops_cleanly(tmp_path):
    start_exercise(1, into=tmp_path)
    env = {**os.environ, "WORKSHOP_EXERCISES": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    watcher = subprocess.Popen(
        [sys.executable, "-m", "grading", "watch", "1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in watcher.stdout], daemon=True)
    reader.start()

    def read_until_watching(seconds: float = 90) -> str:
        seen, deadline = [], time.monotonic() + seconds
        while not (seen and seen[-1].startswith("Watching")):
            seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        return "".join(seen)

    try:
        first = read_until_watching()
        assert "Task 1.1" in first and "to do" in first
        main = tmp_path / STEPS[1] / "main.py"
        main.write_text(main.read_text() + "\n# saved\n")
        second = read_until_watching()
        assert "Task 1.1" in second, "saving a file did not grade again"
    finally:
        watcher.send_signal(signal.SIGINT)
        watcher.wait(timeout=30)
        reader.join(timeout=10)
    rest = "".join(lines.queue)
    assert watcher.returncode == 0 and "Stopped watching." in rest


SYNTHETIC = """
import time
import pytest

@pytest.mark.task("4.1")
def test_a_client_leaving_mid_reply():  # hangs, as the trial learner's did
    time.sleep(30)

@pytest.mark.task("4.2")
def test_a_stop_returns_normally():
    assert False, "stop() raised the reply's own cancellation"
"""


def test_a_test_that_hangs_is_named_in_words_and_next_points_at_the_task_that_says_why(tmp_path):
    # The trial learner's Stop bug (task 4.2 today): one test of it said why, while a test of 4.1 alone hung
    # until the per-test timeout; the summary sent them to 4.1 with "Timeout (>20s)".
    write_exercise(4, tmp_path, only=set())  # every task solved: only the tests below fail
    (tmp_path / "test_synthetic.py").write_text(SYNTHETIC)
    command = [sys.executable, "-m", "pytest", str(tmp_path / "test_synthetic.py"), "-c", "pyproject.toml"]
    command += [f"--code={tmp_path}"]
    done = subprocess.run(
        [*command, "--timeout=2", "-q", "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    summary = done.stdout.split("= tasks =", 1)[1].split("short test summary")[0]
    assert "Next: Task 4.2" in summary, summary
    assert "stop() raised the reply's own cancellation" in summary.split("First failing test:", 1)[1].splitlines()[0]
    assert "Timeout (>" not in summary, f"a bare timeout in the task summary:\n{summary}"
