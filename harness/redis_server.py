"""A real redis-server for the tests: Debian's package, on a free loopback port, its files
in a temporary folder. `make test` installs redis-server when it is missing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from harness.fake_llm import free_port
from harness.support import wait_for_port


class RedisServer:
    """Start, stop and start again on the same port and folder (its data survives: AOF,
    written to disk at every write by default; Redis's own default is every second)."""

    def __init__(self, folder: Path, fsync: str = "always"):
        executable = shutil.which("redis-server")
        if executable is None:  # never a silent skip
            pytest.fail(
                "No redis-server on PATH. `make test` installs Debian's redis-server; "
                "elsewhere install Redis 6.2 or newer."
            )
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.port = folder, free_port()
        self.command = [
            executable,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(folder),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            fsync,
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL)
        wait_for_port(self.port, process=self.process)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
