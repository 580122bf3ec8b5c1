"""Cluster descriptions and start-up shared by the launchers (train, sweep): `cluster_configs/<name>.yaml`, a
private local Ray instance, the #SBATCH header of a job script, and the checks of a Ray worker layout (nodes x
workers per node against the parallel layout and against what a running Ray cluster offers).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from math import floor
from pathlib import Path

from omegaconf import OmegaConf

from vidtron.errors import ConfigError
from vidtron.platform.config import ParallelConfig

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
    ray_address: str = ""  # launcher=ray: a running Ray cluster (head:6379 or ray://head:10001); "" = local
    # launcher=ray: a custom resource every Ray node advertises procs_per_node of (`ray start
    # --resources='{"vidtron_slot": 8}'`); each worker takes one, so each node gets exactly procs_per_node
    # workers. "" = place by GPUs / CPUs alone (PACK) and only verify the placement
    ray_slot_resource: str = ""

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


@dataclass(frozen=True)
class RayLayout:
    """Where launcher=ray puts its workers: `nodes` Ray nodes with `procs` workers each, world ranks node by node
    (Ray Train V2 groups a node's workers into consecutive ranks), so a TP group of consecutive ranks whose size
    divides `procs` never leaves its node."""

    nodes: int  # Ray nodes the workers run on
    procs: int  # workers per node
    source: str  # the config fields the sizes come from, for error messages
    slot: str = ""  # custom per-node resource that caps a node at `procs` workers ("" = none)
    address: str = ""  # the Ray cluster to connect to ("" = a private local instance)

    @property
    def world(self) -> int:
        return self.nodes * self.procs


def ray_layout(cluster: ClusterConfig | None, nproc_per_node: int, name: str = "") -> RayLayout:
    """nodes x procs_per_node from the cluster config; without one, launcher.nproc_per_node workers on this host."""
    if cluster is None:
        return RayLayout(1, nproc_per_node, "launcher.nproc_per_node")
    if cluster.nodes > 1 and not cluster.ray_address:
        raise ConfigError(
            "cluster.ray_address",
            "",
            f"{name or 'the cluster config'} asks for {cluster.nodes} nodes: set ray_address to the head of a running "
            "Ray cluster (`ray start --head` there; see cluster_configs/ray_example.yaml), or nodes: 1 for a local run",
        )
    source = f"cluster.nodes x cluster.procs_per_node of {name}" if name else "cluster.nodes x cluster.procs_per_node"
    return RayLayout(cluster.nodes, cluster.procs, source, cluster.ray_slot_resource, cluster.ray_address)


def check_ray_layout(layout: RayLayout, p: ParallelConfig) -> None:
    """The worker count fits the parallel layout, and a TP group fits on one node; before Ray starts."""
    fixed = p.dp_replicate * p.cp * p.tp * (p.dp_shard if p.dp_shard > 0 else 1)
    if (p.dp_shard > 0 and fixed != layout.world) or layout.world % fixed:
        shard = "dp_shard (-1: the rest)" if p.dp_shard == -1 else f"dp_shard={p.dp_shard}"
        raise ConfigError(
            "parallel",
            f"dp_replicate={p.dp_replicate} x {shard} x cp={p.cp} x tp={p.tp}",
            f"does not fit the {layout.world} Ray workers ({layout.source}: {layout.nodes} x {layout.procs}); "
            f"make the layout's product {layout.world} or change the worker count to a multiple of {fixed}",
        )
    if layout.procs % p.tp:
        valid = [d for d in range(1, layout.procs + 1) if layout.procs % d == 0]
        raise ConfigError(
            "parallel.tp",
            p.tp,
            f"a TP group must sit on one node, so tp must divide the {layout.procs} workers per node "
            f"({layout.source}); choose tp in {valid} or give each node a multiple of {p.tp} workers",
        )


def worker_resources(layout: RayLayout, use_gpu: bool) -> dict[str, float]:
    """What one Ray worker reserves: a CPU, a GPU on GPU clusters, one slot of the per-node slot resource."""
    need = {"CPU": 1.0}
    need.update({"GPU": 1.0} if use_gpu else {})
    need.update({layout.slot: 1.0} if layout.slot else {})
    return need


def check_ray_capacity(layout: RayLayout, need: dict[str, float], ray_nodes: list[dict]) -> None:
    """Fail (instead of waiting forever for a placement group) when the connected Ray cluster cannot hold
    `layout.nodes` nodes of `layout.procs` workers; `ray_nodes` is `ray.nodes()`."""
    alive = [n for n in ray_nodes if n.get("Alive")]
    fits = {n["NodeID"]: _workers_on(n.get("Resources", {}), need) for n in alive}
    summary = ", ".join(f"{n['NodeManagerAddress']}/{n['NodeID'][:8]}: {fits[n['NodeID']]}" for n in alive[:8])
    where = layout.address or "the local Ray instance"
    if layout.slot:
        uneven = [n for n in alive if n.get("Resources", {}).get(layout.slot, layout.procs) != layout.procs]
        if uneven:
            n = uneven[0]
            raise ConfigError(
                "cluster.ray_slot_resource",
                layout.slot,
                f"node {n['NodeManagerAddress']}/{n['NodeID'][:8]} of {where} advertises "
                f"{n['Resources'][layout.slot]:g} {layout.slot} but each node must hold exactly procs_per_node="
                f"{layout.procs} workers; start every node with --resources='{{\"{layout.slot}\": {layout.procs}}}'",
            )
    if sum(f >= layout.procs for f in fits.values()) < layout.nodes:
        raise ConfigError(
            "cluster.nodes",
            layout.nodes,
            f"{where} has {len(alive)} live node(s) holding [{summary}] workers of {need}, but {layout.nodes} "
            f"node(s) with {layout.procs} each are needed ({layout.source}); add nodes (`ray start --address=...` "
            "on each, with the slot resource if configured) or ask for fewer nodes / workers per node",
        )


def _workers_on(resources: dict[str, float], need: dict[str, float]) -> int:
    """How many workers needing `need` fit in a node's total `resources`."""
    return min(floor(resources.get(key, 0.0) / amount + 1e-9) for key, amount in need.items())
