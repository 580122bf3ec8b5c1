"""`launcher=ray`: the same train function as Ray Train (V2) `TorchTrainer` workers; Ray restarts failed groups.

    vidtron-train launcher=ray data.root=data/synth run_dir=runs/a               # a local Ray instance
    vidtron-train launcher=ray launcher.cluster=my_ray data.root=... run_dir=...   # ray_address from the config

Our committed checkpoints in run_dir are the source of truth: every (re)started worker group resumes from
the newest one that passes its checksums. Ray is used for placement and restarts only
(`FailureConfig(max_failures=launcher.max_failures)`); its own reported checkpoints are not relied on,
because the controller registers a report only at its next poll (shared/PROBES.md), so nothing is reported.
Re-running the same command after the driver died continues the run: the RunConfig name and storage path
(`<run_dir>/ray`) are the same, and the trainer resumes from run_dir.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import torch

from vidtron.errors import ConfigError
from vidtron.launch.cluster import init_local_ray, load_cluster
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
    """Runs on every Ray worker: Ray has started the process group; build the config and train (or resume)."""
    import ray.train

    from vidtron.platform.distributed import init_distributed
    from vidtron.platform.trainer import train
    from vidtron.recipes.registry import compose_config, get_recipe

    cfg = compose_config(config["argv"])
    if ray.train.get_context().get_world_rank() == 0:
        os.environ["VIDTRON_RAY_ATTEMPT"] = str(_attempt(Path(cfg.run_dir), config["launch_id"]))
    task = get_recipe(cfg.recipe).make_task(cfg)
    train(cfg, task, init_distributed(cfg.trainer.collective_timeout_s))


def _init_ray(cfg: TrainConfig):
    """Connect to the cluster config's ray_address, or start a private local instance (no dashboard)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cluster = load_cluster(cfg.launcher.cluster) if cfg.launcher.cluster else None
    if cluster is not None and cluster.ray_address:
        env = {"OMP_NUM_THREADS": "1", **cluster.env}
        ray.init(address=cluster.ray_address, runtime_env={"env_vars": env}, log_to_driver=True)
        return cluster
    init_local_ray(max(2, cfg.launcher.nproc_per_node), Path(cfg.run_dir).resolve(), dashboard_host="127.0.0.1")
    return cluster


def launch_ray(cfg: TrainConfig, argv: list[str]) -> int:
    """Train under a TorchTrainer with launcher.nproc_per_node workers; 0 on success, 1 after max_failures."""
    try:
        import ray
    except ImportError as err:
        raise ConfigError(
            "launcher", "ray", "needs Ray Train: pip install 'ray[train]' (the vidtron[ray] extra)"
        ) from err
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_dir = Path(cfg.run_dir).resolve()
    cluster = _init_ray(cfg)
    try:
        use_gpu = cluster.gpus_per_node > 0 if cluster is not None else torch.cuda.is_available()
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"argv": [*argv, f"run_dir={run_dir}"], "launch_id": uuid.uuid4().hex[:12]},
            torch_config=TorchConfig(
                backend="nccl" if use_gpu else "gloo", timeout_s=int(cfg.trainer.collective_timeout_s)
            ),
            scaling_config=ScalingConfig(
                num_workers=cfg.launcher.nproc_per_node, use_gpu=use_gpu, resources_per_worker={"CPU": 1}
            ),
            run_config=RunConfig(
                name=RAY_NAME,
                storage_path=str(run_dir / "ray"),
                failure_config=FailureConfig(max_failures=cfg.launcher.max_failures),
            ),
        )
        trainer.fit()
    except Exception as err:  # TrainingFailedError after max_failures, or a driver-side error
        print(f"vidtron-train: error: Ray training failed: {type(err).__name__}: {str(err)[:2000]}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    return 0
