"""Training checkpoints: written whole or not at all, found by themselves, refused when they do not fit the run.

``OUTPUT/checkpoints/step-00000040/``::

    meta.json            format, step, layout (tensor, pipeline, data, zero_stage), model shape, vocabulary
    config.yaml          the run's resolved config
    deepspeed/state/     DeepSpeed's checkpoint: module weights, ZeRO optimizer shards, LR scheduler
    trainer/rank_XXXXX.pt  this rank's data-loader position and RNG states

Every rank writes into ``checkpoints/.tmp-step-00000040``; after a barrier rank 0 writes ``meta.json`` last and
renames the folder. A crash at any point before the rename leaves only a ``.tmp-*`` folder, which is never read
(and is removed by the next save of that step); ``latest_checkpoint`` considers complete folders only.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gatedpo_mega.config import Config, dump_config
from gatedpo_mega.errors import UserError
from gatedpo_mega.families import SHAPE_FIELDS, first_difference
from gatedpo_mega.formats import (
    DEEPSPEED_DIR,
    DEEPSPEED_TAG,
    TRAIN_FORMAT,
    TRAIN_META,
    TRAIN_VERSION,
    complete_checkpoints,
    find_checkpoint,
    format_mismatch,
    incomplete_dir,
    latest_checkpoint,
    step_dir,
)
from gatedpo_mega.megatron.parallel import Layout

# Besides the weights' shapes, what the saved state depends on: the padded vocabulary, the optimizer's dtype and
# which model the engine wraps. The other model fields (fused_logprobs, init_from, ...) may differ on resume.
RESUME_FIELDS = (*SHAPE_FIELDS, "make_vocab_size_divisible_by", "dtype", "backend")


class CheckpointError(UserError):
    """A checkpoint that is incomplete, unreadable or does not fit this run."""


def check_output_dir(cfg: Config) -> Path | None:
    """The checkpoint ``train.resume`` continues from (None: start at step 0). A run that would mix its outputs
    with an earlier run's checkpoints is refused."""
    latest = latest_checkpoint(cfg.train.output_dir)
    if latest is not None and not cfg.train.resume:
        raise CheckpointError(
            f"{cfg.train.output_dir} already holds checkpoints (latest {latest.name}); pass --resume to continue "
            "that run, or choose another train.output_dir"
        )
    return latest


def check_resume(cfg: Config, world_size: int) -> None:
    """Before any process starts: the output folder, and the layout and model of the checkpoint to resume."""
    latest = check_output_dir(cfg)
    if latest is not None:
        dp = world_size // (cfg.parallel.tensor * cfg.parallel.pipeline)
        check_fits(read_meta(latest), latest, cfg, dp)


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` is a checkpoint folder, or a run's output folder or its ``checkpoints/`` (the latest checkpoint)."""
    return find_checkpoint(path, CheckpointError)


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / TRAIN_META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: meta.json is unreadable ({e})") from None
    problem = format_mismatch(meta, TRAIN_FORMAT, TRAIN_VERSION)
    if problem:
        raise CheckpointError(f"checkpoint {path}: {problem}")
    return meta


def layout_record(cfg: Config, data_parallel: int) -> dict[str, int]:
    p = cfg.parallel
    return {"tensor": p.tensor, "pipeline": p.pipeline, "data": data_parallel, "zero_stage": p.zero_stage}


def check_fits(
    meta: dict[str, Any], path: Path, cfg: Config, data_parallel: int, vocab_size: int | None = None
) -> None:
    """Refuse a checkpoint written at another layout or for another model, naming the first mismatch."""
    mine = layout_record(cfg, data_parallel)
    theirs = meta["layout"]
    for key, value in mine.items():
        if theirs.get(key) != value:
            raise CheckpointError(
                f"checkpoint {path} was written at {key}={theirs.get(key)} ({_fmt(theirs)}); this run has "
                f"{key}={value} ({_fmt(mine)}). Resume with the checkpoint's layout"
            )
    differs = first_difference(meta["model"], asdict(cfg.model), RESUME_FIELDS)
    if differs:
        key, saved, mine = differs
        raise CheckpointError(
            f"checkpoint {path} holds a model with model.{key}={saved!r}; this run has model.{key}={mine!r}"
        )
    if vocab_size is not None and meta["vocab_size"] != vocab_size:
        raise CheckpointError(
            f"checkpoint {path} holds a vocabulary of {meta['vocab_size']}; this run's is {vocab_size}"
        )


def _fmt(layout: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in layout.items())


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    engine: Any,
    cfg: Config,
    layout: Layout,
    step: int,
    *,
    trainer_state: dict[str, Any],
    vocab_size: int,
    padded_vocab_size: int,
    hf_config: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint of ``step`` (collective: every rank calls it) and return its folder."""
    final = step_dir(cfg.train.output_dir, step)
    tmp = incomplete_dir(final)
    if layout.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "trainer").mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)
    torch.save({**trainer_state, "rng": rng_state()}, tmp / "trainer" / f"rank_{layout.rank:05d}.pt")
    dist.barrier()
    if layout.rank == 0:
        meta = {
            "format": TRAIN_FORMAT, "version": TRAIN_VERSION, "step": step, "layout": layout_record(cfg, layout.dp),
            "model": asdict(cfg.model), "vocab_size": vocab_size, "padded_vocab_size": padded_vocab_size,
            "hf_config": hf_config,
        }  # fmt: skip
        (tmp / "config.yaml").write_text(dump_config(cfg))
        (tmp / TRAIN_META).write_text(json.dumps(meta, indent=1))
        if final.exists():  # the same step saved again (a resumed run that re-reached it)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(cfg)
    dist.barrier()
    return final


def _prune(cfg: Config) -> None:
    keep = cfg.train.keep_checkpoints
    if keep:
        for old in complete_checkpoints(cfg.train.output_dir)[:-keep]:
            shutil.rmtree(old)


def load_checkpoint(
    path: Path, engine: Any, cfg: Config, layout: Layout, *, vocab_size: int
) -> tuple[int, dict[str, Any]]:
    """Restore the engine (weights, optimizer, scheduler) and this rank's RNG; returns (step, trainer state)."""
    meta = read_meta(path)
    check_fits(meta, path, cfg, layout.dp, vocab_size)
    rank_file = path / "trainer" / f"rank_{layout.rank:05d}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {rank_file.relative_to(path)}")
    load_path, _ = engine.load_checkpoint(
        str(path / DEEPSPEED_DIR),
        tag=DEEPSPEED_TAG,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise CheckpointError(f"checkpoint {path}: DeepSpeed found no state under {path / DEEPSPEED_DIR}")
    state = torch.load(rank_file, map_location="cpu", weights_only=False)
    set_rng_state(state.pop("rng"))
    return int(meta["step"]), state
