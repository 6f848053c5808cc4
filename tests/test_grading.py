"""The learner's commands around the exercises: start, start over, grade with nothing yet."""

import subprocess
import sys

from grading.exercises import ROOT, STEPS, start_exercise


def test_make_exercise_never_overwrites_and_fresh_moves_the_old_copy_aside(tmp_path):
    first = start_exercise(1, into=tmp_path)
    assert "Task 1.1" in first and "Task 1.2" in first
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


def run_grading(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "grading", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_hint_names_the_task_and_refuses_one_from_another_step():
    hint = run_grading("hint", "2", "2.1")
    assert hint.returncode == 0 and "Task 2.1" in hint.stdout and "Hint:" in hint.stdout
    wrong = run_grading("hint", "2", "3.1")
    assert wrong.returncode == 2 and "its tasks are 2.1, 2.2" in wrong.stdout


def test_progress_lists_every_task_of_every_step():
    progress = run_grading("progress")
    assert progress.returncode == 0
    for step in STEPS:
        assert f"Step {step} ({STEPS[step]})" in progress.stdout
    assert "Task 3.4" in progress.stdout
