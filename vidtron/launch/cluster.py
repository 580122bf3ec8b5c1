"""Cluster descriptions and start-up shared by the launchers (train, sweep): `cluster_configs/<name>.yaml`, a
private local Ray instance, and the #SBATCH header of a job script.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from vidtron.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2  # nothing large goes through Ray's object store
# <temp>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store must fit in an AF_UNIX path (107 bytes)
MAX_RAY_TEMP_DIR_CHARS = 40


@dataclass
class ClusterConfig:
    """A cluster description (`cluster_configs/<name>.yaml`); SLURM fields, plus `ray_address` for launcher=ray."""

    nodes: int = 1  # nodes per job
    gpus_per_node: int = 0  # GPUs per node (--gpus-per-node); 0 = CPU nodes
    procs_per_node: int = 0  # training processes per node; 0 = gpus_per_node, or 1 on CPU nodes
    cpus_per_node: int = 0  # --cpus-per-task of the one srun task per node; 0 = SLURM's default
    mem: str = ""  # --mem per node, e.g. 0 (all of it) or 200G; "" = SLURM's default
    partition: str = ""  # --partition; "" = the cluster's default partition
    account: str = ""  # --account
    qos: str = ""  # --qos
    time_limit: str = "01:00:00"  # --time: [D-]HH:MM:SS
    container_image: str = ""  # pyxis/enroot image for `srun --container-image`; "" = run on the host
    container_mounts: str = ""  # `srun --container-mounts`, e.g. /lustre:/lustre
    env: dict[str, str] = field(default_factory=dict)  # exported in the job before srun
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load, source a venv, ...)
    python: str = ""  # interpreter on the nodes; "" = the one running vidtron-train
    rdzv_port: int = 0  # c10d rendezvous port on the head node; 0 = a free one (1 node) or derived from the job id
    extra_sbatch: list[str] = field(default_factory=list)  # more #SBATCH options, e.g. --exclusive
    ray_address: str = ""  # launcher=ray: a running Ray cluster (ray://head:10001 or head:6379); "" = local

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigError("cluster.nodes", self.nodes, "must be >= 1")
        if self.gpus_per_node < 0 or self.procs_per_node < 0 or self.cpus_per_node < 0:
            raise ConfigError("cluster.procs_per_node", self.procs_per_node, "counts must be >= 0")

    @property
    def procs(self) -> int:
        """Training processes per node."""
        return self.procs_per_node or self.gpus_per_node or 1


def cluster_path(name: str) -> Path:
    """A .yaml path as given, else cluster_configs/<name>.yaml here or in the vidtron checkout."""
    if name.endswith((".yaml", ".yml")):
        return Path(name)
    for root in (Path.cwd(), REPO_ROOT):
        path = root / "cluster_configs" / f"{name}.yaml"
        if path.exists():
            return path
    return Path("cluster_configs") / f"{name}.yaml"


def load_cluster(name: str) -> ClusterConfig:
    path = cluster_path(name)
    if not path.is_file():
        known = sorted(p.stem for p in (REPO_ROOT / "cluster_configs").glob("*.yaml"))
        raise ConfigError("launcher.cluster", name, f"no {path}; choose one of {known} or give a .yaml path")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ClusterConfig), OmegaConf.load(path))
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except Exception as err:  # an unknown key or a wrong type in the yaml
        first = str(err).splitlines()[0]
        raise ConfigError("launcher.cluster", str(path), f"{first}; see the fields of ClusterConfig") from err


def sbatch_options(
    c: ClusterConfig, job_name: str, output: str | Path, head: list[str], tail: list[str] = ()
) -> list[str]:
    """The #SBATCH lines of a job on cluster `c`: its name, the `head` options (nodes, tasks, GPUs, CPUs), memory,
    partition, account, QoS, time limit, the appended log `output`, the `tail` options, the cluster's extras."""
    opts = [f"--job-name={job_name}", *head]
    opts += [f"--mem={c.mem}"] if c.mem else []
    for flag, value in (("partition", c.partition), ("account", c.account), ("qos", c.qos)):
        opts += [f"--{flag}={value}"] if value else []
    opts += [f"--time={c.time_limit}", f"--output={output}", "--open-mode=append", *tail]
    return [f"#SBATCH {o}" for o in [*opts, *c.extra_sbatch]]


def init_local_ray(num_cpus: int, run_dir: Path, **kwargs) -> None:
    """Start a private local Ray instance (no dashboard, small object store, token auth, session folder under
    `run_dir` when its socket paths fit); extra keyword arguments go to `ray.init`."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    _private_token()
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        _temp_dir=_temp_dir(run_dir),
        **kwargs,
    )


def _private_token() -> None:
    """Token auth for the private instance without writing ~/.ray/auth_token: a random token in the environment
    (inherited by Ray's processes), unless the user configured one."""
    configured = any(os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"))
    if not configured and not (Path.home() / ".ray" / "auth_token").exists():
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def _temp_dir(run_dir: Path) -> str | None:
    """Ray's session folder inside the run dir when the socket paths under it stay within the 107-byte limit of
    AF_UNIX; otherwise Ray's default (/tmp/ray)."""
    path = run_dir / "ray" / "tmp"
    return str(path) if len(str(path)) <= MAX_RAY_TEMP_DIR_CHARS else None
