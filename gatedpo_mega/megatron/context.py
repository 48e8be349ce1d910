"""Context parallelism (CP): each row's tokens split over the CP ranks in the load-balanced zigzag order.

A row of ``n`` tokens (``n`` a multiple of ``2 CP``; the data pads it) is cut into ``2 CP`` chunks of ``n / 2CP``;
CP rank ``r`` holds chunks ``r`` and ``2 CP - 1 - r``, so that under the causal mask every rank has the same amount
of attention work (an early chunk attends to few keys, its partner at the end to many). A packed row is cut the
same way document by document (every document's length a multiple of ``2 CP``), which is the layout megatron-core's
rotary embedding reads (``get_pos_emb_on_this_cp_rank``; per document for ``thd``), so positions stay right.

The labels are the next-token targets of each position before the split, so they travel with their tokens. The
model runs on this rank's tokens only; attention gathers the keys and values of the whole row over the CP group
(``megatron/attention.py``); the loss gathers the per-token statistics (three floats a token: never the logits) and
computes everything after them (gate, objective, metrics) on whole rows, identically on every CP rank.

Gradients: the loss is replicated on the CP ranks and each rank's backward reaches its own tokens' activations. The
loss is scaled by CP before backward and DeepSpeed averages over data x context (``deepspeed/engine.py``), which
sums the parameter gradients over CP and averages them over DP.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise
from typing import Any

import torch

from gatedpo_mega.ops.collectives import gather_to_replicated


def chunk_ids(cp: int, rank: int) -> tuple[int, int]:
    """The two chunks (of ``2 cp``) rank ``rank`` holds, in the order it holds them."""
    return rank, 2 * cp - 1 - rank


def local_positions(length: int, cp: int, rank: int) -> torch.Tensor:
    """Positions in ``[0, length)`` of rank ``rank``'s tokens of one row (or document), in its order."""
    if length % (2 * cp):
        raise ValueError(f"a row of {length} tokens cannot be split into {2 * cp} equal chunks")
    size = length // (2 * cp)
    return torch.cat([torch.arange(c * size, (c + 1) * size) for c in chunk_ids(cp, rank)])


def rank_positions(bounds: tuple[int, ...], cp: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s positions in a row whose documents start at ``bounds`` (``(0, n)``: one document)."""
    return torch.cat([a + local_positions(b - a, cp, rank) for a, b in pairwise(bounds)])


@lru_cache(maxsize=64)
def _plan(bounds: tuple[int, ...], cp: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions = [rank_positions(bounds, cp, r) for r in range(cp)]
    gathered = torch.cat(positions)  # the position of each token of the gathered (rank-major) row
    return positions[rank], torch.argsort(gathered)


@lru_cache(maxsize=64)
def natural_order(bounds: tuple[int, ...], cp: int, device: torch.device) -> torch.Tensor:
    """``[n]``: for each position of the whole row, its index in the row gathered rank-major over ``cp`` ranks."""
    return _plan(bounds, cp, 0)[1].to(device)


@dataclass(frozen=True, slots=True)
class ContextShard:
    """One CP rank's share of a micro-batch's model row(s) ``[R, n]`` (``R`` padded rows, or one packed row)."""

    group: Any
    size: int
    rank: int
    bounds: tuple[int, ...]  # document starts in the whole row, the end included: (0, n) for padded rows
    index: torch.Tensor  # [n / size] the positions this rank holds, in its order
    order: torch.Tensor  # [n] natural position -> index into the gathered (rank-major) row

    @property
    def length(self) -> int:
        return self.bounds[-1]

    def local(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of ``x`` (whole rows along ``dim``)."""
        return x.index_select(dim, self.index.to(x.device))

    def whole(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's ``x`` (this rank's tokens along ``dim``) as whole rows in natural order. The gradient that
        comes back is this rank's tokens' share: what follows must run identically on every CP rank."""
        gathered = gather_to_replicated(x, self.group, dim)
        return gathered.index_select(dim, self.order.to(x.device))


def context_shard(group: Any, size: int, rank: int, bounds: tuple[int, ...]) -> ContextShard:
    """Rank ``rank``'s share of a row whose documents start at ``bounds`` (``(0, n)``: padded rows of ``n``)."""
    index, order = _plan(tuple(bounds), size, rank)
    return ContextShard(group, size, rank, tuple(bounds), index, order)
