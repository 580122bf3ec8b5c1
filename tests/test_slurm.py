"""launcher=slurm: the generated sbatch script, the failed-node record and exclusion (vidtron/launch/slurm_node.py,
slurm_requeue.py) on made-up events, and a real one-node SLURM (started and stopped by the tests) running `srun
torchrun` with 2 CPU processes: a rank SIGKILLed by a fault is recorded with its node, whose exclusion the safety
rule refuses (it is the partition's only node); an externally killed step is recorded with no node; the job
requeues twice and resumes bitwise. The exclusion commands themselves run against a real (sleeping) job.

Without slurmctld / munge (Debian: `apt-get install -y slurm-wlm munge`) the cluster tests skip with the reason.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import warnings

import pytest

from tests.slurm_cluster import SlurmCluster, missing_reason
from tests.test_faults import (
    assert_matches_reference,
    assert_nothing_outside,
    events,
    reference,
    sandbox,
    train_cmd,
)
from vidtron.launch import slurm_requeue as rq
from vidtron.launch.slurm_node import run_node
from vidtron.launch.train import main
from vidtron.platform.checkpoint import committed_checkpoints


def _dry_run(capsys, *args: str) -> str:
    argv = ["launcher=slurm", "launcher.dry_run=true", "data.root=/lustre/data", "run_dir=/lustre/runs/a", *args]
    assert main(argv) == 0
    return capsys.readouterr().out


def test_dry_run_prints_the_gpu_cluster_script(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = _dry_run(capsys, "launcher.cluster=h100_example", "parallel.tp=4")
    for line in [
        "#SBATCH --nodes=4",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=my_project",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --requeue",
        "#SBATCH --exclusive",
        "#SBATCH --output=/lustre/runs/a/slurm/%x-%j.out",
        "export NCCL_IB_DISABLE=0",
        'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "python -m vidtron.launch.slurm_node /lustre/runs/a -- \\",
        "trap '' TERM  # requeueing signals this script: let the helper finish",
    ]:
        assert line in [s.strip() for s in script.splitlines()], line
    assert "--container-image=/lustre/containers/" in script and "--container-mounts=/lustre:/lustre" in script
    assert "--nnodes=$SLURM_JOB_NUM_NODES --nproc_per_node=8" in script
    assert '--rdzv_backend=c10d --rdzv_endpoint="$HEAD_NODE:$RDZV_PORT"' in script
    assert script.rstrip().endswith('exit "$status"') and "parallel.tp=4" in script
    assert "launcher.dry_run" not in script.split("vidtron.launch.train", 1)[1]
    assert "#SBATCH --exclude" not in script
    helper = 'python3 -m vidtron.launch.slurm_requeue /lustre/runs/a --exit "$status" --max-failures 3'
    assert f"{helper} --max-excluded-nodes 8 \\" in script  # on the host: the container has no scontrol
    assert 'scontrol requeue "$SLURM_JOB_ID"; }' in script  # the fallback when the helper cannot run
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_dry_run_with_excluded_nodes(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ['launcher.exclude_nodes=[gpu017,"gpu[040-043]"]', "launcher.max_excluded_nodes=2"]
    script = _dry_run(capsys, "launcher.cluster=h100_example", "launcher.max_failures=5", *args)
    assert "#SBATCH --exclude=gpu017,gpu[040-043]" in script.splitlines()
    assert "--max-failures 5 --max-excluded-nodes 2 \\" in script and "--no-exclude" not in script
    script = _dry_run(capsys, "launcher.cluster=h100_example", "launcher.exclude_failed_nodes=false")
    assert "--max-excluded-nodes 8 --no-exclude \\" in script


def test_dry_run_of_the_local_cpu_cluster(capsys):
    script = _dry_run(capsys, "launcher.cluster=local_cpu")
    assert "--nproc_per_node=2" in script and "--gpus-per-node" not in script
    assert "RDZV_PORT=$(" in script and "export OMP_NUM_THREADS=1" in script


@pytest.mark.parametrize(
    ("args", "field"),
    [(["launcher.cluster=nope"], "launcher.cluster"), (["launcher.cluster="], "launcher.cluster")],
)
def test_bad_cluster_is_a_user_error(args, field, capsys):
    assert main(["launcher=slurm", "data.root=x", *args]) == 2
    assert field in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arg", "field", "fix"),
    [
        ("launcher.max_excluded_nodes=0", "launcher.max_excluded_nodes", "launcher.exclude_failed_nodes=false"),
        ("launcher.exclude_nodes=['gpu1;rm -rf /']", "launcher.exclude_nodes", "SLURM hostlists"),
        ("launcher.exclude_nodes=['gpu[1-2']", "launcher.exclude_nodes", "SLURM hostlists"),
    ],
)
def test_bad_exclusion_settings_are_user_errors(arg, field, fix, capsys):
    assert main(["launcher=slurm", "launcher.dry_run=true", "launcher.cluster=local_cpu", "data.root=x", arg]) == 2
    err = capsys.readouterr().err
    assert field in err and fix in err


def test_typo_in_a_cluster_config_is_a_user_error(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("nodes: 2\ngpus_per_nod: 8\n")
    assert main(["launcher=slurm", "launcher.dry_run=true", "data.root=x", f"launcher.cluster={path}"]) == 2
    assert "gpus_per_nod" in capsys.readouterr().err


# ---- which node failed, what gets excluded (made-up events and SLURM answers) ----------------------------------


def _node_exit(node: str, t: float, job: str = "77", attempt: int = 0) -> dict:
    return {"event": "node_exit", "time": t, "job": job, "attempt": attempt, "node": node, "host": node, "exit": 1}


class FakeSlurm:
    """Answers scontrol / sinfo like a 4-node partition gpu001-gpu004 plus a drained gpu005; records every call."""

    def __init__(self, exc_node_list: str = "gpu009", states: str = "mix mix alloc idle drain"):
        self.calls: list[list[str]] = []
        self.exc = exc_node_list
        self.states = states.split()

    def __call__(self, cmd: list[str]) -> tuple[int, str]:
        self.calls.append(cmd)
        if cmd[:3] == ["scontrol", "-o", "show"]:
            return 0, f"JobId={cmd[-1]} JobState=RUNNING ReqNodeList=(null) ExcNodeList={self.exc} NumNodes=2"
        if cmd[:3] == ["scontrol", "show", "hostnames"]:
            return 0, {"gpu[001,009]": "gpu001\ngpu009"}.get(cmd[3], cmd[3])
        if cmd[0] == "sinfo":
            return 0, "\n".join(f"gpu00{i + 1} {st}" for i, st in enumerate(self.states))
        return 0, ""

    def changes(self) -> list[list[str]]:
        return [c for c in self.calls if c[1] in ("requeue", "requeuehold", "update", "release")]


def test_the_first_node_to_fail_is_blamed():
    ev = [_node_exit("gpu003", 12.5), _node_exit("gpu002", 11.0), _node_exit("gpu001", 10.0, attempt=1)]
    ev += [_node_exit("gpu004", 1.0, job="76"), {"event": "failure", "launcher": "slurm"}]
    exits = rq.node_exits(ev, "77", 0)
    assert [e["node"] for e in exits] == ["gpu002", "gpu003"] and rq.blamed_nodes(exits) == ["gpu002"]
    assert rq.blamed_nodes(rq.node_exits(ev, "77", 2)) == []  # a killed step: no node failed on its own


def test_exclusion_rules():
    part = {"gpu001": "mix", "gpu002": "alloc", "gpu003": "idle~", "gpu004": "down*", "gpu005": "drain"}
    plan = rq.plan_exclusion(["gpu002"], ["gpu009"], [], part, job_nodes=2, cap=8)
    assert plan.exclude == ["gpu002"] and plan.exc_node_list == ["gpu009", "gpu002"] and not plan.refused
    # usable: gpu001-003 (gpu004 is not responding, gpu005 drained); without gpu001 and gpu002 one is left for 2
    plan = rq.plan_exclusion(["gpu002"], ["gpu001"], ["gpu001"], part, job_nodes=2, cap=8)
    assert plan.exclude == [] and plan.refused == [
        {"node": "gpu002", "reason": "would leave 1 usable nodes in the partition for a job of 2"}
    ]
    plan = rq.plan_exclusion(["gpu003"], [], ["gpu001", "gpu002"], part, job_nodes=1, cap=2)  # the cap
    assert plan.exclude == [] and "launcher.max_excluded_nodes=2" in plan.refused[0]["reason"]
    assert plan.exc_node_list == ["gpu001", "gpu002"]  # earlier exclusions are kept even if scontrol lost them
    plan = rq.plan_exclusion(["gpu003"], [], [], None, job_nodes=64, cap=8)  # partition unknown: the cap only
    assert plan.exclude == ["gpu003"]


def test_failure_record_and_requeue_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_JOB_PARTITION", "gpu")
    earlier = {"event": "exclude", "job": "77", "attempt": 0, "excluded": ["gpu001"]}
    lines = [earlier, _node_exit("gpu003", 20.0, attempt=1), _node_exit("gpu002", 19.0, attempt=1)]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"torn\n')
    slurm = FakeSlurm(exc_node_list="gpu[001,009]")
    rq.handle_failure(str(tmp_path), 1, max_failures=3, exclude=True, cap=8, run=slurm)
    assert ["sinfo", "-h", "-N", "-p", "gpu", "-o", "%N %t"] in slurm.calls
    assert slurm.changes() == [
        ["scontrol", "requeuehold", "77"],
        ["scontrol", "update", "JobId=77", "ExcNodeList=gpu001,gpu009,gpu002"],
        ["scontrol", "release", "77"],
    ]
    ev = rq.read_events(tmp_path)
    failure = next(e for e in ev if e["event"] == "failure")
    assert failure["hosts"] == ["gpu002"] and [e["node"] for e in failure["node_exits"]] == ["gpu002", "gpu003"]
    assert failure["launcher"] == "slurm" and failure["attempt"] == 1 and failure["exit"] == 1
    assert ev[-1]["event"] == "exclude" and ev[-1]["excluded"] == ["gpu002"]
    assert rq.excluded_for_failures(ev, "77") == ["gpu001", "gpu002"]
    assert "requeueing job 77 without gpu001, gpu009, gpu002" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("attempt", "exclude", "node_exit", "changes"),
    [
        (0, True, False, [["scontrol", "requeue", "77"]]),  # killed step: no node to blame
        (0, False, True, [["scontrol", "requeue", "77"]]),  # launcher.exclude_failed_nodes=false
        (3, True, True, []),  # launcher.max_failures used up: no requeue
    ],
)
def test_requeue_without_exclusion(attempt, exclude, node_exit, changes, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(attempt))
    ev = [_node_exit("gpu002", 1.0, attempt=attempt)] if node_exit else []
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ev))
    slurm = FakeSlurm()
    rq.handle_failure(str(tmp_path), 137, max_failures=3, exclude=exclude, cap=8, run=slurm)
    assert slurm.changes() == changes
    failure = [e for e in rq.read_events(tmp_path) if e["event"] == "failure"]
    assert len(failure) == 1 and failure[0]["hosts"] == (["gpu002"] if node_exit else [])


def test_node_task_records_its_own_failure_only(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURMD_NODENAME", "gpu007")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_NODEID", "6")
    assert run_node(str(tmp_path), ["true"]) == 0 and not (tmp_path / "events.jsonl").exists()
    assert run_node(str(tmp_path), ["sh", "-c", "exit 3"]) == 3
    assert run_node(str(tmp_path), ["sh", "-c", "kill -KILL $$"]) == 137
    ev = rq.read_events(tmp_path)
    assert [(e["event"], e["node"], e["node_id"], e["exit"]) for e in ev] == [
        ("node_exit", "gpu007", 6, 3),
        ("node_exit", "gpu007", 6, -9),
    ]
    assert ev[0]["host"] == socket.gethostname() and ev[0]["job"] == "77" and ev[0]["attempt"] == 0


# ---- a real one-node SLURM -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = missing_reason()
    if reason:
        warnings.warn(f"SLURM tests skipped: {reason}", stacklevel=1)
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def ref(synth_data, tmp_path_factory):
    return reference(synth_data, tmp_path_factory)


def _wait_for(cond, timeout_s: float, what: str) -> None:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout_s:
            raise TimeoutError(what)
        time.sleep(0.2)


@pytest.fixture(scope="module")
def requeued_job(cluster, synth_data, tmp_path_factory):
    """Submit the drill run (launcher.cluster=local_cpu, 0.5 s pause per step) whose fault SIGKILLs rank 0 after step
    3 (attempt 0: torchrun fails on this node); once the requeued attempt has committed step 6, SIGKILL its srun step
    from outside (scancel: no node failed on its own). Wait for the twice-requeued job to finish."""
    tmp = tmp_path_factory.mktemp("slurm_run")
    cwd, env = sandbox(tmp)
    env["SLURM_CONF"] = str(cluster.conf)
    run_dir = tmp / "run"
    faults = ["faults.step_delay_s=0.5", "faults.kill_at_step=3"]
    cmd = train_cmd(synth_data, run_dir, "launcher.cluster=local_cpu", *faults, launcher="slurm")
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    job = out.split("submitted job ")[1].split(";")[0]
    _wait_for(lambda: (run_dir / "checkpoints" / "step_000006").exists(), 400, f"job {job} wrote no checkpoint 6")
    steps_running = cluster.run("squeue", "-h", "-s", "-j", job, "-o", "%i %j")
    step = next(w for w in steps_running.split() if w.startswith(f"{job}.") and w.split(".")[1].isdigit())
    killed_after = max(int(p.name.split("_")[1]) for p in committed_checkpoints(run_dir))
    cluster.run("scancel", "--signal=KILL", step)
    state = cluster.wait_job(job, 400)
    return {
        "tmp": tmp,
        "run_dir": run_dir,
        "job": job,
        "state": state,
        "restarts": cluster.job_field(job, "Restarts"),
        "exc_node_list": cluster.job_field(job, "ExcNodeList"),
        "steps_running": steps_running,
        "killed_after": killed_after,
        "script": (run_dir / "slurm" / "job.sbatch").read_text(),
        "log": (run_dir / "slurm" / f"vidtron-run-{job}.out").read_text(),
    }


def test_job_runs_torchrun_with_two_processes_through_srun(requeued_job):
    job = requeued_job
    assert f"{job['job']}." in job["steps_running"]  # the srun step was running
    assert "srun --kill-on-bad-exit=1" in job["script"] and "-m torch.distributed.run" in job["script"]
    assert "-m vidtron.launch.slurm_node" in job["script"]
    first = next(e for e in events(job["run_dir"]) if e["event"] == "start")
    assert first["world"] == 2 and first["layout"] == "dp_shard2" and first["step"] == 0


def test_killed_steps_requeue_and_resume_from_the_checkpoint(requeued_job, ref):
    job = requeued_job
    assert job["state"] == "COMPLETED" and job["restarts"] == "2"
    ev = events(job["run_dir"])
    failure = [e for e in ev if e["event"] == "failure" and e.get("launcher") == "slurm"]
    assert [e["attempt"] for e in failure] == [0, 1] and all(e["exit"] != 0 and e["job"] == job["job"] for e in failure)
    assert [e["attempts"] for e in ev if e["event"] == "restart"] == [{"slurm": 1}, {"slurm": 2}]
    resumes = [e["step"] for e in ev if e["event"] == "resume"]
    assert len(resumes) == 2 and resumes[0] == 2 and job["killed_after"] <= resumes[1] < 10
    assert_matches_reference(job["run_dir"], ref)
    assert_nothing_outside(job["tmp"])


def test_failed_node_is_recorded_and_its_exclusion_refused(requeued_job, cluster):
    """The fault's SIGKILL made torchrun fail on this node: the failure names it; excluding the partition's only
    node would leave none, so the helper refuses, says so, and the job (ExcNodeList unset) runs again."""
    job, node = requeued_job, cluster.node
    ev = events(job["run_dir"])
    assert any(e["event"] == "fault-injected" and e["step"] == 3 for e in ev)
    exits = [e for e in ev if e["event"] == "node_exit"]
    assert [(e["node"], e["host"], e["attempt"]) for e in exits] == [(node, socket.gethostname(), 0)]
    failure = [e for e in ev if e["event"] == "failure" and e.get("launcher") == "slurm"]
    assert failure[0]["hosts"] == [node] and failure[0]["node_exits"][0]["exit"] != 0
    assert failure[1]["hosts"] == []  # the step SIGKILLed from outside: no node failed on its own
    (exclude,) = [e for e in ev if e["event"] == "exclude"]
    assert exclude["requested"] == [node] and exclude["excluded"] == [] and exclude["exc_node_list"] == []
    reason = "would leave 0 usable nodes in the partition for a job of 1"
    assert exclude["refused"] == [{"node": node, "reason": reason}]
    assert f"vidtron: not excluding {node}: {reason}" in job["log"]
    assert job["exc_node_list"] == "(null)"


def test_exclusion_commands_on_a_real_job(cluster, monkeypatch):
    """requeuehold, update ExcNodeList, release on a running job; read back with the helper's scontrol/sinfo parsers."""
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    job = cluster.run("sbatch", "--parsable", "--requeue", "--output=/dev/null", "--wrap", "sleep 300").strip()
    try:
        cluster.wait_job(job, 60, done=("RUNNING",))
        assert rq.current_exclusions(job) == [] and list(rq.partition_nodes("test")) == [cluster.node]
        assert rq.requeue(job, [cluster.node])
        assert rq.current_exclusions(job) == [cluster.node]  # SLURM will not start it on this node again
        assert cluster.wait_job(job, 30, done=("PENDING",)) == "PENDING"  # after REQUEUED / COMPLETING
        assert cluster.job_field(job, "Restarts") == "1"
    finally:
        cluster.run("scancel", job, check=False)
