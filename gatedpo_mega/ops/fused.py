"""The output layer fused with the per-token log-probabilities: the logits exist one chunk at a time.

The logits ``hidden @ W_shard.T`` are the largest tensor of a training step (V x tokens). Two backward strategies:

``fused_token_logprobs`` (recompute; composes with any objective). Forward computes a chunk's logits, reduces them to
the statistics of ``token_logprobs`` (the same vocab-parallel reductions: one MAX and one packed SUM all-reduce per
chunk) and drops them; backward recomputes the chunk's logits from the saved ``hidden`` and ``W`` and the per-token
log-sum-exp, and turns ``d log p_y / d z = 1[k = y] - p`` into the two gradients

    d hidden = dZ @ W_shard        (partial over the vocabulary shards: summed over the tensor-parallel group)
    d W_shard += dZ.T @ hidden

Four matmuls in all: the recomputation is the one above the floor.

``fused_pair_loss`` (fused objective). Chunks of whole pairs: forward computes the chunk's logits, the statistics,
the per-pair loss (objective, gate, NLL term: any function of the statistics), its gradient with respect to the
token log-probs, and, from the logits still in memory, ``d hidden`` and ``d W``. Backward only scales those stored
gradients. Three matmuls, the floor.

The extra memory is one chunk of logits and its float32 temporaries, plus the weight gradient's float32
accumulator for half-precision weights.
"""

from __future__ import annotations

from typing import Any

import torch

from gatedpo_mega.ops.collectives import ProcessGroup, copy_to_group, group_size
from gatedpo_mega.ops.logprobs import (
    IGNORE_INDEX,
    acc_dtype,
    check_on_device,
    default_chunk_size,
    resolve_shard,
    shard_logit_grad,
    shard_stats,
    workspace,
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
        acc = acc_dtype(hidden.dtype)
        outs = [torch.empty(n, dtype=acc, device=hidden.device) for _ in range(4)]
        work = workspace(min(chunk, n), valid, acc, hidden.device)  # reused by every chunk
        for i in range(0, n, chunk):
            sl = slice(i, min(i + chunk, n))
            logits = hidden[sl] @ weight.t()
            for out, t in zip(outs, shard_stats(logits, targets[sl], start, valid, group, work), strict=True):
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
        # Half-precision weights accumulate their gradient over chunks in float32; a frozen weight (LoRA) has none.
        want_weight = ctx.needs_input_grad[1]
        grad_weight = (
            torch.zeros(weight.shape, dtype=acc_dtype(weight.dtype), device=weight.device)
            if want_weight
            else None
        )
        n = targets.shape[0]
        w = weight[:valid]
        buf = torch.empty((min(chunk, n), max(valid, 1)), dtype=lse.dtype, device=hidden.device)
        for i in range(0, n if valid > 0 else 0, chunk):
            sl = slice(i, min(i + chunk, n))
            h = hidden[sl]
            dz = shard_logit_grad(
                h @ w.t(), targets[sl], lse[sl], g[sl], start, valid, out=buf[: sl.stop - i]
            )
            dz = dz.to(hidden.dtype)
            grad_hidden[sl] = dz @ w
            if grad_weight is None:
                continue
            if grad_weight.dtype == dz.dtype:
                grad_weight[:valid].addmm_(dz.t(), h)  # in place: no [V, H] temporary
            else:  # half precision: a bf16/fp16 matmul (fast), accumulated over chunks in float32
                grad_weight[:valid] += dz.t() @ h
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None


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
    chunk = (
        chunk_size if chunk_size is not None else default_chunk_size(weight.shape[0], group_size(tp_group))
    )
    if chunk <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk}")
    h = copy_to_group(hidden.reshape(-1, hidden.shape[-1]), tp_group)  # backward: sum of the shards' parts
    logp, logp_max, entropy = _FusedLogprobs.apply(h, weight, flat_targets, tp_group, start, valid, chunk)
    shape = targets.shape
    return logp.view(shape), logp_max.view(shape), entropy.view(shape)


PairLossFn = Any  # (logp [2k, T] with grad, logp_max [2k, T], entropy [2k, T], pairs: slice) -> loss [k]


class _FusedPairLoss(torch.autograd.Function):
    """Forward computes the per-pair loss *and* its gradients chunk by chunk; backward only scales them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,  # [R, T, H], R = 2B rows: chosen rows, then rejected rows
        weight: torch.Tensor,
        targets: torch.Tensor,  # [R, T] int64, checked
        loss_fn: PairLossFn,
        group: ProcessGroup | None,
        start: int,
        valid: int,
        pairs_per_chunk: int,
    ) -> tuple[torch.Tensor, ...]:
        rows, t, h_dim = hidden.shape
        b = rows // 2
        acc = acc_dtype(hidden.dtype)
        losses = torch.empty(b, dtype=acc, device=hidden.device)
        stats = [torch.zeros(rows, t, dtype=acc, device=hidden.device) for _ in range(3)]
        grad_hidden = torch.zeros_like(hidden)
        # A frozen output layer (LoRA) needs no weight gradient: matmul 3 is skipped.
        grad_weight = (
            torch.zeros(weight.shape, dtype=acc, device=weight.device) if weight.requires_grad else None
        )
        w = weight[:valid]
        for i in range(0, b, pairs_per_chunk):
            pairs = slice(i, min(i + pairs_per_chunk, b))
            idx = torch.cat(
                [torch.arange(pairs.start, pairs.stop), torch.arange(b + pairs.start, b + pairs.stop)]
            )
            h = hidden[idx].reshape(-1, h_dim)
            tgt = targets[idx].reshape(-1)
            logits = h @ weight.t()  # matmul 1 of 3
            logp, logp_max, entropy, lse = shard_stats(logits, tgt, start, valid, group)
            keep = tgt != IGNORE_INDEX
            shaped = [x.masked_fill(~keep, 0.0).view(-1, t) for x in (logp, logp_max, entropy)]
            for out, x in zip(stats, shaped, strict=True):
                out[idx] = x
            leaf = shaped[0].detach().requires_grad_(True)
            with torch.enable_grad():
                loss = loss_fn(leaf, shaped[1], shaped[2], pairs)
                (g,) = torch.autograd.grad(loss.sum(), leaf)
            losses[pairs] = loss.detach()
            if valid == 0:
                continue
            dz = shard_logit_grad(logits, tgt, lse, g.reshape(-1).masked_fill(~keep, 0.0), start, valid)
            dz = dz.to(hidden.dtype)
            grad_hidden[idx] = (dz @ w).view(-1, t, h_dim)  # matmul 2 of 3
            if grad_weight is not None:
                grad_weight[:valid].addmm_(dz.t().to(acc), h.to(acc))  # matmul 3 of 3
        ctx.grads = [grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None]
        logp_all, logp_max_all, entropy_all = stats
        ctx.mark_non_differentiable(logp_all, logp_max_all, entropy_all)
        return losses, logp_all, logp_max_all, entropy_all

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        return *scaled_stored_grads(ctx, grad_loss, "fused_pair_loss"), None, None, None, None, None, None


def scaled_stored_grads(
    ctx: Any, grad_loss: torch.Tensor, op: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The backward of an op that computed its gradients in forward (``ctx.grads``): scale them by the incoming
    gradient of the per-pair losses, which must be the same for every pair, since the weight gradient was summed
    over pairs in forward (the mean over pairs and micro-batches gives exactly that).

    The gradients are kept on ``ctx``, not saved for backward, and scaled in place: handed over with no other
    reference, autograd takes them as the gradients instead of copying them (a weight-sized copy at the peak)."""
    grad_hidden, grad_weight = ctx.grads
    ctx.grads = None
    scale = grad_loss.reshape(-1)
    unequal = f"{op}: the per-pair losses must be reduced with equal weights (sum or mean)"
    check_on_device(torch.all(scale == scale[0]), unequal, lambda: unequal, error=RuntimeError)
    grad_hidden.mul_(scale[0].to(grad_hidden.dtype))
    if grad_weight is not None:
        grad_weight.mul_(scale[0].to(grad_weight.dtype))
    return grad_hidden, grad_weight


def fused_pair_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: PairLossFn,
    *,
    tp_group: ProcessGroup | None = None,
    vocab_start_index: int | None = None,
    vocab_size: int | None = None,
    pairs_per_chunk: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole preference loss through the output layer, with its gradients computed in the forward pass.

    ``hidden`` ``[2B, T, H]`` holds the chosen rows then the rejected rows of ``B`` pairs; ``targets`` ``[2B, T]``.
    Chunk by chunk of ``pairs_per_chunk`` whole pairs: the chunk's logits (matmul 1), the per-token statistics,
    ``loss_fn(logp, logp_max, entropy, pairs)`` (the objective, gate and NLL term, on ``[2k, T]`` tensors whose
    first ``k`` rows are chosen), its gradient with respect to the token log-probs, and from the logits still in
    memory the gradients of ``hidden`` (matmul 2) and ``weight`` (matmul 3). Backward multiplies the stored
    gradients by the incoming scale, which must be the same for every pair (a sum or a mean of the losses).

    Returns ``(loss [B], logp [2B, T], logp_max, entropy)``; only ``loss`` carries a gradient.
    """
    if hidden.ndim != 3 or hidden.shape[:2] != targets.shape or hidden.shape[0] % 2:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be [2B, T, H] matching targets {tuple(targets.shape)}"
        )
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} is not [V_local, H={hidden.shape[-1]}]")
    if pairs_per_chunk < 1:
        raise ValueError(f"pairs_per_chunk must be >= 1, got {pairs_per_chunk}")
    flat, start, valid = resolve_shard(targets, weight.shape[0], tp_group, vocab_start_index, vocab_size)
    h = copy_to_group(hidden, tp_group)
    return _FusedPairLoss.apply(
        h, weight, flat.view(targets.shape), loss_fn, tp_group, start, valid, pairs_per_chunk
    )
