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
from gatedpo_mega.megatron.model import StageInfo, build_model
from gatedpo_mega.megatron.parallel import Layout, initialize_layout, validate_layout
from gatedpo_mega.megatron.step import LossContext
from gatedpo_mega.metrics import reduce_metric_sums
from gatedpo_mega.training.step import reference_pass, train_step


class StepSource(Protocol):
    """Where a run's batches come from (``gatedpo_mega.data.PreferenceLoader`` in production)."""

    num_micro_batches: int

    def __next__(self) -> list[PreferenceBatch]: ...


@dataclass(slots=True)
class RunData:
    steps: StepSource  # this DP rank's micro-batches, one list per optimizer step
    reference_batches: list[PreferenceBatch]  # this DP rank's share of every pair, for the reference pass
    num_pairs: int
    vocab_size: int
    reference_file: Path | None  # cached reference log-probs (None: always compute)
    report: str = ""


def device_for(layout_rank: int) -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", layout_rank % torch.cuda.device_count()))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def load_or_compute_reference(
    model: torch.nn.Module, layout: Layout, ctx: LossContext, data: RunData, device: torch.device
) -> None:
    """Reference log-probs of the initial weights: read from ``data.reference_file`` or computed once with the
    run's own layout and written there (atomically) for every later run of the same data, model and seed."""
    f = data.reference_file
    if f is not None and f.exists():
        saved = torch.load(f, map_location="cpu", weights_only=True)
        logps, tokens = saved["logps"], saved["tokens"]
        if logps.shape != (data.num_pairs, 2):
            raise RuntimeError(
                f"reference file {f} holds {tuple(logps.shape)} log-probs for {data.num_pairs} pairs"
            )
    else:
        logps, tokens = reference_pass(
            model, layout, ctx, [b.to(device) for b in data.reference_batches], data.num_pairs
        )
        if f is not None and layout.is_logger:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(f".tmp{os.getpid()}")
            torch.save({"logps": logps.cpu(), "tokens": tokens.cpu()}, tmp)
            tmp.replace(f)
    ctx.reference, ctx.ref_tokens = logps.to(device), tokens.to(device)


class MetricsLog:
    """``metrics.jsonl`` (one object per optimizer step), TensorBoard scalars and the progress bar, on one rank."""

    def __init__(self, cfg: Config, *, active: bool, start_step: int = 0) -> None:
        self.active = active
        self.out = Path(cfg.train.output_dir)
        self.bar: Any = None
        self.tb: Any = None
        if not active:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(dump_config(cfg))
        self.file = (self.out / "metrics.jsonl").open("w")  # a new run starts a new file
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
        self.bar.set_postfix(
            loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}", refresh=False
        )
        self.bar.update(1)

    def close(self) -> None:
        if self.active:
            self.file.close()
            self.bar.close()
            if self.tb is not None:
                self.tb.close()


def train(cfg: Config, make_data: Any) -> list[dict[str, Any]]:
    """Run ``cfg`` on the initialised default process group. ``make_data(cfg, layout) -> RunData``.

    Returns the per-step metrics (on every rank: they are broadcast from the rank that computes them).
    """
    world = dist.get_world_size()
    validate_layout(cfg, world)
    layout = initialize_layout(cfg.parallel.tensor, cfg.parallel.pipeline)
    device = device_for(layout.rank)
    torch.manual_seed(cfg.train.seed)
    data: RunData = make_data(cfg, layout)
    if layout.rank == 0 and data.report:
        print(data.report, flush=True)

    per_stage = cfg.model.num_layers // layout.pp
    stage = StageInfo(
        pre_process=layout.first_stage,
        post_process=layout.last_stage,
        layer_offset=layout.pp_rank * per_stage,
        tp_rank=layout.tp_rank,
        tp_size=layout.tp,
    )
    model = build_model(
        cfg.model, vocab_size=data.vocab_size, stage=stage, pipeline=layout.pp, seed=cfg.train.seed,
        tp_group=layout.tp_group,
    )  # fmt: skip
    model.to(device)
    ctx = LossContext(
        objective=cfg.objective, gate=cfg.gate, tp_group=layout.tp_group, vocab_size=data.vocab_size,
        reference=None, ref_tokens=None, fused=cfg.model.fused_logprobs,
    )  # fmt: skip
    load_or_compute_reference(model, layout, ctx, data, device)

    engine_driver = uses_engine_driver(cfg)
    engine = build_engine(model, cfg, layout, num_micro_batches=data.steps.num_micro_batches)
    log = MetricsLog(cfg, active=layout.rank == 0)
    history = []
    try:
        for step in range(1, cfg.train.max_steps + 1):
            ctx.step = step
            batches = [b.to(device) for b in next(data.steps)]
            t0 = time.perf_counter()
            sums = train_step(engine, layout, ctx, batches, engine_driver=engine_driver)
            record = _step_record(step, sums, batches, engine, layout, time.perf_counter() - t0)
            history.append(record)
            log.log(record)
    finally:
        log.close()
    return history


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
