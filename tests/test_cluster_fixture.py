"""The Ray cluster fixture itself: two real nodes, and the worker can be killed and restarted."""

from __future__ import annotations

import pytest

from ray_support import alive_nodes, ray_cluster, wait_for_nodes  # noqa: F401

pytestmark = pytest.mark.slow


def test_two_separate_nodes_are_alive(ray_cluster) -> None:  # noqa: F811
    nodes = alive_nodes(ray_cluster.address)
    assert len(nodes) == 2
    assert len({n["id"] for n in nodes}) == 2
    assert sum("worker_node" in n["resources"] for n in nodes) == 1
    assert ray_cluster.raylet_pid() > 0


def test_without_ray_the_cli_names_the_extra(monkeypatch) -> None:
    import sys

    from meddx.cluster import INSTALL_HINT, require_ray
    from meddx.errors import ConfigError

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError) as info:
        require_ray()
    assert info.value.hint == INSTALL_HINT == "pip install 'meddx[cluster]'"


def test_the_cli_does_not_import_ray_until_a_cluster_command_runs() -> None:
    import subprocess
    import sys

    code = ("import sys, meddx, meddx.cli; "
            "sys.exit(int(any(m == 'ray' or m.startswith('ray.') for m in sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], timeout=300).returncode == 0
