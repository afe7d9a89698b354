"""One resumable, DDP-aware order of batches, shared by the ClickMe loader and the training streams.

Epoch ``e`` of ``n`` records:

1. order: ``numpy.random.default_rng([seed, e]).permutation(n)`` when shuffling, else
   ``0 .. n-1`` (independent of the global RNG and of how many epochs were skipped);
2. global batches: consecutive chunks of ``per_rank * world_size`` records;
3. DDP: rank ``r`` takes rows ``[r * per_rank, (r + 1) * per_rank)`` of every global batch,
   so the union over ranks is exactly the single-process batch. Dealing batches of
   ``per_rank`` round-robin over ranks is the same thing, seen batch by batch;
4. the last global batch is dropped when it is incomplete and ``drop_last`` (every step the
   same size), and in any case when some rank would get no row of it (ranks stay in step).

A position in the order is ``(epoch, batch)``: plain ints for a checkpoint.
"""
from __future__ import annotations

from typing import List

import numpy as np

from harmonizer_fast.spec import check_positive_int


class BatchOrder:
    """The record ids of every batch of one rank, epoch by epoch (see the module docstring).

    Args:
        num_records: records in the set.
        per_rank: records per batch on each rank.
        seed: seed of the per-epoch permutations.
        shuffle: False keeps the records' order.
        drop_last: drop an incomplete last global batch.
        rank, world_size: this process's place in the DDP world.
    """

    def __init__(self, num_records: int, per_rank: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        for name, value, minimum in (("num_records", num_records, 0), ("per_rank", per_rank, 1),
                                     ("world_size", world_size, 1)):
            check_positive_int(value, name, minimum)
        if not 0 <= rank < world_size:
            raise ValueError(f"`rank` must be in [0, world_size={world_size}), got {rank!r}")
        self.num_records = int(num_records)
        self.per_rank = int(per_rank)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.rank = int(rank)
        self.world_size = int(world_size)

    @property
    def global_batch(self) -> int:
        return self.per_rank * self.world_size

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        full, rest = divmod(self.num_records, self.global_batch)
        # a partial global batch is kept only when every rank gets at least one row of it
        keep_partial = rest > 0 and not self.drop_last and rest > (self.world_size - 1) * self.per_rank
        return full + int(keep_partial)

    def order(self, epoch: int) -> np.ndarray:
        """All record ids of ``epoch`` in visiting order."""
        if not self.shuffle:
            return np.arange(self.num_records)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_records)

    def rank_batches(self, epoch: int) -> List[np.ndarray]:
        """This rank's batches of ``epoch`` (record ids, in order)."""
        order = self.order(epoch)
        start = self.rank * self.per_rank
        return [order[b * self.global_batch + start:b * self.global_batch + start + self.per_rank]
                for b in range(len(self))]
