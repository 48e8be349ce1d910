"""The loss hook: one micro-batch's model output -> ``(loss, {"sums": metric sums})``, for every backend.

The output is this rank's vocabulary shard of the logits ``[2B, T, V/TP]``, or, with a fused output layer, the
per-token statistics ``[2B, T, 3]`` (target log-prob, top-1 log-prob, entropy). ``response_stats`` turns either into
per-token statistics of the chosen and the rejected rows (``token_logprobs`` on logits: a few floats per token
cross the tensor-parallel group); the gate attenuates the rejected tokens' gradient; the objective gives the per-pair
loss; the metrics come from the same tensors.

A loss function has the signature of Megatron's ``loss_func`` once ``batch`` and ``ctx`` (and the micro-batch's
``OutputRequest``) are bound with ``functools.partial``: ``loss_func(output) -> (loss, aux)``. The backends
(``gatedpo_mega.backend``) run the forward passes and call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from gatedpo_mega.data.batch import Packing, PreferenceBatch
from gatedpo_mega.errors import NonFiniteError
from gatedpo_mega.gate import GateConfig, apply_gate, gate_values
from gatedpo_mega.megatron.context import ContextShard, context_shard
from gatedpo_mega.metrics import ResponseStats, metric_sums
from gatedpo_mega.objectives import (
    SFT_OBJECTIVES,
    ObjectiveConfig,
    preference_loss,
    sequence_logps,
    sft_loss,
)
from gatedpo_mega.ops import token_logprobs
from gatedpo_mega.ops.streaming import PairObjective


class NonFiniteLossError(NonFiniteError):
    """The loss of a micro-batch is NaN or infinite; the run stops and names it."""

    every_rank = True  # found by a check every rank makes together, once per step (``training/step.py``)


@dataclass(slots=True)
class LossContext:
    """What the loss of every micro-batch of a step needs besides the batch and the model output."""

    objective: ObjectiveConfig
    gate: GateConfig
    tp_group: Any
    vocab_size: int  # the true vocabulary (padding columns excluded)
    reference: torch.Tensor | None  # [N, 2] summed reference log-probs (chosen, rejected) by pair id
    ref_tokens: torch.Tensor | None  # [N, 2] response token counts, for length-normalised objectives
    fused: bool = False  # the model outputs per-token statistics (a fused output layer), not logits
    fused_objective: bool = False  # the output layer also computes the per-pair loss (fused_preference_loss)
    step: int = 0
    shift: float = (
        1.0  # dpo_shift's lambda at this step (ObjectiveConfig.shift_at); 1 for the other objectives
    )
    micro_batch: int = 0
    cp_group: Any = None  # context parallelism: the ranks sharing each row's tokens (megatron/context.py)
    # (micro-batch, detached loss, pair ids) of each micro-batch since the last check (``check_losses`` in
    # training/step.py, once per step): the loss hook itself never waits for the device
    losses: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass(slots=True)
class OutputRequest:
    """What a fused output layer is asked to compute for one micro-batch, and what it hands back. It returns the
    statistics in the padded row layout ``[2B, W, 3]`` whatever layout the model ran in."""

    # next-token targets in the model's layout ([2B, W], or [1, T] packed; this rank's tokens with CP), -100 ignored
    targets: torch.Tensor
    packing: Packing | None = None  # the micro-batch ran packed: how to bring its tokens back to rows
    shard: ContextShard | None = None  # context parallelism: this rank's tokens of the model's row(s)
    row_targets: torch.Tensor | None = None  # [2B, W] the targets in the padded layout (with packing)
    objective: PairObjective | None = None  # also compute the per-pair loss (training with fused_objective)
    pair_losses: torch.Tensor | None = None  # [B], filled by the layer when it computed them


def pair_reference(
    ctx: LossContext, batch: PreferenceBatch, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``[B, 2]`` reference log-probs of the batch's pairs (in ``dtype``), per token with
    ``objective.average_logps``."""
    assert ctx.reference is not None and ctx.ref_tokens is not None, "reference log-probs are not loaded"
    ref = ctx.reference[batch.pair_ids].to(dtype or ctx.reference.dtype)
    if ctx.objective.average_logps:
        ref = ref / ctx.ref_tokens[batch.pair_ids].clamp(min=1).to(ref.dtype)
    return ref


def pair_objective(
    reference: torch.Tensor,
    objective: ObjectiveConfig,
    gate: GateConfig,
    *,
    vocab_size: int | None = None,
    shift: float = 1.0,
) -> PairObjective:
    """The objective and gate as ``fused_preference_loss`` calls them; ``reference`` ``[B, 2]`` as
    ``pair_reference`` gives it; ``vocab_size`` the true vocabulary (``gate.signal=uniform``); ``shift``
    dpo_shift's lambda. The same formulas as ``preference_loss_func``."""

    def loss(i: int, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        seq = sums / counts.clamp(min=1) if objective.average_logps else sums
        ref = reference[i].to(sums.dtype)
        nll = None
        if objective.nll_weight:
            nll = -(sums[0] / counts[0].clamp(min=1) if objective.nll_average else sums[0]).reshape(1)
        return preference_loss(
            seq[0:1], seq[1:2], ref[0:1], ref[1:2], objective=objective.name, beta=objective.beta,
            label_smoothing=objective.label_smoothing, chosen_nll=nll, nll_weight=objective.nll_weight, shift=shift,
        )[0]  # fmt: skip

    def ratio(counts: torch.Tensor) -> torch.Tensor:
        """``dL/ds_r / dL/ds_c`` of a margin objective: -1, or -n_c / n_r on per-token log-probs."""
        n = counts.clamp(min=1)
        return -(n[0] / n[1]) if objective.average_logps else -torch.ones((), dtype=n.dtype, device=n.device)

    def token_gate(logp: torch.Tensor, logp_max: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return gate_values(logp[None], logp_max[None], keep[None], gate, vocab_size=vocab_size)[0]

    def row_gate(logp: torch.Tensor, logp_max: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return gate_values(logp[None], logp_max[None], keep[None], gate, vocab_size=vocab_size)[0][keep][0]

    return PairObjective(
        loss=loss,
        rejected_ratio=ratio if objective.margin_only else None,
        token_gate=token_gate if gate.enabled and not gate.per_response else None,
        row_gate=row_gate if gate.enabled and gate.per_response else None,
    )


def output_request(ctx: LossContext | None, batch: PreferenceBatch) -> OutputRequest:
    """The request for the output layer: the targets, and with ``ctx.fused_objective`` (training) the objective."""
    objective = None
    if ctx is not None and ctx.fused_objective and ctx.reference is not None and torch.is_grad_enabled():
        objective = pair_objective(
            pair_reference(ctx, batch), ctx.objective, ctx.gate, vocab_size=ctx.vocab_size, shift=ctx.shift
        )
    p = batch.packing
    shard = None
    if ctx is not None and ctx.cp_group is not None:
        width = batch.input_ids.shape[1] if p is None else p.input_ids.shape[1]
        bounds = (0, width) if p is None else p.bounds
        shard = context_shard(
            ctx.cp_group, dist.get_world_size(ctx.cp_group), dist.get_rank(ctx.cp_group), bounds
        )
    targets = batch.labels if p is None else p.targets
    if shard is not None:
        targets = shard.local(targets)
    if p is None:
        return OutputRequest(targets, objective=objective, shard=shard)
    return OutputRequest(targets, packing=p, row_targets=batch.labels, objective=objective, shard=shard)


def response_stats(
    output: torch.Tensor, batch: PreferenceBatch, ctx: LossContext, request: OutputRequest | None = None
) -> tuple[ResponseStats, ResponseStats, torch.Tensor]:
    """Per-token statistics of the chosen rows and the rejected rows, and the ungated rejected log-probs.
    ``output`` is this shard's logits in the model's layout (this rank's tokens with CP), or a fused output
    layer's ``[2B, W, 3]`` statistics (in the padded layout, whole rows). With context parallelism the statistics
    of every rank's tokens are gathered: what follows runs on whole rows on every CP rank."""
    if request is None:
        request = output_request(ctx, batch)
    if ctx.fused:
        logp, logp_max, entropy = output.unbind(-1)
    else:
        stats = torch.stack(
            token_logprobs(output, request.targets, tp_group=ctx.tp_group, vocab_size=ctx.vocab_size), -1
        )  # [rows, tokens, 3] in the model's layout
        if request.shard is not None:
            stats = request.shard.whole(stats, dim=1)
        if batch.packing is not None:  # the packed row's statistics back to rows
            stats = batch.packing.rows(stats[0])
        logp, logp_max, entropy = stats.unbind(-1)
    mask = batch.loss_mask
    b = batch.pairs
    chosen = ResponseStats(logp[:b], logp_max[:b], entropy[:b], mask[:b])
    rejected = ResponseStats(logp[b:], logp_max[b:], entropy[b:], mask[b:])
    return chosen, rejected, logp[b:]


def _record(loss: torch.Tensor, batch: PreferenceBatch, ctx: LossContext) -> None:
    ctx.losses.append((ctx.micro_batch, loss.detach(), batch.pair_ids))


def sft_loss_func(
    batch: PreferenceBatch, ctx: LossContext, output: torch.Tensor, *, request: OutputRequest | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``sft``: NLL of the chosen responses; ``sft_extended``: of chosen and rejected (per-sequence, token-mean
    with ``objective.nll_average``)."""
    obj = ctx.objective
    chosen, rejected, _ = response_stats(output, batch, ctx, request)
    pc = sequence_logps(chosen.logp, chosen.mask)
    pr = sequence_logps(rejected.logp, rejected.mask)
    nll_c = -sequence_logps(chosen.logp, chosen.mask, average=obj.nll_average)
    nll_r = -sequence_logps(rejected.logp, rejected.mask, average=obj.nll_average)
    per_pair = sft_loss(nll_c, nll_r if obj.name == "sft_extended" else None)
    loss = per_pair.mean()
    _record(loss, batch, ctx)
    sums = metric_sums(
        beta=obj.beta, loss=per_pair, policy_chosen=pc, policy_rejected=pr, ref_chosen=None, ref_rejected=None,
        chosen=chosen, rejected=rejected, gate=None,
    )  # fmt: skip
    ctx.micro_batch += 1
    return loss, {"sums": sums}


def preference_loss_func(
    batch: PreferenceBatch, ctx: LossContext, output: torch.Tensor, *, request: OutputRequest | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The training loss of one micro-batch: gate on rejected tokens, objective, NLL term; the per-pair losses
    come from the output layer instead when it computed them (``request.pair_losses``)."""
    obj, gate = ctx.objective, ctx.gate
    if obj.name in SFT_OBJECTIVES:
        return sft_loss_func(batch, ctx, output, request=request)
    chosen, rejected, rejected_logp = response_stats(output, batch, ctx, request)
    g = None
    if gate.enabled:
        g = gate_values(rejected.logp, rejected.logp_max, rejected.mask, gate, vocab_size=ctx.vocab_size)
        rejected_logp = apply_gate(rejected_logp, g)
    pc = sequence_logps(chosen.logp, chosen.mask, average=obj.average_logps)
    pr = sequence_logps(rejected_logp, rejected.mask, average=obj.average_logps)
    ref = pair_reference(ctx, batch, pc.dtype)
    nll = -sequence_logps(chosen.logp, chosen.mask, average=obj.nll_average) if obj.nll_weight else None
    fused = request.pair_losses if request is not None else None
    per_pair = fused if fused is not None else preference_loss(
        pc, pr, ref[:, 0], ref[:, 1], objective=obj.name, beta=obj.beta,
        label_smoothing=obj.label_smoothing, chosen_nll=nll, nll_weight=obj.nll_weight, shift=ctx.shift,
    )  # fmt: skip
    loss = per_pair.mean()
    _record(loss, batch, ctx)
    sums = metric_sums(
        beta=obj.beta, loss=per_pair, policy_chosen=pc, policy_rejected=pr, ref_chosen=ref[:, 0],
        ref_rejected=ref[:, 1], chosen=chosen, rejected=rejected, gate=g,
    )  # fmt: skip
    ctx.micro_batch += 1
    return loss, {"sums": sums}


def reference_loss_func(
    batch: PreferenceBatch, ctx: LossContext, output: torch.Tensor, *, request: OutputRequest | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Forward-only: summed log-probs and token counts per row, keyed by pair id."""
    with torch.no_grad():
        chosen, rejected, _ = response_stats(output, batch, ctx, request)
        sums = torch.stack(
            [sequence_logps(chosen.logp, chosen.mask), sequence_logps(rejected.logp, rejected.mask)], 1
        )
        counts = torch.stack([chosen.mask.sum(-1), rejected.mask.sum(-1)], 1)
    return output.new_zeros(()), {"pair_ids": batch.pair_ids, "logps": sums.double(), "tokens": counts}
