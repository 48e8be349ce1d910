"""The training loop, read top to bottom: layout, data, model, reference log-probs, engine, steps, outputs."""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from gatedpo_mega.config import Config, dump_config
from gatedpo_mega.data.batch import PreferenceBatch
from gatedpo_mega.deepspeed.engine import build_engine, uses_engine_driver
from gatedpo_mega.megatron.model import StageInfo, build_model, padded_vocab_size
from gatedpo_mega.megatron.parallel import Layout, initialize_layout, validate_layout
from gatedpo_mega.megatron.step import LossContext, preference_loss_func
from gatedpo_mega.metrics import reduce_metric_sums
from gatedpo_mega.objectives import SFT_OBJECTIVES
from gatedpo_mega.training.checkpoint import (
    CheckpointError,
    check_output_dir,
    checkpoints_root,
    load_checkpoint,
    save_checkpoint,
)
from gatedpo_mega.training.init import load_initial_weights, source_hf_config
from gatedpo_mega.training.step import reference_pass, run_forward, train_step


class StepSource(Protocol):
    """Where a run's batches come from (``gatedpo_mega.data.PreferenceLoader`` in production)."""

    num_micro_batches: int

    def __next__(self) -> list[PreferenceBatch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(slots=True)
class RunData:
    steps: StepSource  # this DP rank's micro-batches, one list per optimizer step
    reference_batches: list[PreferenceBatch]  # this DP rank's share of every pair, for the reference pass
    num_pairs: int
    vocab_size: int
    reference_file: Path | None  # cached reference log-probs (None: always compute)
    report: str = ""
    # Held-out pairs: this DP rank's micro-batches (the same number on every rank; ``eval_counted`` False marks
    # the fillers that even them out, which are run but not counted).
    eval_batches: list[PreferenceBatch] | None = None
    eval_counted: list[bool] | None = None
    num_eval_pairs: int = 0
    eval_reference_file: Path | None = None


def device_for(layout_rank: int) -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", layout_rank % torch.cuda.device_count()))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def load_or_compute_reference(
    model: torch.nn.Module,
    layout: Layout,
    ctx: LossContext,
    batches: list[PreferenceBatch],
    num_pairs: int,
    f: Path | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of the initial weights: read from ``f`` or computed once with the run's own layout and
    written there (atomically) for every later run of the same data, initial weights and seed."""
    if f is not None and f.exists():
        saved = torch.load(f, map_location="cpu", weights_only=True)
        logps, tokens = saved["logps"], saved["tokens"]
        if logps.shape != (num_pairs, 2):
            raise CheckpointError(
                f"reference file {f} holds {tuple(logps.shape)} log-probs for {num_pairs} pairs; delete it"
            )
    else:
        logps, tokens = reference_pass(model, layout, ctx, [b.to(device) for b in batches], num_pairs)
        if f is not None and layout.is_logger:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(f".tmp{os.getpid()}")
            torch.save({"logps": logps.cpu(), "tokens": tokens.cpu()}, tmp)
            tmp.replace(f)
    return logps.to(device), tokens.to(device)


class MetricsLog:
    """``metrics.jsonl`` (one object per optimizer step), TensorBoard scalars and the progress bar, on one rank."""

    def __init__(self, cfg: Config, *, active: bool, start_step: int = 0) -> None:
        """A run that starts at ``start_step`` > 0 (resumed) keeps the first ``start_step`` records and appends."""
        self.active = active
        self.out = Path(cfg.train.output_dir)
        self.bar: Any = None
        self.tb: Any = None
        if not active:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(dump_config(cfg))
        path = self.out / "metrics.jsonl"
        kept = []
        if start_step and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        self.file = path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tensorboard"))
        except ImportError:  # tensorboard is optional for the loop itself
            self.tb = None
        from tqdm import tqdm

        self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc="gate-dpo", dynamic_ncols=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step":
                    self.tb.add_scalar(k, v, record["step"])
        shown = {
            "loss": record.get("loss"),
            "acc": record.get("rewards/accuracies"),
            "eval": record.get("eval/loss"),
        }
        self.bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items() if v is not None}, refresh=False)
        if record["step"] > 0:  # the step-0 row is the evaluation before training
            self.bar.update(1)

    def close(self) -> None:
        if self.active:
            self.file.close()
            self.bar.close()
            if self.tb is not None:
                self.tb.close()


def stage_info(cfg: Config, layout: Layout) -> StageInfo:
    per_stage = cfg.model.num_layers // layout.pp
    return StageInfo(
        pre_process=layout.first_stage, post_process=layout.last_stage, layer_offset=layout.pp_rank * per_stage,
        tp_rank=layout.tp_rank, tp_size=layout.tp,
    )  # fmt: skip


def build_policy(cfg: Config, layout: Layout, vocab_size: int, device: torch.device) -> torch.nn.Module:
    """This rank's stage of the model with its initial weights: seeded, or read from ``model.init_from``."""
    if cfg.model.backend == "transformers":
        from gatedpo_mega.hf.model import load_hf_model

        hf = load_hf_model(cfg.model.init_from, dtype=cfg.model.dtype, fused=cfg.model.fused_logprobs)
        return hf.to(device)
    model = build_model(
        cfg.model, vocab_size=vocab_size, stage=stage_info(cfg, layout), pipeline=layout.pp, seed=cfg.train.seed,
        tp_group=layout.tp_group,
    )  # fmt: skip
    if cfg.model.init_from:
        load_initial_weights(model, cfg, layout, vocab_size)
    return model.to(device)


def train(cfg: Config, make_data: Any) -> list[dict[str, Any]]:
    """Run ``cfg`` on the initialised default process group. ``make_data(cfg, layout) -> RunData``.

    Returns the per-step metrics of this invocation (on every rank: they are broadcast from the rank that
    computes them).
    """
    world = dist.get_world_size()
    validate_layout(cfg, world)
    resume_from = find_resume_checkpoint(cfg)
    layout = initialize_layout(
        cfg.parallel.tensor, cfg.parallel.pipeline, timeout_minutes=cfg.train.collective_timeout_minutes
    )
    device = device_for(layout.rank)
    torch.manual_seed(cfg.train.seed)
    data: RunData = make_data(cfg, layout)
    if layout.rank == 0 and data.report:
        print(data.report, flush=True)

    model = build_policy(cfg, layout, data.vocab_size, device)
    ctx = LossContext(
        objective=cfg.objective, gate=cfg.gate, tp_group=layout.tp_group, vocab_size=data.vocab_size,
        reference=None, ref_tokens=None, fused=cfg.model.fused_logprobs, hf=cfg.model.backend == "transformers",
        fused_objective=cfg.model.fused_objective,
    )  # fmt: skip
    reference = Reference(cfg, layout, model, data, device)  # from the initial weights, before any update
    engine = build_engine(model, cfg, layout, num_micro_batches=data.steps.num_micro_batches)
    start = 0
    if resume_from is not None:
        start, state = load_checkpoint(resume_from, engine, cfg, layout, vocab_size=data.vocab_size)
        data.steps.load_state_dict(state["loader"])
        if layout.rank == 0:
            print(f"resumed from {resume_from} (step {start})", flush=True)
    log = MetricsLog(cfg, active=layout.rank == 0, start_step=start)
    history = []
    t = cfg.train
    evaluating = data.eval_batches is not None and t.eval_every > 0
    hf_config = source_hf_config(cfg.model.init_from)  # kept in checkpoints, so an export writes it back
    try:
        # Step 0: the initial model, where every change the analysis shows starts.
        if evaluating and start == 0:
            record = {"step": 0, **evaluate(engine.module, layout, ctx, reference, data, device)}
            history.append(record)
            log.log(record)
        for step in range(start + 1, t.max_steps + 1):
            ctx.step = step
            batches = [b.to(device) for b in next(data.steps)]
            t0 = time.perf_counter()
            reference.prepare(ctx, batches)
            sums = train_step(engine, layout, ctx, batches, engine_driver=uses_engine_driver(cfg))
            record = _step_record(step, sums, batches, engine, layout, time.perf_counter() - t0)
            last = step == t.max_steps
            if evaluating and (step % t.eval_every == 0 or last):
                record |= evaluate(engine.module, layout, ctx, reference, data, device)
            history.append(record)
            log.log(record)
            if (t.save_every and step % t.save_every == 0) or (last and t.save_final):
                save_checkpoint(
                    engine, cfg, layout, step, trainer_state={"loader": data.steps.state_dict()},
                    vocab_size=data.vocab_size, padded_vocab_size=padded_vocab(cfg, data.vocab_size),
                    hf_config=hf_config,
                )  # fmt: skip
        if cfg.model.backend == "transformers":
            from gatedpo_mega.hf.model import save_hf_folder

            out = Path(t.output_dir) / "hf"
            save_hf_folder(
                engine, cfg.model.init_from, out, rank=layout.rank, zero_stage=cfg.parallel.zero_stage
            )
            if layout.rank == 0:
                print(f"wrote the trained model as a Hugging Face folder: {out}", flush=True)
    finally:
        log.close()
    return history


def padded_vocab(cfg: Config, vocab_size: int) -> int:
    return padded_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor)


def find_resume_checkpoint(cfg: Config) -> Path | None:
    latest = check_output_dir(cfg)
    if cfg.train.resume and latest is None and dist.get_rank() == 0:
        print(f"no checkpoint in {checkpoints_root(cfg.train.output_dir)}: starting at step 0", flush=True)
    return latest


class Reference:
    """The reference log-probs: precomputed once from the initial weights (cached beside the data), or ``live``:
    a frozen copy of the initial model (same sharding, no gradients, no optimizer state) run forward on each
    step's micro-batches."""

    def __init__(
        self, cfg: Config, layout: Layout, model: torch.nn.Module, data: RunData, device: torch.device
    ) -> None:
        self.layout, self.data, self.device = layout, data, device
        self.live: torch.nn.Module | None = None
        self.needed = cfg.objective.name not in SFT_OBJECTIVES
        self.train_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self.eval_table: tuple[torch.Tensor, torch.Tensor] | None = None
        if not self.needed:
            return
        ctx = LossContext(
            objective=cfg.objective, gate=cfg.gate, tp_group=layout.tp_group, vocab_size=data.vocab_size,
            reference=None, ref_tokens=None, fused=cfg.model.fused_logprobs, hf=cfg.model.backend == "transformers",
        )  # fmt: skip
        self.ctx = ctx
        if cfg.train.reference == "live":
            # Built again rather than copied (the model holds process groups): the same initial weights.
            self.live = build_policy(cfg, layout, data.vocab_size, device).requires_grad_(False).eval()
            return
        self.train_table = load_or_compute_reference(
            model, layout, ctx, data.reference_batches, data.num_pairs, data.reference_file, device
        )
        if data.eval_batches is not None:
            self.eval_table = load_or_compute_reference(
                model, layout, ctx, data.eval_batches, data.num_eval_pairs, data.eval_reference_file, device
            )

    def prepare(self, ctx: LossContext, batches: list[PreferenceBatch], *, split: str = "train") -> None:
        """Point ``ctx`` at the reference log-probs of ``batches`` (pairs of ``split``)."""
        if not self.needed:
            return
        if self.live is not None:
            n = self.data.num_pairs if split == "train" else self.data.num_eval_pairs
            ctx.reference, ctx.ref_tokens = reference_pass(
                self.live, self.layout, self.ctx, batches, n, reduce=False
            )
            return
        table = self.train_table if split == "train" else self.eval_table
        assert table is not None
        ctx.reference, ctx.ref_tokens = table


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, layout: Layout, ctx: LossContext, reference: Reference, data: RunData,
    device: torch.device,
) -> dict[str, float]:  # fmt: skip
    """The preference metrics on the held-out pairs (every pair once), as ``eval/<name>``."""
    assert data.eval_batches is not None and data.eval_counted is not None
    batches = [b.to(device) for b in data.eval_batches]
    saved = ctx.reference, ctx.ref_tokens, ctx.micro_batch
    reference.prepare(ctx, batches, split="eval")
    ctx.micro_batch = 0
    was_training = model.training
    model.eval()
    out = run_forward(model, batches, preference_loss_func, ctx)
    model.train(was_training)
    ctx.reference, ctx.ref_tokens, ctx.micro_batch = saved
    sums = [o["sums"] for o, counted in zip(out, data.eval_counted, strict=True) if counted] if out else []
    metrics = reduce_metric_sums(sums, layout.dp_group) if layout.last_stage else {}
    payload = [metrics]
    if layout.pp > 1:
        dist.broadcast_object_list(payload, src=layout.logger_rank)
    return {f"eval/{k}": v for k, v in payload[0].items()}


def _step_record(
    step: int, sums: list[Any], batches: list[PreferenceBatch], engine: Any, layout: Layout, seconds: float
) -> dict[str, Any]:
    """Reduce the metrics over the data-parallel group and bring them to every rank."""
    metrics = reduce_metric_sums(sums, layout.dp_group) if layout.last_stage else {}
    device = batches[0].input_ids.device  # collectives on the backend's device (NCCL needs CUDA tensors)
    tokens = torch.tensor([sum(b.input_ids.numel() for b in batches)], dtype=torch.float64, device=device)
    dist.all_reduce(tokens, group=layout.dp_group)
    payload = [metrics]
    if layout.pp > 1:
        dist.broadcast_object_list(payload, src=layout.logger_rank)
    # Peak memory of the busiest rank: device memory on GPU, resident set size on CPU.
    if torch.cuda.is_available():
        peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**20], dtype=torch.float64, device="cuda")
    else:
        peak = torch.tensor(
            [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], dtype=torch.float64, device=device
        )
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    norm = engine.get_global_grad_norm()
    record = {"step": step, **payload[0]}
    record["grad_norm"] = float(norm) if norm is not None else float("nan")
    record["lr"] = float(engine.get_lr()[0])
    record["tokens_per_second"] = float(tokens) / max(seconds, 1e-9)
    record["step_seconds"] = seconds
    record["memory/peak_mib_max_rank"] = float(peak)
    return record
