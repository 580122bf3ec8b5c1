"""`launcher=slurm`: write an sbatch script from `cluster_configs/<name>.yaml` and submit it (or print it).

    vidtron-train launcher=slurm launcher.cluster=h100_example launcher.dry_run=true data.root=... run_dir=...

The job runs one `torchrun` per node through `srun`, joined by a c10d rendezvous on the first node of the
allocation (`scontrol show hostnames`). Failures are handled at two levels: torchrun restarts the local
group `launcher.max_restarts` times, and when the step itself fails (a node dies, the step is killed) the
script requeues the job (`#SBATCH --requeue`) up to `launcher.max_failures` times. Every start resumes from
the newest committed checkpoint in run_dir.

Each node's torchrun runs under `vidtron.launch.slurm_node`, which records a `node_exit` event (SLURM node name,
exit status) when torchrun fails on its own; after a failed step `vidtron.launch.slurm_requeue` blames the first
node to fail, writes the `failure` event with its `hosts`, and requeues the job with that node added to its
ExcNodeList (`launcher.exclude_failed_nodes`, at most `launcher.max_excluded_nodes`, never leaving the partition
fewer usable nodes than the job needs). `launcher.exclude_nodes` is a static `#SBATCH --exclude`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import vidtron
from vidtron.launch.cluster import ClusterConfig, load_cluster, sbatch_options
from vidtron.launch.preflight import preflight
from vidtron.platform.config import TrainConfig
from vidtron.platform.metrics import log_event


def _sbatch_lines(c: ClusterConfig, cfg: TrainConfig, log_dir: Path) -> list[str]:
    head = [f"--nodes={c.nodes}", "--ntasks-per-node=1"]
    head += [f"--gpus-per-node={c.gpus_per_node}"] if c.gpus_per_node else []
    head += [f"--cpus-per-task={c.cpus_per_node}"] if c.cpus_per_node else []
    tail = ["--requeue"] + ([f"--exclude={','.join(cfg.launcher.exclude_nodes)}"] if cfg.launcher.exclude_nodes else [])
    return sbatch_options(c, f"vidtron-{Path(cfg.run_dir).name}", f"{log_dir}/%x-%j.out", head, tail)


def _rdzv_port_lines(c: ClusterConfig, python: str) -> list[str]:
    if c.rdzv_port:
        return [f"RDZV_PORT={c.rdzv_port}"]
    if c.nodes == 1:
        pick = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
        return [f'RDZV_PORT=$({python} -c "{pick}")  # a free port on the only node']
    return ["RDZV_PORT=$((20000 + SLURM_JOB_ID % 20000))  # the same on every node"]


def _requeue_lines(cfg: TrainConfig, cluster: ClusterConfig, python: str, run_dir: Path) -> list[str]:
    """After the step: on failure, the requeue helper (failure record, node exclusion, requeue); plain `scontrol
    requeue` if the helper itself fails. With a container the helper runs on the host's python3 (stdlib only)."""
    lc = cfg.launcher
    helper = python
    if cluster.container_image:
        helper = f"PYTHONPATH={shlex.quote(str(Path(vidtron.__file__).resolve().parents[1]))} python3"
    flags = f'--exit "$status" --max-failures {lc.max_failures} --max-excluded-nodes {lc.max_excluded_nodes}'
    flags += "" if lc.exclude_failed_nodes else " --no-exclude"
    return [
        "status=$?",
        'if [ "$status" -ne 0 ]; then',
        "  trap '' TERM  # requeueing signals this script: let the helper finish",
        f"  {helper} -m vidtron.launch.slurm_requeue {shlex.quote(str(run_dir))} {flags} \\",
        f'    || {{ [ "${{SLURM_RESTART_COUNT:-0}}" -lt {lc.max_failures} ] && scontrol requeue "$SLURM_JOB_ID"; }}',
        "fi",
        'exit "$status"',
    ]


def sbatch_script(cfg: TrainConfig, argv: list[str], cluster: ClusterConfig, cluster_name: str) -> str:
    """The job script: SBATCH header, environment, `srun torchrun` with a c10d rendezvous, requeue on failure."""
    run_dir = Path(cfg.run_dir).resolve()
    python = cluster.python or sys.executable
    container = []
    if cluster.container_image:
        container = [f"--container-image={shlex.quote(cluster.container_image)}", f"--container-workdir={Path.cwd()}"]
        container += [f"--container-mounts={shlex.quote(cluster.container_mounts)}"] if cluster.container_mounts else []
    rdzv = '--rdzv_backend=c10d --rdzv_endpoint="$HEAD_NODE:$RDZV_PORT" --rdzv_id="$SLURM_JOB_ID"'
    restarts = f"--max-restarts={cfg.launcher.max_restarts} --log-dir={shlex.quote(str(run_dir / 'torchrun'))}"
    args = [a for a in argv if not a.startswith(("run_dir=", "launcher.dry_run="))] + [f"run_dir={run_dir}"]
    torchrun = [
        f"{python} -m torch.distributed.run --nnodes=$SLURM_JOB_NUM_NODES --nproc_per_node={cluster.procs}",
        rdzv,
        restarts,
        "-m vidtron.launch.train " + " ".join(shlex.quote(a) for a in args),
    ]
    lines = ["#!/bin/bash", f"# vidtron-train launcher=slurm, from cluster config {cluster_name!r}"]
    lines += _sbatch_lines(cluster, cfg, run_dir / "slurm")
    lines += ["", "set -uo pipefail", f"cd {shlex.quote(str(Path.cwd()))}"]
    lines += [f"export {k}={shlex.quote(str(v))}" for k, v in cluster.env.items()]
    lines += list(cluster.setup)
    lines += ['HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)']
    lines += _rdzv_port_lines(cluster, python)
    lines += ['echo "vidtron: job $SLURM_JOB_ID attempt ${SLURM_RESTART_COUNT:-0}: rendezvous $HEAD_NODE:$RDZV_PORT"']
    lines += [" ".join(["srun", "--kill-on-bad-exit=1", *container, "\\"])]
    lines += [f"  {python} -m vidtron.launch.slurm_node {shlex.quote(str(run_dir))} -- \\"]
    lines += [f"  {part} \\" for part in torchrun[:-1]] + [f"  {torchrun[-1]}"]
    lines += _requeue_lines(cfg, cluster, python, run_dir)
    return "\n".join(lines) + "\n"


def launch_slurm(cfg: TrainConfig, argv: list[str]) -> int:
    """Print the script (launcher.dry_run) or write it to <run_dir>/slurm/ and submit it with sbatch."""
    cluster = load_cluster(cfg.launcher.cluster)
    script = sbatch_script(cfg, argv, cluster, cfg.launcher.cluster)
    if cfg.launcher.dry_run:
        print(script, end="")
        return 0
    preflight(cfg, cluster.nodes * cluster.procs)
    log_dir = Path(cfg.run_dir).resolve() / "slurm"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "job.sbatch"
    path.write_text(script)
    res = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, env=os.environ)
    if res.returncode:
        print(f"vidtron-train: error: sbatch failed: {res.stderr.strip()}", file=sys.stderr)
        return res.returncode
    job_id = res.stdout.strip().split(";")[0]
    log_event(cfg.run_dir, "submit", launcher="slurm", job=job_id, cluster=cfg.launcher.cluster)
    print(f"submitted job {job_id}; log {log_dir}/vidtron-{Path(cfg.run_dir).name}-{job_id}.out")
    return 0
