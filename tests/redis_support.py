"""A real Redis server for the replica tests: Debian's ``redis-server`` on loopback.

:func:`redis_server` starts ``redis-server --port FREE --bind 127.0.0.1 --save ''
--appendonly no`` as its own process in a temporary folder and stops it afterwards. Without
``redis-server`` on the PATH the test is skipped — except under ``CI=true``, where a missing
server is a failure (``make test`` installs it: the Makefile's ``redis`` target).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

__all__ = ["RedisServer", "redis_server", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RedisServer:
    """A running ``redis-server``: its URL, and a way to stop (and restart) it."""

    port: int
    proc: subprocess.Popen
    folder: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """Stop the server (the test's "Redis is down")."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def start(self) -> None:
        """(Re)start the server on the same port."""
        self.proc = _spawn(self.port, self.folder)


def _spawn(port: int, folder: str) -> subprocess.Popen:
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", folder, "--protected-mode", "yes"],
        cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 15
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not answer within 15 s")


def _have_server() -> bool:
    return shutil.which("redis-server") is not None or os.path.exists("/usr/bin/redis-server")


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """Run a private Redis on a free loopback port; skip (fail under CI) without one."""
    if not _have_server():
        msg = "redis-server is not installed (apt-get install redis-server; make redis)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    pytest.importorskip("redis", reason="redis-py absent: pip install 'meddx[cluster]'")
    folder = tempfile.mkdtemp(prefix="meddx-redis-")
    port = free_port()
    server = RedisServer(port=port, proc=_spawn(port, folder), folder=folder)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
