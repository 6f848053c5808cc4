"""make kit / make setup KIT=<dir>: a workshop room with no network. The instructor builds the
kit beforehand (with the network); each learner sets up from it, grades and chats with none."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from harness.fake_llm import free_port
from harness.support import ROOT
from tests.test_workshop import run_workshop
from workshop import kit

# What a copy of the repository holds, as a learner's fresh clone would: no .venv, no kit.
NOT_CLONED = shutil.ignore_patterns(".git", ".venv", "kit", "exercises", "data", "*.egg-info", "__pycache__", ".*cache")
# Frames a learner's browser would get: the reply, over the chat's real WebSocket.
CLIENT = """
import json, sys
from websockets.sync.client import connect
with connect(sys.argv[1], open_timeout=10) as ws:
    ws.send(json.dumps({"type": "message", "content": "Say hi"}))
    while True:
        frame = json.loads(ws.recv(timeout=60))
        print(json.dumps(frame), flush=True)
        if frame["type"] in ("end", "error"):
            break
"""


def fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    shutil.copytree(ROOT, clone, ignore=NOT_CLONED)
    return clone


def test_a_kit_path_with_no_kit_is_named_before_anything_is_installed(tmp_path):
    clone = fresh_clone(tmp_path)
    result = run_workshop("setup", "--kit", str(tmp_path / "usb-stick"), root=clone)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "No kit at" in result.stderr and "usb-stick" in result.stderr and "Traceback" not in result.stderr
    assert not (clone / ".venv").exists()


def test_a_kit_without_this_python_names_what_it_has_before_anything_is_installed(tmp_path):
    clone = fresh_clone(tmp_path)
    other = tmp_path / "kit"  # laid out as make kit lays it out, for another machine only
    (other / "wheels").mkdir(parents=True)
    (other / "targets").mkdir()
    (other / "targets" / "windows-amd64-py3.12.txt").write_text("pip-25.3-py3-none-any.whl\n")
    result = run_workshop("setup", "--kit", str(other), root=clone)
    assert result.returncode == 2, result.stdout + result.stderr
    this = "{}-py{}.{}".format(kit.this_platform(), *sys.version_info[:2])
    assert f"The kit has no files for {this} (it was built for: windows-amd64-py3.12)" in result.stderr
    assert "PYTHON=" in result.stderr and not (clone / ".venv").exists()


def test_a_venv_whose_kit_is_gone_says_so_instead_of_reaching_for_the_network(tmp_path):
    clone = fresh_clone(tmp_path)
    (clone / ".venv").mkdir()  # what setup --kit left, the USB stick since taken out
    (clone / ".venv" / "pip.conf").write_text(f"[global]\nno-index = true\nfind-links = {tmp_path / 'gone'}\n")
    result = run_workshop("setup", root=clone)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "which is not there now" in result.stderr and "make setup KIT=" in result.stderr


def test_an_unknown_kit_target_is_refused_with_the_known_ones(tmp_path):
    result = run_workshop("kit", "--out", str(tmp_path), "--platform", "plan9", "--python", "3.11")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "No such kit target: plan9" in result.stderr and "linux-x86_64" in result.stderr
    assert not any(tmp_path.iterdir()), "nothing is downloaded for a mistyped target"


def offline_env() -> dict:
    """This machine's pip and uv settings removed (its global pip config adds indexes and
    find-links): what a learner's laptop in the room has."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
    return {**env, "PIP_CONFIG_FILE": os.devnull}


class NoNetwork:
    """A network namespace with only a loopback: each command run through it sees no network."""

    def __enter__(self):
        if shutil.which("unshare") is None or os.geteuid() != 0:
            pytest.skip("needs root and unshare for a network namespace")
        self.holder = subprocess.Popen(["unshare", "-n", "sleep", "1800"])
        ours, deadline = os.readlink("/proc/self/ns/net"), time.monotonic() + 10
        while os.readlink(f"/proc/{self.holder.pid}/ns/net") == ours:  # not yet in its own namespace
            assert time.monotonic() < deadline and self.holder.poll() is None, "unshare -n did not start"
            time.sleep(0.05)
        subprocess.run(self.command(["ip", "link", "set", "lo", "up"]), check=True)
        return self

    def command(self, args) -> list:
        return ["nsenter", "-t", str(self.holder.pid), "-n", "--", *map(str, args)]

    def run(self, *args, cwd, timeout=900, env=None) -> subprocess.CompletedProcess:
        command = self.command([sys.executable, "-m", "workshop", *args])
        env = {**offline_env(), **(env or {})}
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)

    def __exit__(self, *exc):
        self.holder.kill()
        self.holder.wait()


@pytest.fixture(scope="session")
def kit_for_this_machine(tmp_path_factory):
    """A kit for this platform and this Python only, built once, with the network."""
    out = tmp_path_factory.mktemp("kit")
    python = "{}.{}".format(*sys.version_info[:2])
    began = time.monotonic()
    built = run_workshop("kit", "--out", str(out), "--platform", kit.this_platform(), "--python", python, timeout=900)
    assert built.returncode == 0, built.stdout + built.stderr[-3000:]
    print(f"kit for {kit.this_platform()} Python {python} built in {time.monotonic() - began:.0f} s")
    return out


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.timeout(2400)
def test_a_learner_sets_up_grades_and_chats_from_a_kit_with_no_network(kit_for_this_machine, tmp_path):
    clone = fresh_clone(tmp_path)
    with NoNetwork() as room:
        reach_pypi = "import urllib.request; urllib.request.urlopen('https://pypi.org/simple/', timeout=10)"
        unreachable = subprocess.run(room.command([sys.executable, "-c", reach_pypi]), capture_output=True)
        assert unreachable.returncode != 0, "the namespace must have no network, or this test proves nothing"

        began = time.monotonic()
        setup = room.run("setup", "--kit", kit_for_this_machine, cwd=clone)
        assert setup.returncode == 0, setup.stdout + setup.stderr[-3000:]
        print(f"offline set-up from the kit: {time.monotonic() - began:.0f} s")

        exercises = {"WORKSHOP_EXERCISES": str(tmp_path / "exercises")}
        assert room.run("exercise", "1", cwd=clone, env=exercises).returncode == 0
        graded = room.run("grade", "1", cwd=clone, env=exercises)
        assert graded.returncode == 1 and "Task 1.1" in graded.stdout, "an untouched exercise fails its grade"

        # A `git pull` that changes the lock: the next command installs again, from the kit.
        with open(clone / "locks" / "learn.txt", "a") as lock:
            lock.write("# pulled: a new lock\n")
        again = room.run("progress", cwd=clone)
        assert again.returncode == 0, again.stdout + again.stderr[-3000:]
        assert "Installing the tested versions" in again.stdout and "Task 1.1" in again.stdout

        frames = chat_reply(room, clone)
    if frames[0]["type"] == "conversation":  # step05 names the conversation first
        frames = frames[1:]
    assert frames[0]["type"] == "start" and frames[-1]["type"] == "end", frames[-1]
    chunks = [frame["content"] for frame in frames if frame["type"] == "chunk"]
    assert len(chunks) >= 3 and all(chunks), "the embedded model streamed a reply"


def chat_reply(room: NoNetwork, clone) -> list:
    """`python -m workshop chat` in the room, and one reply fetched over its WebSocket there."""
    port = free_port()
    command = room.command([sys.executable, "-m", "workshop", "chat", "--port", port])
    # A session of its own, as in a terminal: Ctrl-C reaches the workshop command and the chat it started.
    errors = tempfile.TemporaryFile("w+")  # a file, not a pipe: the model's log must never block it
    chat = subprocess.Popen(
        command, cwd=clone, env=offline_env(), stdout=subprocess.PIPE, stderr=errors, text=True, start_new_session=True
    )
    try:
        printed = []
        for line in chat.stdout:  # the URL is printed once the chat answers
            printed.append(line)
            if "Chat: open" in line:
                break
        else:
            raise AssertionError("make chat never printed its URL:\n" + "".join(printed))
        python = clone / ".venv" / "bin" / "python"
        client = room.command([python, "-c", CLIENT, f"ws://127.0.0.1:{port}/ws"])
        reply = subprocess.run(client, capture_output=True, text=True, timeout=180)
        assert reply.returncode == 0, reply.stderr
    finally:
        os.killpg(chat.pid, signal.SIGINT)  # Ctrl-C
        try:
            rest = chat.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            os.killpg(chat.pid, signal.SIGKILL)
            chat.communicate()
            raise
    errors.seek(0)
    logged = errors.read()
    assert "Stopped." in rest and "Traceback" not in logged, "Ctrl-C stops the chat cleanly:\n" + logged[-3000:]
    return [json.loads(line) for line in reply.stdout.splitlines()]
