"""Evaluation on the held-out pairs of each evaluation set: the training metrics, every pair exactly once at any
data-parallel size."""

from __future__ import annotations

import torch
import torch.distributed as dist

from gatedpo_mega.backend import Backend
from gatedpo_mega.loss import LossContext, preference_loss_func
from gatedpo_mega.megatron.parallel import Layout
from gatedpo_mega.metrics import reduce_metric_sums
from gatedpo_mega.training.data import EvalData, RunData
from gatedpo_mega.training.reference import Reference
from gatedpo_mega.training.step import check_losses, run_forward


def evaluate(
    backend: Backend, model: torch.nn.Module, layout: Layout, ctx: LossContext, reference: Reference,
    data: RunData, device: torch.device,
) -> dict[str, float]:  # fmt: skip
    """The preference metrics of every evaluation set, as ``eval/<metric>`` (the hash split alone) or
    ``eval/<set>/<metric>``, on every rank."""
    out: dict[str, float] = {}
    for evals in data.evals:
        out |= evaluate_set(backend, model, layout, ctx, reference, evals, device)
    return out


@torch.no_grad()
def evaluate_set(
    backend: Backend, model: torch.nn.Module, layout: Layout, ctx: LossContext, reference: Reference,
    evals: EvalData, device: torch.device,
) -> dict[str, float]:  # fmt: skip
    """The preference metrics on the pairs of one set (every pair once), as ``<prefix><name>`` on every rank."""
    batches = [b.to(device) for b in evals.batches]
    saved = ctx.reference, ctx.ref_tokens, ctx.micro_batch
    reference.prepare(ctx, batches, evals=evals)
    ctx.micro_batch = 0
    out = run_forward(
        backend,
        model,
        batches,
        preference_loss_func,
        ctx,
        progress=evals.prefix[:-1] if layout.rank == 0 else "",
    )
    ctx.reference, ctx.ref_tokens, ctx.micro_batch = saved
    check_losses(ctx, device)
    # Fillers (ranks with fewer micro-batches repeat one so ZeRO-3's gathers stay in step) are run, not counted.
    sums = [o["sums"] for o, counted in zip(out, evals.counted, strict=True) if counted] if out else []
    metrics = reduce_metric_sums(sums, layout.dp_group) if layout.last_stage else {}
    payload = [metrics]
    if layout.pp > 1:
        dist.broadcast_object_list(payload, src=layout.logger_rank)
    return {f"{evals.prefix}{k}": v for k, v in payload[0].items()}
