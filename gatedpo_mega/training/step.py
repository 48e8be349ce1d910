"""One optimizer step, and forward-only passes, over a backend (``gatedpo_mega.backend``)."""

from __future__ import annotations

from typing import Any

import torch

from gatedpo_mega.backend import Backend, LossFunc
from gatedpo_mega.data.batch import PreferenceBatch
from gatedpo_mega.loss import LossContext, output_request, preference_loss_func
from gatedpo_mega.megatron.parallel import Layout
from gatedpo_mega.metrics import MetricSums


def train_step(
    engine: Any, backend: Backend, layout: Layout, ctx: LossContext, batches: list[PreferenceBatch]
) -> list[MetricSums]:
    """Forward and backward of every micro-batch, gradient reduction, optimizer step; returns metric sums of this
    rank's micro-batches (empty except on the last pipeline stage)."""
    ctx.micro_batch = 0
    if backend.engine_driver:  # DeepSpeed accumulates, reduces and steps at the last micro-batch
        sums = []
        for batch in batches:
            request = output_request(ctx, batch)
            output = backend.forward(engine, batch, request)
            loss, aux = preference_loss_func(batch, ctx, output, request=request)
            engine.backward(loss)
            engine.step()
            sums.append(aux["sums"])
        return sums
    model = engine.module
    out = backend.schedule(model, batches, preference_loss_func, ctx, forward_only=False)
    backend.after_backward(model, layout)
    engine.allreduce_gradients()
    engine.step()
    return [o["sums"] for o in out] if layout.last_stage else []


@torch.no_grad()
def run_forward(
    backend: Backend,
    model: torch.nn.Module,
    batches: list[PreferenceBatch],
    loss_func: LossFunc,
    ctx: LossContext,
) -> list[dict[str, Any]]:
    """Forward-only over ``batches``, in eval mode: the loss function's outputs on the last stage (empty
    elsewhere)."""
    was_training = model.training
    model.eval()
    out: list[dict[str, Any]] = []
    for i in range(0, len(batches), 8):  # a few micro-batches per schedule call keeps the pipeline busy
        out += backend.schedule(model, batches[i : i + 8], loss_func, ctx, forward_only=True) or []
    model.train(was_training)
    return out
