"""`launcher=ray`: the same train function as Ray Train (V2) `TorchTrainer` workers; Ray restarts failed groups.

    vidtron-train launcher=ray data.root=data/synth run_dir=runs/a               # a local Ray instance
    vidtron-train launcher=ray launcher.cluster=ray_example data.root=... run_dir=...   # a running Ray cluster

Workers: cluster.nodes x procs_per_node of the cluster config (launcher.nproc_per_node without one). Before Ray
starts, the count must fit the parallel layout and tp must divide the workers per node; once connected, the
cluster must have enough nodes that can each hold procs_per_node workers (else a ConfigError, not an endless
wait for resources). Placement: PACK, plus, with cluster.ray_slot_resource, one slot per worker out of
procs_per_node per node, so every node gets exactly procs_per_node workers; Ray Train V2 numbers a node's
workers consecutively, so TP groups (consecutive ranks, tp innermost) stay on one node. Every started worker
group records (rank, node) in <run_dir>/ray/placement/ and checks that: placement.json is the latest.

Our committed checkpoints in run_dir (a shared file system across nodes) are the source of truth: every
(re)started worker group resumes from the newest one that passes its checksums. Ray is used for placement and
restarts only (`FailureConfig(max_failures=launcher.max_failures)`); its own reported checkpoints are not relied
on, because the controller registers a report only at its next poll (shared/PROBES.md), so nothing is reported.
Re-running the same command after the driver died continues the run: the RunConfig name and storage path
(`<run_dir>/ray`) are the same, and the trainer resumes from run_dir.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import uuid
from pathlib import Path

import torch

from vidtron.errors import ConfigError
from vidtron.launch.cluster import (
    RayLayout,
    check_ray_capacity,
    check_ray_layout,
    init_local_ray,
    load_cluster,
    ray_layout,
    worker_resources,
)
from vidtron.launch.preflight import preflight
from vidtron.platform.config import TrainConfig

RAY_NAME = "vidtron"  # RunConfig.name; with storage_path <run_dir>/ray it identifies the run across drivers


def _attempt(run_dir: Path, launch_id: str) -> int:
    """How many worker groups of this driver started before this one (rank 0 counts them in a file)."""
    path = run_dir / "ray" / f"attempts-{launch_id}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        f.seek(0)
        before = len(f.read().splitlines())
        f.write(f"{os.getpid()}\n")
    return before


def train_loop(config: dict) -> None:
    """Runs on every Ray worker: Ray has started the process group; check the placement, build the config and
    train (or resume)."""
    import ray.train
    import ray.train.collective

    from vidtron.platform.distributed import init_distributed
    from vidtron.platform.trainer import train
    from vidtron.recipes.registry import compose_config, get_recipe

    cfg = compose_config(config["argv"])
    run_dir = Path(cfg.run_dir)
    rank0 = ray.train.get_context().get_world_rank() == 0
    attempt = _attempt(run_dir, config["launch_id"]) if rank0 else None
    attempt = ray.train.collective.broadcast_from_rank_zero(attempt)
    if rank0:
        os.environ["VIDTRON_RAY_ATTEMPT"] = str(attempt)
    record_placement(run_dir / "ray" / "placement" / f"{config['launch_id']}-{attempt}", cfg.parallel.tp, attempt)
    task = get_recipe(cfg.recipe).make_task(cfg)
    train(cfg, task, init_distributed(cfg.trainer.collective_timeout_s))


def record_placement(folder: Path, tp: int, attempt: int) -> None:
    """Every worker writes (rank, node) to `folder`; after a barrier every worker checks that each TP group sits
    on one node (raising on all ranks if not), and rank 0 writes the group's record to <run_dir>/ray/placement.json."""
    import ray
    import ray.train
    import ray.train.collective

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    me = {
        "rank": rank,
        "local_rank": ctx.get_local_rank(),  # Ray's, per node IP (raylets sharing a host share it)
        "node_rank": ctx.get_node_rank(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / f"rank_{rank:05d}.json", me)
    ray.train.collective.barrier()
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("rank_*.json"))]
    summary = placement_summary(records, ctx.get_world_size(), tp)
    if rank == 0:
        _write_json(folder.parent.parent / "placement.json", {"attempt": attempt, **summary})
    if summary["split_tp_groups"]:
        raise RuntimeError(f"placement: TP groups span nodes: {summary['split_tp_groups']} (records in {folder})")


def placement_summary(records: list[dict], world: int, tp: int) -> dict:
    """Ranks per node and the TP groups (consecutive ranks of size tp) whose ranks are not all on one node."""
    by_rank = {r["rank"]: r for r in records}
    if sorted(by_rank) != list(range(world)):
        raise RuntimeError(f"placement: records of ranks {sorted(by_rank)} for a world of {world}")
    nodes: dict[str, list[int]] = {}
    for rank in range(world):
        nodes.setdefault(by_rank[rank]["node_id"], []).append(rank)
    split = []
    for start in range(0, world, tp):
        group = range(start, start + tp)
        on = {by_rank[r]["node_id"] for r in group}
        split += [{"ranks": list(group), "nodes": sorted(on)}] if len(on) > 1 else []
    return {
        "world": world,
        "tp": tp,
        "nodes": nodes,
        "split_tp_groups": split,
        "ranks": [by_rank[r] for r in range(world)],
    }


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def _init_ray(cfg: TrainConfig, layout: RayLayout, env: dict[str, str]) -> None:
    """Connect to the cluster's ray_address, or start a private local instance (no dashboard)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if layout.address:
        ray.init(address=layout.address, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", **env}}, log_to_driver=True)
        return
    resources = {layout.slot: layout.procs} if layout.slot else None
    run_dir = Path(cfg.run_dir).resolve()
    init_local_ray(max(2, layout.procs), run_dir, dashboard_host="127.0.0.1", resources=resources)


def plan(cfg: TrainConfig) -> tuple[RayLayout, dict[str, str], bool]:
    """The worker layout, the cluster's env and whether workers take GPUs; raises ConfigError before Ray starts."""
    cluster = load_cluster(cfg.launcher.cluster) if cfg.launcher.cluster else None
    layout = ray_layout(cluster, cfg.launcher.nproc_per_node, cfg.launcher.cluster)
    check_ray_layout(layout, cfg.parallel)
    preflight(cfg, layout.world)
    use_gpu = cluster.gpus_per_node > 0 if cluster is not None else torch.cuda.is_available()
    return layout, dict(cluster.env) if cluster is not None else {}, use_gpu


def launch_ray(cfg: TrainConfig, argv: list[str]) -> int:
    """Train under a TorchTrainer with nodes x procs_per_node workers; 0 on success, 1 after max_failures."""
    try:
        import ray
    except ImportError as err:
        raise ConfigError(
            "launcher", "ray", "needs Ray Train: pip install 'ray[train]' (the vidtron[ray] extra)"
        ) from err
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_dir = Path(cfg.run_dir).resolve()
    layout, env, use_gpu = plan(cfg)
    need = worker_resources(layout, use_gpu)
    _init_ray(cfg, layout, env)
    try:
        check_ray_capacity(layout, need, ray.nodes())
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"argv": [*argv, f"run_dir={run_dir}"], "launch_id": uuid.uuid4().hex[:12]},
            torch_config=TorchConfig(
                backend="nccl" if use_gpu else "gloo", timeout_s=int(cfg.trainer.collective_timeout_s)
            ),
            scaling_config=ScalingConfig(
                num_workers=layout.world, use_gpu=use_gpu, resources_per_worker=need, placement_strategy="PACK"
            ),
            run_config=RunConfig(
                name=RAY_NAME,
                storage_path=str(run_dir / "ray"),
                failure_config=FailureConfig(max_failures=cfg.launcher.max_failures),
            ),
        )
        trainer.fit()
    except ConfigError:
        raise
    except Exception as err:  # TrainingFailedError after max_failures, or a driver-side error
        print(f"vidtron-train: error: Ray training failed: {type(err).__name__}: {str(err)[:2000]}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    return 0
