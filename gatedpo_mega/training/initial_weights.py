"""Initial weights from ``model.init_from``: a training checkpoint of this project, a megatron-core folder written by
``gatedpo convert``, or a Hugging Face model folder (converted for this rank on the way in)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gatedpo_mega.config import Config, ModelConfig
from gatedpo_mega.errors import UserError
from gatedpo_mega.families import SHAPE_FIELDS, first_difference
from gatedpo_mega.formats import MCORE_META, module_states_file
from gatedpo_mega.megatron.parallel import Layout
from gatedpo_mega.training.checkpoint import (
    CheckpointError,
    check_fits,
    layout_record,
    read_meta,
    resolve_checkpoint,
)

# A Hugging Face folder also fixes the function the weights compute: its norm epsilon and rotary base.
HF_FIELDS = (*SHAPE_FIELDS, "norm_epsilon", "rotary_base")


def source_kind(path: Path) -> str:
    """``checkpoint`` | ``mcore`` | ``hf``, from the marker file the folder holds."""
    if not path.exists():
        raise UserError(f"model.init_from={path} does not exist")
    if (path / MCORE_META).is_file():
        return "mcore"
    if (path / "config.json").is_file():
        return "hf"
    resolve_checkpoint(path)  # raises with the reason when it is not one
    return "checkpoint"


def source_identity(path_text: str) -> str:
    """A short hash of what the initial weights are (names, sizes and times of the files): the reference
    log-probs cached for one source are never read for another."""
    if not path_text:
        return ""
    path = Path(path_text)
    if source_kind(path) == "checkpoint":
        path = resolve_checkpoint(path)
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def source_vocab_size(path_text: str) -> int:
    """The true vocabulary size of ``model.init_from`` (0 when there is none)."""
    if not path_text:
        return 0
    path = Path(path_text)
    kind = source_kind(path)
    if kind == "hf":
        return int(json.loads((path / "config.json").read_text())["vocab_size"])
    if kind == "mcore":
        return int(json.loads((path / MCORE_META).read_text())["vocab_size"])
    return int(read_meta(resolve_checkpoint(path))["vocab_size"])


def source_hf_config(path_text: str) -> dict[str, Any] | None:
    """The Hugging Face ``config.json`` behind ``model.init_from``, when there is one (None otherwise)."""
    if not path_text:
        return None
    path = Path(path_text)
    kind = source_kind(path)
    if kind == "hf":
        return dict(json.loads((path / "config.json").read_text()))
    meta = (
        json.loads((path / MCORE_META).read_text())
        if kind == "mcore"
        else read_meta(resolve_checkpoint(path))
    )
    return meta.get("hf_config")


def _parameters_only(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if not k.endswith("_extra_state")}


def load_checkpoint_weights(
    model: torch.nn.Module, src: Path, cfg: Config, layout: Layout, vocab: int
) -> None:
    """This rank's weights from a training checkpoint: its module weights when it was written at this tensor x
    pipeline layout (any data-parallel size, ZeRO 0-2); otherwise (another layout, or ZeRO-3 partitions) resharded
    on the way in from the fp32 master weights, reading only the tensors this rank keeps."""
    path = resolve_checkpoint(src)
    meta = read_meta(path)
    theirs = meta["layout"]
    # Only the weights are read: the layout may differ (checked below by shape, through the mapping).
    check_fits({**meta, "layout": layout_record(cfg, layout.dp)}, path, cfg, layout.dp, vocab)
    where = f"model.init_from={path}"
    if (theirs["tensor"], theirs["pipeline"]) == (layout.tp, layout.pp) and theirs["zero_stage"] < 3:
        f = module_states_file(path, layout.pp_rank * layout.tp + layout.tp_rank, theirs["zero_stage"])
        if not f.is_file():
            raise CheckpointError(f"{where}: {f.relative_to(path)} is missing")
        state = torch.load(f, map_location="cpu", weights_only=False)["module"]
        copy_weights(model, _parameters_only(state), where)
        return
    from gatedpo_mega.convert import hf_to_mcore_state
    from gatedpo_mega.convert.mapping import HFView
    from gatedpo_mega.convert.train_checkpoint import TrainCheckpoint

    ckpt = TrainCheckpoint(path)
    view = HFView(ckpt.get, ckpt.cfg, vocab_size=vocab, tensor=ckpt.tensor, pipeline=ckpt.pipeline)
    local = hf_to_mcore_state(
        view, cfg.model, vocab_size=vocab, tensor=layout.tp, pipeline=layout.pp, tp_rank=layout.tp_rank,
        pp_rank=layout.pp_rank,
    )  # fmt: skip
    copy_weights(model, local, where)
    ckpt.release()


def copy_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``state`` into ``model``'s parameters, refusing a missing, extra or mis-shaped tensor by name."""
    params = _parameters_only(dict(model.state_dict()))
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise CheckpointError(f"{where}: {what} ({len(missing)} missing, {len(extra)} unexpected tensors)")
    with torch.no_grad():
        for name, target in params.items():
            value = state[name]
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"{where}: {name} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}"
                )
            target.copy_(value.to(target.dtype))


def load_initial_weights(model: torch.nn.Module, cfg: Config, layout: Layout, vocab_size: int) -> None:
    src = Path(cfg.model.init_from)
    kind = source_kind(src)
    if kind == "checkpoint":
        load_checkpoint_weights(model, src, cfg, layout, vocab_size)
        return
    from gatedpo_mega import convert
    from gatedpo_mega.convert.folders import HFFolder

    if kind == "mcore":
        convert.load_mcore_weights(
            model, src, cfg=cfg.model, vocab_size=vocab_size, tp_rank=layout.tp_rank, tp=layout.tp,
            pp_rank=layout.pp_rank, pp=layout.pp,
        )  # fmt: skip
        return
    hf_config = json.loads((src / "config.json").read_text())
    want, hf_vocab = convert.hf_model_config(hf_config)
    _check_shape(cfg, want, vocab_size, hf_vocab, src)
    state = HFFolder(src)  # lazy: this rank reads only the tensors it keeps
    local = convert.hf_to_mcore_state(
        state, cfg.model, vocab_size=vocab_size, tensor=layout.tp, pipeline=layout.pp, tp_rank=layout.tp_rank,
        pp_rank=layout.pp_rank,
    )  # fmt: skip
    copy_weights(model, local, f"model.init_from={src}")


def _check_shape(cfg: Config, want: ModelConfig, vocab_size: int, hf_vocab: int, src: Path) -> None:
    differs = first_difference(asdict(want), asdict(cfg.model), HF_FIELDS)
    if differs:
        key, theirs, mine = differs
        raise UserError(f"model.{key}={mine!r} but model.init_from={src} has {theirs!r}")
    if vocab_size != hf_vocab:
        raise UserError(f"model.init_from={src} has a vocabulary of {hf_vocab}; this run's is {vocab_size}")
