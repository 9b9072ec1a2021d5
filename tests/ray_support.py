"""A real two-node Ray cluster on loopback for the cluster tests (one per test session).

The head and a second ("worker") node are started with ``ray start`` as separate process trees,
each with its own short temp dir under /tmp, one CPU and a small object store. Teardown and
:meth:`RayCluster.kill_worker` end only the processes whose command line names one of those
temp dirs (by PID), never ``ray stop`` (which would stop every Ray on this shared machine).

Import the fixture where it is needed: ``from ray_support import ray_cluster``. The cluster is
cached in this module, so several test modules importing the fixture still share one cluster.
Without ray installed the tests skip, except under ``CI=true`` where that is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
OBJECT_STORE_BYTES = 200 * 1024 * 1024
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    """Environment for Ray processes: no usage stats, no uv run, and token authentication
    off explicitly: Ray turns it on by itself once any local ``ray.init()`` on this machine
    has written ``~/.ray/auth_token``, and then a node started without the token is refused."""
    env = dict(os.environ)
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_DISABLE_DOCKER_CPU_WARNING="1",
               RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", RAY_AUTH_MODE="disabled")
    return env


def _pids_under(temp_dir: str) -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or ())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if temp_dir in cmd and proc.info["pid"] != os.getpid():
            found.append(proc.info["pid"])
    return found


def _kill(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@dataclass
class RayCluster:
    """A running local cluster: ``address`` (host:port) and the worker node's controls."""

    address: str
    head_dir: str
    worker_dir: str = ""
    worker_pids: list[int] = field(default_factory=list)

    def _start_worker(self) -> None:
        self.worker_dir = tempfile.mkdtemp(prefix="rw", dir="/tmp")
        _run([RAY, "start", "--address", self.address, "--node-ip-address", "127.0.0.1",
              "--num-cpus", "1", "--resources", '{"worker_node": 1}',
              "--object-store-memory", str(OBJECT_STORE_BYTES), "--temp-dir", self.worker_dir,
              "--disable-usage-stats"])
        self.worker_pids = _pids_under(self.worker_dir)

    def raylet_pid(self) -> int:
        """PID of the worker node's raylet (killing it takes the node down)."""
        import psutil

        for pid in _pids_under(self.worker_dir):
            try:
                if psutil.Process(pid).name() == "raylet":
                    return pid
            except psutil.NoSuchProcess:
                continue
        raise RuntimeError("the worker node's raylet is not running")

    def kill_worker(self) -> None:
        """Kill the worker node hard: its raylet first, then what is left of its processes."""
        _kill([self.raylet_pid()])
        time.sleep(0.5)
        _kill(_pids_under(self.worker_dir))

    def restart_worker(self) -> None:
        """Bring a fresh worker node up after :meth:`kill_worker`."""
        _kill(_pids_under(self.worker_dir))
        shutil.rmtree(self.worker_dir, ignore_errors=True)
        self._start_worker()
        wait_for_nodes(self.address, 2)

    def stop(self) -> None:
        for d in (self.worker_dir, self.head_dir):
            if d:
                _kill(_pids_under(d), signal.SIGTERM)
        time.sleep(1.0)
        for d in (self.worker_dir, self.head_dir):
            if d:
                _kill(_pids_under(d))
                shutil.rmtree(d, ignore_errors=True)


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, env=ray_env(), capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{done.stdout[-2000:]}\n"
                           f"{done.stderr[-2000:]}")


def alive_nodes(address: str) -> list[dict]:
    """The cluster's alive nodes, asked from a short-lived driver in a subprocess."""
    code = (f"import json, ray; ray.init(address={address!r}, logging_level='ERROR', "
            "log_to_driver=False); print(json.dumps([{'id': n['NodeID'], "
            "'resources': n['Resources']} for n in ray.nodes() if n['Alive']]))")
    done = subprocess.run([sys.executable, "-c", code], env=ray_env(), capture_output=True,
                          text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def actor_classes(address: str) -> list[str]:
    """The class name of every actor the cluster has run (alive or dead), from the GCS's actor
    table (asked from a short-lived driver in a subprocess)."""
    code = (f"import json, ray; ray.init(address={address!r}, logging_level='ERROR', "
            "log_to_driver=False); from ray._private.state import state; "
            "print(json.dumps([a['ActorClassName'] + '|' + a['ActorID'] "
            "for a in state.actor_table(None).values()]))")
    done = subprocess.run([sys.executable, "-c", code], env=ray_env(), capture_output=True,
                          text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def wait_for_nodes(address: str, count: int, timeout: float = 90.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    nodes: list[dict] = []
    while time.monotonic() < deadline:
        nodes = alive_nodes(address)
        if len(nodes) >= count:
            return nodes
        time.sleep(1.0)
    raise RuntimeError(f"only {len(nodes)} of {count} Ray nodes came up in {timeout:.0f}s")


def start_cluster() -> RayCluster:
    """Start a head node and one worker node (separate ``ray start`` processes)."""
    port = _free_port()
    head_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    cluster = RayCluster(address=f"127.0.0.1:{port}", head_dir=head_dir)
    try:
        _run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
              "--num-cpus", "1", "--include-dashboard", "false",
              "--object-store-memory", str(OBJECT_STORE_BYTES), "--temp-dir", head_dir,
              "--disable-usage-stats"])
        cluster._start_worker()
        wait_for_nodes(cluster.address, 2)
    except BaseException:
        cluster.stop()
        raise
    return cluster


_CLUSTER: list[RayCluster] = []


def _need_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        msg = "ray is not installed (pip install 'meddx[cluster]')"
        if IN_CI:
            pytest.fail(msg + " (CI=true: a missing extra is a failure)")
        pytest.skip(msg)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """A live two-node local Ray cluster, shared by the whole session."""
    _need_ray()
    owner = not _CLUSTER
    if owner:
        _CLUSTER.append(start_cluster())
    try:
        yield _CLUSTER[0]
    finally:
        if owner:
            _CLUSTER.pop().stop()
