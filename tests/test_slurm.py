"""launcher=slurm: the generated sbatch script, and a real one-node SLURM (started and stopped by the tests)
running `srun torchrun` with 2 CPU processes, whose killed step requeues the job and resumes from the checkpoint.

Without slurmctld / munge (Debian: `apt-get install -y slurm-wlm munge`) the cluster tests skip with the reason.
"""

from __future__ import annotations

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
        'scontrol requeue "$SLURM_JOB_ID"',
    ]:
        assert line in [s.strip() for s in script.splitlines()], line
    assert "--container-image=/lustre/containers/" in script and "--container-mounts=/lustre:/lustre" in script
    assert "--nnodes=$SLURM_JOB_NUM_NODES --nproc_per_node=8" in script
    assert '--rdzv_backend=c10d --rdzv_endpoint="$HEAD_NODE:$RDZV_PORT"' in script
    assert script.rstrip().endswith('exit "$status"') and "parallel.tp=4" in script
    assert "launcher.dry_run" not in script.split("vidtron.launch.train", 1)[1]
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


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


def test_typo_in_a_cluster_config_is_a_user_error(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("nodes: 2\ngpus_per_nod: 8\n")
    assert main(["launcher=slurm", "launcher.dry_run=true", "data.root=x", f"launcher.cluster={path}"]) == 2
    assert "gpus_per_nod" in capsys.readouterr().err


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
    """Submit the drill run (launcher.cluster=local_cpu, 0.5 s pause per step), SIGKILL its srun step once step 4 is
    committed, and wait for the requeued job to finish."""
    tmp = tmp_path_factory.mktemp("slurm_run")
    cwd, env = sandbox(tmp)
    env["SLURM_CONF"] = str(cluster.conf)
    run_dir = tmp / "run"
    cmd = train_cmd(synth_data, run_dir, "launcher.cluster=local_cpu", "faults.step_delay_s=0.5", launcher="slurm")
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    job = out.split("submitted job ")[1].split(";")[0]
    _wait_for(lambda: (run_dir / "checkpoints" / "step_000004").exists(), 300, f"job {job} wrote no checkpoint")
    steps_running = cluster.run("squeue", "-h", "-s", "-j", job, "-o", "%i %j")
    killed_after = max(int(p.name.split("_")[1]) for p in committed_checkpoints(run_dir))
    cluster.run("scancel", "--signal=KILL", f"{job}.0")
    state = cluster.wait_job(job, 400)
    return {
        "tmp": tmp,
        "run_dir": run_dir,
        "job": job,
        "state": state,
        "restarts": cluster.job_field(job, "Restarts"),
        "steps_running": steps_running,
        "killed_after": killed_after,
        "script": (run_dir / "slurm" / "job.sbatch").read_text(),
    }


def test_job_runs_torchrun_with_two_processes_through_srun(requeued_job):
    job = requeued_job
    assert f"{job['job']}.0 " in job["steps_running"]  # the srun step was running
    assert "srun --kill-on-bad-exit=1" in job["script"] and "-m torch.distributed.run" in job["script"]
    first = next(e for e in events(job["run_dir"]) if e["event"] == "start")
    assert first["world"] == 2 and first["layout"] == "dp_shard2" and first["step"] == 0


def test_killed_step_requeues_and_resumes_from_the_checkpoint(requeued_job, ref):
    job = requeued_job
    assert job["state"] == "COMPLETED" and job["restarts"] == "1"
    ev = events(job["run_dir"])
    failure = [e for e in ev if e["event"] == "failure" and e.get("launcher") == "slurm"]
    assert len(failure) == 1 and failure[0]["exit"] != 0 and failure[0]["job"] == job["job"]
    assert [e["attempts"] for e in ev if e["event"] == "restart"] == [{"slurm": 1}]
    resumes = [e["step"] for e in ev if e["event"] == "resume"]
    assert len(resumes) == 1 and job["killed_after"] <= resumes[0] < 10
    assert_matches_reference(job["run_dir"], ref)
    assert_nothing_outside(job["tmp"])
