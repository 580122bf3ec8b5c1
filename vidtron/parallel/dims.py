"""ParallelDims: the one object that owns the 5D layout and its DeviceMesh.

world = dp_replicate * dp_shard * cp * tp. Mesh dims, outermost first: dp_replicate, dp_shard, cp, tp
(tp innermost so a TP group sits on one node). SP rides on the tp dim; ZeRO shards over dp_shard (and cp,
whose ranks hold the same parameters). Validation happens in `__post_init__` and `validate_for`, before
any process group starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from vidtron.errors import ConfigError

CP_MODES = ("ring", "ulysses", "usp")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class ParallelDims:
    """Sizes of the five parallel dimensions (SP shares tp's ranks)."""

    dp_replicate: int = 1  # replicated data-parallel groups (DDP / the outer dim of HSDP)
    dp_shard: int = 1  # ZeRO-sharded data-parallel ranks (FSDP2 / DeepSpeed)
    cp: int = 1  # context-parallel ranks splitting the attention tokens
    tp: int = 1  # tensor-parallel ranks splitting heads and MLP hidden (SP rides on it)
    cp_mode: str = "ring"  # ring | ulysses | usp
    ulysses: int = 0  # Ulysses degree inside usp (ring degree = cp / ulysses); 0 = derived from cp_mode
    _mesh: object = field(default=None, init=False, repr=False, compare=False)
    # (backend, options with the collective timeout) the mesh groups were built with; None: torch's defaults
    group_options: object = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "dp_shard", "cp", "tp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel.{name}", value, "must be a positive integer")
        if self.cp_mode not in CP_MODES:
            raise ConfigError("parallel.cp_mode", self.cp_mode, f"choose one of {list(CP_MODES)}")
        if self.ulysses == 0:
            self.ulysses = {"ring": 1, "ulysses": self.cp}.get(self.cp_mode, 0)
            if self.cp_mode == "usp":
                self.ulysses = self._default_usp_ulysses()
        if self.cp % self.ulysses:
            raise ConfigError(
                "parallel.ulysses",
                self.ulysses,
                f"must divide parallel.cp={self.cp}; choose one of {_divisors(self.cp)}",
            )

    def _default_usp_ulysses(self) -> int:
        for d in _divisors(self.cp):
            if d * d >= self.cp:
                return d
        return self.cp

    # ---- derived sizes ----
    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Number of distinct data streams (ranks that see different samples)."""
        return self.dp_replicate * self.dp_shard

    @property
    def ring(self) -> int:
        return self.cp // self.ulysses

    @property
    def layout_name(self) -> str:
        parts = [f"{n}{getattr(self, n)}" for n in ("dp_replicate", "dp_shard", "cp", "tp") if getattr(self, n) > 1]
        return "x".join(parts) or "single"

    # ---- validation against a model and a sequence ----
    def validate_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise ConfigError(
                "parallel",
                self.layout_name,
                f"dp_replicate*dp_shard*cp*tp = {self.world_size} but {world_size} processes were started; "
                f"set launcher.nproc_per_node={self.world_size} or change the layout",
            )

    def validate_for(self, heads: int, video_tokens: int | None = None, mlp_hidden: int | None = None) -> None:
        """Check that this layout can split a model with `heads` heads and MLP hidden `mlp_hidden` over
        `video_tokens` tokens (None: skip that check). Errors name the valid choices."""
        if heads % self.tp:
            raise ConfigError("parallel.tp", self.tp, f"must divide the {heads} heads; valid: {_divisors(heads)}")
        if mlp_hidden is not None and mlp_hidden % self.tp:
            valid = [d for d in _divisors(heads) if mlp_hidden % d == 0]
            raise ConfigError(
                "parallel.tp", self.tp, f"must divide the MLP hidden size {mlp_hidden} and the heads; valid: {valid}"
            )
        local_heads = heads // self.tp
        if local_heads % self.ulysses:
            valid = [d for d in _divisors(self.cp) if local_heads % d == 0]
            raise ConfigError(
                "parallel.ulysses",
                self.ulysses,
                f"must divide the {local_heads} heads per TP rank (heads {heads} / tp {self.tp}); "
                f"valid Ulysses degrees for cp={self.cp}: {valid}",
            )
        if video_tokens is not None and video_tokens < self.cp * self.tp:
            raise ConfigError(
                "parallel.cp",
                self.cp,
                f"{video_tokens} video tokens cannot be split over cp*tp={self.cp * self.tp}; "
                f"with tp={self.tp} use cp <= {video_tokens // self.tp} (or a larger video)",
            )

    # ---- mesh ----
    def build_mesh(self, device_type: str = "cpu", timeout_s: float | None = None):
        """Build (once) the named 4D DeviceMesh plus the flattened dp and dp_shard_cp dims. With `timeout_s` every
        mesh process group gets that collective timeout (torch's default for subgroups is 30 min, whatever the
        world group's is), so a hung peer in a TP / CP / DP group fails the step as fast as in the world group."""
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            names = ("dp_replicate", "dp_shard", "cp", "tp")
            opts = self.group_options = _group_options(device_type, timeout_s)
            override = {n: opts for n in names} if opts else None
            shape = tuple(getattr(self, n) for n in names)
            mesh = init_device_mesh(device_type, shape, mesh_dim_names=names, backend_override=override)
            mesh["dp_replicate", "dp_shard"]._flatten("dp", backend_override=opts)
            mesh["dp_shard", "cp"]._flatten("dp_shard_cp", backend_override=opts)
            self._mesh = mesh
        return self._mesh

    @property
    def mesh(self):
        if self._mesh is None:
            raise RuntimeError("ParallelDims.build_mesh() has not been called")
        return self._mesh


def _group_options(device_type: str, timeout_s: float | None):
    """(backend, options carrying the timeout) for DeviceMesh's backend_override; None keeps torch's defaults."""
    if timeout_s is None:
        return None
    import torch.distributed as dist

    if device_type == "cuda":
        backend, opts = "nccl", dist.ProcessGroupNCCL.Options()
    else:
        backend, opts = "gloo", dist.ProcessGroupGloo._Options()
    opts._timeout = timedelta(seconds=timeout_s)
    return backend, opts
