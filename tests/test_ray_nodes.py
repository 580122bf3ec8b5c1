"""launcher=ray on a real two-node Ray cluster: two raylets on this machine (`ray start --head` plus
`ray start --address=...`, each advertising 2 `vidtron_slot`), 2 nodes x 2 workers with parallel.tp=2.

A worker is SIGKILLed mid-run (faults.kill_at_step); the group restarts on the same two nodes, resumes from our
committed checkpoint and finishes, and the placement records of both worker groups show each node holding two
consecutive ranks, i.e. both TP groups intact. An impossible request (3 nodes) fails at once with a ConfigError.

Every Ray process is started in a session of its own with the test's tag in its environment and SIGKILLed by PID
afterwards (tests/test_ray.py's `kill_run`), never with `ray stop`. Token auth with a random token keeps other
users off the cluster; Ray's session folder is a short private path (AF_UNIX socket paths).
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys

import pytest

from tests.test_faults import STEPS, assert_nothing_outside, assert_resumed_from, events, train_cmd
from tests.test_ray import ray_sandbox  # noqa: F401 (fixture)
from vidtron.platform.metrics import read_metrics

pytest.importorskip("ray", reason="launcher=ray needs ray[train] (pip install 'ray[train]')")

SLOTS = 2  # workers per node
RAY_START = [sys.executable, "-m", "ray.scripts.scripts", "start", "--disable-usage-stats", "--num-cpus=2"]
NODE_OPTS = [f"--resources={json.dumps({'vidtron_slot': SLOTS})}", "--object-store-memory=100000000"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two_nodes(box) -> str:
    """A head and a second node on this machine; returns the GCS address."""
    box.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    port = _free_port()
    head = ["--head", f"--port={port}", f"--temp-dir={box.short / 't'}", "--include-dashboard=false"]
    for extra in (head, [f"--address=127.0.0.1:{port}"]):
        cmd = [*RAY_START, *extra, *NODE_OPTS, "--dashboard-agent-listen-port=0"]
        box.run(cmd, timeout=300)
    return f"127.0.0.1:{port}"


def write_cluster(box, name: str, address: str, nodes: int) -> str:
    path = box.short / f"{name}.yaml"
    lines = [
        f"ray_address: '{address}'",
        f"nodes: {nodes}",
        f"procs_per_node: {SLOTS}",
        "ray_slot_resource: vidtron_slot",
    ]
    path.write_text("\n".join([*lines, "env:", "  OMP_NUM_THREADS: '1'", ""]))
    return str(path)


def run_expecting_failure(box, cmd: list[str]) -> str:
    proc = box.start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, out[-2000:] + err[-4000:]
    return err


def assert_tp_groups_per_node(placement: dict) -> None:
    """Two distinct nodes, each holding one whole TP group of consecutive ranks."""
    assert placement["world"] == 4 and placement["tp"] == 2 and placement["split_tp_groups"] == []
    assert sorted(placement["nodes"].values()) == [[0, 1], [2, 3]], placement["nodes"]


@pytest.mark.slow
def test_two_nodes_kill_restart_resume_keeps_tp_groups_on_a_node(synth_data, ray_sandbox, tmp_path):  # noqa: F811
    box = ray_sandbox
    address = start_two_nodes(box)

    three = write_cluster(box, "three_nodes", address, nodes=3)
    fits_six = ["parallel.tp=2", "data.batch_size=12"]  # 6 workers pass every check but the cluster's capacity
    err = run_expecting_failure(
        box, train_cmd(synth_data, box.run_dir, f"launcher.cluster={three}", *fits_six, launcher="ray")
    )
    assert "cluster.nodes=3" in err and "2 live node(s)" in err, err[-3000:]

    two = write_cluster(box, "two_nodes", address, nodes=2)
    extra = ["parallel.tp=2", "faults.kill_rank=1", "faults.kill_at_step=5", "launcher.max_failures=2"]
    box.run(train_cmd(synth_data, box.run_dir, f"launcher.cluster={two}", *extra, launcher="ray"))

    ev = assert_resumed_from(box.run_dir, 4)
    assert [e["attempts"] for e in ev if e["event"] == "restart"] == [{"ray": 1}]
    assert [r["step"] for r in read_metrics(box.run_dir)] == list(range(1, STEPS + 1))
    assert "fault-injected" in [e["event"] for e in events(box.run_dir)]
    groups = sorted((box.run_dir / "ray" / "placement").iterdir())
    assert [g.name.rsplit("-", 1)[1] for g in groups] == ["0", "1"]  # the first group and the restarted one
    for group in groups:
        records = [json.loads(p.read_text()) for p in sorted(group.glob("rank_*.json"))]
        assert len({r["node_id"] for r in records}) == 2
    placement = json.loads((box.run_dir / "ray" / "placement.json").read_text())
    assert placement["attempt"] == 1
    assert_tp_groups_per_node(placement)
    assert box.cleanup()  # the two nodes' daemons, by PID
    assert box.cleanup() == []
    assert_nothing_outside(tmp_path)
