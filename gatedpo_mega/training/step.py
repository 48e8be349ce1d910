"""One optimizer step and the reference pass, over either driver (see ``gatedpo_mega.deepspeed.engine``)."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from gatedpo_mega.data.batch import PreferenceBatch
from gatedpo_mega.megatron.parallel import Layout
from gatedpo_mega.megatron.step import (
    LossContext,
    forward_step,
    model_forward,
    preference_loss_func,
    reference_loss_func,
)
from gatedpo_mega.metrics import MetricSums


def _schedule(
    model: torch.nn.Module,
    batches: list[PreferenceBatch],
    loss_func: Any,
    ctx: LossContext,
    *,
    forward_only: bool,
) -> list[dict[str, Any]]:
    if ctx.hf:  # a Hugging Face model has no pipeline stages: forward-only, one micro-batch at a time
        assert forward_only, "the transformers backend trains through DeepSpeed's engine"
        return [loss_func(b, ctx, model_forward(model, b, hf=True))[1] for b in batches]
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    return fb(
        forward_step_func=partial(forward_step, loss_func, ctx),
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=max(b.input_ids.shape[1] for b in batches),
        micro_batch_size=batches[0].input_ids.shape[0],
        forward_only=forward_only,
    )


def sync_tied_embedding_grads(model: torch.nn.Module, layout: Layout) -> None:
    """With pipeline parallelism a tied embedding lives on the first and the last stage: sum their gradients."""
    if layout.embedding_group is None or not getattr(model, "share_embeddings_and_output_weights", False):
        return
    if not (layout.first_stage or layout.last_stage):
        return
    weight = model.shared_embedding_or_output_weight()  # type: ignore[operator]
    if weight.grad is not None:
        dist.all_reduce(weight.grad, group=layout.embedding_group)


def train_step(
    engine: Any, layout: Layout, ctx: LossContext, batches: list[PreferenceBatch], *, engine_driver: bool
) -> list[MetricSums]:
    """Forward and backward of every micro-batch, gradient reduction, optimizer step; returns metric sums of this
    rank's micro-batches (empty except on the last pipeline stage)."""
    ctx.micro_batch = 0
    if engine_driver:
        sums = []
        for batch in batches:
            loss, aux = preference_loss_func(batch, ctx, model_forward(engine, batch, hf=ctx.hf, ctx=ctx))
            engine.backward(loss)
            engine.step()
            sums.append(aux["sums"])
        return sums
    model = engine.module
    out = _schedule(model, batches, preference_loss_func, ctx, forward_only=False)
    sync_tied_embedding_grads(model, layout)
    engine.allreduce_gradients()
    engine.step()
    return [o["sums"] for o in out] if layout.last_stage else []


@torch.no_grad()
def run_forward(
    model: torch.nn.Module, batches: list[PreferenceBatch], loss_func: Any, ctx: LossContext
) -> list[dict[str, Any]]:
    """Forward-only over ``batches``: the loss function's outputs on the last stage (empty elsewhere)."""
    out: list[dict[str, Any]] = []
    for i in range(0, len(batches), 8):  # a few micro-batches per schedule call keeps the pipeline busy
        out += _schedule(model, batches[i : i + 8], loss_func, ctx, forward_only=True) or []
    return out


@torch.no_grad()
def reference_pass(
    model: torch.nn.Module,
    layout: Layout,
    ctx: LossContext,
    batches: list[PreferenceBatch],
    num_pairs: int,
    *,
    reduce: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs ``[N, 2]`` (chosen, rejected) and response token counts of the pairs in ``batches`` under
    ``model`` by pair id, on the last stage (zeros elsewhere). With ``reduce``, summed over the data-parallel group:
    when every pair belongs to exactly one DP rank, that assembles the whole table."""
    device = next(model.parameters()).device  # collectives on the backend's device (NCCL needs CUDA tensors)
    logps = torch.zeros(num_pairs, 2, dtype=torch.float64, device=device)
    tokens = torch.zeros(num_pairs, 2, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    out = run_forward(model, batches, reference_loss_func, ctx)
    for o in out if layout.last_stage else []:
        ids = o["pair_ids"]
        logps[ids] = o["logps"]
        tokens[ids] = o["tokens"]
    model.train(was_training)
    if reduce and layout.last_stage:
        dist.all_reduce(logps, group=layout.dp_group)
        dist.all_reduce(tokens, group=layout.dp_group)
    return logps, tokens
