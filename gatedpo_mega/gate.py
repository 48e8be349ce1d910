"""The gate: how much of the gradient reaches each rejected response token.

Per rejected token the inputs are ``logp_y`` (target log-prob) and ``logp_max`` (log-prob of the argmax token),
both detached. The family (DESIGN.md):

    signal       absolute: s = logp_y            relative: s = logp_y - logp_max   (<= 0, distance below the peak)
                 uniform:  s = logp_y + log V    (the probability in units of the uniform 1/V: tau is a fraction
                                                  of 1/V, so one tau means the same at every vocabulary size)
                 seq:      s = mean_t logp_y     (per response: the log of the geometric mean of its token
                                                  probabilities, the published gate's "seq")
                 q10:      s = log quantile_q(p_y)  (per response: the ``quantile`` (default 0.1) of its token
                                                  probabilities, linear interpolation as torch.quantile; "q10")
    granularity  token: one s per token          sequence: s is the response's length-normalised mean
                 (seq and q10 are per response whatever the granularity)
    shape        sigmoid:  g = sigmoid((s - log tau) / temperature)
                 psigmoid: g = sigmoid(slope * (exp(s) - tau))   (in probability space: the published gate)
                 hard:     g = 1[s >= log tau]
                 power:    g = min(1, exp(s - log tau)) ** alpha
                 none:     no gate at all (plain DPO, to the bit)

``apply_gate`` is the identity in the forward pass and multiplies the gradient by ``g`` in the backward pass,
so the loss value is exactly the ungated one. (``g * x + (1 - g) * x.detach()`` is not: it rounds.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

SHAPES = ("none", "sigmoid", "psigmoid", "hard", "power")
SIGNALS = ("absolute", "relative", "uniform", "seq", "q10")
PER_RESPONSE_SIGNALS = ("seq", "q10")  # one value per response, whatever gate.granularity says
GRANULARITIES = ("token", "sequence")
# A rejected token counts as "attenuated" in the metrics when its gate is below this value.
ATTENUATED_BELOW = 0.5


@dataclass(kw_only=True, slots=True)
class GateConfig:
    """Gate family parameters; see the module docstring for the formulas."""

    # The default is the published gate as configs/gate_vs_field.yaml's sweep picked it (docs/mass-dynamics.md), by a
    # rule fixed before the runs: one sigmoid per rejected response on the 10th percentile of its token probabilities,
    # half open at 2e-4, closed (0.018) at 0, open (0.98) at 4e-4. A probability threshold: docs/mass-dynamics.md says
    # how to choose tau for a model whose response probabilities sit elsewhere.
    shape: str = "psigmoid"  # one of SHAPES; "none" is plain DPO
    granularity: str = "token"  # one of GRANULARITIES (seq and q10 are per response whatever it says)
    signal: str = "q10"  # one of SIGNALS
    tau: float = 2e-4  # threshold: the gate closes as the signal falls below log(tau) (uniform: p < tau / V)
    temperature: float = 1.0  # sigmoid width, in nats
    alpha: float = 1.0  # power exponent
    slope: float = 2e4  # psigmoid: the steepness in probability (the published gate's alpha)
    quantile: float = 0.1  # q10: which quantile of the response's token probabilities

    def __post_init__(self) -> None:
        for name, allowed in (("shape", SHAPES), ("granularity", GRANULARITIES), ("signal", SIGNALS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"gate.{name}={value!r} is not one of {', '.join(allowed)}")
        if not (0.0 < self.tau <= 1.0):
            raise ValueError(f"gate.tau={self.tau} must be in (0, 1]")
        if not self.temperature > 0.0:
            raise ValueError(f"gate.temperature={self.temperature} must be > 0")
        if not self.alpha > 0.0:
            raise ValueError(f"gate.alpha={self.alpha} must be > 0")
        if not self.slope > 0.0:
            raise ValueError(f"gate.slope={self.slope} must be > 0")
        if not (0.0 <= self.quantile <= 1.0):
            raise ValueError(f"gate.quantile={self.quantile} must be in [0, 1]")

    @property
    def per_response(self) -> bool:
        """One gate value per rejected response (every token of it shares the value)."""
        return self.granularity == "sequence" or self.signal in PER_RESPONSE_SIGNALS

    @property
    def enabled(self) -> bool:
        return self.shape != "none"


def gate_signal(
    logp_target: torch.Tensor,
    logp_max: torch.Tensor,
    mask: torch.Tensor,
    *,
    signal: str,
    granularity: str,
    vocab_size: int | None = None,
    quantile: float = 0.1,
) -> torch.Tensor:
    """The signal ``s`` per token, ``[B, T]``; with ``granularity='sequence'``, ``seq`` or ``q10`` every token of a
    row shares it. ``signal='uniform'`` needs ``vocab_size``, the true vocabulary (padding columns excluded)."""
    if signal == "q10":
        return response_quantile(logp_target, mask, quantile)[:, None].expand(logp_target.shape)
    if signal == "seq":
        signal, granularity = "absolute", "sequence"
    if signal == "relative":
        s = (logp_target - logp_max).detach().float()
    elif signal == "uniform":
        if not vocab_size:
            raise ValueError("gate.signal=uniform needs the vocabulary size")
        s = logp_target.detach().float() + math.log(vocab_size)
    else:
        s = logp_target.detach().float()
    if granularity == "sequence":
        m = mask.to(s.dtype)
        s = ((s * m).sum(-1) / m.sum(-1).clamp(min=1.0))[:, None].expand_as(s)
    return s


def response_quantile(logp_target: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """``[B]``: log of the ``q``-quantile of each row's token probabilities over its mask (linear interpolation
    between order statistics, as ``torch.quantile``), in float64 so that tiny probabilities keep their value;
    ``-inf`` where it is 0, 0 (probability 1) for a row without tokens."""
    p = logp_target.detach().double().exp().masked_fill(~mask.bool(), float("nan"))
    value = torch.nanquantile(p, q, dim=-1)
    return value.nan_to_num(1.0).log().float()


def gate_from_signal(
    s: torch.Tensor, *, shape: str, tau: float, temperature: float, alpha: float, slope: float = 100.0
) -> torch.Tensor:
    """Gate values in [0, 1] from the signal."""
    if shape == "psigmoid":
        return torch.sigmoid(slope * (s.double().exp() - tau)).to(s.dtype)
    d = s - math.log(tau)
    if shape == "sigmoid":
        return torch.sigmoid(d / temperature)
    if shape == "hard":
        return (d >= 0).to(s.dtype)
    if shape == "power":
        return torch.exp(alpha * d.clamp(max=0.0))
    if shape == "none":
        return torch.ones_like(s)
    raise ValueError(f"unknown gate shape {shape!r}; expected one of {', '.join(SHAPES)}")


def gate_values(
    logp_target: torch.Tensor,
    logp_max: torch.Tensor,
    mask: torch.Tensor,
    cfg: GateConfig,
    *,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Detached gate per rejected token, ``[B, T]`` float32; 1 outside the response mask. ``vocab_size``: the
    true vocabulary, needed by ``signal='uniform'``."""
    s = gate_signal(
        logp_target, logp_max, mask, signal=cfg.signal, granularity=cfg.granularity, vocab_size=vocab_size,
        quantile=cfg.quantile,
    )  # fmt: skip
    g = gate_from_signal(
        s, shape=cfg.shape, tau=cfg.tau, temperature=cfg.temperature, alpha=cfg.alpha, slope=cfg.slope
    )
    return torch.where(mask.bool(), g, 1.0)


class _ApplyGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(g)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (g,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None


def apply_gate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged in value; its gradient is multiplied by ``g`` (detached, broadcastable to ``x``)."""
    return _ApplyGate.apply(x, g.detach())
