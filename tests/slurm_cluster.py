"""A real one-node SLURM cluster for tests: munged + slurmctld + slurmd as root, private ports and state.

Everything lives under one temp folder (key, socket, slurm.conf, state, spool, logs, pid files); clients
find it through `SLURM_CONF`. The daemons are stopped by PID. Needs Debian's `slurm-wlm` and `munge`
(see shared/PROBES.md, "SLURM, for real, on one machine").
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")


def missing_reason() -> str | None:
    """Why a SLURM test cannot run here, or None when it can."""
    gone = [d for d in DAEMONS if shutil.which(d) is None]
    if gone:
        return f"SLURM test cluster needs {', '.join(gone)} (apt-get install -y slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the SLURM test cluster runs its daemons as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf(d: Path, host: str, cpus: int) -> str:
    return f"""ClusterName=vidtrontest
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={d / "munge.sock"},cred_expire=5
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d / "state"}
SlurmdSpoolDir={d / "spool"}
SlurmctldPidFile={d / "slurmctld.pid"}
SlurmdPidFile={d / "slurmd.pid"}
SlurmctldLogFile={d / "slurmctld.log"}
SlurmdLogFile={d / "slurmd.log"}
ReturnToService=2
JobRequeue=1
KillWait=5
SchedulerParameters=sched_interval=1,bf_interval=1
MinJobAge=600
NodeName={host} CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """Start with `start()`, use `env` for clients (sbatch, squeue, scontrol), `stop()` by PID at the end."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root = Path(root)
        self.cpus = cpus
        self.procs: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.node = socket.gethostname().split(".")[0]  # the one node's SLURM name (slurmd's host name)

    def start(self, timeout_s: float = 30) -> SlurmCluster:
        d = self.root
        for sub in ("state", "spool"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(_conf(d, self.node, self.cpus))
        key = d / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        os.chmod(key, 0o600)
        munge = ["munged", "-F", "--force", f"--key-file={key}", f"--socket={d / 'munge.sock'}"]
        munge += [f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munge.seed'}"]
        self._spawn(munge, "munged")
        self._wait(lambda: (d / "munge.sock").exists(), timeout_s, "munged did not create its socket")
        self._spawn(["slurmctld", "-D", "-f", str(self.conf)], "slurmctld")
        self._spawn(["slurmd", "-D", "-f", str(self.conf)], "slurmd")
        self._wait(self._node_ready, timeout_s, "slurmd never became idle")
        return self

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(self.root / f"{name}.stdout", "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        t0 = time.time()
        while not ready():
            if time.time() - t0 > timeout_s:
                raise RuntimeError(f"{what} within {timeout_s} s; logs in {self.root}")
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a SLURM daemon exited early; logs in {self.root}")
            time.sleep(0.2)

    def _node_ready(self) -> bool:
        out = self.run("sinfo", "-h", "-o", "%t", check=False)
        return out.strip() in ("idle", "mix", "alloc")

    def run(self, *cmd: str, check: bool = True) -> str:
        res = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        if check and res.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")
        return res.stdout

    def job_state(self, job_id: str) -> str:
        """PENDING, RUNNING, COMPLETED, FAILED, ... (scontrol keeps finished jobs for MinJobAge)."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
        return fields.get("JobState", "UNKNOWN")

    def job_field(self, job_id: str, name: str) -> str:
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
        return fields.get(name, "")

    def wait_job(self, job_id: str, timeout_s: float, done=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")) -> str:
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            state = self.job_state(job_id)
            if state in done:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout_s} s; logs in {self.root}")

    def stop(self) -> None:
        """Cancel this cluster's jobs, then SIGTERM each daemon we started (newest first), SIGKILL leftovers."""
        if self.procs and all(p.poll() is None for p in self.procs):
            self.run("scancel", "--full", "--partition=test", check=False)
            try:
                self._wait(lambda: not self.run("squeue", "-h", check=False).strip(), 20, "jobs did not end")
            except RuntimeError:
                pass
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        for p in reversed(self.procs):
            try:
                p.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
