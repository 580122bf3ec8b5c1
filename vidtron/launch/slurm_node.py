"""One node's task of a vidtron SLURM job step: run torchrun and, when it fails on its own, record which node it was.

    srun ... python -m vidtron.launch.slurm_node RUN_DIR -- python -m torch.distributed.run ...

A non-zero exit of the command appends a `node_exit` event to `<run_dir>/events.jsonl`: the SLURM node name
(`SLURMD_NODENAME`, the name `scontrol` and `--exclude` take), the host name, the node's index in the allocation,
the exit status and the time. A task that SLURM itself terminates (`srun --kill-on-bad-exit` stopping the peers of
a failed node, `scancel`, the time limit) records nothing: it did not fail, it was stopped. The requeue helper
(`vidtron.launch.slurm_requeue`) reads these events to decide which node to exclude. Standard library only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from vidtron.platform.metrics import log_event


def run_node(run_dir: str, cmd: list[str]) -> int:
    """Run `cmd`, forward SIGTERM / SIGINT to it, record a `node_exit` event when it fails unprompted."""
    child = subprocess.Popen(cmd)
    stopped = []

    def forward(signum, _frame) -> None:
        stopped.append(signum)
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = child.wait()
    if rc != 0 and not stopped:
        log_event(
            run_dir,
            "node_exit",
            launcher="slurm",
            job=os.environ.get("SLURM_JOB_ID", ""),
            attempt=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            node=os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0],
            host=socket.gethostname(),
            node_id=int(os.environ.get("SLURM_NODEID", "0") or 0),
            exit=rc,
        )
    return rc if rc >= 0 else 128 - rc  # killed by signal N: the shell's 128 + N


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m vidtron.launch.slurm_node RUN_DIR -- COMMAND ...", file=sys.stderr)
        return 2
    return run_node(argv[0], argv[2:])


if __name__ == "__main__":
    sys.exit(main())
