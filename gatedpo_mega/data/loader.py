"""Tokenized pairs to micro-batches: deterministic, length-bucketed, sharded over data-parallel ranks, resumable.

The set of pairs in optimizer step ``k`` depends on ``(seed, epoch, k)`` alone: epoch ``e`` is a permutation drawn
from ``(seed, e)``, and step ``k`` takes its ``k``-th slice of ``global_batch_size`` pairs. Only then is the slice
sorted by length and dealt out, so DP 1 and DP 2, or micro-batch 8 and micro-batch 4 x accumulation 2, see exactly
the same pairs per step (the loss is a mean over the global batch, so they compute the same update).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from gatedpo_mega.data.batch import PreferenceBatch, pack
from gatedpo_mega.data.tokenized import TokenizedPairs
from gatedpo_mega.ops import IGNORE_INDEX


def collate(
    pairs: TokenizedPairs,
    ids: list[int],
    *,
    pad_to_multiple: int,
    pad_id: int,
    packing: bool = False,
    document_multiple: int = 1,
) -> PreferenceBatch:
    """``B`` pairs as ``2B`` right-padded rows (chosen rows first); labels on response tokens, EOS included. With
    ``packing``, also the rows back to back in one row (``PreferenceBatch.packing``). ``document_multiple``: every
    row (packed: every document) spans a multiple of it, as context parallelism's ``2 CP`` chunks need."""
    pad_to_multiple = math.lcm(pad_to_multiple, document_multiple)
    rows = []
    starts = []
    for i in ids:
        p = pairs[i]
        rows.append(p.prompt + p.chosen)
        starts.append(len(p.prompt))
    for i in ids:
        p = pairs[i]
        rows.append(p.prompt + p.rejected)
    starts += starts
    longest = max(len(r) for r in rows)
    width = -(-longest // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for j, (row, start) in enumerate(zip(rows, starts, strict=True)):
        t = torch.tensor(row, dtype=torch.long)
        input_ids[j, : len(row)] = t
        # labels[t] = input_ids[t + 1] where position t + 1 is a response token
        first = max(start - 1, 0)
        labels[j, first : len(row) - 1] = t[first + 1 :]
    batch = PreferenceBatch(input_ids, labels, torch.tensor(ids, dtype=torch.long))
    if packing:
        return pack(
            batch, [len(r) for r in rows], pad_to_multiple=pad_to_multiple, pad_id=pad_id,
            document_multiple=document_multiple,
        )  # fmt: skip
    return batch


class PreferenceLoader:
    """``next(loader)``: this data-parallel rank's micro-batches of one optimizer step; epochs roll over forever."""

    def __init__(
        self,
        pairs: TokenizedPairs,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        pad_to_multiple: int,
        pad_id: int,
        shuffle: bool = True,
        packing: bool = False,
        document_multiple: int = 1,
    ) -> None:
        if micro_batch_size < 1 or global_batch_size < 1 or dp_size < 1:
            raise ValueError(
                f"train.global_batch_size={global_batch_size}, train.micro_batch_size={micro_batch_size} and "
                f"the data-parallel size {dp_size} must all be >= 1"
            )
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"train.global_batch_size={global_batch_size} must be a multiple of train.micro_batch_size="
                f"{micro_batch_size} x data-parallel size {dp_size} = {micro_batch_size * dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, {dp_size})")
        if len(pairs) < global_batch_size:
            raise ValueError(
                f"train.global_batch_size={global_batch_size} is larger than the {len(pairs)} training pairs"
            )
        if pad_to_multiple < 1:
            raise ValueError(f"data.pad_to_multiple={pad_to_multiple} must be >= 1")
        self.pairs = pairs
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.pad_to_multiple, self.pad_id = pad_to_multiple, pad_id
        self.shuffle = shuffle
        self.packing = packing
        self.document_multiple = document_multiple
        self.num_micro_batches = global_batch_size // (micro_batch_size * dp_size)
        self.steps_per_epoch = len(pairs) // global_batch_size
        # The last incomplete global batch of each epoch is left out (a different set each epoch when shuffled).
        self.dropped_per_epoch = len(pairs) - self.steps_per_epoch * global_batch_size
        self.epoch = 0
        self.step_in_epoch = 0
        self._lengths = pairs.row_lengths
        self._order_epoch = -1
        self._order = np.arange(0)

    def describe(self) -> str:
        return (
            f"loader: {len(self.pairs)} pairs, {self.steps_per_epoch} steps per epoch of {self.global_batch_size} "
            f"pairs ({self.num_micro_batches} micro-batches of {self.micro_batch_size} on each of {self.dp_size} "
            f"ranks); {self.dropped_per_epoch} pairs per epoch left out (incomplete last global batch)"
        )

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.pairs))
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
            self._order_epoch = epoch
        return self._order

    def global_batch(self, epoch: int, step: int) -> list[int]:
        """The pairs of step ``step`` of ``epoch``, sorted by (row length, pair index): the same for any DP size."""
        g = self.global_batch_size
        ids = self.epoch_order(epoch)[step * g : (step + 1) * g]
        keyed = sorted(ids.tolist(), key=lambda i: (int(self._lengths[i]), i))
        return keyed

    def rank_micro_batches(self, epoch: int, step: int) -> list[list[int]]:
        """Consecutive ``micro_batch_size`` slices of the sorted global batch (similar lengths together), dealt
        round-robin to ranks: micro-batch ``m`` of rank ``r`` is slice ``m * dp_size + r``."""
        ids = self.global_batch(epoch, step)
        mbs = self.micro_batch_size
        return [
            ids[(m * self.dp_size + self.dp_rank) * mbs : (m * self.dp_size + self.dp_rank + 1) * mbs]
            for m in range(self.num_micro_batches)
        ]

    def __iter__(self) -> PreferenceLoader:
        return self

    def __next__(self) -> list[PreferenceBatch]:
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.step_in_epoch = 0
        batches = [
            collate(
                self.pairs,
                ids,
                pad_to_multiple=self.pad_to_multiple,
                pad_id=self.pad_id,
                packing=self.packing,
                document_multiple=self.document_multiple,
            )
            for ids in self.rank_micro_batches(self.epoch, self.step_in_epoch)
        ]
        self.step_in_epoch += 1
        return batches

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "seed": self.seed,
            "num_pairs": len(self.pairs),
            "global_batch_size": self.global_batch_size,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume exactly where the saved loader was; DP size and micro-batch size may differ (same pairs)."""
        mine = self.state_dict()
        for key in ("seed", "num_pairs", "global_batch_size", "shuffle"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"data loader state: {key}={state.get(key)!r} in the checkpoint differs from this run's "
                    f"{mine[key]!r}; the resumed run would not see the batches it would have seen"
                )
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
