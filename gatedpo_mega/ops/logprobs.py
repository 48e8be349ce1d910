"""Per-token log-probabilities from vocab-parallel logits, with the statistics the gate and metrics need.

Each tensor-parallel rank holds logits for a contiguous slice of the vocabulary. Per token chunk:

    m      = all_reduce_MAX(max_k z_k)                               (one MAX all-reduce)
    S, Z, T = all_reduce_SUM([sum_k e^(z_k-m), z_y-m, sum_k e^(z_k-m) (z_k-m)])   (one SUM all-reduce, packed)
    log p_y = Z - log S,   log p_max = -log S,   H = log S - T / S,   lse = m + log S

so a token costs four floats of communication instead of an all-gather of ``V / TP`` logits. Backward recomputes
``p = exp(z - lse)`` chunk by chunk from the saved logits: ``d log p_y / d z_k = 1[k = y] - p_k``. Work is done in
float32 for half-precision logits (float64 stays float64), one token chunk at a time, so neither a full-size float32 copy of the logits
nor a full softmax ever exists.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from gatedpo_mega.ops.collectives import ProcessGroup, all_reduce_, group_rank, group_size

IGNORE_INDEX = -100
# Float32 elements per chunk when ``chunk_size`` is not given: 2**25 elements, 128 MiB per temporary (256 tokens at
# V = 128k). Measured on CPU: much smaller chunks lose to per-chunk overhead (reductions over few rows
# parallelise poorly), much larger ones only add memory.
DEFAULT_CHUNK_ELEMENTS = 1 << 25


def check_on_device(
    ok: torch.Tensor, what: str, detail: Callable[[], str], *, error: type[Exception] = ValueError
) -> None:
    """Raise ``error(detail())`` unless the boolean tensor ``ok`` holds. On the CPU that reads one value; on an
    accelerator, reading it would stall the stream until the device caught up (on every micro-batch), so there the
    check is a device-side assertion: the step still fails, later, saying ``what``."""
    if ok.device.type == "cpu":
        if not bool(ok):
            raise error(detail())
    else:
        torch._assert_async(ok, f"gatedpo_mega: {what}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half-precision logits, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def workspace(
    rows: int, cols: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two chunk-sized temporaries, allocated once per call and reused by every chunk."""
    return (
        torch.empty((rows, max(cols, 1)), dtype=dtype, device=device),
        torch.empty((rows, max(cols, 1)), dtype=dtype, device=device),
    )


def default_chunk_size(local_vocab: int, tp_size: int = 1) -> int:
    """Tokens per chunk: sized from the *global* vocabulary, so a rank's chunk temporaries shrink with tensor
    parallelism like everything else it holds."""
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(1, local_vocab * tp_size))


def shard_stats(
    x: torch.Tensor,
    target: torch.Tensor,
    start: int,
    valid: int,
    group: ProcessGroup | None,
    work: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token chunk: returns (logp_target, logp_max, entropy, lse) of shape [n], in ``acc_dtype(x)``.

    ``work``: two reusable ``[>= n, >= valid]`` buffers for the temporaries (fresh large allocations cost more than
    the arithmetic on CPU: the first touch of every page).
    """
    n = x.shape[0]
    acc = acc_dtype(x.dtype)
    local = target - start
    hit = (local >= 0) & (local < valid)
    if valid > 0:
        # Columns at or past ``valid`` are vocabulary padding: they never take part.
        z = x[:, :valid]
        m = z.max(dim=-1).values.to(acc)
    else:  # the whole shard is padding
        m = torch.full((n,), float("-inf"), dtype=acc, device=x.device)
    all_reduce_(m, dist.ReduceOp.MAX, group)
    packed = torch.zeros((n, 3), dtype=acc, device=x.device)
    if valid > 0:
        d, e = work if work is not None else workspace(n, valid, acc, x.device)
        d, e = d[:n, :valid], e[:n, :valid]
        # d = z - m, clamped so that -inf logits give 0 * finite = 0 below, not NaN.
        if z.dtype == acc:
            torch.sub(z, m[:, None], out=d)
        else:  # cast into the buffer, then in place: a mixed-dtype sub on CPU allocates a hidden float32 copy
            d.copy_(z).sub_(m[:, None])
        d.clamp_(min=torch.finfo(acc).min)
        zt = d.gather(1, local.clamp(0, valid - 1)[:, None]).squeeze(1)
        packed[:, 1] = torch.where(hit, zt, 0.0)
        torch.exp(d, out=e)
        packed[:, 0] = e.sum(dim=-1)
        packed[:, 2] = e.mul_(d).sum(dim=-1)
    all_reduce_(packed, dist.ReduceOp.SUM, group)
    log_s = packed[:, 0].log()
    logp_target = packed[:, 1] - log_s
    entropy = log_s - packed[:, 2] / packed[:, 0]
    return logp_target, -log_s, entropy, m + log_s


def shard_logit_grad(
    x: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    g: torch.Tensor,
    start: int,
    valid: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of sum_i g_i log p_{y_i} with respect to this shard's logits chunk, ``[n, valid]``, written into
    ``out`` when given (same dtype as ``lse``)."""
    local = target - start
    hit = (local >= 0) & (local < valid)
    xv = x[:, :valid]
    if xv.dtype == lse.dtype:
        grad = torch.sub(xv, lse[:, None], out=out)
    else:  # one cast, then in place: a mixed-dtype sub on CPU allocates a hidden float32 copy of the chunk
        grad = xv.to(lse.dtype) if out is None else out.copy_(xv)
        grad.sub_(lse[:, None])
    grad.exp_().mul_(-g[:, None])
    grad.scatter_add_(1, local.clamp(0, valid - 1)[:, None], torch.where(hit, g, 0.0)[:, None])
    return grad


def resolve_shard(
    targets: torch.Tensor,
    local_vocab: int,
    tp_group: ProcessGroup | None,
    vocab_start_index: int | None,
    vocab_size: int | None,
) -> tuple[torch.Tensor, int, int]:
    """Flat int64 targets (checked against the vocabulary), this shard's first global id, and how many of its
    columns are real vocabulary (the rest is padding)."""
    tp = group_size(tp_group)
    start = group_rank(tp_group) * local_vocab if vocab_start_index is None else vocab_start_index
    total = local_vocab * tp if vocab_size is None else vocab_size
    if not 0 < total <= local_vocab * tp:
        raise ValueError(
            f"vocab_size={total} must be in (0, {local_vocab * tp}] (V_local {local_vocab} x TP {tp})"
        )
    flat = targets.reshape(-1).long()
    bad = (flat != IGNORE_INDEX) & ((flat < 0) | (flat >= total))
    check_on_device(
        ~bad.any(), f"a target id is outside the vocabulary [0, {total})",
        lambda: f"target id {int(flat[bad][0])} is outside the vocabulary [0, {total}) and is not {IGNORE_INDEX}",
    )  # fmt: skip
    return flat, start, min(max(total - start, 0), local_vocab)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: torch.Tensor,
        targets: torch.Tensor,
        group: ProcessGroup | None,
        start: int,
        valid: int,
        chunk: int,
        inplace_backward: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = targets.shape[0]
        acc = acc_dtype(logits.dtype)
        outs = [torch.empty(n, dtype=acc, device=logits.device) for _ in range(4)]
        work = workspace(min(chunk, n), valid, acc, logits.device)
        for i in range(0, n, chunk):
            sl = slice(i, min(i + chunk, n))
            for out, t in zip(
                outs, shard_stats(logits[sl], targets[sl], start, valid, group, work), strict=True
            ):
                out[sl] = t
        logp, logp_max, entropy, lse = outs
        ignored = targets == IGNORE_INDEX
        for out in (logp, logp_max, entropy):
            out.masked_fill_(ignored, 0.0)
        ctx.save_for_backward(logits, targets, lse)
        ctx.meta = (start, valid, chunk, inplace_backward)
        ctx.mark_non_differentiable(logp_max, entropy)
        return logp, logp_max, entropy

    @staticmethod
    def backward(ctx: Any, grad_logp: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        logits, targets, lse = ctx.saved_tensors
        start, valid, chunk, inplace = ctx.meta
        g = grad_logp.to(lse.dtype).masked_fill(targets == IGNORE_INDEX, 0.0)
        grad = logits if inplace else torch.empty_like(logits)
        n = targets.shape[0]
        # Float32 (or float64) logits take their gradient in place of the chunk; half precision goes through a
        # float32 buffer. In place over the logits themselves is safe: each chunk is read before it is written.
        direct = logits.dtype == lse.dtype and grad.is_contiguous()
        buf = (
            None
            if direct
            else torch.empty((min(chunk, n), max(valid, 1)), dtype=lse.dtype, device=logits.device)
        )
        for i in range(0, n if valid > 0 else 0, chunk):
            sl = slice(i, min(i + chunk, n))
            target = grad[sl, :valid] if direct else buf[: sl.stop - sl.start]  # type: ignore[index]
            # In place, input and output are the same memory: an elementwise op may write over what it reads.
            chunk_grad = shard_logit_grad(logits[sl], targets[sl], lse[sl], g[sl], start, valid, out=target)
            if not direct:
                grad[sl, :valid] = chunk_grad
        grad[:, valid:] = 0
        return grad, None, None, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group: ProcessGroup | None = None,
    vocab_start_index: int | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    inplace_backward: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``(logp_target, logp_max, entropy)`` from vocab-sharded logits.

    Args:
        logits: ``[..., V_local]``, this rank's slice of the vocabulary (any float dtype; math is float32).
        targets: ``[...]`` global token ids, or -100 for ignored positions (all three outputs 0, no gradient).
        tp_group: the tensor-parallel group the vocabulary is split over; None means unsharded.
        vocab_start_index: global id of this shard's first column; default ``rank(tp_group) * V_local``
            (Megatron's contiguous vocabulary split).
        vocab_size: the true vocabulary size; columns at or past it are padding and get no probability.
            Default: ``V_local * size(tp_group)`` (no padding).
        chunk_size: tokens per chunk; default keeps each float32 temporary near 128 MiB.
        inplace_backward: write the gradient into ``logits``' own storage (as Megatron's cross entropy does);
            only valid when nothing else reads the logits after this op.

    Returns tensors of ``targets``' shape in float32 (float64 for float64 logits). Only ``logp_target`` carries a gradient, into ``logits``; the
    gradient is local to the shard, which is exact because everything downstream is replicated over ``tp_group``.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)} + [V_local]"
        )
    local_vocab = logits.shape[-1]
    flat_targets, start, valid = resolve_shard(targets, local_vocab, tp_group, vocab_start_index, vocab_size)
    chunk = chunk_size if chunk_size is not None else default_chunk_size(local_vocab, group_size(tp_group))
    if chunk <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk}")
    flat_logits = logits.reshape(-1, local_vocab)
    logp, logp_max, entropy = _TokenLogprobs.apply(
        flat_logits, flat_targets, tp_group, start, valid, chunk, inplace_backward
    )
    shape = targets.shape
    return logp.view(shape), logp_max.view(shape), entropy.view(shape)
