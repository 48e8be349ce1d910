"""Preference objectives over per-sequence log-probabilities: one small function each, chosen from a table.

Notation: ``dw = log pi(y_w) - log pi_ref(y_w)`` and ``dl = log pi(y_l) - log pi_ref(y_l)`` per pair,
``h = dw - dl``. Every function returns the per-pair loss; the caller reduces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gatedpo_mega.validate import choice, positive


def dpo(
    dw: torch.Tensor, dl: torch.Tensor, *, beta: float, label_smoothing: float = 0.0, shift: float = 1.0
) -> torch.Tensor:
    """DPO, Rafailov et al. 2023, eq. 7: ``-log sigmoid(beta h)``; with label smoothing ``eps`` the conservative
    DPO of Mitchell 2023: ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``."""
    z = beta * (dw - dl)
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def ipo(
    dw: torch.Tensor, dl: torch.Tensor, *, beta: float, label_smoothing: float = 0.0, shift: float = 1.0
) -> torch.Tensor:
    """IPO, Azar et al. 2023, eq. 17: ``(h - 1 / (2 beta))^2`` (beta plays the role of tau there)."""
    return (dw - dl - 1.0 / (2.0 * beta)) ** 2


def cal_dpo(
    dw: torch.Tensor, dl: torch.Tensor, *, beta: float, label_smoothing: float = 0.0, shift: float = 1.0
) -> torch.Tensor:
    """Cal-DPO, Xiao et al. 2024, eq. 10: ``-log sigmoid(h) + 1/2 [(dw - 1/(2 beta))^2 + (dl + 1/(2 beta))^2]``.
    The calibration term pulls the implicit rewards toward +-1/(2 beta); the 1/2 weight is the authors' code's."""
    c = 1.0 / (2.0 * beta)
    return -F.logsigmoid(dw - dl) + 0.5 * ((dw - c) ** 2 + (dl + c) ** 2)


def hinge(
    dw: torch.Tensor, dl: torch.Tensor, *, beta: float, label_smoothing: float = 0.0, shift: float = 1.0
) -> torch.Tensor:
    """SLiC-HF hinge, Zhao et al. 2023, eq. 3 on the log-ratio margin: ``max(0, 1 - beta h)``."""
    return torch.relu(1.0 - beta * (dw - dl))


def dpo_shift(
    dw: torch.Tensor, dl: torch.Tensor, *, beta: float, label_smoothing: float = 0.0, shift: float = 1.0
) -> torch.Tensor:
    """DPO-Shift, Yang et al. 2025: ``-log sigmoid(beta (dw - lambda dl))``, the rejected log-ratio scaled by
    ``lambda = shift`` in (0, 1] (1: DPO), which lets the chosen likelihood fall less. The other objectives take
    ``shift`` and ignore it, so that one call serves every entry of the table."""
    return -F.logsigmoid(beta * (dw - shift * dl))


Objective = Callable[..., torch.Tensor]
OBJECTIVES: dict[str, Objective] = {
    "dpo": dpo, "ipo": ipo, "cal_dpo": cal_dpo, "hinge": hinge, "dpo_shift": dpo_shift,
}  # fmt: skip
# Supervised objectives on the same pairs (no reference model): ``sft`` on chosen responses; ``sft_extended`` on
# chosen and rejected responses (Ren & Sutherland 2024, "Learning dynamics of LLM finetuning", sec. 4.3: SFT on
# both responses first, so DPO does not start by pushing down responses the model finds extremely unlikely).
SFT_OBJECTIVES = ("sft", "sft_extended")
# Objectives that depend on the margin ``h`` alone: ``dL/d log pi(y_l) = -dL/d log pi(y_w)`` whatever the loss is.
MARGIN_OBJECTIVES = ("dpo", "ipo", "hinge")


@dataclass(kw_only=True, slots=True)
class ObjectiveConfig:
    name: str = (
        "dpo"  # dpo | ipo | cal_dpo | hinge | dpo_shift | sft (chosen) | sft_extended (both responses)
    )
    beta: float = 0.1  # inverse temperature of the implicit reward
    # dpo_shift's lambda, the weight of the rejected log-ratio: shift_lambda at the first step, moving linearly to
    # shift_lambda_end (if set) at the last
    shift_lambda: float = 0.9
    shift_lambda_end: float | None = None
    label_smoothing: float = 0.0  # conservative DPO (dpo only)
    average_logps: bool = False  # length-normalised sequence log-probs instead of sums
    nll_weight: float = 0.0  # weight of the NLL term on chosen tokens
    nll_average: bool = True  # NLL term per token (True) or per sequence (False)

    def __post_init__(self) -> None:
        choice("objective.name", self.name, (*OBJECTIVES, *SFT_OBJECTIVES))
        positive("objective.beta", self.beta)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"objective.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.name != "dpo":
            raise ValueError("objective.label_smoothing applies to objective.name=dpo only")
        for key in ("shift_lambda", "shift_lambda_end"):
            value = getattr(self, key)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"objective.{key}={value} must be in (0, 1]")
        if self.shift_lambda_end is not None and self.name != "dpo_shift":
            raise ValueError("objective.shift_lambda_end applies to objective.name=dpo_shift only")
        positive("objective.nll_weight", self.nll_weight, allow_zero=True)
        if self.name in SFT_OBJECTIVES and self.nll_weight:
            raise ValueError(
                f"objective.nll_weight applies to preference objectives, not objective.name={self.name}"
            )

    def shift_at(self, step: int, max_steps: int) -> float:
        """dpo_shift's lambda at ``step`` (1-based) of ``max_steps``: linear from ``shift_lambda`` to
        ``shift_lambda_end``; 1 for the other objectives."""
        if self.name != "dpo_shift":
            return 1.0
        if self.shift_lambda_end is None or max_steps <= 1:
            return self.shift_lambda
        frac = min(max(step - 1, 0), max_steps - 1) / (max_steps - 1)
        return self.shift_lambda + frac * (self.shift_lambda_end - self.shift_lambda)

    @property
    def margin_only(self) -> bool:
        """The loss depends on the margin alone (no calibration, no NLL term)."""
        return self.name in MARGIN_OBJECTIVES and not self.nll_weight


def sft_loss(chosen_nll: torch.Tensor, rejected_nll: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair SFT loss from per-sequence NLLs: the chosen one, or the mean of both for extended SFT."""
    return chosen_nll if rejected_nll is None else 0.5 * (chosen_nll + rejected_nll)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """Sum (or mean, with ``average``) of per-token log-probs over the response mask, ``[B, T] -> [B]``."""
    m = mask.to(token_logps.dtype)
    total = (token_logps * m).sum(-1)
    return total / m.sum(-1).clamp(min=1.0) if average else total


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    objective: str,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_nll: torch.Tensor | None = None,
    nll_weight: float = 0.0,
    shift: float = 1.0,
) -> torch.Tensor:
    """Per-pair loss of ``objective`` plus ``nll_weight * chosen_nll`` (the NLL term on chosen tokens, e.g. RPO).

    ``chosen_nll`` is the per-pair negative log-likelihood of the chosen response (summed or length-normalised by
    the caller, see ``sequence_logps``); it is required when ``nll_weight`` is non-zero. ``shift``: dpo_shift's
    lambda at this step (``ObjectiveConfig.shift_at``).
    """
    fn = OBJECTIVES.get(objective)
    if fn is None:
        raise ValueError(f"objective.name={objective!r} is not one of {', '.join(OBJECTIVES)}")
    loss = fn(
        policy_chosen - ref_chosen, policy_rejected - ref_rejected, beta=beta, label_smoothing=label_smoothing,
        shift=shift,
    )  # fmt: skip
    if nll_weight:
        if chosen_nll is None:
            raise ValueError("nll_weight is set but chosen_nll was not given")
        loss = loss + nll_weight * chosen_nll
    return loss
