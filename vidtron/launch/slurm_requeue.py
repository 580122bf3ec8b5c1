"""After a failed `srun` step of a vidtron SLURM job: record which node failed, exclude it, requeue the job.

    python -m vidtron.launch.slurm_requeue RUN_DIR --exit STATUS --max-failures 3 --max-excluded-nodes 8

The sbatch script (vidtron/launch/slurm.py) calls this when its step fails, inside the job (SLURM_JOB_ID,
SLURM_RESTART_COUNT, SLURM_JOB_NUM_NODES, SLURM_JOB_PARTITION set). It

1. blames the node whose torchrun failed first: the earliest `node_exit` event of this job attempt, written by
   `vidtron.launch.slurm_node` on that node (peers stopped by `srun --kill-on-bad-exit` write none). A node that
   dies outright writes none either; SLURM marks such a node DOWN and stops scheduling on it by itself;
2. appends `{"event": "failure", "launcher": "slurm", "hosts": [blamed node], "node_exits": [...], ...}`;
3. while the job has requeues left (`--max-failures`), excludes the blamed node unless that would break a rule:
   at most `--max-excluded-nodes` nodes excluded for failures per job, and never so many that the job's partition
   keeps fewer usable nodes (`sinfo`: not down, drained, failed or unresponsive) than the job needs. A refused
   node is logged ("not excluding vm: would leave 0 usable nodes ...") and the job is requeued without it.
   The outcome is an `exclude` event;
4. requeues: `scontrol requeuehold`, `scontrol update JobId=J ExcNodeList=<static --exclude + excluded nodes>`
   (SLURM only updates the node list of a pending job), `scontrol release`; a plain `scontrol requeue` when
   nothing new is excluded.

Requeueing signals the batch script, so this ignores SIGTERM; its commands take well under SLURM's KillWait.
Standard library only: with a container cluster it runs on the host's python3.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vidtron.platform.metrics import log_event

USABLE_STATES = ("idle", "alloc", "mix", "comp", "plnd")  # sinfo %t; a trailing * (not responding) is unusable


@dataclass
class ExclusionPlan:
    """What one failure does to the job's excluded nodes."""

    exclude: list[str] = field(default_factory=list)  # blamed nodes excluded now
    refused: list[dict] = field(default_factory=list)  # {"node", "reason"} for blamed nodes kept
    exc_node_list: list[str] = field(default_factory=list)  # the job's ExcNodeList after the requeue


def read_events(run_dir: str | Path) -> list[dict]:
    """The events of `<run_dir>/events.jsonl`; a torn line (concurrent writers on a shared file system) is skipped."""
    path = Path(run_dir) / "events.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def node_exits(events: list[dict], job: str, attempt: int) -> list[dict]:
    """This attempt's `node_exit` events, earliest first."""
    mine = [e for e in events if e.get("event") == "node_exit" and str(e.get("job")) == str(job)]
    return sorted((e for e in mine if e.get("attempt") == attempt), key=lambda e: e.get("time", 0.0))


def blamed_nodes(exits: list[dict]) -> list[str]:
    """The node whose torchrun failed first; [] when no node failed on its own (killed step, dead node)."""
    return [exits[0]["node"]] if exits else []


def excluded_for_failures(events: list[dict], job: str) -> list[str]:
    """Nodes this job has already excluded after earlier failures (its `exclude` events)."""
    done: list[str] = []
    for e in events:
        if e.get("event") == "exclude" and str(e.get("job")) == str(job):
            done += [n for n in e.get("excluded", []) if n not in done]
    return done


def plan_exclusion(
    blamed: list[str],
    current: list[str],
    failed_before: list[str],
    partition: dict[str, str] | None,
    job_nodes: int,
    cap: int,
) -> ExclusionPlan:
    """Which blamed nodes to add to the job's ExcNodeList `current` (its static --exclude plus `failed_before`):
    at most `cap` nodes excluded for failures in all, and, when the partition's nodes and states are known, never
    leaving fewer usable nodes than `job_nodes`."""
    plan = ExclusionPlan(exc_node_list=[*current, *(n for n in failed_before if n not in current)])
    usable = None if partition is None else {n for n, s in partition.items() if s.rstrip("~#!%$@^-") in USABLE_STATES}
    for node in blamed:
        if node in plan.exc_node_list:
            continue
        if len(failed_before) + len(plan.exclude) >= cap:
            plan.refused.append({"node": node, "reason": f"launcher.max_excluded_nodes={cap} nodes already excluded"})
            continue
        if usable is not None:
            left = len(usable - {*plan.exc_node_list, node})
            if left < job_nodes:
                reason = f"would leave {left} usable nodes in the partition for a job of {job_nodes}"
                plan.refused.append({"node": node, "reason": reason})
                continue
        plan.exclude.append(node)
        plan.exc_node_list.append(node)
    return plan


def run_cmd(cmd: list[str]) -> tuple[int, str]:
    """Run a SLURM client command; (exit status, stdout or stderr)."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 1, str(e)
    return res.returncode, (res.stdout if res.returncode == 0 else res.stderr).strip()


def current_exclusions(job: str, run=run_cmd) -> list[str] | None:
    """The job's ExcNodeList (its --exclude and earlier exclusions), expanded to node names; None if unknown."""
    rc, out = run(["scontrol", "-o", "show", "job", job])
    fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
    if rc != 0 or "ExcNodeList" not in fields:
        return None
    hostlist = fields["ExcNodeList"]
    if hostlist in ("", "(null)"):
        return []
    rc, out = run(["scontrol", "show", "hostnames", hostlist])
    return out.split() if rc == 0 else hostlist.split(",")


def partition_nodes(partition: str, run=run_cmd) -> dict[str, str] | None:
    """{node: sinfo state} of the job's partition(s); None when sinfo cannot say."""
    rc, out = run(
        ["sinfo", "-h", "-N", "-p", partition, "-o", "%N %t"] if partition else ["sinfo", "-h", "-N", "-o", "%N %t"]
    )
    if rc != 0 or not out:
        return None
    return dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)


def requeue(job: str, exc_node_list: list[str] | None, run=run_cmd) -> bool:
    """Requeue `job`; with `exc_node_list`, hold it first, set its ExcNodeList while it is pending, release it."""
    if exc_node_list is None:
        return _say(run, ["scontrol", "requeue", job])
    if not _say(run, ["scontrol", "requeuehold", job]):
        return _say(run, ["scontrol", "requeue", job])
    try:
        _say(run, ["scontrol", "update", f"JobId={job}", f"ExcNodeList={','.join(exc_node_list)}"])
    finally:
        released = _say(run, ["scontrol", "release", job])
    return released


def _say(run, cmd: list[str]) -> bool:
    rc, out = run(cmd)
    print(f"vidtron: {' '.join(cmd)}" + (f" -> failed ({rc}): {out}" if rc else ""), flush=True)
    return rc == 0


def handle_failure(run_dir: str, status: int, max_failures: int, exclude: bool, cap: int, run=run_cmd) -> None:
    """Steps 1-4 of the module docstring for this job's current attempt."""
    job, attempt = os.environ["SLURM_JOB_ID"], int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    events = read_events(run_dir)
    exits = node_exits(events, job, attempt)
    blamed = blamed_nodes(exits)
    summary = [{k: e.get(k) for k in ("node", "host", "node_id", "exit", "time")} for e in exits]
    log_event(
        run_dir, "failure", launcher="slurm", job=job, attempt=attempt, exit=status, hosts=blamed, node_exits=summary
    )
    print(f"vidtron: step failed (exit {status}); failed first: {', '.join(blamed) or 'no node (killed or lost)'}")
    if attempt >= max_failures:
        print(f"vidtron: not requeueing: {attempt} requeues already (launcher.max_failures={max_failures})")
        return
    exc_node_list = _exclude(run_dir, job, attempt, blamed, events, cap, run) if exclude and blamed else None
    print(f"vidtron: requeueing job {job}" + (f" without {', '.join(exc_node_list)}" if exc_node_list else ""))
    requeue(job, exc_node_list, run)


def _exclude(run_dir: str, job: str, attempt: int, blamed: list[str], events: list[dict], cap: int, run):
    """Plan step 3, log it (`exclude` event, a line per refused node); the new ExcNodeList, or None if unchanged."""
    current = current_exclusions(job, run)
    if current is None:
        print(f"vidtron: not excluding {', '.join(blamed)}: scontrol cannot show job {job}'s ExcNodeList")
        return None
    partition = partition_nodes(os.environ.get("SLURM_JOB_PARTITION", ""), run)
    job_nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "1") or 1)
    plan = plan_exclusion(blamed, current, excluded_for_failures(events, job), partition, job_nodes, cap)
    for r in plan.refused:
        print(f"vidtron: not excluding {r['node']}: {r['reason']}")
    fields = {
        "requested": blamed,
        "excluded": plan.exclude,
        "refused": plan.refused,
        "exc_node_list": plan.exc_node_list,
    }
    log_event(run_dir, "exclude", launcher="slurm", job=job, attempt=attempt, **fields)
    return plan.exc_node_list if plan.exclude else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vidtron.launch.slurm_requeue", description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--exit", type=int, required=True, help="the failed step's exit status")
    p.add_argument("--max-failures", type=int, required=True, help="requeues allowed (launcher.max_failures)")
    p.add_argument("--max-excluded-nodes", type=int, default=8, help="launcher.max_excluded_nodes")
    p.add_argument("--no-exclude", action="store_true", help="launcher.exclude_failed_nodes=false: requeue only")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the requeue signals the batch script; finish it (scontrol too)
    handle_failure(args.run_dir, args.exit, args.max_failures, not args.no_exclude, args.max_excluded_nodes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
