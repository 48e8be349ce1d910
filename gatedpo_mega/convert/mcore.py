"""The mcore folder: a megatron-core checkpoint at one tensor x pipeline layout, one safetensors file per rank.

``DIR/gatedpo_mcore.json`` holds the model config, the true and padded vocabulary, the layout, the dtype and the
original Hugging Face ``config.json``; ``DIR/tp{t:02d}_pp{p:02d}.safetensors`` holds rank (t, p)'s local state dict
with the names ``build_model`` gives it; ``DIR/tokenizer/`` the tokenizer files and ``generation_config.json`` of the
Hugging Face source, so the way back can restore them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gatedpo_mega.config import ModelConfig
from gatedpo_mega.convert.errors import (
    CheckpointFormatError,
    LayoutMismatchError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
)
from gatedpo_mega.convert.folders import read_json
from gatedpo_mega.convert.hf_config import model_config_dict, model_config_from_dict
from gatedpo_mega.convert.mapping import check_layout, iter_mcore_rank, local_shapes
from gatedpo_mega.convert.safetensors_io import SafetensorsReader, write_safetensors
from gatedpo_mega.families import SHAPE_FIELDS, expert_renamed, first_difference
from gatedpo_mega.formats import DTYPES, MCORE_FORMAT, MCORE_META, MCORE_VERSION
from gatedpo_mega.megatron.model import padded_vocab_size


def rank_file(tp_rank: int, pp_rank: int) -> str:
    return f"tp{tp_rank:02d}_pp{pp_rank:02d}.safetensors"


def read_mcore_meta(src: str | Path) -> dict[str, Any]:
    """``gatedpo_mcore.json`` of an mcore folder, checked for format and version."""
    path = Path(src) / MCORE_META
    if not path.exists():
        raise CheckpointFormatError(
            f"{src}: not an mcore folder (no {MCORE_META}; convert one with gatedpo convert hf-to-mcore)"
        )
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != MCORE_FORMAT:
        raise CheckpointFormatError(f"{path}: format is not {MCORE_FORMAT!r}")
    if meta.get("version") != MCORE_VERSION:
        raise CheckpointFormatError(
            f"{path}: version {meta.get('version')} is not supported ({MCORE_VERSION})"
        )
    for key in ("model", "vocab_size", "padded_vocab_size", "tensor", "pipeline", "dtype"):
        if key not in meta:
            raise CheckpointFormatError(f"{path}: key {key!r} is missing")
    return meta


def mcore_meta(
    cfg: ModelConfig, vocab_size: int, *, tensor: int, pipeline: int, hf_config: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "format": MCORE_FORMAT,
        "version": MCORE_VERSION,
        "model": model_config_dict(cfg),
        "vocab_size": vocab_size,
        "padded_vocab_size": padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by, tensor),
        "tensor": tensor,
        "pipeline": pipeline,
        "dtype": cfg.dtype,
        "hf_config": hf_config,
    }


def write_mcore_folder(
    dst: Path,
    hf_get: Callable[[str], torch.Tensor],
    cfg: ModelConfig,
    *,
    vocab_size: int,
    tensor: int,
    pipeline: int,
    hf_config: dict[str, Any] | None,
    after_rank: Callable[[], None] | None = None,
) -> None:
    """One rank file at a time, one tensor at a time (``hf_get`` is called per tensor as it is needed)."""
    from tqdm import tqdm

    check_layout(cfg, tensor, pipeline)
    dtype = DTYPES[cfg.dtype]
    bar = tqdm(total=tensor * pipeline, desc="writing rank files", unit="file", delay=2.0, leave=False)
    for pp in range(pipeline):
        shapes = local_shapes(cfg, vocab_size, tensor=tensor, pipeline=pipeline, pp_rank=pp)
        for tp in range(tensor):
            tensors = iter_mcore_rank(
                hf_get, cfg, vocab_size=vocab_size, tensor=tensor, pipeline=pipeline, tp_rank=tp, pp_rank=pp
            )
            entries = {n: (s, dtype) for n, s in shapes.items()}
            write_safetensors(dst / rank_file(tp, pp), entries, tensors, {"format": "pt"})
            bar.update(1)
            if after_rank is not None:
                after_rank()
    bar.close()
    meta = mcore_meta(cfg, vocab_size, tensor=tensor, pipeline=pipeline, hf_config=hf_config)
    (dst / MCORE_META).write_text(json.dumps(meta, indent=2) + "\n")


class McoreFolder:
    """An mcore folder opened for reading: every rank file's tensor names and shapes checked against the config;
    ``get(tp_rank, pp_rank, name)`` reads one tensor."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.meta = read_mcore_meta(self.root)
        self.cfg = model_config_from_dict(self.meta["model"], str(self.root / MCORE_META))
        self.vocab_size = int(self.meta["vocab_size"])
        self.tensor, self.pipeline = int(self.meta["tensor"]), int(self.meta["pipeline"])
        self.hf_config: dict[str, Any] | None = self.meta.get("hf_config")
        check_layout(self.cfg, self.tensor, self.pipeline)
        padded = padded_vocab_size(self.vocab_size, self.cfg.make_vocab_size_divisible_by, self.tensor)
        if padded != self.meta["padded_vocab_size"]:
            raise CheckpointFormatError(
                f"{self.root / MCORE_META}: padded_vocab_size {self.meta['padded_vocab_size']} != {padded} "
                f"(vocab_size {self.vocab_size}, make_vocab_size_divisible_by "
                f"{self.cfg.make_vocab_size_divisible_by}, tensor {self.tensor})"
            )
        expected = {rank_file(t, p) for t in range(self.tensor) for p in range(self.pipeline)}
        for f in sorted(self.root.glob("*.safetensors")):
            if f.name not in expected:
                raise UnexpectedTensorError(
                    f"{f}: unexpected rank file (the folder is tensor {self.tensor} x pipeline {self.pipeline})"
                )
        self._readers: dict[tuple[int, int], SafetensorsReader] = {}
        for p in range(self.pipeline):
            shapes = local_shapes(
                self.cfg, self.vocab_size, tensor=self.tensor, pipeline=self.pipeline, pp_rank=p
            )
            for t in range(self.tensor):
                path = self.root / rank_file(t, p)
                if not path.exists():
                    raise MissingTensorError(f"{path}: rank file is missing")
                r = SafetensorsReader(path)
                check_local_names(r.names(), r.shape, shapes, str(path))
                self._readers[(t, p)] = r

    def get(self, tp_rank: int, pp_rank: int, name: str) -> torch.Tensor:
        return self._readers[(tp_rank, pp_rank)].read(name)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()


def check_local_names(
    names: list[str],
    shape_of: Callable[[str], tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    where: str,
) -> None:
    have = set(names)
    for n in expected:
        if n not in have:
            raise MissingTensorError(f"{where}: tensor {n} is missing")
    for n in names:
        if n not in expected:
            raise UnexpectedTensorError(f"{where}: unexpected tensor {n}")
        if tuple(shape_of(n)) != tuple(expected[n]):
            raise ShapeMismatchError(
                f"{where}: tensor {n} has shape {list(shape_of(n))}, expected {list(expected[n])}"
            )


def load_mcore_weights(
    model: torch.nn.Module,
    src: str | Path,
    *,
    cfg: ModelConfig,
    vocab_size: int,
    tp_rank: int,
    tp: int,
    pp_rank: int,
    pp: int,
    expert_offset: int = 0,
) -> None:
    """Copy rank (``tp_rank``, ``pp_rank``)'s tensors from the mcore folder ``src`` into ``model`` (built by
    ``build_model``); a different layout, model shape, vocabulary or tensor set is refused in one line. Under expert
    parallelism the model holds experts ``expert_offset`` on as its 0 on (the folder holds every expert)."""
    meta = read_mcore_meta(src)
    if (meta["tensor"], meta["pipeline"]) != (tp, pp):
        raise LayoutMismatchError(
            f"{src} is laid out for tensor {meta['tensor']} x pipeline {meta['pipeline']}, this run is tensor {tp} x "
            f"pipeline {pp}: gatedpo convert reshard --src {src} --dst DIR --tensor {tp} --pipeline {pp}"
        )
    saved = meta["model"]
    differs = first_difference(saved, model_config_dict(cfg), SHAPE_FIELDS)
    if differs:
        field, theirs, mine = differs
        raise LayoutMismatchError(f"{src}: model.{field} is {theirs} in the checkpoint, {mine} in this run")
    if meta["vocab_size"] != vocab_size:
        raise LayoutMismatchError(
            f"{src}: vocabulary size is {meta['vocab_size']} in the checkpoint, {vocab_size} in this run"
        )
    padded = padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by, tp)
    if meta["padded_vocab_size"] != padded:
        raise LayoutMismatchError(
            f"{src}: padded vocabulary is {meta['padded_vocab_size']} in the checkpoint, {padded} in this run "
            f"(model.make_vocab_size_divisible_by={cfg.make_vocab_size_divisible_by}; the checkpoint used "
            f"{saved.get('make_vocab_size_divisible_by')})"
        )
    state = {
        k: v
        for k, v in model.state_dict().items()
        if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)
    }
    path = Path(src) / rank_file(tp_rank, pp_rank)
    if not path.exists():
        raise MissingTensorError(f"{path}: rank file is missing")
    stored = {k: expert_renamed(k, expert_offset) for k in state}  # this rank's name -> the folder's
    with SafetensorsReader(path) as r:
        expected = {k: tuple(v.shape) for k, v in state.items()}
        if expert_offset or cfg.num_experts:
            # every expert is in the folder; this rank holds a slice of them
            expected = {stored[k]: s for k, s in expected.items()}
            folder = local_shapes(cfg, vocab_size, tensor=tp, pipeline=pp, pp_rank=pp_rank)
            check_local_names(r.names(), r.shape, folder, str(path))
            for k, s in expected.items():
                if folder.get(k) != s:
                    raise ShapeMismatchError(
                        f"{path}: tensor {k} has shape {folder.get(k)}, expected {list(s)}"
                    )
        else:
            check_local_names(r.names(), r.shape, expected, str(path))
        with torch.no_grad():
            for name, target in state.items():
                target.copy_(r.read(stored[name]))
