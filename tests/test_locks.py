"""The lock files (locks/, `make lock`) are what set-up installs: they must satisfy pyproject's
ranges, hold every package the extras name, and cover the platforms a room brings."""

import re
import tomllib

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

from harness.support import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
KINDS = {"learn": ["local", "learn"], "dev": ["local", "dev"]}


def pinned(kind: str) -> dict[str, list[tuple[Version, Marker | None]]]:
    """name -> [(version, marker)] from a uv-compiled lock file (a name may be pinned per platform)."""
    pins: dict[str, list] = {}
    for line in (ROOT / "locks" / f"{kind}.txt").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            requirement = Requirement(line)
            version = Version(next(iter(requirement.specifier)).version)
            pins.setdefault(canonical(requirement.name), []).append((version, requirement.marker))
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(kind: str) -> list[Requirement]:
    """What the project asks for in this kind of install (the extras followed, not the self-reference)."""
    found, extras = list(PROJECT["dependencies"]), list(KINDS[kind])
    while extras:
        for spec in PROJECT["optional-dependencies"][extras.pop()]:
            requirement = Requirement(spec)
            if canonical(requirement.name) == canonical(PROJECT["name"]):
                extras += sorted(requirement.extras)
            else:
                found.append(spec)
    return [Requirement(spec) for spec in found]


@pytest.mark.parametrize("kind", KINDS)
def test_every_requirement_is_locked_within_its_range(kind):
    pins = pinned(kind)
    for requirement in requirements(kind):
        versions = pins.get(canonical(requirement.name))
        assert versions, f"locks/{kind}.txt lacks {requirement.name}: run make lock"
        for version, _ in versions:
            assert version in requirement.specifier, f"{requirement.name} {version} is outside {requirement.specifier}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("platform", ["linux", "darwin", "win32"])
def test_the_locks_cover_every_platform_a_room_brings(kind, platform):
    """Each package is pinned exactly once for each platform and supported Python."""
    for python in ("3.11", "3.13", "3.15"):
        environment = {
            "sys_platform": platform,
            "platform_system": {"linux": "Linux", "darwin": "Darwin", "win32": "Windows"}[platform],
            "python_version": python,
            "python_full_version": python + ".0",
            "os_name": "nt" if platform == "win32" else "posix",
            "implementation_name": "cpython",
            "platform_python_implementation": "CPython",
            "platform_machine": "x86_64",
        }
        for name, versions in pinned(kind).items():
            applying = [v for v, marker in versions if marker is None or marker.evaluate(environment)]
            assert len(applying) <= 1, f"{name}: {len(applying)} pins apply on {platform}, Python {python}"
        for requirement in requirements(kind):
            if requirement.marker is None or requirement.marker.evaluate(environment):
                assert any(
                    marker is None or marker.evaluate(environment)
                    for _, marker in pinned(kind)[canonical(requirement.name)]
                ), (requirement.name, platform)
