"""A LoRA run's training checkpoint as Hugging Face weights: its adapters (full factors, gathered over TP) on its
frozen base.

The checkpoint holds the adapters only; the base is what ``model.init_from`` named when the run trained (a Hugging
Face folder, an mcore folder, a training checkpoint, a Hub id from the local cache) or, with none, the seeded
initialisation drawn again from the run's ``train.seed`` (``megatron.model.init_tensor``, as ``init_parameters``
drew it). ``hf_weights`` gives the Hugging Face state dict of either kind of checkpoint: a LoRA one's each adapted
linear ``W + (B @ A) * alpha / r``, as PEFT's ``merge_and_unload`` computes it, in float32 from ``W`` cast to the
run's dtype (the weights the run trained on).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import yaml

from gatedpo_mega.config import ModelConfig
from gatedpo_mega.convert.errors import CheckpointFormatError, ShapeMismatchError
from gatedpo_mega.convert.folders import HFFolder
from gatedpo_mega.convert.mapping import HFView, check_hf_names, hf_shapes, local_name, stage_params
from gatedpo_mega.convert.mcore import McoreFolder
from gatedpo_mega.convert.peft import hf_module
from gatedpo_mega.convert.train_checkpoint import TrainCheckpoint
from gatedpo_mega.formats import DTYPES, MCORE_META, TRAIN_META
from gatedpo_mega.megatron.lora import Factor, adapter_factors
from gatedpo_mega.megatron.model import init_tensor
from gatedpo_mega.megatron.parallel import shard, unshard


def adapter_tensor(ckpt: TrainCheckpoint, f: Factor) -> torch.Tensor:
    """The full factor ``f`` (float32): its TP pieces read from ``ckpt`` and put together along ``f.dim``."""
    per = ckpt.cfg.num_layers // ckpt.pipeline
    pp = f.layer // per
    local = local_name(f.name, pp * per)
    return unshard([ckpt.get(t, pp, local) for t in range(ckpt.tensor if f.dim is not None else 1)], f.dim, 1)


def seeded_weights(cfg: ModelConfig, vocab_size: int, *, tensor: int, seed: int) -> HFView:
    """The Hugging Face state dict of the model ``build_model`` initialises from ``seed`` at ``tensor`` (the padded
    embedding's shape depends on it), each tensor drawn when read."""
    params = {p.name: p for p in stage_params(cfg, vocab_size, tensor=tensor, pipeline=1, pp_rank=0)}
    drawn: dict[str, torch.Tensor] = {}  # the last full tensor, for its other TP pieces

    def get(tp_rank: int, pp_rank: int, name: str) -> torch.Tensor:
        p = params[name]
        if name not in drawn:
            drawn.clear()
            drawn[name] = init_tensor(cfg, name, p.shape, seed)
        return shard(drawn[name], p.dim, p.stride, tp_rank, tensor)

    return HFView(get, cfg, vocab_size=vocab_size, tensor=tensor, pipeline=1)


def _run_seed(ckpt: TrainCheckpoint) -> int:
    path = ckpt.path / "config.yaml"
    try:
        seed = yaml.safe_load(path.read_text())["train"]["seed"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        seed = None
    if not isinstance(seed, int):
        raise CheckpointFormatError(
            f"{path}: no train.seed (the LoRA adapters' base is the seeded initialisation: model.init_from is empty)"
        )
    return seed


def _fits(shapes: dict[str, tuple[int, ...]], ckpt: TrainCheckpoint) -> None:
    """The base's Hugging Face tensors (``shapes``) are the ones the checkpoint's model has."""
    for name, shape in hf_shapes(ckpt.cfg, ckpt.vocab_size).items():
        if shapes.get(name) != shape:
            raise ShapeMismatchError(
                f"{ckpt.path / TRAIN_META}: model.init_from={ckpt.cfg.init_from}: tensor {name} has shape "
                f"{list(shapes.get(name, ()))}, the checkpoint's LoRA adapters were trained on {list(shape)}"
            )


def _base(ckpt: TrainCheckpoint, stack: contextlib.ExitStack) -> Mapping[str, torch.Tensor]:
    """The Hugging Face state dict of the base ``ckpt``'s adapters were trained on."""
    cfg, text = ckpt.cfg, ckpt.cfg.init_from
    if not text:
        return seeded_weights(cfg, ckpt.vocab_size, tensor=ckpt.tensor, seed=_run_seed(ckpt))
    from gatedpo_mega.hub import hub_id, resolve_model

    ident = hub_id(text)
    path = resolve_model(ident) if ident else Path(text)
    if not path.exists():
        raise CheckpointFormatError(
            f"{ckpt.path / TRAIN_META}: model.init_from={text} does not exist (the base of the checkpoint's LoRA "
            "adapters)"
        )
    view: Mapping[str, torch.Tensor]
    if (path / MCORE_META).is_file():
        folder = McoreFolder(path)
        stack.callback(folder.close)
        mcore = HFView(
            folder.get,
            folder.cfg,
            vocab_size=folder.vocab_size,
            tensor=folder.tensor,
            pipeline=folder.pipeline,
        )
        _fits(mcore.shapes, ckpt)
        view = mcore
    elif (path / "config.json").is_file():
        hf = HFFolder(path)
        stack.callback(hf.close)
        check_hf_names(set(hf), cfg, ckpt.vocab_size, str(path), hf.shape)
        view = hf
    else:
        base = TrainCheckpoint(path)
        stack.callback(base.release)
        view = hf_weights(base, stack)
        _fits(hf_shapes(base.cfg, base.vocab_size), ckpt)
    return view


class MergedView(Mapping[str, torch.Tensor]):
    """The Hugging Face state dict of a LoRA checkpoint: ``base`` with each adapted linear's ``(B @ A) * scale``
    added."""

    def __init__(self, base: Mapping[str, torch.Tensor], ckpt: TrainCheckpoint) -> None:
        self.base, self.ckpt = base, ckpt
        self.dtype, self.scale = DTYPES[ckpt.cfg.dtype], ckpt.cfg.lora.scale
        self.shapes = hf_shapes(ckpt.cfg, ckpt.vocab_size)
        self.factors: dict[str, dict[str, Factor]] = {}  # Hugging Face weight -> {"A": ..., "B": ...}
        for f in adapter_factors(ckpt.cfg, range(ckpt.cfg.num_layers)):
            self.factors.setdefault(f"{hf_module(f.layer, f.site, f.hf)}.weight", {})[f.factor] = f

    def __getitem__(self, name: str) -> torch.Tensor:
        w = self.base[name].to(self.dtype)  # as the run held it
        if name not in self.factors:
            return w
        a, b = (adapter_tensor(self.ckpt, self.factors[name][k]) for k in "AB")
        return w.float() + (b @ a) * self.scale  # PEFT's merge: W + (B @ A) * scaling

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def hf_weights(ckpt: TrainCheckpoint, stack: contextlib.ExitStack) -> Mapping[str, torch.Tensor]:
    """The Hugging Face state dict of ``ckpt``'s model: its own weights, or for a LoRA run its adapters merged into
    its base (whose files ``stack`` closes)."""
    if not ckpt.cfg.lora.enabled:
        return HFView(
            ckpt.get, ckpt.cfg, vocab_size=ckpt.vocab_size, tensor=ckpt.tensor, pipeline=ckpt.pipeline
        )
    return MergedView(_base(ckpt, stack), ckpt)
