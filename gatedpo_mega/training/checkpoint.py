"""Training checkpoints: written whole or not at all, found by themselves, refused when they do not fit the run.

``OUTPUT/checkpoints/step-00000040/``::

    meta.json            format, step, layout (tensor, pipeline, data, zero_stage), model shape, vocabulary
    config.yaml          the run's resolved config
    deepspeed/state/     DeepSpeed's checkpoint: module weights, ZeRO optimizer shards, LR scheduler
    trainer/rank_XXXXX.pt  this rank's data-loader position and RNG states

Every rank writes into ``checkpoints/.tmp-step-00000040`` and reports the files it wrote (size and SHA-256, flushed
to disk) or the error that stopped it; rank 0 writes ``meta.json`` last, with the list of every file, and renames
the folder only when every rank succeeded. A crash at any point before the rename leaves only a ``.tmp-*`` folder,
which is never read (and is removed by the next save of that step); a failed write (a full disk) removes it and
every rank stops with one line. ``--resume`` verifies the newest checkpoint against its file list before loading
anything and falls back to the newest one that verifies (``train.resume_fallback``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from gatedpo_mega.config import Config, dump_config
from gatedpo_mega.errors import UserError
from gatedpo_mega.families import SHAPE_FIELDS, first_difference
from gatedpo_mega.formats import (
    CHECKPOINTS,
    DEEPSPEED_DIR,
    DEEPSPEED_TAG,
    DTYPES,
    STEP_NAME,
    TRAIN_FILES,
    TRAIN_FORMAT,
    TRAIN_META,
    TRAIN_VERSION,
    checkpoints_root,
    complete_checkpoints,
    experts_file,
    find_checkpoint,
    format_mismatch,
    incomplete_dir,
    step_dir,
    step_folders,
)
from gatedpo_mega.manifest import changed, file_record, missing_or_resized, share, total_size
from gatedpo_mega.megatron.parallel import Layout
from gatedpo_mega.training.reshard import layout_changes, load_resharded, reshard_refusal

# Besides the weights' shapes, what the saved state depends on: the padded vocabulary, the optimizer's dtype and
# which model the engine wraps. The other model fields (fused_logprobs, init_from, ...) may differ on resume.
RESUME_FIELDS = (*SHAPE_FIELDS, "make_vocab_size_divisible_by", "dtype", "backend", "lora")
# A LoRA checkpoint holds the adapters only: the run that resumes it must build the same base and starting adapters.
LORA_BASE_FIELDS = ("init_from", "init_adapter")


class CheckpointError(UserError):
    """A checkpoint that is incomplete, unreadable or does not fit this run."""


class CheckpointDecision(CheckpointError):
    """A checkpoint refusal every rank reaches together (a failed write, no checkpoint that verifies)."""

    every_rank = True


def check_output_dir(cfg: Config) -> Path | None:
    """The newest checkpoint folder of ``train.output_dir`` (None: there is none). A run that would mix its outputs
    with an earlier run's checkpoints (no ``train.resume``) is refused, and so is ``train.resume: true`` with
    nothing to resume (a mistyped folder would otherwise train again from step 0)."""
    folders = step_folders(cfg.train.output_dir)
    if folders and cfg.train.resume is False:
        raise CheckpointError(
            f"{cfg.train.output_dir} already holds checkpoints (latest {folders[-1].name}); pass --resume to continue "
            "that run, or choose another train.output_dir"
        )
    if not folders and cfg.train.resume is True:
        raise CheckpointError(
            f"no checkpoint in {checkpoints_root(cfg.train.output_dir)} to resume from (train.resume=auto starts at "
            "step 0 when there is none)"
        )
    return folders[-1] if folders else None


def check_resume(cfg: Config, world_size: int) -> None:
    """Before any process starts: the output folder, and the layout and model of the checkpoint to resume (the
    newest whose files are all there at their sizes; the processes verify checksums before loading)."""
    if check_output_dir(cfg) is None:
        return
    for path in reversed(step_folders(cfg.train.output_dir)):
        if verify(path, checksums=False) is None:
            dp = world_size // (cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.context)
            check_fits(read_meta(path), path, cfg, dp)
            return


def find_resume_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint this run continues from (collective: every rank calls it and gets the same answer).

    The newest checkpoint is verified before anything is loaded, each rank checking that it sees every file at its
    recorded size and the checksums of its share of the files. A damaged one is skipped with one line saying why
    and the next older one is tried, or, with ``train.resume_fallback: false``, the run is refused.
    """
    if check_output_dir(cfg) is None:
        if cfg.train.resume == "auto" and dist.get_rank() == 0:
            print(
                f"no checkpoint in {checkpoints_root(cfg.train.output_dir)}: starting at step 0", flush=True
            )
        return None
    skipped = []
    for path in reversed(step_folders(cfg.train.output_dir)):
        problem = verify_on_every_rank(path)
        if problem is None:
            if dist.get_rank() == 0 and TRAIN_FILES not in read_meta(path):
                print(
                    f"checkpoint {path} records no file list (an earlier format): resuming unverified",
                    flush=True,
                )
            return path
        if not cfg.train.resume_fallback:
            raise CheckpointDecision(
                f"checkpoint {path} is damaged: {problem} (train.resume_fallback is false: not falling back to an "
                "earlier checkpoint)"
            )
        if dist.get_rank() == 0:
            print(
                f"gatedpo: warning: skipping damaged checkpoint {path}: {problem}",
                file=sys.stderr,
                flush=True,
            )
        skipped.append(f"{path.name}: {problem}")
    raise CheckpointDecision(
        f"no checkpoint in {checkpoints_root(cfg.train.output_dir)} verifies ({'; '.join(skipped)}); move the folder "
        "away to start again at step 0"
    )


def verify(path: Path, *, checksums: bool = True, rank: int = 0, world: int = 1) -> str | None:
    """What is wrong with the checkpoint ``path`` (None: it is whole): its ``meta.json``, every recorded file
    present at its size, and the checksums of this process's share of the files (all of them for one process)."""
    return _check(path, checksums=checksums, rank=rank, world=world)[0]


def _check(path: Path, *, checksums: bool, rank: int, world: int) -> tuple[str | None, bool]:
    """``verify``'s answer, and whether this process sees every recorded file at its size."""
    meta, problem = _meta(path)
    if meta is None:
        return problem, False
    files = meta.get(TRAIN_FILES)
    if files is None:  # written before checkpoints recorded their files: nothing more to check
        return None, True
    problem = missing_or_resized(path, files)
    if problem is not None:
        return problem, False
    if checksums:
        problem = changed(path, files, share(list(files), rank, world))
    return problem, True


def verify_report(path: Path) -> tuple[list[str], bool]:
    """``gatedpo checkpoint verify``: a line per checkpoint (``path`` itself, or every one of a run folder, newest
    first) and whether all of them verify."""
    if (path / TRAIN_META).is_file() or STEP_NAME.match(path.name):
        folders = [path]
    else:
        run = path.parent if path.name == CHECKPOINTS else path
        folders = list(reversed(step_folders(run)))
        if not folders:
            raise CheckpointError(f"{path}: not a training checkpoint nor a run folder with checkpoints")
    lines, resumes_from = [], None
    for folder in folders:
        problem = verify(folder)
        if problem is not None:
            lines.append(f"DAMAGED {folder}: {problem}")
            continue
        files = read_meta(folder).get(TRAIN_FILES)
        what = (
            f"{len(files)} files, {total_size(files) / 2**20:.1f} MiB"
            if files
            else "no file list: meta.json only"
        )
        lines.append(f"ok      {folder} ({what})")
        resumes_from = resumes_from or folder
    if len(folders) > 1 or resumes_from != folders[0]:
        lines.append(
            f"--resume continues from {resumes_from}" if resumes_from else "--resume finds none that verifies"
        )
    return lines, all(line.startswith("ok") for line in lines[: len(folders)])


def verify_on_every_rank(path: Path) -> str | None:
    """``verify`` split over the ranks of the default group; every rank gets the same answer. A file that some
    ranks see and others do not is no damage but a filesystem the ranks do not share: refused."""
    rank, world = dist.get_rank(), dist.get_world_size()
    found: list[Any] = [None] * world
    dist.all_gather_object(found, _check(path, checksums=True, rank=rank, world=world))
    refusal = unshared(path, found)
    if refusal:
        raise CheckpointDecision(refusal)
    problems = [(r, p) for r, (p, _) in enumerate(found) if p is not None]
    if not problems:
        return None
    r, problem = problems[0]
    return problem if world == 1 else f"{problem} (found by rank {r})"


def unshared(path: Path, found: list[tuple[str | None, bool]]) -> str | None:
    """The refusal when some ranks see every file of ``path`` and others miss some (per rank: problem, sees all)."""
    seeing = [r for r, (_, sees) in enumerate(found) if sees]
    blind = [(r, p) for r, (p, sees) in enumerate(found) if not sees and p and p.endswith(" is missing")]
    if not seeing or not blind:
        return None
    r, problem = blind[0]
    return (
        f"checkpoint {path}: rank {r} cannot see a file rank {seeing[0]} sees ({problem}): checkpoints must be on a "
        "filesystem every rank shares"
    )


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` is a checkpoint folder, or a run's output folder or its ``checkpoints/`` (the latest checkpoint)."""
    return find_checkpoint(path, CheckpointError)


def read_meta(path: Path) -> dict[str, Any]:
    meta, problem = _meta(path)
    if meta is None:
        raise CheckpointError(f"checkpoint {path}: {problem}")
    return meta


def _meta(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    if not (path / TRAIN_META).is_file():
        return None, f"{TRAIN_META} is missing"
    try:
        meta = json.loads((path / TRAIN_META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{TRAIN_META} is unreadable ({e})"
    if not isinstance(meta, dict):
        return None, f"{TRAIN_META} is unreadable (not an object)"
    problem = format_mismatch(meta, TRAIN_FORMAT, TRAIN_VERSION)
    return (None, problem) if problem else (meta, None)


def layout_record(cfg: Config, data_parallel: int) -> dict[str, int]:
    """The layout a checkpoint records. ZeRO partitions over data x context: ``data * context`` files per
    model-parallel rank."""
    p = cfg.parallel
    return {
        "tensor": p.tensor, "pipeline": p.pipeline, "context": p.context, "expert": p.expert, "data": data_parallel,
        "zero_stage": p.zero_stage,
    }  # fmt: skip


def check_fits(
    meta: dict[str, Any], path: Path, cfg: Config, data_parallel: int, vocab_size: int | None = None
) -> list[str]:
    """What differs between the checkpoint's layout and this run's (``["tensor 2 -> 1", ...]``: resharded on
    load); refused, naming the first mismatch: another model, another global batch, or a layout change that cannot
    be resharded."""
    mine = layout_record(cfg, data_parallel)
    theirs = meta["layout"]
    changes = layout_changes(theirs, mine)
    refusal = reshard_refusal(theirs, mine, cfg) if changes else None
    if refusal:
        raise CheckpointError(
            f"checkpoint {path} was written at {_fmt(theirs)}; this run has {_fmt(mine)}: {refusal}. Resume with "
            "the checkpoint's layout"
        )
    batch = _saved_global_batch(path)
    if batch is not None and batch != cfg.train.global_batch_size:
        raise CheckpointError(
            f"checkpoint {path} was trained with train.global_batch_size={batch}; this run has "
            f"{cfg.train.global_batch_size}: the resumed run would see other batches (a data-parallel size or "
            "micro-batch size may change; the global batch may not)"
        )
    differs = first_difference(meta["model"], asdict(cfg.model), RESUME_FIELDS)
    if differs:
        key, saved, mine = differs
        raise CheckpointError(
            f"checkpoint {path} holds a model with model.{key}={saved!r}; this run has model.{key}={mine!r}"
        )
    differs = (
        first_difference(meta["model"], asdict(cfg.model), LORA_BASE_FIELDS)
        if cfg.model.lora.enabled
        else None
    )
    if differs:
        key, saved, mine = differs
        raise CheckpointError(
            f"checkpoint {path} holds LoRA adapters of the base model.{key}={saved!r}; this run has "
            f"model.{key}={mine!r}"
        )
    if vocab_size is not None and meta["vocab_size"] != vocab_size:
        raise CheckpointError(
            f"checkpoint {path} holds a vocabulary of {meta['vocab_size']}; this run's is {vocab_size}"
        )
    return changes


def _saved_global_batch(path: Path) -> int | None:
    """``train.global_batch_size`` of the run that wrote the checkpoint (its ``config.yaml``; None: unreadable)."""
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text())
        return int(saved["train"]["global_batch_size"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def _fmt(layout: dict[str, Any]) -> str:
    """``tensor 2, pipeline 1, data 2, zero_stage 1``; context only where there is context parallelism."""
    return ", ".join(f"{k} {v}" for k, v in layout.items() if not (k in ("context", "expert") and v == 1))


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
    """Write the checkpoint of ``step`` (collective: every rank calls it) and return its folder.

    Every rank records the files it wrote (size, SHA-256, flushed to disk) and reports them, or the error that
    stopped it, to every other; rank 0 renames the folder only when every rank succeeded and it sees every file.
    Otherwise the partial folder is removed, the previous checkpoints are untouched, and every rank raises a
    ``CheckpointError`` naming the rank and the OS error (for instance "No space left on device").
    """
    final = step_dir(cfg.train.output_dir, step)
    tmp = incomplete_dir(final)
    error = None
    if layout.rank == 0:
        _warn_if_short_of_space(engine, cfg, final, layout)
        error = _attempt(lambda: _fresh_folder(tmp / "trainer"), tmp)
    _agree([error], final, tmp, src=0)

    recorder = RecordingSaves(engine.checkpoint_engine)
    # DeepSpeed's writes go through the recorder, and so does its copy of its recovery script (a file copy outside
    # its checkpoint engine, on rank 0); its collectives run unchanged.
    engine.checkpoint_engine = recorder
    engine._copy_recovery_script = recorder.guarded(engine._copy_recovery_script)
    try:
        # With LoRA the checkpoint holds the adapters and their optimizer state; the frozen base is named by
        # model.init_from (or the seed) in config.yaml and meta.json, not copied.
        engine.save_checkpoint(
            str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False,
            exclude_frozen_parameters=cfg.model.lora.enabled,
        )  # fmt: skip
    finally:
        engine.checkpoint_engine = recorder.inner
        del engine._copy_recovery_script  # the class's method again
    written, error = recorder.written, recorder.error
    if error is None and layout.ep > 1 and layout.expert_dp_rank == 0:  # one copy of each rank's experts
        experts = experts_file(tmp, layout.ep_rank, layout.pp_rank * layout.tp + layout.tp_rank)
        error = _attempt(lambda: _save_experts(engine.module, cfg, layout, experts), experts)
        written.append(experts)
    if error is None:
        rank_file = tmp / "trainer" / f"rank_{layout.rank:05d}.pt"
        error = _attempt(lambda: _torch_save({**trainer_state, "rng": rng_state()}, rank_file), rank_file)
        written.append(rank_file)
    records: dict[str, Any] = {}
    if error is None:
        error = _attempt(
            lambda: records.update({_rel(p, tmp): file_record(p, sync=True) for p in written}), tmp
        )
    reports: list[Any] = [None] * layout.world
    dist.all_gather_object(reports, (error, records))
    _agree([e for e, _ in reports], final, tmp, src=None)

    if layout.rank == 0:
        files = {name: record for _, recs in reports for name, record in recs.items()}
        error = _attempt(lambda: _finish(tmp, final, cfg, layout, step, files, vocab_size, padded_vocab_size,
                                         hf_config), tmp)  # fmt: skip
    _agree([error], final, tmp, src=0)
    return final


def _save_experts(model: torch.nn.Module, cfg: Config, layout: Layout, path: Path) -> None:
    from gatedpo_mega.families import expert_index, expert_renamed
    from gatedpo_mega.megatron.model import expert_offset

    offset = expert_offset(cfg.model, layout.ep_rank, layout.ep)
    state = {
        expert_renamed(k, offset): v.detach().cpu()
        for k, v in model.state_dict().items()
        if expert_index(k) is not None and isinstance(v, torch.Tensor)
    }
    path.parent.mkdir(exist_ok=True)
    _torch_save({"module": state}, path)


def _load_experts(model: torch.nn.Module, cfg: Config, layout: Layout, path: Path) -> None:
    """This rank's experts from the checkpoint's experts file: DeepSpeed's module weights hold EP rank 0's (its
    optimizer's master weights are right, but the next forward runs on the module's)."""
    from gatedpo_mega.families import expert_index, expert_renamed
    from gatedpo_mega.megatron.model import expert_offset

    f = experts_file(path, layout.ep_rank, layout.pp_rank * layout.tp + layout.tp_rank)
    if not f.is_file():
        raise CheckpointError(f"checkpoint {path} has no {f.relative_to(path)}")
    saved = torch.load(f, map_location="cpu", weights_only=True)["module"]
    offset = expert_offset(cfg.model, layout.ep_rank, layout.ep)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if expert_index(name) is not None:
                p.copy_(saved[expert_renamed(name, offset)])


class RecordingSaves:
    """DeepSpeed's checkpoint engine, recording every file this rank writes and the first error instead of
    raising it: DeepSpeed's save then runs its remaining collectives, so every rank reaches the report in
    ``save_checkpoint`` (an exception would leave the other ranks waiting in DeepSpeed's barrier). Files are
    written through a Python file object, so a full disk is an ``OSError`` with its errno."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.written: list[Path] = []
        self.error: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def save(self, state_dict: Any, path: str) -> None:
        if self.error is not None:
            return
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        if isinstance(self.inner, TorchCheckpointEngine):
            zipfile = self.inner.zipfile_serialization
            write = lambda: _torch_save(state_dict, Path(path), zipfile=zipfile)  # noqa: E731
        else:
            write = lambda: self.inner.save(state_dict, path)  # noqa: E731
        self.error = _attempt(write, Path(path))
        if self.error is None:
            self.written.append(Path(path))

    def guarded(self, copy: Any) -> Any:
        def run(path: str) -> None:
            if self.error is None:
                self.error = _attempt(lambda: copy(path), Path(path))

        return run

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        if self.error is None:
            self.error = _attempt(lambda: self.inner.makedirs(path, exist_ok=exist_ok), Path(path))


def _torch_save(obj: Any, path: Path, *, zipfile: bool = True) -> None:
    """``torch.save`` through a file whose write errors are kept: torch reports a failed write as a bare
    "unexpected pos" ``RuntimeError``; the ``OSError`` behind it (errno, "No space left on device") is raised."""
    with path.open("wb") as f:
        sink = _Sink(f)
        try:
            torch.save(obj, sink, _use_new_zipfile_serialization=zipfile)  # type: ignore[arg-type]
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


class _Sink:
    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return int(self.f.write(data))
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _fresh_folder(path: Path) -> None:
    shutil.rmtree(path.parent, ignore_errors=True)
    path.mkdir(parents=True)


def _rel(path: Path, root: Path) -> str:
    return str(Path(path).relative_to(root))


def _attempt(write: Any, where: Path) -> str | None:
    """Run ``write``; None, or what stopped it in one line (an ``OSError``'s message names its file)."""
    try:
        write()
    except OSError as e:
        return f"{e.strerror or e} ({e.filename or where})"
    except RuntimeError as e:  # torch's serializer, or another checkpoint engine
        return f"{str(e).strip().splitlines()[0][:300]} (writing under {where})"
    return None


def _agree(errors: list[str | None], final: Path, tmp: Path, *, src: int | None) -> None:
    """Raise on every rank when any rank failed: ``errors`` per rank, or (``src`` given) one rank's error, which is
    broadcast first. The partial folder is removed by rank 0."""
    if src is not None:
        dist.broadcast_object_list(errors, src=src)
        failed = [(src, errors[0])] if errors[0] else []
    else:
        failed = [(r, e) for r, e in enumerate(errors) if e]
    if not failed:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    rank, error = failed[0]
    previous = [p for p in complete_checkpoints(final.parents[1]) if p != final]
    kept = f"; {previous[-1].name} is untouched" if previous else ""
    raise CheckpointDecision(
        f"checkpoint {final} not written: rank {rank}: {error}; the partial folder was removed{kept}"
    )


def _finish(
    tmp: Path,
    final: Path,
    cfg: Config,
    layout: Layout,
    step: int,
    files: dict[str, Any],
    vocab_size: int,
    padded_vocab_size: int,
    hf_config: dict[str, Any] | None,
) -> None:
    """Rank 0: check every rank's files are visible, write config.yaml and meta.json (its file list) and rename."""
    problem = missing_or_resized(tmp, files)
    if problem:
        raise OSError(f"a file another rank wrote is not visible here ({problem}); checkpoints need a filesystem "
                      "every rank shares")  # fmt: skip
    (tmp / "config.yaml").write_text(dump_config(cfg))
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):  # DeepSpeed's own copies (zero_to_fp32.py)
        files.setdefault(_rel(path, tmp), file_record(path, sync=True))
    meta = {
        "format": TRAIN_FORMAT, "version": TRAIN_VERSION, "step": step, "layout": layout_record(cfg, layout.dp),
        "model": asdict(cfg.model), "vocab_size": vocab_size, "padded_vocab_size": padded_vocab_size,
        "hf_config": hf_config, TRAIN_FILES: dict(sorted(files.items())),
    }  # fmt: skip
    with (tmp / TRAIN_META).open("w") as f:
        f.write(json.dumps(meta, indent=1))
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # the same step saved again (a resumed run that re-reached it)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    _prune(cfg)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _warn_if_short_of_space(engine: Any, cfg: Config, final: Path, layout: Layout) -> None:
    """Rank 0, before writing: warn when the checkpoint will likely not fit in the free space. Its size is the
    previous checkpoint's, or an estimate (weights in their dtype plus 12 bytes of fp32 optimizer state each)."""
    previous = complete_checkpoints(cfg.train.output_dir)
    meta = _meta(previous[-1])[0] if previous else None
    if meta and meta.get(TRAIN_FILES):
        needed = total_size(meta[TRAIN_FILES])
    else:
        local = sum(p.numel() for p in engine.module.parameters())
        needed = local * layout.tp * layout.pp * (DTYPES[cfg.model.dtype].itemsize + 12)
    folder = next(p for p in (final.parent, *final.parents) if p.exists())
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if needed > free:
        print(
            f"gatedpo: warning: checkpoint {final.name} needs about {_size(needed)} and {_size(free)} are free "
            f"under {folder}: it will likely not fit",
            file=sys.stderr, flush=True,
        )  # fmt: skip


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _prune(cfg: Config) -> None:
    keep = cfg.train.keep_checkpoints
    if keep:
        for old in complete_checkpoints(cfg.train.output_dir)[:-keep]:
            shutil.rmtree(old)


def load_checkpoint(
    path: Path, engine: Any, cfg: Config, layout: Layout, *, vocab_size: int
) -> tuple[int, dict[str, Any], list[str]]:
    """Restore the engine (weights, optimizer, scheduler) and this rank's RNG; returns (step, trainer state, what
    differs from the checkpoint's layout). At the checkpoint's layout DeepSpeed loads its own files; at another
    one the state is resharded (``reshard.py``) and a rank that did not exist then takes rank 0's RNG."""
    meta = read_meta(path)
    changes = check_fits(meta, path, cfg, layout.dp, vocab_size)
    rank_file = path / "trainer" / f"rank_{layout.rank:05d}.pt"
    if changes and not rank_file.is_file():
        rank_file = path / "trainer" / f"rank_{0:05d}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {rank_file.relative_to(path)}")
    if changes:
        load_resharded(path, engine, cfg, layout, meta)
    else:
        load_path, _ = engine.load_checkpoint(
            str(path / DEEPSPEED_DIR),
            tag=DEEPSPEED_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=not cfg.model.lora.enabled,  # LoRA: the adapters only; the base is built
        )
        if load_path is None:
            raise CheckpointError(f"checkpoint {path}: DeepSpeed found no state under {path / DEEPSPEED_DIR}")
        if layout.ep > 1:
            _load_experts(engine.module, cfg, layout, path)
    state = torch.load(rank_file, map_location="cpu", weights_only=False)
    set_rng_state(state.pop("rng"))
    return int(meta["step"]), state, changes
