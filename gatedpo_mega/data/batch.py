"""The micro-batch that flows from the data pipeline into the model: whole preference pairs, padded or packed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gatedpo_mega.ops import IGNORE_INDEX


@dataclass(frozen=True, slots=True)
class Packing:
    """The same micro-batch with its rows back to back in one row of ``T`` tokens (megatron-core's ``thd`` layout):
    what the model runs on when ``data.packing`` is set. Document ``j`` is row ``j`` of the padded layout without
    its padding, so chosen documents come first, then rejected ones, as the rows do."""

    input_ids: torch.Tensor  # [1, T]
    targets: torch.Tensor  # [1, T] next-token targets, -100 outside the responses
    # [D + 1] int32: where each document starts (the last document may be the padding tail)
    cu_seqlens: torch.Tensor
    max_seqlen: int  # the longest document
    # [2B, W]: the position in the packed row of each token of the padded layout (-1: padding)
    unpack: torch.Tensor
    bounds: tuple[
        int, ...
    ] = ()  # ``cu_seqlens`` on the host: attention splits documents without a device sync

    def rows(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token ``values`` of the packed row, ``[T, ...]``, in the padded layout ``[2B, W, ...]`` (zero on
        padding, as the padded computation gives there)."""
        out = values[self.unpack.clamp(min=0)]
        pad = (self.unpack < 0).reshape(*self.unpack.shape, *([1] * (values.ndim - 1)))
        return out.masked_fill(pad, 0)

    def to(self, device: torch.device | str) -> Packing:
        return Packing(
            self.input_ids.to(device), self.targets.to(device), self.cu_seqlens.to(device), self.max_seqlen,
            self.unpack.to(device), self.bounds,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class PreferenceBatch:
    """``B`` pairs as ``2B`` right-padded rows: rows ``0..B-1`` are prompt + chosen, rows ``B..2B-1`` prompt +
    rejected of the same pairs, in the same order.

    ``labels[:, t]`` is the next token ``input_ids[:, t + 1]`` where that token belongs to the response (its EOS
    included) and ``-100`` elsewhere (prompt, padding), so ``labels != -100`` is the response loss mask.
    ``pair_ids`` are the pairs' indices in their tokenized dataset: the key for stored reference log-probs.
    With ``packing`` the model runs on the packed row instead; the loss reads its statistics back in this layout.
    """

    input_ids: torch.Tensor  # [2B, W] long
    labels: torch.Tensor  # [2B, W] long
    pair_ids: torch.Tensor  # [B] long
    packing: Packing | None = None

    @property
    def pairs(self) -> int:
        return int(self.pair_ids.numel())

    @property
    def loss_mask(self) -> torch.Tensor:
        return self.labels != IGNORE_INDEX

    @property
    def real_tokens(self) -> int:
        """Prompt and response tokens of the rows, padding excluded (a row ends one past its last target)."""
        m = self.loss_mask
        pos = torch.arange(m.shape[1], device=m.device)
        return int((torch.where(m, pos, -1).amax(-1) + 2).sum())

    @property
    def token_mask(self) -> torch.Tensor:
        """True on the tokens of ``model_input_ids`` that are prompt or response, False on padding."""
        m = self.loss_mask
        pos = torch.arange(m.shape[1], device=m.device)
        rows = pos[None] <= torch.where(m, pos, -1).amax(-1, keepdim=True) + 1  # one past the last target
        if self.packing is None:
            return rows
        unpack = self.packing.unpack
        out = torch.zeros_like(self.packing.input_ids, dtype=torch.bool)
        out[0, unpack[rows & (unpack >= 0)]] = True
        return out

    @property
    def model_input_ids(self) -> torch.Tensor:
        """What the model runs on: ``[2B, W]`` padded rows, or ``[1, T]`` packed."""
        return self.input_ids if self.packing is None else self.packing.input_ids

    def to(self, device: torch.device | str) -> PreferenceBatch:
        packing = self.packing.to(device) if self.packing is not None else None
        return PreferenceBatch(
            self.input_ids.to(device), self.labels.to(device), self.pair_ids.to(device), packing
        )


def pack(
    batch: PreferenceBatch,
    lengths: list[int],
    *,
    pad_to_multiple: int,
    pad_id: int,
    document_multiple: int = 1,
) -> PreferenceBatch:
    """``batch`` with its ``Packing``: the rows' first ``lengths[j]`` tokens back to back, in row order, the row
    padded to a multiple of ``pad_to_multiple`` by a tail that forms its own (ignored) document. With
    ``document_multiple`` every document spans a multiple of it (context parallelism cuts each document into
    ``2 CP`` chunks): its padding follows its last token, where the causal mask keeps it from the real ones, and
    ``pad_to_multiple`` must then be a multiple of it."""
    if pad_to_multiple % document_multiple:
        raise ValueError(f"pad_to_multiple={pad_to_multiple} is not a multiple of {document_multiple}")
    spans = [-(-n // document_multiple) * document_multiple for n in lengths]
    real = sum(spans)
    total = -(-real // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((1, total), pad_id, dtype=torch.long)
    targets = torch.full((1, total), IGNORE_INDEX, dtype=torch.long)
    unpack = torch.full(batch.input_ids.shape, -1, dtype=torch.long)
    starts = [0]
    for j, (n, span) in enumerate(zip(lengths, spans, strict=True)):
        a = starts[-1]
        input_ids[0, a : a + n] = batch.input_ids[j, :n]
        targets[0, a : a + n] = batch.labels[j, :n]
        unpack[j, :n] = torch.arange(a, a + n)
        starts.append(a + span)
    if total > real:
        starts.append(total)
    cu = torch.tensor(starts, dtype=torch.int32)
    packing = Packing(input_ids, targets, cu, int((cu[1:] - cu[:-1]).max()), unpack, tuple(starts))
    return PreferenceBatch(batch.input_ids, batch.labels, batch.pair_ids, packing)
