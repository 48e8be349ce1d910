"""``fused_token_logprobs``: the output layer and the per-token log-probabilities in one op, one token chunk at a time.

The logits ``hidden @ W_shard.T`` are the largest tensor of a training step (V x tokens). Here they exist one chunk
of tokens at a time: forward computes a chunk's logits, reduces them to the statistics of ``token_logprobs``
(same vocab-parallel reductions: one MAX and one packed SUM all-reduce per chunk) and drops them; backward
recomputes the chunk's logits from the saved ``hidden`` and ``W`` and the per-token log-sum-exp, and turns
``d log p_y / d z = 1[k = y] - p`` into the two gradients:

    d hidden = dZ @ W_shard        (partial over the vocabulary shards: summed over the tensor-parallel group)
    d W_shard += dZ.T @ hidden

Four matmuls in all (the recomputation is the one above the three-matmul floor); the extra memory is one chunk of
logits and its float32 temporaries, plus the weight gradient's float32 accumulator for half-precision weights.
"""

from __future__ import annotations

from typing import Any

import torch

from gatedpo_mega.ops.collectives import ProcessGroup, copy_to_group
from gatedpo_mega.ops.logprobs import (
    IGNORE_INDEX,
    acc_dtype,
    default_chunk_size,
    resolve_shard,
    shard_logit_grad,
    shard_stats,
)


class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        group: ProcessGroup | None,
        start: int,
        valid: int,
        chunk: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = targets.shape[0]
        outs = [torch.empty(n, dtype=acc_dtype(hidden.dtype), device=hidden.device) for _ in range(4)]
        for i in range(0, n, chunk):
            sl = slice(i, min(i + chunk, n))
            logits = hidden[sl] @ weight.t()
            for out, t in zip(outs, shard_stats(logits, targets[sl], start, valid, group), strict=True):
                out[sl] = t
        logp, logp_max, entropy, lse = outs
        ignored = targets == IGNORE_INDEX
        for out in (logp, logp_max, entropy):
            out.masked_fill_(ignored, 0.0)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.meta = (start, valid, chunk)
        ctx.mark_non_differentiable(logp_max, entropy)
        return logp, logp_max, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, targets, lse = ctx.saved_tensors
        start, valid, chunk = ctx.meta
        g = grad_logp.to(lse.dtype).masked_fill(targets == IGNORE_INDEX, 0.0)
        grad_hidden = torch.zeros_like(hidden)
        # Half-precision weights accumulate their gradient over chunks in float32.
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype(weight.dtype), device=weight.device)
        n = targets.shape[0]
        w = weight[:valid]
        for i in range(0, n if valid > 0 else 0, chunk):
            sl = slice(i, min(i + chunk, n))
            h = hidden[sl]
            dz = shard_logit_grad(h @ w.t(), targets[sl], lse[sl], g[sl], start, valid).to(hidden.dtype)
            grad_hidden[sl] = dz @ w
            grad_weight[:valid].addmm_(dz.t().to(grad_weight.dtype), h.to(grad_weight.dtype))
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None


def fused_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group: ProcessGroup | None = None,
    vocab_start_index: int | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``token_logprobs(hidden @ weight.T, targets, ...)`` without ever holding more than one chunk of logits.

    Args:
        hidden: ``[..., H]``, the final hidden states, identical on every rank of ``tp_group``.
        weight: ``[V_local, H]``, this rank's vocabulary shard of the output layer.
        targets, tp_group, vocab_start_index, vocab_size, chunk_size: as in ``token_logprobs``.

    Returns ``(logp_target, logp_max, entropy)`` of ``targets``' shape; ``logp_target`` carries gradients into
    ``hidden`` (summed over ``tp_group``) and ``weight``.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match targets {tuple(targets.shape)} + [H]")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} is not [V_local, H={hidden.shape[-1]}]")
    flat_targets, start, valid = resolve_shard(
        targets, weight.shape[0], tp_group, vocab_start_index, vocab_size
    )
    chunk = chunk_size if chunk_size is not None else default_chunk_size(weight.shape[0])
    if chunk <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk}")
    h = copy_to_group(hidden.reshape(-1, hidden.shape[-1]), tp_group)  # backward: sum of the shards' parts
    logp, logp_max, entropy = _FusedLogprobs.apply(h, weight, flat_targets, tp_group, start, valid, chunk)
    shape = targets.shape
    return logp.view(shape), logp_max.view(shape), entropy.view(shape)
