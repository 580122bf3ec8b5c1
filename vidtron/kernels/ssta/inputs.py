"""Shape checks and broadcasting shared by the block-sparse attention backends (torch and Triton).

Shape legend: B batch, N heads, nb_q / nb_k query / key blocks, bs block size, Dh head dim.
"""

from __future__ import annotations

import torch

from vidtron.errors import ConfigError


def expand_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    key_valid: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check every shape (the Triton kernel would read out of bounds on a wrong one), then broadcast block_mask to
    [B, N, nb_q, nb_k] and key_valid to [B, nb_k, bs] (bool)."""
    B, N, nb_q, bs, Dh = q.shape
    nb_k = k.shape[2]
    for name, t in (("k", k), ("v", v)):
        if t.shape != (B, N, nb_k, bs, Dh):
            raise ConfigError(
                f"block_sparse_attention {name} shape", tuple(t.shape), f"expected [B, N, {nb_k}, {bs}, {Dh}]"
            )
    if key_valid is None:
        key_valid = torch.ones(nb_k, bs, dtype=torch.bool, device=q.device)
    try:
        mask = block_mask.to(device=q.device, dtype=torch.bool).expand(B, N, nb_q, nb_k)
        valid = key_valid.to(device=q.device, dtype=torch.bool).expand(B, nb_k, bs)
    except RuntimeError as err:
        shapes = f"block_mask {tuple(block_mask.shape)}, key_valid {tuple(key_valid.shape)}"
        want = f"block_mask broadcastable to [{B}, {N}, {nb_q}, {nb_k}], key_valid to [{B}, {nb_k}, {bs}]"
        raise ConfigError("block_sparse_attention mask shapes", shapes, want) from err
    return mask, valid
