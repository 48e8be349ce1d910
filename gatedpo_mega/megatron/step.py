"""The loss hook at Megatron's seam: ``forward_step(data_iterator, model) -> (output, partial(loss_func, ...))``.

On the last pipeline stage the output is this rank's vocabulary shard of the logits; ``loss_func`` turns it into
per-token statistics with ``token_logprobs`` (the only tensor-parallel communication: a few floats per token),
gates the rejected tokens, evaluates the objective and returns ``(loss, {"sums": metric sums})``. Earlier stages
return their hidden states and the schedule moves them along.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from gatedpo_mega.config import ObjectiveConfig
from gatedpo_mega.data.batch import PreferenceBatch
from gatedpo_mega.gate import GateConfig, apply_gate, gate_values
from gatedpo_mega.megatron.output import set_output_targets
from gatedpo_mega.metrics import ResponseStats, metric_sums
from gatedpo_mega.objectives import SFT_OBJECTIVES, preference_loss, sequence_logps, sft_loss
from gatedpo_mega.ops import token_logprobs


class NonFiniteLossError(RuntimeError):
    """The loss of a micro-batch is NaN or infinite; the run stops and names it."""


@dataclass(slots=True)
class LossContext:
    objective: ObjectiveConfig
    gate: GateConfig
    tp_group: Any
    vocab_size: int  # the true vocabulary (padding columns excluded)
    reference: torch.Tensor | None  # [N, 2] summed reference log-probs (chosen, rejected) by pair id
    ref_tokens: torch.Tensor | None  # [N, 2] response token counts, for length-normalised objectives
    fused: bool = False  # the model's output layer is FusedOutputLayer (outputs statistics, not logits)
    hf: bool = False  # the model is a Hugging Face causal LM (the transformers backend)
    fused_objective: bool = (
        False  # the output layer computes the preference loss itself (fused_preference_loss)
    )
    pair_losses: list[torch.Tensor] = field(default_factory=list)  # what it computed, by micro-batch
    step: int = 0
    micro_batch: int = 0


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """megatron-core's boolean attention mask: True where attention is *not* allowed."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu_(1)[None, None]


def model_forward(
    model: torch.nn.Module, batch: PreferenceBatch, *, hf: bool = False, ctx: LossContext | None = None
) -> torch.Tensor:
    """Logits ``[2B, T, V/TP]`` on the last stage, or ``[2B, T, 3]`` statistics with the fused output layer (which,
    with ``ctx.fused_objective``, also leaves the micro-batch's per-pair losses in ``ctx.pair_losses``)."""
    if hf:
        from gatedpo_mega.hf.model import hf_forward

        return hf_forward(model, batch.input_ids, batch.labels)
    pair = None
    if ctx is not None and ctx.fused_objective and ctx.reference is not None and ctx.ref_tokens is not None:
        ref = ctx.reference[batch.pair_ids]
        if ctx.objective.average_logps:
            ref = ref / ctx.ref_tokens[batch.pair_ids].clamp(min=1).to(ref.dtype)
        pair = (ref, ctx.objective, ctx.gate, ctx.pair_losses)
    set_output_targets(model, batch.labels, pair)
    ids = batch.input_ids
    positions = torch.arange(ids.shape[1], device=ids.device)[None].expand_as(ids)
    return model(ids, positions, attention_mask=causal_mask(ids.shape[1], ids.device))


def response_stats(
    logits: torch.Tensor, batch: PreferenceBatch, ctx: LossContext
) -> tuple[ResponseStats, ResponseStats, torch.Tensor]:
    """Per-token statistics of the chosen rows and the rejected rows, and the ungated rejected log-probs.
    ``logits`` are this shard's logits, or the fused output layer's ``[2B, T, 3]`` statistics."""
    if ctx.fused:
        logp, logp_max, entropy = logits.unbind(-1)
    else:
        logp, logp_max, entropy = token_logprobs(
            logits, batch.labels, tp_group=ctx.tp_group, vocab_size=ctx.vocab_size
        )
    mask = batch.loss_mask
    b = batch.pairs
    chosen = ResponseStats(logp[:b], logp_max[:b], entropy[:b], mask[:b])
    rejected = ResponseStats(logp[b:], logp_max[b:], entropy[b:], mask[b:])
    return chosen, rejected, logp[b:]


def _finite(loss: torch.Tensor, batch: PreferenceBatch, ctx: LossContext) -> None:
    if not math.isfinite(float(loss.detach())):
        raise NonFiniteLossError(
            f"loss is {float(loss.detach())} at step {ctx.step}, micro-batch {ctx.micro_batch} (pairs {batch.pair_ids.tolist()})"
        )


def sft_loss_func(
    batch: PreferenceBatch, ctx: LossContext, logits: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``sft``: NLL of the chosen responses; ``sft_extended``: of chosen and rejected (per-sequence, token-mean
    with ``objective.nll_average``)."""
    obj = ctx.objective
    chosen, rejected, _ = response_stats(logits, batch, ctx)
    pc = sequence_logps(chosen.logp, chosen.mask)
    pr = sequence_logps(rejected.logp, rejected.mask)
    nll_c = -sequence_logps(chosen.logp, chosen.mask, average=obj.nll_average)
    nll_r = -sequence_logps(rejected.logp, rejected.mask, average=obj.nll_average)
    per_pair = sft_loss(nll_c, nll_r if obj.name == "sft_extended" else None)
    loss = per_pair.mean()
    _finite(loss, batch, ctx)
    sums = metric_sums(
        beta=obj.beta, loss=per_pair, policy_chosen=pc, policy_rejected=pr, ref_chosen=None, ref_rejected=None,
        chosen=chosen, rejected=rejected, gate=None,
    )  # fmt: skip
    ctx.micro_batch += 1
    return loss, {"sums": sums}


def preference_loss_func(
    batch: PreferenceBatch, ctx: LossContext, logits: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any]]:
    obj, gate = ctx.objective, ctx.gate
    if obj.name in SFT_OBJECTIVES:
        return sft_loss_func(batch, ctx, logits)
    chosen, rejected, rejected_logp = response_stats(logits, batch, ctx)
    fused_losses = ctx.pair_losses.pop(0) if ctx.pair_losses else None  # computed by the output layer
    g = None
    if gate.enabled:
        g = gate_values(rejected.logp, rejected.logp_max, rejected.mask, gate)
        rejected_logp = apply_gate(rejected_logp, g)
    pc = sequence_logps(chosen.logp, chosen.mask, average=obj.average_logps)
    pr = sequence_logps(rejected_logp, rejected.mask, average=obj.average_logps)
    assert ctx.reference is not None and ctx.ref_tokens is not None, "reference log-probs are not loaded"
    ref = ctx.reference[batch.pair_ids].to(pc.dtype)
    if obj.average_logps:
        ref = ref / ctx.ref_tokens[batch.pair_ids].clamp(min=1).to(ref.dtype)
    nll = -sequence_logps(chosen.logp, chosen.mask, average=obj.nll_average) if obj.nll_weight else None
    per_pair = fused_losses if fused_losses is not None else preference_loss(
        pc, pr, ref[:, 0], ref[:, 1], objective=obj.name, beta=obj.beta,
        label_smoothing=obj.label_smoothing, chosen_nll=nll, nll_weight=obj.nll_weight,
    )  # fmt: skip
    loss = per_pair.mean()
    _finite(loss, batch, ctx)
    sums = metric_sums(
        beta=obj.beta, loss=per_pair, policy_chosen=pc, policy_rejected=pr, ref_chosen=ref[:, 0],
        ref_rejected=ref[:, 1], chosen=chosen, rejected=rejected, gate=g,
    )  # fmt: skip
    ctx.micro_batch += 1
    return loss, {"sums": sums}


def reference_loss_func(
    batch: PreferenceBatch, ctx: LossContext, logits: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Forward-only: summed log-probs and token counts per row, keyed by pair id."""
    with torch.no_grad():
        chosen, rejected, _ = response_stats(logits, batch, ctx)
        sums = torch.stack(
            [sequence_logps(chosen.logp, chosen.mask), sequence_logps(rejected.logp, rejected.mask)], 1
        )
        counts = torch.stack([chosen.mask.sum(-1), rejected.mask.sum(-1)], 1)
    return logits.new_zeros(()), {"pair_ids": batch.pair_ids, "logps": sums.double(), "tokens": counts}


def forward_step(
    loss_func: Any, ctx: LossContext, data_iterator: Any, model: torch.nn.Module
) -> tuple[Any, Any]:
    """Megatron's ``forward_step_func`` (bind ``loss_func`` and ``ctx`` with ``functools.partial``)."""
    batch: PreferenceBatch = next(data_iterator)
    return model_forward(model, batch, hf=ctx.hf, ctx=ctx), partial(loss_func, batch, ctx)
