"""One optimizer step, and forward-only passes, over a backend (``gatedpo_mega.backend``)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from gatedpo_mega.backend import Backend, LossFunc
from gatedpo_mega.data.batch import PreferenceBatch
from gatedpo_mega.deepspeed.engine import skips_nonfinite_steps
from gatedpo_mega.errors import NonFiniteError
from gatedpo_mega.loss import LossContext, NonFiniteLossError, output_request, preference_loss_func
from gatedpo_mega.megatron.experts import expert_config, set_aux_loss_scale
from gatedpo_mega.megatron.parallel import Layout
from gatedpo_mega.metrics import MetricSums


class NonFiniteGradientError(NonFiniteError):
    """The reduced gradients of a step are NaN or infinite; the update is not applied and the run stops."""

    every_rank = True  # every rank raises it together, with the same message


def train_step(
    engine: Any, backend: Backend, layout: Layout, ctx: LossContext, batches: list[PreferenceBatch]
) -> list[MetricSums]:
    """Forward and backward of every micro-batch, gradient reduction, optimizer step; returns metric sums of this
    rank's micro-batches (empty except on the last pipeline stage)."""
    ctx.micro_batch = 0
    if backend.engine_driver:  # DeepSpeed accumulates, reduces and steps at the last micro-batch
        if expert_config(engine.module) is not None:  # as megatron-core's schedule does on the other path
            set_aux_loss_scale(1.0 / len(batches), batches[0].input_ids.device)
        sums = []
        for i, batch in enumerate(batches):
            request = output_request(ctx, batch)
            output = backend.forward(engine, batch, request)
            loss, aux = preference_loss_func(batch, ctx, output, request=request)
            # x CP: DeepSpeed averages over data x context, the CP ranks' shares must add up (deepspeed/engine.py);
            # megatron-core's schedule does the same on the other path
            engine.backward(loss * layout.cp if layout.cp > 1 else loss)  # the last one reduces the gradients
            if i == len(batches) - 1:
                check_losses(ctx, batch.input_ids.device)
                optimizer_step(engine, layout, ctx, batches)
            else:
                engine.step()  # accumulation only
            sums.append(aux["sums"])
        return sums
    model = engine.module
    out = backend.schedule(model, batches, preference_loss_func, ctx, forward_only=False)
    check_losses(ctx, batches[0].input_ids.device)
    backend.after_backward(model, layout)
    engine.allreduce_gradients()
    optimizer_step(engine, layout, ctx, batches)
    return [o["sums"] for o in out] if layout.last_stage else []


def check_losses(ctx: LossContext, device: torch.device) -> None:
    """Raise ``NonFiniteLossError`` on every rank when any rank recorded a NaN or infinite loss since the last
    check, naming the step, the first such micro-batch and its pairs; then forget the recorded losses. One
    all-reduce and one host synchronisation, once per step (every rank must call it: on a pipeline's other stages
    the list is empty)."""
    recorded, ctx.losses = ctx.losses, []
    values = torch.stack([v.float().reshape(()) for _, v, _ in recorded]) if recorded else None
    finite = torch.isfinite(values).all() if values is not None else torch.tensor(True)
    flag = finite.to(device=device, dtype=torch.float32).reshape(1)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if flag.item():
        return
    bad = next(((mb, float(v), ids.tolist()) for mb, v, ids in recorded if not math.isfinite(float(v))), None)
    found = [bad]
    if dist.is_initialized():
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, bad)
    mb, value, pairs = next(f for f in found if f is not None)
    raise NonFiniteLossError(f"loss is {value} at step {ctx.step}, micro-batch {mb} (pairs {pairs})")


def optimizer_step(engine: Any, layout: Layout, ctx: LossContext, batches: list[PreferenceBatch]) -> None:
    """The update from the step's reduced gradients. When they are NaN or infinite the update never reaches the
    weights and every rank raises ``NonFiniteGradientError`` together. Left to itself DeepSpeed skips such a step
    (ZeRO 1-3, bf16) or applies it (fp32 without ZeRO); with fp32 or bf16 there is no loss scale to lower, so the
    unchanged weights overflow again on the following steps and the run ends, exit code 0, as if it had trained."""
    if skips_nonfinite_steps(engine):  # DeepSpeed checks the gradient norm and discards a non-finite update
        engine.step()
        _stop_unless_finite(torch.tensor(engine.was_step_applied()), layout, ctx, batches)
    else:  # DeepSpeed would apply the gradients as they are: check them before the update
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
        _stop_unless_finite(finite, layout, ctx, batches)
        engine.step()


def _stop_unless_finite(
    finite: torch.Tensor, layout: Layout, ctx: LossContext, batches: list[PreferenceBatch]
) -> None:
    """Raise on every rank when any rank's ``finite`` is False, naming the step and all its pairs."""
    device = batches[0].input_ids.device  # collectives on the backend's device (NCCL needs CUDA tensors)
    # DeepSpeed's verdict is global already; the minimum over all ranks makes a local check global too, so no rank
    # raises while another waits for it in a collective.
    flag = finite.to(device=device, dtype=torch.float32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if flag.item():
        return
    gathered: list[Any] = [None] * layout.dp  # the step's pairs on every data-parallel rank
    dist.all_gather_object(gathered, [int(i) for b in batches for i in b.pair_ids], group=layout.dp_group)
    pairs = sorted(i for rank_pairs in gathered for i in rank_pairs)
    raise NonFiniteGradientError(
        f"gradient norm is not finite at step {ctx.step} (pairs {pairs}); the update was not applied"
    )


@torch.no_grad()
def run_forward(
    backend: Backend,
    model: torch.nn.Module,
    batches: list[PreferenceBatch],
    loss_func: LossFunc,
    ctx: LossContext,
    *,
    progress: str = "",
) -> list[dict[str, Any]]:
    """Forward-only over ``batches``, in eval mode: the loss function's outputs on the last stage (empty
    elsewhere). ``progress``: a progress bar by that name (on stderr), shown once the pass has taken 2 s."""
    was_training = model.training
    model.eval()
    out: list[dict[str, Any]] = []
    chunks = range(0, len(batches), 8)  # a few micro-batches per schedule call keeps the pipeline busy
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc=progress, unit="chunk", delay=2.0, leave=False, dynamic_ncols=True)
    for i in chunks:
        out += backend.schedule(model, batches[i : i + 8], loss_func, ctx, forward_only=True) or []
    model.train(was_training)
    return out
