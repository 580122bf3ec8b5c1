"""launcher=ray across nodes, without Ray: the worker count from the cluster config, the impossible requests that
fail before Ray starts (or right after it connects) with a ConfigError naming field, value and fix, and the
worker-side check that every TP group sits on one node."""

from __future__ import annotations

import pytest

from vidtron.errors import ConfigError
from vidtron.launch.cluster import (
    ClusterConfig,
    RayLayout,
    check_ray_capacity,
    check_ray_layout,
    load_cluster,
    ray_layout,
    worker_resources,
)
from vidtron.launch.ray_launcher import placement_summary
from vidtron.platform.config import ParallelConfig

TWO_BY_TWO = RayLayout(nodes=2, procs=2, source="test", slot="vidtron_slot", address="127.0.0.1:6379")


def _node(node_id: str, **resources: float) -> dict:
    return {"NodeID": node_id * 8, "NodeManagerAddress": "10.0.0.1", "Alive": True, "Resources": resources}


def test_workers_are_nodes_times_procs_per_node():
    assert ray_layout(None, 3).world == 3  # local: launcher.nproc_per_node
    gpu = ray_layout(ClusterConfig(nodes=4, gpus_per_node=8, ray_address="head:6379"), 2, "h")
    assert (gpu.nodes, gpu.procs, gpu.world) == (4, 8, 32)
    cpu = ray_layout(ClusterConfig(nodes=2, procs_per_node=3, ray_address="head:6379", ray_slot_resource="s"), 1)
    assert (cpu.world, cpu.slot, cpu.address) == (6, "s", "head:6379")
    assert worker_resources(cpu, use_gpu=False) == {"CPU": 1.0, "s": 1.0}
    assert worker_resources(gpu, use_gpu=True) == {"CPU": 1.0, "GPU": 1.0}


def test_example_config_is_a_multi_node_gpu_ray_cluster():
    c = load_cluster("ray_example")
    layout = ray_layout(c, 1, "ray_example")
    assert c.ray_address and c.nodes > 1 and c.gpus_per_node > 0 and c.ray_slot_resource
    check_ray_layout(layout, ParallelConfig(tp=c.procs, cp=2))


def test_several_nodes_need_a_ray_address():
    with pytest.raises(ConfigError, match="ray_address.*ray start --head"):
        ray_layout(ClusterConfig(nodes=2, procs_per_node=2), 1, "two")


@pytest.mark.parametrize(
    ("parallel", "field", "fix"),
    [
        (ParallelConfig(tp=2, dp_shard=3), "parallel", "does not fit the 4 Ray workers"),
        (ParallelConfig(tp=1, cp=3), "parallel", "multiple of 3"),
        (ParallelConfig(tp=4), "parallel.tp", r"TP group must sit on one node.*choose tp in \[1, 2\]"),
    ],
)
def test_impossible_layouts_fail_before_ray_starts(parallel, field, fix):
    with pytest.raises(ConfigError, match=fix) as err:
        check_ray_layout(TWO_BY_TWO, parallel)
    assert err.value.field == field


def test_a_fitting_layout_passes():
    check_ray_layout(TWO_BY_TWO, ParallelConfig(tp=2))  # dp_shard -1 -> 2
    check_ray_layout(TWO_BY_TWO, ParallelConfig(tp=1, dp_replicate=2, dp_shard=2))


def test_capacity_too_few_nodes_fails_with_the_cluster_summary():
    nodes = [_node("a", CPU=2, vidtron_slot=2), {**_node("b", CPU=2, vidtron_slot=2), "Alive": False}]
    with pytest.raises(ConfigError, match=r"1 live node\(s\).*2 node\(s\) with 2 each") as err:
        check_ray_capacity(TWO_BY_TWO, {"CPU": 1.0, "vidtron_slot": 1.0}, nodes)
    assert err.value.field == "cluster.nodes"


def test_capacity_missing_resources_and_uneven_slots():
    need = {"CPU": 1.0, "vidtron_slot": 1.0}
    no_slots = [_node("a", CPU=8), _node("b", CPU=8)]
    with pytest.raises(ConfigError, match="cluster.nodes"):
        check_ray_capacity(TWO_BY_TWO, need, no_slots)
    uneven = [_node("a", CPU=8, vidtron_slot=2), _node("b", CPU=8, vidtron_slot=4)]
    with pytest.raises(ConfigError, match=r"advertises 4 vidtron_slot.*--resources='\{\"vidtron_slot\": 2\}'"):
        check_ray_capacity(TWO_BY_TWO, need, uneven)
    one_cpu = [_node("a", CPU=1, vidtron_slot=2), _node("b", CPU=2, vidtron_slot=2)]
    with pytest.raises(ConfigError, match="cluster.nodes"):
        check_ray_capacity(TWO_BY_TWO, need, one_cpu)
    head_without_slots = [_node("h", CPU=4), *uneven[:1], _node("c", CPU=2, vidtron_slot=2)]
    check_ray_capacity(TWO_BY_TWO, need, head_without_slots)


def _records(node_of_rank: list[str]) -> list[dict]:
    return [{"rank": r, "node_id": n} for r, n in enumerate(node_of_rank)]


def test_placement_summary_finds_tp_groups_that_span_nodes():
    ok = placement_summary(_records(["a", "a", "b", "b"]), 4, tp=2)
    assert ok["nodes"] == {"a": [0, 1], "b": [2, 3]} and ok["split_tp_groups"] == []
    bad = placement_summary(_records(["a", "b", "b", "a"]), 4, tp=2)
    assert bad["split_tp_groups"] == [{"ranks": [0, 1], "nodes": ["a", "b"]}, {"ranks": [2, 3], "nodes": ["a", "b"]}]
    assert placement_summary(_records(["a", "b", "b", "a"]), 4, tp=1)["split_tp_groups"] == []
    with pytest.raises(RuntimeError, match="records of ranks"):
        placement_summary(_records(["a", "a", "b"]), 4, tp=2)
