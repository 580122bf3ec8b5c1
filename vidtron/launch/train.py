"""vidtron-train: `vidtron-train [recipe=dit_t2v] [key=value ...]` (Hydra overrides).

    vidtron-train data.root=data/synth run_dir=runs/a trainer.steps=200
    vidtron-train data.root=data/synth launcher.nproc_per_node=2      # spawns 2 local processes (torchrun)
    torchrun --nproc_per_node 2 -m vidtron.launch.train data.root=...  # or launch it yourself
    vidtron-train launcher=torchrun ...                 # 2 local processes, restarts from the last checkpoint
    vidtron-train launcher=slurm launcher.cluster=NAME [launcher.dry_run=true] ...   # sbatch (cluster_configs/)
    vidtron-train launcher=ray [launcher.cluster=NAME] ...   # Ray Train TorchTrainer, restarts on failure

The config is checked in the launching process, before any process group starts.
"""

from __future__ import annotations

import os
import subprocess
import sys

from vidtron.launch.cli import user_errors
from vidtron.platform.compose import compose_config, to_yaml
from vidtron.platform.config import TrainConfig
from vidtron.platform.data.shards import list_shards
from vidtron.platform.distributed import init_distributed, shutdown
from vidtron.platform.errors import ConfigError
from vidtron.platform.faults import check_ranks
from vidtron.platform.trainer import build_dims, train
from vidtron.recipes.dit_t2v.task import DiTTextToVideo, dit_config
from vidtron.recipes.vae.task import VAETask
from vidtron.recipes.vae.task import validate_layout as validate_vae_layout

TASKS = {"dit_t2v": DiTTextToVideo, "vae": VAETask.from_train_config}  # recipe -> task factory(TrainConfig)


def preflight(cfg: TrainConfig, world_size: int) -> None:
    """Everything that can be checked without starting processes."""
    list_shards(cfg.data.root)
    dims = build_dims(cfg.parallel, world_size)
    if cfg.recipe == "vae":
        validate_vae_layout(dims)
    else:
        dit = dit_config(cfg.model.flavor, cfg.model.arch_overrides())
        latent = (1 + (cfg.data.frames - 1) // 4, cfg.data.height // 8, cfg.data.width // 8)
        tokens = (latent[0] // dit.patch_size_t) * (latent[1] // dit.patch_size) * (latent[2] // dit.patch_size)
        dims.validate_for(dit.num_heads, tokens, dit.mlp_hidden)
    check_ranks(cfg.faults, world_size)
    if cfg.data.batch_size % dims.dp:
        raise ConfigError(
            "data.batch_size", cfg.data.batch_size, f"must be divisible by the data-parallel size {dims.dp}"
        )


def spawn_local(cfg: TrainConfig, argv: list[str]) -> int:
    """Re-run this command under torchrun with launcher.nproc_per_node processes on this machine."""
    n = cfg.launcher.nproc_per_node
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    cmd += [f"--max-restarts={cfg.launcher.max_restarts}", f"--log-dir={os.path.join(cfg.run_dir, 'torchrun')}"]
    cmd += ["-m", "vidtron.launch.train", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(cmd, env=env)


def _under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@user_errors("vidtron-train")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print(to_yaml(compose_config([])))
        return 0
    cfg = compose_config(argv)
    if not _under_launcher() and cfg.launcher.kind == "slurm":
        from vidtron.launch.slurm import launch_slurm

        return launch_slurm(cfg, argv)
    if not _under_launcher() and cfg.launcher.kind == "ray":
        from vidtron.launch.ray_launcher import launch_ray

        preflight(cfg, cfg.launcher.nproc_per_node)
        return launch_ray(cfg, argv)
    if not _under_launcher() and (cfg.launcher.kind == "torchrun" or cfg.launcher.nproc_per_node > 1):
        preflight(cfg, cfg.launcher.nproc_per_node)
        return spawn_local(cfg, argv)
    preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    ctx = init_distributed(cfg.trainer.collective_timeout_s)
    try:
        train(cfg, TASKS[cfg.recipe](cfg), ctx)
    finally:
        shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
