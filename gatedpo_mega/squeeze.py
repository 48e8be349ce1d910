"""The squeeze demonstration: the mechanism of DESIGN.md in its simplest setting.

A linear softmax model ``p(. | x) = softmax(W x)`` over ``labels`` classes and two fixed unit feature vectors:
``x_w``, the context of the chosen label, and ``x_l``, the context of the rejected label, with cosine
``correlation`` (0 makes the two contexts independent free-logit vectors; > 0 shares parameters between them, as
a language model shares them between the chosen and rejected responses). One preference pair, the reference is the
initial model, and the rejected label's initial probability is set exactly to each value of ``rejected_probs``.

Descending on ``-log p(y_l | x_l)`` moves ``z_{y_l}`` by ``-(1 - p_{y_l})`` and every other ``z_k`` by ``+p_k``:
when ``p_{y_l}`` is tiny the step is all redistribution toward labels that are already likely (squeezing), and
with shared parameters it also leaks into the chosen context. The gate scales that gradient by ``g``.

Each (rejected probability, gate shape) cell is trained for every seed in one batched computation; the report is
the change, final minus initial, of: the top-1 probability and entropy in the rejected context (among labels
other than the rejected one), the chosen label's probability, and the top-1 probability among non-chosen labels
in the chosen context.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gatedpo_mega.gate import SHAPES, GateConfig, apply_gate, gate_values
from gatedpo_mega.objectives import preference_loss
from gatedpo_mega.ops import token_logprobs
from gatedpo_mega.validate import choice, not_empty, positive


@dataclass(kw_only=True, slots=True)
class SqueezeConfig:
    """The squeeze demonstration: a free-logit softmax model trained on one preference pair."""

    labels: int = 64  # size of the label set
    feature_dim: int = 16  # dimension of the fixed context features
    correlation: float = 0.5  # cosine between the chosen and the rejected context (0: independent logits)
    init_scale: float = 2.0  # std of the initial logits
    rejected_probs: list[float] = field(default_factory=lambda: [0.2, 1e-2, 1e-4, 1e-6, 1e-8])
    seeds: int = 64
    steps: int = 200
    lr: float = 0.5
    beta: float = 1.0
    shapes: list[str] = field(default_factory=lambda: ["none", "sigmoid", "hard", "power"])
    output_dir: str = "outputs/squeeze"

    def __post_init__(self) -> None:
        if self.labels < 3:
            raise ValueError(
                f"squeeze.labels={self.labels} must be >= 3 (chosen, rejected and at least one other)"
            )
        if self.feature_dim < 2:
            raise ValueError(f"squeeze.feature_dim={self.feature_dim} must be >= 2")
        if not -1.0 < self.correlation < 1.0:
            raise ValueError(f"squeeze.correlation={self.correlation} must be in (-1, 1)")
        positive("squeeze.init_scale", self.init_scale, allow_zero=True)
        not_empty("squeeze.rejected_probs", self.rejected_probs)  # no cells: nothing to run or report
        not_empty("squeeze.shapes", self.shapes)
        not_empty("squeeze.output_dir", self.output_dir)  # empty would write into the current folder
        for p in self.rejected_probs:
            if not 0.0 < p < 1.0:
                raise ValueError(f"squeeze.rejected_probs contains {p}; each must be in (0, 1)")
        for name in ("seeds", "steps"):
            positive(f"squeeze.{name}", getattr(self, name))
        positive("squeeze.lr", self.lr)
        positive("squeeze.beta", self.beta)
        for s in self.shapes:
            choice("squeeze.shapes[]", s, SHAPES)


METRICS = (
    "top1_rejected_ctx",
    "entropy_rejected_ctx",
    "p_chosen",
    "top1_other_chosen_ctx",
    "p_rejected_final",
)


def _unit_pair(
    seeds: int, dim: int, correlation: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors x_w, x_l per seed with cosine exactly ``correlation``."""
    a = torch.randn(seeds, dim, generator=gen, dtype=torch.float64)
    b = torch.randn(seeds, dim, generator=gen, dtype=torch.float64)
    a = a / a.norm(dim=1, keepdim=True)
    b = b - (b * a).sum(1, keepdim=True) * a
    b = b / b.norm(dim=1, keepdim=True)
    return a, correlation * a + math.sqrt(1.0 - correlation**2) * b


def _initial_state(cfg: SqueezeConfig, p0: float, seed: int) -> dict[str, torch.Tensor]:
    """Weights, contexts and labels for every seed; identical for every gate shape at the same ``p0``."""
    gen = torch.Generator().manual_seed(seed)
    s, k, d = cfg.seeds, cfg.labels, cfg.feature_dim
    w = torch.randn(s, k, d, generator=gen, dtype=torch.float64) * cfg.init_scale
    x_w, x_l = _unit_pair(s, d, cfg.correlation, gen)
    rejected = torch.randint(0, k, (s,), generator=gen)
    chosen = (rejected + torch.randint(1, k, (s,), generator=gen)) % k  # any label but the rejected one
    # Move row y_l along x_l so that p(y_l | x_l) = p0 exactly: z_r = logit(p0) + logsumexp of the others.
    z_l = torch.einsum("skd,sd->sk", w, x_l)
    others = z_l.scatter(1, rejected[:, None], float("-inf")).logsumexp(1)
    delta = math.log(p0 / (1.0 - p0)) + others - z_l.gather(1, rejected[:, None]).squeeze(1)
    w[torch.arange(s), rejected] += delta[:, None] * x_l
    return {"w": w, "x_w": x_w, "x_l": x_l, "chosen": chosen, "rejected": rejected}


def _probs(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(torch.einsum("skd,sd->sk", w, x), dim=-1)


def _observe(state: dict[str, torch.Tensor], w: torch.Tensor) -> dict[str, torch.Tensor]:
    c, r = state["chosen"], state["rejected"]
    p_w, p_l = _probs(w, state["x_w"]), _probs(w, state["x_l"])
    p_l_others = p_l.scatter(1, r[:, None], 0.0)
    q = p_l_others / p_l_others.sum(1, keepdim=True)  # rejected context, renormalised without y_l
    return {
        "top1_rejected_ctx": p_l_others.max(1).values,
        "entropy_rejected_ctx": -(q * q.clamp_min(1e-300).log()).sum(1),
        "p_chosen": p_w.gather(1, c[:, None]).squeeze(1),
        "top1_other_chosen_ctx": p_w.scatter(1, c[:, None], 0.0).max(1).values,
        "p_rejected_final": p_l.gather(1, r[:, None]).squeeze(1),
    }


def train_cell(
    cfg: SqueezeConfig, gate: GateConfig, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """SGD on the DPO loss of one pair per seed; returns per-seed changes (final - initial) of ``METRICS``."""
    w = state["w"].clone().requires_grad_(True)
    c, r = state["chosen"][:, None], state["rejected"][:, None]
    with torch.no_grad():
        ref_c = token_logprobs(torch.einsum("skd,sd->sk", w, state["x_w"])[:, None], c)[0][:, 0]
        ref_r = token_logprobs(torch.einsum("skd,sd->sk", w, state["x_l"])[:, None], r)[0][:, 0]
    before = _observe(state, w.detach())
    mask = torch.ones_like(r, dtype=torch.bool)
    for _ in range(cfg.steps):
        logp_c, _, _ = token_logprobs(torch.einsum("skd,sd->sk", w, state["x_w"])[:, None], c)
        logp_r, logp_r_max, _ = token_logprobs(torch.einsum("skd,sd->sk", w, state["x_l"])[:, None], r)
        if gate.enabled:
            g = gate_values(logp_r, logp_r_max, mask, gate, vocab_size=cfg.labels)
            logp_r = apply_gate(logp_r, g)
        loss = preference_loss(logp_c[:, 0], logp_r[:, 0], ref_c, ref_r, objective="dpo", beta=cfg.beta)
        (grad,) = torch.autograd.grad(loss.sum(), w)  # seeds are independent: the sum separates
        with torch.no_grad():
            w -= cfg.lr * grad
    after = _observe(state, w.detach())
    out = {k: after[k] - before[k] for k in METRICS if k != "p_rejected_final"}
    out["p_rejected_final"] = after["p_rejected_final"]
    return out


def run_squeeze(
    cfg: SqueezeConfig, gate: GateConfig, *, seed: int = 0, progress: bool = False
) -> list[dict[str, Any]]:
    """All cells; one row per (rejected probability, shape) with per-seed values and their mean and std.

    On one thread: the tensors are a few kilobytes, and threads only add their synchronisation to every op (on
    two busy cores, 20x slower than one thread)."""
    from tqdm import tqdm

    cells = [(i, p0, shape) for i, p0 in enumerate(cfg.rejected_probs) for shape in cfg.shapes]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        state: dict[str, torch.Tensor] = {}
        for i, p0, shape in tqdm(cells, desc="squeeze", unit="cell", disable=not progress, leave=False):
            if shape == cfg.shapes[0]:
                state = _initial_state(cfg, p0, seed + 1000 * i)
            per_seed = train_cell(cfg, dataclasses.replace(gate, shape=shape), state)
            row: dict[str, Any] = {"rejected_prob": p0, "shape": shape}
            for k, v in per_seed.items():
                row[k] = {"mean": float(v.mean()), "std": float(v.std()), "values": v.tolist()}
            rows.append(row)
    finally:
        torch.set_num_threads(threads)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = "| p0(rejected) | gate | d top1 (rej. ctx) | d entropy (rej. ctx) | d p(chosen) | d top1 other (ch. ctx) | p(rejected) final |"
    lines = [head, "|" + "---|" * 7]
    for row in rows:
        cells = [f"{row[k]['mean']:+.4f} ± {row[k]['std']:.4f}" for k in METRICS[:4]]
        cells.append(f"{row['p_rejected_final']['mean']:.2e}")
        lines.append(f"| {row['rejected_prob']:.0e} | {row['shape']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    titles = {
        "top1_rejected_ctx": "Δ top-1 prob, rejected context",
        "entropy_rejected_ctx": "Δ entropy, rejected context",
        "p_chosen": "Δ p(chosen)",
        "top1_other_chosen_ctx": "Δ top-1 non-chosen, chosen context",
    }
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (key, title) in zip(axes, titles.items(), strict=True):
        for shape in shapes:
            sel = [r for r in rows if r["shape"] == shape]
            xs = [math.log10(r["rejected_prob"]) for r in sel]
            ax.errorbar(
                xs,
                [r[key]["mean"] for r in sel],
                yerr=[r[key]["std"] for r in sel],
                marker="o",
                capsize=3,
                label=shape,
            )
        ax.set_title(title)
        ax.set_xlabel("log10 initial p(rejected)")
        ax.axhline(0.0, color="grey", lw=0.5)
    axes[0].legend(title="gate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "squeeze.json",
        "table": out_dir / "squeeze.md",
        "plot": out_dir / "squeeze.png",
    }
    paths["json"].write_text(json.dumps(rows, indent=1))
    paths["table"].write_text(format_table(rows) + "\n")
    plot(rows, paths["plot"])
    return paths
