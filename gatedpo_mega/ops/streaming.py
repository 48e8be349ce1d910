"""The whole preference loss through the output layer in three matmuls, token chunk by token chunk.

``fused_pair_loss`` reaches the three-matmul floor by holding a whole pair's logits. This op holds one token chunk
of logits instead. The gradient of the loss with respect to a token's logits is
``c_row * a_t * (onehot(y_t) - p_t)``: ``a_t`` is known when the chunk is computed (the response mask, times the
token's gate on rejected rows) and ``c_row = dL / d(row's summed log-prob)`` only once the pair is complete. So each
chunk contributes, unscaled, ``a (onehot - p) @ W`` to its rows' hidden gradient (matmul 2) and
``(a (onehot - p)).T @ h`` to an accumulator ``D_row`` (matmul 3), one ``[V_local, H]`` accumulator per response of
the pair in flight; when the pair is done, the rows are scaled by ``c_row`` and ``c_c D_c + c_r D_r`` is added to
the weight gradient (for objectives of the margin alone the ratio ``c_r / c_c`` is known in advance and one
accumulator serves both rows). Extra memory: one chunk of logits and one or two ``[V_local, H]`` float32
accumulators (plus the weight gradient every method holds), independent of the pair's length.

What the objective and the gate are comes in as a ``PairObjective`` of functions over tensors (the loss module
builds it from the run's objective and gate, ``gatedpo_mega.loss.pair_objective``), so this op knows neither; the
gate's value never enters the loss, only the gradient, as ``apply_gate`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gatedpo_mega.ops.collectives import ProcessGroup, copy_to_group, group_size
from gatedpo_mega.ops.fused import scaled_stored_grads
from gatedpo_mega.ops.logprobs import (
    IGNORE_INDEX,
    acc_dtype,
    default_chunk_size,
    resolve_shard,
    shard_logit_grad,
    workspace,
)
from gatedpo_mega.ops.logprobs import shard_stats as _shard_stats

Gate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class PairObjective:
    """The per-pair loss and the rejected rows' gate, as functions the op calls."""

    # (pair index, summed target log-probs [2] (chosen, rejected; differentiable), response token counts [2])
    # -> that pair's loss (a scalar).
    loss: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
    # For objectives of the margin alone: ``dL/ds_rejected / dL/ds_chosen`` from the token counts, known before
    # the loss, so one weight-gradient accumulator serves both rows. None: two accumulators.
    rejected_ratio: Callable[[torch.Tensor], torch.Tensor] | None = None
    # (logp [n], logp_max [n], keep [n]) of rejected tokens -> the gate of each (token granularity).
    token_gate: Gate | None = None
    # (logp [T], logp_max [T], keep [T]) of a whole rejected row -> its one gate (sequence granularity).
    row_gate: Gate | None = None


def _pair_coefficients(
    i: int, sums: torch.Tensor, counts: torch.Tensor, objective: PairObjective
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of pair ``i`` and ``dL/d(summed log-prob)`` of its chosen and rejected rows."""
    with torch.enable_grad():
        s = sums.detach().clone().requires_grad_(True)
        loss = objective.loss(i, s, counts)
        (c,) = torch.autograd.grad(loss, s)
    return loss.detach(), c[0], c[1]


class _StreamingPairLoss(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,  # [R, T, H]: chosen rows, then rejected rows
        weight: torch.Tensor,
        targets: torch.Tensor,  # [R, T], checked
        objective: PairObjective,
        group: ProcessGroup | None,
        start: int,
        valid: int,
        chunk: int,
    ) -> tuple[torch.Tensor, ...]:
        rows, t, h_dim = hidden.shape
        b = rows // 2
        acc = acc_dtype(hidden.dtype)
        dev = hidden.device
        losses = torch.empty(b, dtype=acc, device=dev)
        stats = [torch.zeros(rows, t, dtype=acc, device=dev) for _ in range(3)]
        grad_hidden = torch.zeros_like(hidden)
        want_weight = (
            weight.requires_grad
        )  # a frozen output layer (LoRA): matmul 3 and its accumulators skipped
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=dev) if want_weight else None
        # Objectives of the margin alone (no NLL term) fix c_r / c_c before the pair's loss is known, so the rejected
        # row (run first) is scaled by that ratio and the chosen row added onto it: one accumulator instead of two.
        margin_only = objective.rejected_ratio is not None
        n_buffers = (1 if margin_only else 2) if want_weight else 0
        buffers = [torch.zeros(valid, h_dim, dtype=acc, device=dev) for _ in range(n_buffers)]
        w = weight[:valid]
        work = workspace(min(chunk, t), valid, acc, dev)  # the chunk temporaries, reused by every chunk
        token_gate, seq_gate = objective.token_gate, objective.row_gate

        def row_gate(r: int) -> torch.Tensor:
            """The rejected row's one gate (sequence granularity; 1 otherwise)."""
            keep = targets[r] != IGNORE_INDEX
            if seq_gate is None or not bool(keep.any()):
                return torch.ones((), dtype=acc, device=dev)
            return seq_gate(stats[0][r], stats[1][r], keep).to(acc)

        for i in range(b):
            sums = torch.zeros(2, dtype=acc, device=dev)
            counts = (targets[[i, b + i]] != IGNORE_INDEX).sum(-1).to(acc)
            for side, r in ((1, b + i), (0, i)) if margin_only else ((0, i), (1, b + i)):
                buf = (buffers[0] if margin_only else buffers[side]) if want_weight else None
                if buf is None:
                    pass
                elif objective.rejected_ratio is not None and side == 0:  # D = ratio * D_r, then + D_c
                    ratio = objective.rejected_ratio(counts) * row_gate(b + i)
                    buf.mul_(float(ratio))
                else:
                    buf.zero_()
                for s0 in range(0, t, chunk):
                    sl = slice(s0, min(s0 + chunk, t))
                    tgt = targets[r, sl]
                    keep = tgt != IGNORE_INDEX
                    if not bool(keep.any()):
                        continue  # padding: no statistics, no gradient
                    h = hidden[r, sl]
                    logits = h @ weight.t()  # matmul 1 of 3
                    logp, logp_max, entropy, lse = _shard_stats(logits, tgt, start, valid, group, work)
                    for out, x in zip(stats, (logp, logp_max, entropy), strict=True):
                        out[r, sl] = x.masked_fill(~keep, 0.0)
                    sums[side] += logp.masked_fill(~keep, 0.0).sum()
                    a = keep.to(acc)
                    if side == 1 and token_gate is not None:
                        a = a * token_gate(logp, logp_max, keep).to(acc)
                    if valid == 0:
                        continue
                    rows_n = logits.shape[0]
                    dz = shard_logit_grad(logits, tgt, lse, a, start, valid, out=work[0][:rows_n, :valid])
                    dz = dz.to(hidden.dtype)
                    grad_hidden[r, sl] = dz @ w  # matmul 2 of 3 (unscaled)
                    if buf is not None:
                        buf.addmm_(dz.t().to(acc), h.to(acc))  # matmul 3 of 3 (unscaled)
            loss, c_c, c_r = _pair_coefficients(i, sums, counts, objective)
            c_r = c_r * row_gate(b + i)  # one gate per rejected response (sequence granularity)
            losses[i] = loss
            grad_hidden[i].mul_(c_c.to(hidden.dtype))
            grad_hidden[b + i].mul_(c_r.to(hidden.dtype))
            if grad_weight is None:
                pass
            elif valid and margin_only:
                grad_weight[:valid].add_(buffers[0], alpha=float(c_c))
            elif valid:
                grad_weight[:valid].add_(buffers[0], alpha=float(c_c)).add_(buffers[1], alpha=float(c_r))
        ctx.grads = [grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None]
        ctx.mark_non_differentiable(*stats)
        return losses, *stats

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        grads = scaled_stored_grads(ctx, grad_loss, "fused_preference_loss")
        return *grads, None, None, None, None, None, None


def fused_preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    objective: PairObjective,
    *,
    tp_group: ProcessGroup | None = None,
    vocab_start_index: int | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference loss of ``B`` pairs through the output layer, three matmuls, one token chunk of logits.

    Args:
        hidden: ``[2B, T, H]`` final hidden states, chosen rows then rejected rows (identical on every TP rank).
        weight: ``[V_local, H]`` this rank's vocabulary shard of the output layer.
        targets: ``[2B, T]`` next-token targets, ``-100`` outside the responses.
        objective: the per-pair loss (it holds the reference log-probs) and the rejected rows' gate.

    Returns ``(loss [B], logp [2B, T], logp_max, entropy)``; only ``loss`` carries a gradient, into ``hidden``
    (summed over ``tp_group``) and ``weight``; reduce it with equal weights per pair (sum or mean).
    """
    if hidden.ndim != 3 or hidden.shape[:2] != targets.shape or hidden.shape[0] % 2:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be [2B, T, H] matching targets {tuple(targets.shape)}"
        )
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} is not [V_local, H={hidden.shape[-1]}]")
    flat, start, valid = resolve_shard(targets, weight.shape[0], tp_group, vocab_start_index, vocab_size)
    chunk = chunk_size or default_chunk_size(weight.shape[0], group_size(tp_group))
    h = copy_to_group(hidden, tp_group)
    return _StreamingPairLoss.apply(
        h, weight, flat.view(targets.shape), objective, tp_group, start, valid, chunk
    )
