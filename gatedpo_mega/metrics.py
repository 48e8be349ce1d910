"""Training metrics from the tensors the loss already has: no extra forward, no extra communication per token.

Every metric is carried as a ``(sum, weight)`` pair so that micro-batches and data-parallel ranks combine exactly:
pair quantities are weighted by pairs, token quantities (gate, top-1 probability, entropy) by response tokens.
``reduce_metric_sums`` adds the pairs of all micro-batches, does one SUM all-reduce of the packed vector over the
data-parallel group and divides.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gatedpo_mega.gate import ATTENUATED_BELOW
from gatedpo_mega.ops.collectives import ProcessGroup, all_reduce_

MetricSums = dict[str, torch.Tensor]  # name -> float64 tensor [sum, weight]


@dataclass(frozen=True, slots=True)
class ResponseStats:
    """Per-token statistics of one side (chosen or rejected) of a micro-batch, all ``[B, T]``."""

    logp: torch.Tensor  # log-prob of the target token
    logp_max: torch.Tensor  # log-prob of the argmax token
    entropy: torch.Tensor
    mask: torch.Tensor  # response tokens


def _pair(total: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    t = total.detach().double().reshape(())
    return torch.stack([t, torch.as_tensor(weight, dtype=torch.float64, device=t.device).reshape(())])


def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(torch.float64)
    return _pair((values.detach().double() * m).sum(), m.sum())


def metric_sums(
    *,
    beta: float,
    loss: torch.Tensor,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    chosen: ResponseStats,
    rejected: ResponseStats,
    gate: torch.Tensor | None,
) -> MetricSums:
    """Metric sums of one micro-batch. Sequence log-probs are per pair ``[B]`` and summed over tokens.

    ``loss`` is the per-pair loss ``[B]``; ``gate`` is the rejected tokens' gate ``[B, T]`` (None: no gate).
    Without reference log-probs (SFT) the reward and log-likelihood-change metrics are left out.
    """
    pairs = float(policy_chosen.numel())
    g = torch.ones_like(rejected.logp) if gate is None else gate
    out: MetricSums = {"loss": _pair(loss.sum(), pairs)}
    if ref_chosen is not None and ref_rejected is not None:
        dw = (policy_chosen - ref_chosen).detach().double()
        dl = (policy_rejected - ref_rejected).detach().double()
        out |= {
            "rewards/chosen": _pair(beta * dw.sum(), pairs),
            "rewards/rejected": _pair(beta * dl.sum(), pairs),
            "rewards/margins": _pair(beta * (dw - dl).sum(), pairs),
            "rewards/accuracies": _pair((dw > dl).double().sum(), pairs),
            # Change of the chosen response's log-likelihood against the reference, per response token.
            "logps/chosen_delta_per_token": _pair(dw.sum(), chosen.mask.sum()),
            "logps/rejected_delta_per_token": _pair(dl.sum(), rejected.mask.sum()),
        }
    out |= {
        "logps/chosen": _pair(policy_chosen.sum(), pairs),
        "logps/rejected": _pair(policy_rejected.sum(), pairs),
        # Response-token counts: likelihood per token is logps / tokens (eval and analysis use it).
        "tokens/chosen": _pair(chosen.mask.sum(), pairs),
        "tokens/rejected": _pair(rejected.mask.sum(), pairs),
        "gate/mean": _token_mean(g, rejected.mask),
        "gate/frac_attenuated": _token_mean((g < ATTENUATED_BELOW).double(), rejected.mask),
        "squeeze/top1_rejected": _token_mean(rejected.logp_max.exp(), rejected.mask),
        "squeeze/entropy_rejected": _token_mean(rejected.entropy, rejected.mask),
        "squeeze/top1_chosen": _token_mean(chosen.logp_max.exp(), chosen.mask),
        "squeeze/entropy_chosen": _token_mean(chosen.entropy, chosen.mask),
    }
    return out


def reduce_metric_sums(parts: Iterable[MetricSums], group: ProcessGroup | None = None) -> dict[str, float]:
    """Combine micro-batch sums, all-reduce over ``group`` (one collective), return weighted means."""
    total: MetricSums = {}
    for part in parts:
        for name, value in part.items():
            total[name] = total[name] + value if name in total else value.clone()
    if not total:
        return {}
    names = sorted(total)
    packed = torch.stack([total[n] for n in names])
    all_reduce_(packed, dist.ReduceOp.SUM, group)
    return {
        n: float(s / w) if w > 0 else float("nan") for n, (s, w) in zip(names, packed.tolist(), strict=True)
    }
