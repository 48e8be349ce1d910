"""Resume at another layout: a checkpoint's model and optimizer state, resharded onto this run's engine.

A checkpoint written at tensor T, pipeline P, data D and ZeRO stage Z continues at any other T', P', D', Z' (ZeRO
1-3 on both sides, the same model and global batch): every rank reads the whole (unsharded) fp32 master weight and
Adam moments of each parameter it holds, from the partitions of every rank that wrote them
(``convert.train_checkpoint``), cuts its own tensor-parallel shard out of them (``convert.mapping``: the same
functions that convert checkpoints) and writes that into its engine where its ZeRO stage keeps it: its
data-parallel partition of the fp32 masters and of the optimizer state, and the model's weights. The step count,
the learning-rate schedule, the loader position (global, independent of the layout) and the engine's counters carry
over. The result is the state the uninterrupted run had, to the rounding of a different reduction order.

What cannot carry over is refused before anything is loaded (``check_reshardable``): ZeRO stage 0 (DeepSpeed keeps
no partitions to read or write), another global batch (the loader would see other batches), another model shape,
the transformers backend (its tensors are not megatron-core's). A LoRA checkpoint's adapters reshard the same way
(each factor whole from its TP pieces, then cut as ``megatron/lora.py`` cuts it); the frozen base is built anew.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gatedpo_mega.config import Config
from gatedpo_mega.convert.errors import ConvertError
from gatedpo_mega.convert.lora_checkpoint import adapter_tensor
from gatedpo_mega.convert.mapping import HFView, iter_mcore_rank, local_name
from gatedpo_mega.convert.train_checkpoint import MOMENTS, TrainCheckpoint
from gatedpo_mega.errors import UserError
from gatedpo_mega.megatron.lora import adapter_factors
from gatedpo_mega.megatron.parallel import Layout, shard

STATES = ("fp32", *MOMENTS)


class ReshardError(UserError):
    """A checkpoint whose state cannot be resharded; every rank finds it alike (said once)."""

    every_rank = True


LAYOUT_KEYS = ("tensor", "pipeline", "context", "expert", "data", "zero_stage")
LAYOUT_DEFAULTS = {"context": 1, "expert": 1}  # what a checkpoint written before the key existed had


def layout_changes(saved: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    """``["tensor 2 -> 1", ...]``: what differs between the checkpoint's layout and this run's."""
    old = {key: saved.get(key, LAYOUT_DEFAULTS.get(key)) for key in LAYOUT_KEYS}
    return [f"{key} {old[key]} -> {mine[key]}" for key in LAYOUT_KEYS if old[key] != mine[key]]


def reshard_refusal(saved: dict[str, Any], mine: dict[str, Any], cfg: Config) -> str | None:
    """Why a checkpoint at layout ``saved`` cannot continue at ``mine`` (None: it can)."""
    if 0 in (saved.get("zero_stage"), mine["zero_stage"]):
        return "resuming at another layout needs ZeRO stage 1-3 on both sides (DeepSpeed's partitions are read and written)"
    if cfg.model.backend != "megatron":
        return "resuming at another layout needs model.backend=megatron"
    if int(saved.get("expert", 1)) > 1 or mine["expert"] > 1:
        return (
            "a checkpoint with experts split over ranks (parallel.expert > 1) resumes at its own layout (ZeRO "
            "partitions its experts over their expert-data-parallel ranks, which resharding does not read)"
        )
    return None


def load_resharded(path: Path, engine: Any, cfg: Config, layout: Layout, meta: dict[str, Any]) -> None:
    """Write the checkpoint ``path``'s model and optimizer state into ``engine`` at this run's ``layout``.

    One parameter at a time: a rank holds the whole (TP-shard) tensor of one parameter and the memory-mapped pages
    of the files it reads, never a second copy of its model or optimizer state."""
    names = {p: n for n, p in engine.module.named_parameters() if p.requires_grad}  # LoRA: the adapters
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO 3
        target: _Target = _Stage3(opt, names, layout)
    elif hasattr(opt, "bf16_groups"):  # DeepSpeed's BF16_Optimizer (bf16 at ZeRO 1)
        target = _Flat(opt.optimizer, opt.bf16_groups_flat, opt.bf16_groups, opt.fp32_groups_flat_partition,
                       names, layout)  # fmt: skip
    else:  # ZeRO 1 and 2
        target = _Flat(opt.optimizer, opt.bit16_groups_flat, opt.bit16_groups, opt.single_partition_of_fp32_groups,
                       names, layout)  # fmt: skip
    try:
        for key in STATES:
            for name, shard in _local_shards(path, key, cfg, layout, meta):
                target.put(name, key, shard)
    except ConvertError as e:
        raise ReshardError(f"cannot resume at another layout: {e}") from None
    missing = sorted(set(names.values()) - target.written)
    if missing:
        raise ReshardError(f"checkpoint {path} has no tensor for this run's parameter {missing[0]}")
    target.finish(_saved_step(path))
    saved = torch.load(_model_states(path), map_location="cpu", weights_only=False)
    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(saved["lr_scheduler"])
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    engine.global_steps = saved["global_steps"]
    engine.global_samples = saved["global_samples"]
    engine.skipped_steps = saved.get("skipped_steps", 0)


def _local_shards(
    path: Path, key: str, cfg: Config, layout: Layout, meta: dict[str, Any]
) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's tensor-parallel shard of ``key`` (fp32 master, exp_avg, exp_avg_sq) of each parameter of its
    pipeline stage, by local name, one at a time, from the checkpoint's partitions of every rank."""
    ckpt = TrainCheckpoint(path, source=key)
    if (
        cfg.model.lora.enabled
    ):  # the adapters only: each factor whole, then this rank's cut (megatron/lora.py)
        per = cfg.model.num_layers // layout.pp
        offset = layout.pp_rank * per
        for f in adapter_factors(cfg.model, range(offset, offset + per)):
            yield (
                local_name(f.name, offset),
                shard(adapter_tensor(ckpt, f), f.dim, 1, layout.tp_rank, layout.tp),
            )
        ckpt.release()
        return
    view = HFView(ckpt.get, ckpt.cfg, vocab_size=ckpt.vocab_size, tensor=ckpt.tensor, pipeline=ckpt.pipeline)
    yield from iter_mcore_rank(
        view.__getitem__, cfg.model, vocab_size=int(meta["vocab_size"]), tensor=layout.tp,
        pipeline=layout.pp, tp_rank=layout.tp_rank, pp_rank=layout.pp_rank,
    )  # fmt: skip
    ckpt.release()


def _model_states(path: Path) -> Path:
    from gatedpo_mega.formats import DEEPSPEED_DIR, DEEPSPEED_TAG

    folder = path / DEEPSPEED_DIR / DEEPSPEED_TAG
    files = sorted(folder.glob("*mp_rank_00_model_states.pt"))
    return files[0]


def _saved_step(path: Path) -> torch.Tensor:
    """Adam's step count (a tensor, as torch keeps it), from rank 0's optimizer states."""
    from gatedpo_mega.formats import DEEPSPEED_DIR, DEEPSPEED_TAG

    folder = path / DEEPSPEED_DIR / DEEPSPEED_TAG
    sd = torch.load(sorted(folder.glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt"))[0], map_location="cpu",
                    weights_only=False)["optimizer_state_dict"]  # fmt: skip
    inner = sd["base_optimizer_state" if "base_optimizer_state" in sd else "optimizer_state_dict"]["state"]
    return torch.as_tensor(next(iter(inner.values()))["step"]).clone()


def _offset(view: torch.Tensor, flat: torch.Tensor) -> int:
    """Where ``view`` (a view into ``flat``, as DeepSpeed lays parameters out) starts in ``flat``, in elements."""
    offset, rest = divmod(view.data_ptr() - flat.data_ptr(), flat.element_size())
    if rest or not 0 <= offset <= flat.numel() - view.numel():
        raise RuntimeError("a parameter is not a view into its ZeRO flat buffer")
    return offset


class _Target:
    """Where this rank's engine keeps each parameter's fp32 master, moments and weights."""

    written: set[str]

    def put(self, name: str, key: str, full: torch.Tensor) -> None:
        """``full``: this rank's TP shard of parameter ``name``'s ``key``, whole over data parallelism."""
        raise NotImplementedError

    def finish(self, step: torch.Tensor) -> None:
        """Adam's state in place, with ``step`` (torch keeps a non-fused Adam's step on the CPU)."""
        raise NotImplementedError


class _Flat(_Target):
    """ZeRO 1/2 and BF16_Optimizer: each group's parameters are views into one flat buffer, cut into equal
    contiguous data-parallel partitions; this rank's fp32 partition is ``parts[g]``, Adam's state keyed by it."""

    def __init__(
        self, inner: Any, flats: list[torch.Tensor], groups: list[list[torch.Tensor]], parts: list[torch.Tensor],
        names: dict[Any, str], layout: Layout,
    ) -> None:  # fmt: skip
        self.inner, self.parts, self.written = inner, parts, set()
        self.moments = [{k: torch.zeros_like(part) for k in MOMENTS} for part in parts]
        self.where: dict[
            str, tuple[int, int, Any]
        ] = {}  # name -> (group, offset in its flat buffer, parameter)
        for g, (flat, params) in enumerate(zip(flats, groups, strict=True)):
            for p in params:
                self.where[names[p]] = (g, _offset(p.data, flat), p)
        self.dp_rank = layout.grad_rank  # this rank's ZeRO partition (data x context)

    def put(self, name: str, key: str, full: torch.Tensor) -> None:
        g, at, p = self.where[name]
        part = self.parts[g]
        size = part.numel()
        lo, hi = max(at, self.dp_rank * size), min(at + p.numel(), (self.dp_rank + 1) * size)
        dest = part.data if key == "fp32" else self.moments[g][key]
        if lo < hi:
            dest[lo - self.dp_rank * size : hi - self.dp_rank * size] = full.reshape(-1)[lo - at : hi - at]
        if key == "fp32":
            p.data.copy_(full.view_as(p))  # the weights are replicated over data-parallel ranks: all of it
            self.written.add(name)

    def finish(self, step: torch.Tensor) -> None:
        for part, moments in zip(self.parts, self.moments, strict=True):
            self.inner.state[part] = {"step": step.clone(), **moments}


class _Stage3(_Target):
    """ZeRO 3: every parameter is cut on its own into data-parallel pieces of ``ds_tensor.numel()`` elements (the
    last padded); each sub-group's pieces are views into one flat buffer, its fp32 copy and Adam's state alike."""

    def __init__(self, opt: Any, names: dict[Any, str], layout: Layout) -> None:
        self.opt, self.layout, self.written = opt, layout, set()
        self.fp32 = opt.fp32_partitioned_groups_flat
        self.moments = [{k: torch.zeros_like(f) for k in MOMENTS} for f in self.fp32]
        self.where: dict[
            str, tuple[int, int, Any]
        ] = {}  # name -> (sub-group, offset of its piece, parameter)
        for i, (params, flat) in enumerate(
            zip(opt.fp16_groups, opt.fp16_partitioned_groups_flat, strict=True)
        ):
            for p in params:
                self.where[names[p]] = (i, _offset(p.ds_tensor, flat), p)

    def put(self, name: str, key: str, full: torch.Tensor) -> None:
        i, at, p = self.where[name]
        # ZeRO partitions over data x context
        n, rank, dp = p.ds_tensor.numel(), self.layout.grad_rank, self.layout.dp * self.layout.cp
        flat = full.reshape(-1)
        mine = torch.cat([flat, flat.new_zeros(n * dp - flat.numel())])[rank * n : (rank + 1) * n]
        if key == "fp32":
            self.fp32[i].data[at : at + n] = mine
            p.ds_tensor.data.copy_(mine.to(p.ds_tensor.dtype))
            self.written.add(name)
        else:
            self.moments[i][key][at : at + n] = mine

    def finish(self, step: torch.Tensor) -> None:
        for fp32, moments in zip(self.fp32, self.moments, strict=True):
            self.opt.optimizer.state[fp32] = {"step": step.clone(), **moments}
