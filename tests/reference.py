"""Independent float64 references, written from the formulas, sharing no code with the package."""

from __future__ import annotations

import torch


def logprobs_f64(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, ...]:
    """(logp_target, logp_max, entropy) of the full, unsharded logits in float64; ignored (-100) -> 0."""
    z = logits[..., :vocab_size].double()
    logp = z - z.logsumexp(-1, keepdim=True)
    ignored = targets == -100
    lt = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    lmax = logp.max(-1).values
    ent = -(logp.exp() * logp).sum(-1)
    return tuple(t.masked_fill(ignored, 0.0) for t in (lt, lmax, ent))


def grad_f64(
    logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """d/dlogits of sum(weight * logp_target): weight * (onehot - softmax), zero on padding and ignored rows."""
    z = logits.double()
    p = torch.zeros_like(z)
    p[..., :vocab_size] = torch.softmax(z[..., :vocab_size], -1)
    onehot = torch.zeros_like(z)
    keep = targets != -100
    onehot.scatter_(-1, targets.clamp(min=0)[..., None], 1.0)
    g = (weight.double() * keep)[..., None]
    return g * (onehot - p)
