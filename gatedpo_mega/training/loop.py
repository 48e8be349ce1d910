"""The training loop, read top to bottom: layout, data, model, reference log-probs, engine, steps, outputs.

What differs between model libraries sits behind ``gatedpo_mega.backend``; the loss of a micro-batch is
``gatedpo_mega.loss``; the pieces this loop calls each live in their own file of ``gatedpo_mega/training/``.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from gatedpo_mega.backend import make_backend
from gatedpo_mega.config import Config
from gatedpo_mega.deepspeed.engine import build_engine
from gatedpo_mega.loss import LossContext
from gatedpo_mega.megatron.experts import RoutingLog
from gatedpo_mega.megatron.model import padded_vocab_size
from gatedpo_mega.megatron.parallel import initialize_layout, validate_layout
from gatedpo_mega.training.checkpoint import (
    CheckpointDecision,
    find_resume_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_on_every_rank,
)
from gatedpo_mega.training.data import RunData
from gatedpo_mega.training.evaluation import evaluate
from gatedpo_mega.training.initial_weights import source_hf_config
from gatedpo_mega.training.metrics_log import MetricsLog, peak_memory_mib, step_record
from gatedpo_mega.training.preemption import Preempted, SignalWatch, at_step_end
from gatedpo_mega.training.reference import Reference
from gatedpo_mega.training.step import train_step


def train(cfg: Config, make_data: Any, watch: SignalWatch | None = None) -> list[dict[str, Any]]:
    """Run ``cfg`` on the initialised default process group. ``make_data(cfg, layout) -> RunData``.

    Returns the per-step metrics of this invocation (on every rank: they are broadcast from the rank that
    computes them). A signal of ``train.save_on_signal`` that ``watch`` records (by default: one from here on)
    stops the run after the step it is in, with a checkpoint of that step (``Preempted``).
    """
    if watch is not None:
        return _train(cfg, make_data, watch)
    with SignalWatch(cfg.train.save_on_signal) as own:
        return _train(cfg, make_data, own)


def _train(cfg: Config, make_data: Any, watch: SignalWatch) -> list[dict[str, Any]]:
    validate_layout(cfg, dist.get_world_size())
    layout = initialize_layout(
        cfg.parallel.tensor, cfg.parallel.pipeline, context=cfg.parallel.context, expert=cfg.parallel.expert,
        timeout_minutes=cfg.train.collective_timeout_minutes,
    )  # fmt: skip
    device = device_for(layout.rank)
    resume_from = find_resume_checkpoint(cfg)  # verified on every rank before anything is loaded
    torch.manual_seed(cfg.train.seed)
    data: RunData = make_data(cfg, layout)
    if layout.rank == 0 and data.report:
        print(data.report, flush=True)

    backend = make_backend(cfg)
    model = backend.build(layout, data.vocab_size, device)
    ctx = LossContext(
        objective=cfg.objective, gate=cfg.gate, tp_group=layout.tp_group, cp_group=layout.cp_group,
        vocab_size=data.vocab_size,
        reference=None, ref_tokens=None, fused=cfg.model.fused_logprobs, fused_objective=cfg.model.fused_objective,
        shift=cfg.objective.shift_at(1, cfg.train.max_steps),
    )  # fmt: skip
    reference = Reference(cfg, backend, layout, model, data, device)  # from the initial weights
    routing = RoutingLog(model, num_layers=cfg.model.num_layers) if cfg.model.num_experts else None
    engine = build_engine(
        model,
        cfg,
        layout,
        num_micro_batches=data.steps.num_micro_batches,
        engine_driver=backend.engine_driver,
    )
    start = 0
    if resume_from is not None:
        start, state, changes = load_checkpoint(resume_from, engine, cfg, layout, vocab_size=data.vocab_size)
        data.steps.load_state_dict(state["loader"])
        if layout.rank == 0:
            moved = (
                f" at another layout ({', '.join(changes)}): model and optimizer state resharded"
                if changes
                else ""
            )
            print(f"resumed from {resume_from} (step {start}){moved}", flush=True)
    log = MetricsLog(cfg, active=layout.rank == 0, start_step=start)
    history = []
    t = cfg.train
    evaluating = bool(data.evals) and t.eval_every > 0
    hf_config = source_hf_config(cfg.model.init_from)  # kept in checkpoints, so an export writes it back

    def save(step: int) -> Any:
        return save_checkpoint(
            engine, cfg, layout, step, trainer_state={"loader": data.steps.state_dict()},
            vocab_size=data.vocab_size, padded_vocab_size=padded_vocab(cfg, data.vocab_size), hf_config=hf_config,
        )  # fmt: skip

    def preempt(signal_name: str, step: int, path: Any) -> None:
        problem = verify_on_every_rank(path)
        if problem is not None:
            raise CheckpointDecision(
                f"{signal_name} at step {step}: checkpoint {path} does not verify: {problem}"
            )
        raise Preempted(
            f"{signal_name} received: stopped after step {step} of {t.max_steps}, checkpoint {path} written and "
            "verified; --resume (train.resume=auto) continues the run"
        )

    try:
        # Step 0: the initial model, where every change the analysis shows starts.
        if evaluating and start == 0:
            record = {"step": 0, **evaluate(backend, engine.module, layout, ctx, reference, data, device)}
            history.append(record)
            log.log(record)
        for step in range(start + 1, t.max_steps + 1):
            ctx.step, ctx.shift = step, cfg.objective.shift_at(step, t.max_steps)
            batches = [b.to(device) for b in next(data.steps)]
            t0 = time.perf_counter()
            reference.prepare(ctx, batches)
            sums = train_step(engine, backend, layout, ctx, batches)
            seconds = time.perf_counter() - t0
            peak_mib, stop = at_step_end(watch, peak_memory_mib(), device)
            record = step_record(step, sums, batches, engine, layout, seconds, peak_mib=peak_mib)
            if routing is not None:
                record |= routing.report(
                    tp=layout.tp, dp=layout.dp, micro_batches=len(batches), device=device
                )
            last = step == t.max_steps
            if evaluating and (step % t.eval_every == 0 or last):
                record |= evaluate(backend, engine.module, layout, ctx, reference, data, device)
            history.append(record)
            log.log(record)
            saved = None
            if (t.save_every and step % t.save_every == 0) or (last and t.save_final):
                saved = save(step)
            if stop is not None and not last:  # with its evaluation and checkpoint, as an uninterrupted step
                preempt(stop, step, saved or save(step))
        backend.save_final(engine, layout)
    except BaseException:
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            engine.destroy()
        raise
    finally:
        log.close()
    # DeepSpeed's hooks released: ZeRO's hold the model and its process groups past the run otherwise (a cycle
    # through autograd's C++ nodes that Python's collector cannot see), in a process that goes on.
    engine.destroy()
    return history


def device_for(layout_rank: int) -> torch.device:
    if torch.cuda.is_available():
        # Modulo the visible devices: a scheduler that binds one GPU per task leaves each task only cuda:0.
        local = int(os.environ.get("LOCAL_RANK", layout_rank)) % torch.cuda.device_count()
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def padded_vocab(cfg: Config, vocab_size: int) -> int:
    return padded_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor)
