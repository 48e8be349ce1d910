"""Weights out of this project's training checkpoints (``OUTPUT/checkpoints/step-XXXXXXXX/``).

Two sources, both per megatron-core rank (``mp = pp_rank * T + tp_rank``, the project's ``mpu``):
- ``fp32``: the optimizer's fp32 master weights, rebuilt from the ZeRO partitions of every data-parallel rank;
- ``module``: the model weights DeepSpeed saved in ``mp_rank_XX_model_states.pt`` (ZeRO 0-2; in the model dtype).

How ZeRO lays out the fp32 masters (DeepSpeed's ``deepspeed/utils/zero_to_fp32.py`` reads them the same way):
- stage 1 and 2 (and DeepSpeed's BF16_Optimizer, which bf16 parameters get at stage 1): per parameter group, the parameters of ``param_shapes`` are flattened one after another
  (plus ``param_alignment_paddings`` when saved), and that flat vector, padded, is cut into D equal contiguous
  partitions, one per data-parallel rank (``single_partition_of_fp32_groups``);
- stage 3: every parameter is cut on its own into D pieces of ``ceil(numel / D)`` (the last padded), and each
  rank's ``fp32_flat_groups`` hold its pieces of all parameters, in order.
Unlike ``zero_to_fp32``, which concatenates every partition into one state dict, a parameter is assembled from the
pieces it needs, and the files are memory-mapped and unmapped after every 256 MiB read (``release``), so the
resident memory stays near the largest tensor, not the model.
"""

from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import Any

import torch

from gatedpo_mega.convert.errors import (
    CheckpointFormatError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
)
from gatedpo_mega.convert.folders import read_json
from gatedpo_mega.convert.hf_config import model_config_from_dict
from gatedpo_mega.convert.mapping import adapter_local_shapes, check_layout, local_shapes
from gatedpo_mega.families import expert_index
from gatedpo_mega.formats import (
    DEEPSPEED_DIR,
    DEEPSPEED_TAG,
    TRAIN_FILES,
    TRAIN_FORMAT,
    TRAIN_META,
    TRAIN_VERSION,
    experts_file,
    find_checkpoint,
    format_mismatch,
    module_states_file,
)
from gatedpo_mega.manifest import missing_or_resized

MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's first and second moments, per parameter as its fp32 master


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MissingTensorError(f"{path}: file is missing")
    try:
        # Memory-mapped: only the pages of the tensors read become resident, and only until ``release``.
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)  # type: ignore[no-any-return]
    except Exception as e:
        raise CheckpointFormatError(
            f"{path}: unreadable DeepSpeed checkpoint file ({type(e).__name__}: {e})"
        ) from None


class TrainCheckpoint:
    """A training checkpoint opened for reading one rank's tensors at a time: ``get(tp_rank, pp_rank, name)``. A
    LoRA run's (``cfg.lora.enabled``) holds the adapter factors only (``mapping.adapter_local_shapes``)."""

    def __init__(self, path: str | Path, *, source: str = "fp32") -> None:
        self.path = find_checkpoint(path, CheckpointFormatError)
        where = str(self.path / TRAIN_META)
        self.meta = read_json(self.path / TRAIN_META)
        problem = format_mismatch(self.meta, TRAIN_FORMAT, TRAIN_VERSION)
        if problem:
            raise CheckpointFormatError(f"{where}: {problem}")
        damaged = missing_or_resized(self.path, self.meta.get(TRAIN_FILES) or {})
        if damaged:  # the checksums are checked on demand: gatedpo checkpoint verify
            raise CheckpointFormatError(f"{self.path}: damaged checkpoint: {damaged}")
        self.cfg = model_config_from_dict(self.meta["model"], where)
        self.vocab_size = int(self.meta["vocab_size"])
        layout = self.meta["layout"]
        self.tensor, self.pipeline = int(layout["tensor"]), int(layout["pipeline"])
        self.data, self.zero_stage = int(layout["data"]), int(layout["zero_stage"])
        # ZeRO's partitions: one per data x context parallel rank (context 1 before the key existed)
        self.partitions = self.data * int(layout.get("context", 1))
        self.hf_config: dict[str, Any] | None = self.meta.get("hf_config")
        check_layout(self.cfg, self.tensor, self.pipeline)
        self.ds = self.path / DEEPSPEED_DIR / DEEPSPEED_TAG
        if not self.ds.is_dir():
            raise MissingTensorError(f"{self.ds}: DeepSpeed state folder is missing")
        if source not in ("fp32", "module", *MOMENTS):
            raise ValueError(source)
        # Experts split over ranks: ZeRO partitions them per expert-data-parallel group, so their weights are read
        # from the module weights, each EP rank's experts from its own file (formats.experts_file); an fp32 run's
        # module weights are its fp32 master weights.
        self.expert = int(layout.get("expert", 1))
        if self.expert > 1 and source in MOMENTS:
            raise CheckpointFormatError(
                f"{self.path}: the optimizer's {source} of a run with parallel.expert={self.expert} are not read (ZeRO "
                "partitions its experts per expert-data-parallel group)"
            )
        if self.expert > 1:
            source = "module"
        if source == "module" and self.zero_stage == 3:
            raise CheckpointFormatError(
                f"{self.path}: ZeRO 3 partitions the module weights; read the fp32 master weights instead"
            )
        self._optim_prefix = self._find_optim_prefix() if source != "module" else None
        if source in MOMENTS and self._optim_prefix is None:
            raise CheckpointFormatError(
                f"{self.path}: the optimizer's {source} is read from ZeRO 1-3 checkpoints; this one has zero_stage "
                f"{self.zero_stage}"
            )
        self.source = source if self._optim_prefix is not None else "module"
        self._check_files()
        self._ranks: dict[int, _Rank] = {}
        # Pages of memory-mapped files stay resident while mapped: unmap after this many bytes have been read.
        self.map_budget = 256 * 2**20
        self._touched = 0

    def _find_optim_prefix(self) -> str | None:
        """``zero_pp_rank_`` (ZeRO 1-3), ``bf16_zero_pp_rank_`` (stage 0 with bf16), or None (stage 0, fp32:
        the module weights are the only, fp32, copy)."""
        for prefix in ("zero_pp_rank_", "bf16_zero_pp_rank_"):
            if (self.ds / f"{prefix}0_mp_rank_00_optim_states.pt").is_file():
                return prefix
        if self.zero_stage == 0:
            return None
        raise MissingTensorError(f"{self.ds / 'zero_pp_rank_0_mp_rank_00_optim_states.pt'}: file is missing")

    def _check_files(self) -> None:
        mp = self.tensor * self.pipeline
        expected = {self._model_file(m).name for m in range(mp)}
        if self._optim_prefix is not None:
            expected |= {self._optim_file(d, m).name for d in range(self.partitions) for m in range(mp)}
        prefix = self._optim_prefix
        for f in sorted(self.ds.iterdir()):
            optim = prefix is not None and f.name.startswith(prefix) and f.name.endswith("_optim_states.pt")
            if optim and f.name not in expected:
                raise UnexpectedTensorError(
                    f"{f}: unexpected file for data {self.data} x context {self.partitions // self.data} x tensor "
                    f"{self.tensor} x pipeline {self.pipeline}"
                )
        for name in sorted(expected):
            if not (self.ds / name).is_file():
                raise MissingTensorError(f"{self.ds / name}: file is missing")

    def _model_file(self, mp: int) -> Path:
        return module_states_file(self.path, mp, self.zero_stage)

    def _optim_file(self, dp: int, mp: int) -> Path:
        return self.ds / f"{self._optim_prefix}{dp}_mp_rank_{mp:02d}_optim_states.pt"

    def _rank(self, tp_rank: int, pp_rank: int) -> _Rank:
        mp = pp_rank * self.tensor + tp_rank
        if mp not in self._ranks:
            if self.cfg.lora.enabled:  # a LoRA run saves its adapters only (exclude_frozen_parameters)
                expected = adapter_local_shapes(
                    self.cfg, tensor=self.tensor, pipeline=self.pipeline, pp_rank=pp_rank
                )
            else:
                expected = local_shapes(
                    self.cfg, self.vocab_size, tensor=self.tensor, pipeline=self.pipeline, pp_rank=pp_rank
                )
            optim = [self._optim_file(d, mp) for d in range(self.partitions)] if self._optim_prefix else None
            experts = [experts_file(self.path, e, mp) for e in range(self.expert)] if self.expert > 1 else []
            self._ranks[mp] = _Rank(
                self._model_file(mp), optim, expected, source=self.source, experts=experts
            )
        return self._ranks[mp]

    def get(self, tp_rank: int, pp_rank: int, name: str) -> torch.Tensor:
        if self._touched > self.map_budget:
            self.release()
        t = self._rank(tp_rank, pp_rank).get(name)
        self._touched += t.numel() * t.element_size()
        return t

    def release(self) -> None:
        """Unmap every file read so far (their pages leave the resident set); they are re-opened on demand."""
        for r in self._ranks.values():
            r.release()
        gc.collect()
        self._touched = 0


class _Rank:
    """One model-parallel rank: its parameter index (names, shapes, where each lives in the partitions)."""

    def __init__(
        self,
        model_file: Path,
        optim_files: list[Path] | None,
        expected: dict[str, tuple[int, ...]],
        *,
        source: str,
        experts: list[Path] | None = None,
    ) -> None:
        module = source == "module"
        self.model_file, self.optim_files, self.module, self.source = model_file, optim_files, module, source
        self.expert_files = experts or []
        self._model: dict[str, Any] | None = None
        self._optim: list[dict[str, Any]] | None = None
        state = self._model_state()
        if module:
            names = [
                k for k, v in state["module"].items() if not k.endswith("_extra_state") and v is not None
            ]
            shapes = {k: tuple(state["module"][k].shape) for k in names}
        else:
            param_shapes = state.get("param_shapes")
            if not isinstance(param_shapes, list):
                raise CheckpointFormatError(
                    f"{model_file}: no param_shapes (not a DeepSpeed model-states file)"
                )
            self.groups = [{k: tuple(v) for k, v in g.items()} for g in param_shapes]
            shapes = {k: s for g in self.groups for k, s in g.items()}
        self._check(shapes, expected)
        if not module:
            self._index()

    def _check(self, shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> None:
        where = str(self.model_file)
        for n in expected:
            if n not in shapes:
                raise MissingTensorError(f"{where}: tensor {n} is missing")
        for n, s in shapes.items():
            if n not in expected:
                raise UnexpectedTensorError(f"{where}: unexpected tensor {n}")
            if s != expected[n]:
                raise ShapeMismatchError(
                    f"{where}: tensor {n} has shape {list(s)}, expected {list(expected[n])}"
                )

    def _model_state(self) -> dict[str, Any]:
        if self._model is None:
            self._model = _load(self.model_file)
            if self.expert_files:  # its experts are one EP rank's: every EP rank's from their own files
                module = {k: v for k, v in self._model["module"].items() if expert_index(k) is None}
                for f in self.expert_files:
                    if not f.is_file():
                        raise MissingTensorError(f"{f}: file is missing")
                    module.update(_load(f)["module"])
                self._model = {**self._model, "module": module}
        return self._model

    def _optim_states(self) -> list[dict[str, Any]]:
        if self._optim is None:
            assert self.optim_files is not None
            self._optim = []
            for f in self.optim_files:
                sd = _load(f).get("optimizer_state_dict")
                groups = ("single_partition_of_fp32_groups", "fp32_flat_groups")
                if not isinstance(sd, dict) or not any(k in sd for k in groups):
                    raise CheckpointFormatError(f"{f}: not a ZeRO optimizer-states file (no fp32 partitions)")
                self._optim.append(sd)
        return self._optim

    def _index(self) -> None:
        """Where each parameter's elements are: ``self.where[name] = (group, offset, numel, shape)``."""
        states = self._optim_states()
        first = states[0]
        # DeepSpeed's BF16_Optimizer (bf16 parameters at ZeRO 1, files ``bf16_zero_pp_rank_*``) saves no
        # ``zero_stage``; its fp32 partitions are laid out as stage 1's.
        self.stage = 3 if "fp32_flat_groups" in first else 1
        world = first["partition_count"]
        world = max(world) if isinstance(world, list) else int(world)
        if world != len(states):
            raise CheckpointFormatError(
                f"{self.optim_files[0] if self.optim_files else ''}: written by {world} data-parallel ranks, "
                f"found {len(states)} files"
            )
        self.where: dict[str, tuple[int, int, int, tuple[int, ...]]] = {}
        if self.stage <= 2:
            key = "single_partition_of_fp32_groups"
            parts = first[key]
            paddings = first.get("param_alignment_paddings")
            if len(parts) != len(self.groups):
                raise CheckpointFormatError(
                    f"{self.optim_files and self.optim_files[0]}: {len(parts)} fp32 groups for "
                    f"{len(self.groups)} parameter groups"
                )
            self.partition = [int(p.numel()) for p in parts]
            for g, shapes in enumerate(self.groups):
                offset = 0
                for i, (name, shape) in enumerate(shapes.items()):
                    n = math.prod(shape)
                    self.where[name] = (g, offset, n, shape)
                    offset += n + (int(paddings[g][i]) if paddings is not None else 0)
                if offset > self.partition[g] * world:
                    raise CheckpointFormatError(
                        f"{self.optim_files and self.optim_files[0]}: group {g} holds "
                        f"{self.partition[g] * world} elements, its parameters need {offset}"
                    )
        else:
            flat = first["fp32_flat_groups"]
            self.bounds = [0]
            for t in flat:
                self.bounds.append(self.bounds[-1] + int(t.numel()))
            offset = 0
            for shapes in self.groups:
                for name, shape in shapes.items():
                    n = math.prod(shape)
                    self.where[name] = (0, offset, n, shape)
                    offset += math.ceil(n / world)
            if offset != self.bounds[-1]:
                raise CheckpointFormatError(
                    f"{self.optim_files and self.optim_files[0]}: partitions hold {self.bounds[-1]} elements per "
                    f"rank, the parameters need {offset}"
                )
        self.world = world

    def get(self, name: str) -> torch.Tensor:
        if self.module:
            return self._model_state()["module"][name].detach().clone()
        g, offset, n, shape = self.where[name]
        states = self._optim_states()
        pieces: list[torch.Tensor] = []
        if self.stage <= 2:
            size = self.partition[g]
            for r, sd in enumerate(states):
                lo, hi = max(offset, r * size), min(offset + n, (r + 1) * size)
                if lo < hi:
                    pieces.append(self._flat(sd)[g][lo - r * size : hi - r * size])
        else:
            per = math.ceil(n / self.world)
            for sd in states:
                pieces.extend(_virtual_slice(self._flat(sd), self.bounds, offset, offset + per))
        return torch.cat(pieces)[:n].view(shape).float()

    def _flat(self, sd: dict[str, Any]) -> list[torch.Tensor]:
        """The flat partitions of ``self.source`` in one rank's optimizer states: the fp32 masters, or one of
        Adam's moments (the inner optimizer's state per flat group, laid out as the masters)."""
        if self.source == "fp32":
            return sd["single_partition_of_fp32_groups" if self.stage <= 2 else "fp32_flat_groups"]  # type: ignore[no-any-return]
        inner = sd["base_optimizer_state" if self.stage <= 2 else "optimizer_state_dict"]["state"]
        try:
            return [inner[g][self.source] for g in sorted(inner)]
        except KeyError:
            raise CheckpointFormatError(
                f"{self.optim_files and self.optim_files[0]}: no {self.source} in the optimizer state (not Adam)"
            ) from None

    def release(self) -> None:
        self._model = None
        self._optim = None


def _virtual_slice(groups: list[torch.Tensor], bounds: list[int], lo: int, hi: int) -> list[torch.Tensor]:
    """Elements ``[lo, hi)`` of the concatenation of ``groups`` (whose start offsets are ``bounds``)."""
    out = []
    for i, t in enumerate(groups):
        a, b = max(lo, bounds[i]), min(hi, bounds[i + 1])
        if a < b:
            out.append(t[a - bounds[i] : b - bounds[i]])
    return out
