"""The reference log-probs: precomputed once from the initial weights (cached beside the data), or ``live``: a
frozen copy of the initial model (same sharding, no gradients, no optimizer state) run forward on each step's
micro-batches; with LoRA the policy itself with its adapters switched off (or as they started), no copy."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from gatedpo_mega.backend import Backend
from gatedpo_mega.config import Config
from gatedpo_mega.data.batch import PreferenceBatch
from gatedpo_mega.errors import UserError
from gatedpo_mega.loss import LossContext, reference_loss_func
from gatedpo_mega.megatron.parallel import Layout
from gatedpo_mega.objectives import SFT_OBJECTIVES
from gatedpo_mega.training.data import EvalData, RunData
from gatedpo_mega.training.step import run_forward


@torch.no_grad()
def reference_pass(
    backend: Backend,
    model: torch.nn.Module,
    layout: Layout,
    ctx: LossContext,
    batches: list[PreferenceBatch],
    num_pairs: int,
    *,
    reduce: bool = True,
    progress: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs ``[N, 2]`` (chosen, rejected) and response token counts of the pairs in ``batches`` under
    ``model`` by pair id, on the last stage (zeros elsewhere). With ``reduce``, summed over the data-parallel group:
    when every pair belongs to exactly one DP rank, that assembles the whole table."""
    device = next(model.parameters()).device  # collectives on the backend's device (NCCL needs CUDA tensors)
    logps = torch.zeros(num_pairs, 2, dtype=torch.float64, device=device)
    tokens = torch.zeros(num_pairs, 2, dtype=torch.long, device=device)
    out = run_forward(backend, model, batches, reference_loss_func, ctx, progress=progress)
    for o in out if layout.last_stage else []:
        ids = o["pair_ids"]
        logps[ids] = o["logps"]
        tokens[ids] = o["tokens"]
    if reduce and layout.last_stage:
        dist.all_reduce(logps, group=layout.dp_group)
        dist.all_reduce(tokens, group=layout.dp_group)
    return logps, tokens


def load_or_compute_reference(
    backend: Backend,
    model: torch.nn.Module,
    layout: Layout,
    ctx: LossContext,
    batches: list[PreferenceBatch],
    num_pairs: int,
    f: Path | None,
    device: torch.device,
    name: str = "reference",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of the initial weights: read from ``f`` or computed once with the run's own layout and
    written there (atomically) for every later run of the same data, initial weights and seed."""
    if f is not None and f.exists():
        saved = torch.load(f, map_location="cpu", weights_only=True)
        logps, tokens = saved["logps"], saved["tokens"]
        if logps.shape != (num_pairs, 2):
            raise UserError(
                f"reference file {f} holds {tuple(logps.shape)} log-probs for {num_pairs} pairs; delete it"
            )
    else:
        shown = name if layout.rank == 0 else ""
        logps, tokens = reference_pass(
            backend, model, layout, ctx, [b.to(device) for b in batches], num_pairs, progress=shown
        )
        if f is not None and layout.is_logger:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(f".tmp{os.getpid()}")
            torch.save({"logps": logps.cpu(), "tokens": tokens.cpu()}, tmp)
            tmp.replace(f)
    return logps.to(device), tokens.to(device)


class Reference:
    """Where each step's (and each evaluation's) reference log-probs come from; built from the initial weights,
    before any update."""

    def __init__(
        self,
        cfg: Config,
        backend: Backend,
        layout: Layout,
        model: torch.nn.Module,
        data: RunData,
        device: torch.device,
    ) -> None:
        self.backend, self.layout, self.data = backend, layout, data
        self.live: torch.nn.Module | None = None
        self.adapter_mode = "on"  # how a live reference runs LoRA adapters (``Backend.adapters``)
        self.needed = cfg.objective.name not in SFT_OBJECTIVES
        self.train_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self.eval_tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # by the set's metric prefix
        if not self.needed:
            return
        self.ctx = LossContext(
            objective=cfg.objective, gate=cfg.gate, tp_group=layout.tp_group, cp_group=layout.cp_group,
            vocab_size=data.vocab_size, reference=None, ref_tokens=None, fused=cfg.model.fused_logprobs,
        )  # fmt: skip
        if cfg.train.reference == "live" and cfg.model.lora.enabled:
            # The policy itself, with its adapters off (the base) or as they started (model.init_adapter): no copy.
            self.live, self.adapter_mode = model, "initial" if cfg.model.init_adapter else "off"
            return
        if cfg.train.reference == "live":
            # Built again rather than copied (the model holds process groups): the same initial weights.
            self.live = backend.build(layout, data.vocab_size, device).requires_grad_(False).eval()
            return
        self.train_table = load_or_compute_reference(
            backend,
            model,
            layout,
            self.ctx,
            data.reference_batches,
            data.num_pairs,
            data.reference_file,
            device,
        )
        for e in data.evals:
            shown = "reference (eval pairs)" if e.prefix == "eval/" else f"reference ({e.prefix[:-1]})"
            self.eval_tables[e.prefix] = load_or_compute_reference(
                backend, model, layout, self.ctx, e.batches, e.num_pairs, e.reference_file, device, name=shown
            )

    def prepare(
        self, ctx: LossContext, batches: list[PreferenceBatch], *, evals: EvalData | None = None
    ) -> None:
        """Point ``ctx`` at the reference log-probs of ``batches``: training pairs, or pairs of the set ``evals``."""
        if not self.needed:
            return
        if self.live is not None:
            n = self.data.num_pairs if evals is None else evals.num_pairs
            with self.backend.adapters(self.live, self.adapter_mode):
                ctx.reference, ctx.ref_tokens = reference_pass(
                    self.backend, self.live, self.layout, self.ctx, batches, n, reduce=False
                )
            return
        table = self.train_table if evals is None else self.eval_tables[evals.prefix]
        assert table is not None
        ctx.reference, ctx.ref_tokens = table
