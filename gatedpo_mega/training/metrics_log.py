"""What a run leaves behind each step: ``metrics.jsonl`` (one object per optimizer step), the trackers of
``train.report_to`` (TensorBoard, W&B, MLflow: reporters.py) and the progress bar (on one rank), and the step
record they hold (metrics reduced over data-parallel ranks, gradient norm, learning rate, throughput, peak memory)."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gatedpo_mega.config import Config, dump_config
from gatedpo_mega.data.batch import PreferenceBatch
from gatedpo_mega.megatron.parallel import Layout
from gatedpo_mega.metrics import reduce_metric_sums
from gatedpo_mega.objectives import SFT_OBJECTIVES
from gatedpo_mega.training.reporters import Reporter, numeric, start_reporters


def progress_label(cfg: Config) -> str:
    """What the progress bar calls a run: ``train.run_name`` when set, else its method: ``sft``, ``dpo`` (no gate)
    or ``gate-dpo``, ``gate-ipo``, ... (the objective with the gate)."""
    if cfg.train.run_name:
        return cfg.train.run_name
    name = cfg.objective.name
    if name in SFT_OBJECTIVES or cfg.gate.shape == "none":
        return name
    return f"gate-{name}"


class MetricsLog:
    """``metrics.jsonl`` (one object per optimizer step), the ``train.report_to`` trackers and the progress bar, on
    one rank."""

    def __init__(self, cfg: Config, *, active: bool, start_step: int = 0) -> None:
        """A run that starts at ``start_step`` > 0 (resumed) keeps the first ``start_step`` records and appends."""
        self.active = active
        self.out = Path(cfg.train.output_dir)
        self.bar: Any = None
        self.reporters: list[Reporter] = []
        if not active:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(dump_config(cfg))
        path = self.out / "metrics.jsonl"
        kept = kept_records(path, start_step) if start_step and path.exists() else []
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        self.file = path.open("a")
        self.reporters = start_reporters(cfg, start_step)
        from tqdm import tqdm

        self.bar = tqdm(
            total=cfg.train.max_steps, initial=start_step, desc=progress_label(cfg), dynamic_ncols=True
        )

    def log(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        metrics = numeric(record)
        for reporter in self.reporters:
            reporter.log(metrics, record["step"])
        shown = {
            "loss": record.get("loss"),
            "acc": record.get("rewards/accuracies"),
            "eval": next(
                (v for k, v in record.items() if k.startswith("eval/") and k.endswith("/loss")), None
            ),
        }
        self.bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items() if v is not None}, refresh=False)
        if record["step"] > 0:  # the step-0 row is the evaluation before training
            self.bar.update(1)

    def close(self) -> None:
        if self.active:
            self.file.close()
            self.bar.close()
            for reporter in self.reporters:
                reporter.close()


def kept_records(path: Path, start_step: int) -> list[str]:
    """The lines of ``metrics.jsonl`` a run resumed at ``start_step`` keeps: the records of steps up to it. A line
    that is not a record (half-written when the run was killed, or damaged) is dropped, as are later steps."""
    kept = []
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= start_step:
            kept.append(line)
    return kept


def peak_memory_mib() -> float:
    """This process's peak memory so far: device memory on GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_record(
    step: int, sums: list[Any], batches: list[PreferenceBatch], engine: Any, layout: Layout, seconds: float,
    *, peak_mib: float,
) -> dict[str, Any]:  # fmt: skip
    """Reduce the metrics over the data-parallel group and bring them to every rank. ``peak_mib``: the busiest
    rank's peak memory (reduced by the caller, with the step's other max over every rank)."""
    metrics = reduce_metric_sums(sums, layout.dp_group) if layout.last_stage else {}
    device = batches[0].input_ids.device  # collectives on the backend's device (NCCL needs CUDA tensors)
    # Tokens the model ran on (padding included) and real tokens (padding excluded): the pipeline's throughput, and
    # the work done for the data.
    model_tokens = sum(b.model_input_ids.numel() for b in batches)
    tokens = torch.tensor(
        [model_tokens, sum(b.real_tokens for b in batches)], dtype=torch.float64, device=device
    )
    dist.all_reduce(tokens, group=layout.dp_group)
    payload = [metrics]
    if layout.pp > 1:
        dist.broadcast_object_list(payload, src=layout.logger_rank)
    norm = engine.get_global_grad_norm()
    record = {"step": step, **payload[0]}
    record["grad_norm"] = float(norm) if norm is not None else float("nan")
    record["lr"] = float(engine.get_lr()[0])
    record["tokens_per_second"] = float(tokens[0]) / max(seconds, 1e-9)
    record["real_tokens_per_second"] = float(tokens[1]) / max(seconds, 1e-9)
    record["padding_fraction"] = 1.0 - float(tokens[1]) / float(tokens[0])
    record["step_seconds"] = seconds
    record["memory/peak_mib_max_rank"] = peak_mib
    return record
