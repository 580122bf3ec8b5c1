"""Deterministic global sample order, independent of the data-parallel layout.

The stream is epoch 0's permutation, then epoch 1's, ... (each seeded by (seed, epoch)). The data position
is one integer, `cursor` = samples consumed so far by the whole job. A global batch is the next `batch`
entries of the stream; data-parallel rank r of D takes the r-th contiguous slice. Resuming at the same cursor
with any D continues the same stream: nothing skipped, nothing repeated.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from vidtron.errors import ConfigError


def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    digest = hashlib.blake2b(f"data/{seed}/{epoch}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return torch.randperm(n, generator=gen)


@dataclass
class GlobalSampler:
    num_samples: int  # samples in the dataset
    seed: int

    def __post_init__(self) -> None:
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: _epoch_perm(self.num_samples, self.seed, epoch)}
        return self._perm_cache[epoch]

    def global_indices(self, cursor: int, batch: int) -> list[int]:
        """Dataset indices of the global batch starting at stream position `cursor`."""
        out = []
        for pos in range(cursor, cursor + batch):
            epoch, offset = divmod(pos, self.num_samples)
            out.append(int(self._perm(epoch)[offset]))
        return out

    @staticmethod
    def local_slice(batch: int, dp_rank: int, dp: int) -> slice:
        """The slice of a global batch that data-parallel rank `dp_rank` of `dp` trains on."""
        if batch % dp:
            raise ConfigError("data.batch_size", batch, f"must be divisible by the data-parallel size {dp}")
        per = batch // dp
        return slice(dp_rank * per, (dp_rank + 1) * per)
