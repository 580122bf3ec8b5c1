"""vidtron-train: `vidtron-train [recipe=dit_t2v] [key=value ...]` (Hydra overrides).

    vidtron-train data.root=data/synth run_dir=runs/a trainer.steps=200
    vidtron-train data.root=data/synth launcher.nproc_per_node=2      # spawns 2 local processes (torchrun)
    torchrun --nproc_per_node 2 -m vidtron.launch.train data.root=...  # or launch it yourself
    vidtron-train launcher=torchrun ...                 # 2 local processes, restarts from the last checkpoint
    vidtron-train launcher=slurm launcher.cluster=NAME [launcher.dry_run=true] ...   # sbatch (cluster_configs/)
    vidtron-train launcher=ray [launcher.cluster=NAME] ...   # Ray Train TorchTrainer, restarts on failure
    vidtron-train launcher=dryrun launcher.world_size=256 parallel.tp=8 ...  # 1 simulated step: run_dir/dryrun.json
    vidtron-train recipe=vae ...                        # a recipe from vidtron/recipes/registry.py (or VIDTRON_RECIPE_PATH)

The config is checked in the launching process, before any process group starts.
"""

from __future__ import annotations

import os
import subprocess
import sys

from vidtron.launch.cli import user_errors
from vidtron.launch.preflight import preflight
from vidtron.platform.compose import to_yaml
from vidtron.platform.distributed import init_distributed, shutdown
from vidtron.platform.trainer import train
from vidtron.recipes.registry import compose_config, get_recipe


def spawn_local(cfg, argv: list[str]) -> int:
    """Re-run this command under torchrun with launcher.nproc_per_node processes on this machine."""
    n = cfg.launcher.nproc_per_node
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    cmd += [f"--max-restarts={cfg.launcher.max_restarts}", f"--log-dir={os.path.join(cfg.run_dir, 'torchrun')}"]
    cmd += ["-m", "vidtron.launch.train", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(cmd, env=env)


def _cluster_launch(cfg, argv: list[str]) -> int:
    """launcher=slurm (an sbatch job) or launcher=ray (a TorchTrainer); each runs the preflight itself."""
    if cfg.launcher.kind == "slurm":
        from vidtron.launch.slurm import launch_slurm

        return launch_slurm(cfg, argv)
    from vidtron.launch.ray_launcher import launch_ray

    return launch_ray(cfg, argv)


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
    if cfg.launcher.kind == "dryrun":  # one process, fake ranks and tensors; reads no data (vidtron/tools/dryrun.py)
        from vidtron.tools.dryrun import dryrun

        return dryrun(cfg)
    if not _under_launcher() and cfg.launcher.kind in ("slurm", "ray"):
        return _cluster_launch(cfg, argv)
    if not _under_launcher() and (cfg.launcher.kind == "torchrun" or cfg.launcher.nproc_per_node > 1):
        preflight(cfg, cfg.launcher.nproc_per_node)
        return spawn_local(cfg, argv)
    preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    ctx = init_distributed(cfg.trainer.collective_timeout_s)
    try:
        train(cfg, get_recipe(cfg.recipe).make_task(cfg), ctx)
    finally:
        shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
