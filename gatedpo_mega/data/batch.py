"""The micro-batch that flows from the data pipeline into the model: whole preference pairs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gatedpo_mega.ops import IGNORE_INDEX


@dataclass(frozen=True, slots=True)
class PreferenceBatch:
    """``B`` pairs as ``2B`` right-padded rows: rows ``0..B-1`` are prompt + chosen, rows ``B..2B-1`` prompt +
    rejected of the same pairs, in the same order.

    ``labels[:, t]`` is the next token ``input_ids[:, t + 1]`` where that token belongs to the response (its EOS
    included) and ``-100`` elsewhere (prompt, padding), so ``labels != -100`` is the response loss mask.
    ``pair_ids`` are the pairs' indices in their tokenized dataset: the key for stored reference log-probs.
    """

    input_ids: torch.Tensor  # [2B, T] long
    labels: torch.Tensor  # [2B, T] long
    pair_ids: torch.Tensor  # [B] long

    @property
    def pairs(self) -> int:
        return int(self.pair_ids.numel())

    @property
    def loss_mask(self) -> torch.Tensor:
        return self.labels != IGNORE_INDEX

    def to(self, device: torch.device | str) -> PreferenceBatch:
        return PreferenceBatch(self.input_ids.to(device), self.labels.to(device), self.pair_ids.to(device))
