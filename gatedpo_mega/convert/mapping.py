"""Hugging Face Llama-family tensors <-> megatron-core ``GPTModel`` tensors at any tensor x pipeline layout.

Which tensors a layer has, their names on both sides and how TP cuts each are ``families.layer_tensors``; this
module lays them out per rank and fuses or splits the parts megatron-core keeps as one tensor.

Pure functions over tensors; the sources are callables or mappings, so a lazy mapping (a safetensors folder, a
DeepSpeed checkpoint) streams one tensor at a time.

megatron-core's layout (0.16.1 to 0.19.x, ``gpt_layer_specs.get_gpt_layer_local_spec``):
- ``linear_qkv`` rows are per query group ``[q heads of the group; k; v]`` (``attention.py``
  ``get_query_key_value_tensors`` views ``[ng, (np/ng + 2) * hn]``), cut over TP along rows (stride 1), so each rank
  holds whole groups;
- ``linear_fc1`` is ``[gate; up]`` cut with ``partition_stride=2`` (``mlp.py``): rank r holds
  ``[gate_r; up_r]``;
- ``linear_proj`` and ``linear_fc2`` are cut along columns; the embedding and output layer along (padded) rows;
- rotary embeddings rotate halves (``rotary_interleaved=False``), as Hugging Face's ``rotate_half``, so q/k rows
  need no permutation.
Layer names are local to a pipeline stage: stage p holds global layers ``p * L / PP + i`` as ``decoder.layers.i``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from gatedpo_mega.config import ModelConfig
from gatedpo_mega.convert.errors import (
    LayoutMismatchError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
)
from gatedpo_mega.families import LAYER, Shape, expert_index, expert_renamed, layer_tensors
from gatedpo_mega.megatron.lora import adapter_factors
from gatedpo_mega.megatron.model import padded_vocab_size
from gatedpo_mega.megatron.parallel import indivisible, shard, unshard


@dataclass(frozen=True, slots=True)
class Param:
    """One megatron-core parameter, global name and full (unsharded, padded) shape, and how TP cuts it."""

    name: str  # global name (layer index after the pipeline offset)
    shape: Shape
    dim: int | None  # the dimension TP cuts, or None (replicated)
    stride: int = 1
    hf: tuple[str, ...] = ()  # the Hugging Face tensors it is made of (fused in this order)


def check_layout(cfg: ModelConfig, tensor: int, pipeline: int) -> None:
    """The layout constraints of ``megatron.parallel.validate_layout``, for a conversion."""
    if tensor < 1 or pipeline < 1:
        raise LayoutMismatchError(f"--tensor and --pipeline must be >= 1, got {tensor} and {pipeline}")
    bad = indivisible(cfg, tensor, pipeline)
    if bad:
        field, value, axis, size = bad
        raise LayoutMismatchError(f"model {field}={value} is not divisible by --{axis} {size}")


def hf_shapes(cfg: ModelConfig, vocab_size: int) -> dict[str, Shape]:
    """The Hugging Face state dict's names and shapes, in the order they are written."""
    h = cfg.hidden_size
    out: dict[str, Shape] = {"model.embed_tokens.weight": (vocab_size, h)}
    layer = layer_tensors(cfg)
    for i in range(cfg.num_layers):
        for t in layer:
            out.update((f"model.layers.{i}.{n}", s) for n, s in zip(t.hf, t.hf_shapes, strict=True))
    out["model.norm.weight"] = (h,)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (vocab_size, h)
    return out


def stage_params(
    cfg: ModelConfig, vocab_size: int, *, tensor: int, pipeline: int, pp_rank: int
) -> list[Param]:
    """The megatron-core parameters of pipeline stage ``pp_rank`` (global names, full shapes), in order."""
    h = cfg.hidden_size
    vp = padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by, tensor)
    per = cfg.num_layers // pipeline
    first, last = pp_rank == 0, pp_rank == pipeline - 1
    embed = ("model.embed_tokens.weight",)
    out: list[Param] = []
    if first:
        out.append(Param("embedding.word_embeddings.weight", (vp, h), 0, hf=embed))
    layer = layer_tensors(cfg)
    for g in range(pp_rank * per, (pp_rank + 1) * per):
        for t in layer:
            hf = tuple(f"model.layers.{g}.{n}" for n in t.hf)
            out.append(Param(f"decoder.layers.{g}.{t.mcore}", t.shape, t.dim, t.stride, hf))
    if last:
        out.append(Param("decoder.final_layernorm.weight", (h,), None, hf=("model.norm.weight",)))
        if not cfg.tie_embeddings or pipeline > 1:  # tied at PP 1: the embedding itself is the output layer
            out.append(
                Param(
                    "output_layer.weight", (vp, h), 0, hf=embed if cfg.tie_embeddings else ("lm_head.weight",)
                )
            )
    return out


def local_name(global_name: str, layer_offset: int) -> str:
    m = LAYER.match(global_name)
    return f"decoder.layers.{int(m.group(1)) - layer_offset}.{m.group(2)}" if m else global_name


def local_shape(p: Param, tensor: int) -> Shape:
    if p.dim is None:
        return p.shape
    s = list(p.shape)
    s[p.dim] //= tensor
    return tuple(s)


def local_shapes(
    cfg: ModelConfig, vocab_size: int, *, tensor: int, pipeline: int, pp_rank: int
) -> dict[str, Shape]:
    """The local state dict's names and shapes of any TP rank of stage ``pp_rank``, as ``build_model`` has them
    (``_extra_state`` entries left out)."""
    offset = pp_rank * (cfg.num_layers // pipeline)
    return {
        local_name(p.name, offset): local_shape(p, tensor)
        for p in stage_params(cfg, vocab_size, tensor=tensor, pipeline=pipeline, pp_rank=pp_rank)
    }


def adapter_local_shapes(cfg: ModelConfig, *, tensor: int, pipeline: int, pp_rank: int) -> dict[str, Shape]:
    """The LoRA factors of stage ``pp_rank`` (``megatron/lora.py``), local names and shapes as any TP rank holds
    them: all that a LoRA run's checkpoint holds (its base is ``model.init_from``'s)."""
    per = cfg.num_layers // pipeline
    out: dict[str, Shape] = {}
    for f in adapter_factors(cfg, range(pp_rank * per, (pp_rank + 1) * per)):
        shape = list(f.shape)
        if f.dim is not None:
            shape[f.dim] //= tensor
        out[local_name(f.name, pp_rank * per)] = tuple(shape)
    return out


def _fuse(p: Param, parts: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """The full megatron-core tensor from its Hugging Face parts."""
    if p.name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        (w,) = parts
        if w.shape[0] == p.shape[0]:
            return w
        return torch.cat([w, w.new_zeros(p.shape[0] - w.shape[0], *w.shape[1:])])  # padding rows are zero
    if "linear_qkv" in p.name:
        q, k, v = parts
        ng = cfg.num_query_groups
        rest = q.shape[1:]
        grouped = [q.reshape(ng, -1, *rest), k.reshape(ng, -1, *rest), v.reshape(ng, -1, *rest)]
        return torch.cat(grouped, dim=1).reshape(-1, *rest)
    if "linear_fc1" in p.name:
        return torch.cat(parts)
    (w,) = parts
    return w


def _split(p: Param, full: torch.Tensor, cfg: ModelConfig, vocab_size: int) -> list[torch.Tensor]:
    """The inverse of ``_fuse``: the Hugging Face parts of a full megatron-core tensor."""
    if p.name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return [full[:vocab_size]]
    if "linear_qkv" in p.name:
        ng, hn = cfg.num_query_groups, cfg.kv_channels
        qpg = cfg.num_attention_heads // ng * hn
        rest = full.shape[1:]
        g = full.reshape(ng, qpg + 2 * hn, *rest)
        q, k, v = torch.split(g, [qpg, hn, hn], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]
    if "linear_fc1" in p.name:
        return list(torch.chunk(full, 2))
    return [full]


def check_hf_names(
    names: set[str], cfg: ModelConfig, vocab_size: int, where: str, shape_of: Callable[[str], Shape]
) -> None:
    """Missing, unexpected or mis-shaped tensors of a Hugging Face checkpoint, named."""
    expected = hf_shapes(cfg, vocab_size)
    allowed_extra = (
        {"lm_head.weight"} if cfg.tie_embeddings else set()
    )  # some tied checkpoints store it anyway
    for name in expected:
        if name not in names:
            raise MissingTensorError(f"{where}: tensor {name} is missing")
    for name in sorted(names):
        if name not in expected and name not in allowed_extra and not name.endswith("rotary_emb.inv_freq"):
            raise UnexpectedTensorError(
                f"{where}: unexpected tensor {name} (not part of a {cfg_kind(cfg)} model)"
            )
    for name, shape in expected.items():
        got = tuple(shape_of(name))
        if got != shape:
            raise ShapeMismatchError(f"{where}: tensor {name} has shape {list(got)}, expected {list(shape)}")


def cfg_kind(cfg: ModelConfig) -> str:
    return (
        f"{cfg.num_layers}-layer, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads / "
        f"{cfg.num_query_groups} groups, ffn {cfg.ffn_hidden_size}"
    )


def expert_slice(cfg: ModelConfig, expert: int, ep_rank: int) -> range:
    """The global indices of the experts expert-parallel rank ``ep_rank`` of ``expert`` holds."""
    per = cfg.num_experts // expert
    return range(ep_rank * per, (ep_rank + 1) * per)


def iter_mcore_rank(
    hf_get: Callable[[str], torch.Tensor],
    cfg: ModelConfig,
    *,
    vocab_size: int,
    tensor: int,
    pipeline: int,
    tp_rank: int,
    pp_rank: int,
    expert: int = 1,
    ep_rank: int = 0,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(local name, tensor)`` of one rank, one at a time, from ``hf_get(hf_name)``. Under expert parallelism
    (``expert`` > 1) the rank holds its slice of the experts, numbered from 0 (stored folders hold them all: EP cuts
    no tensor, it only picks whole experts)."""
    check_layout(cfg, tensor, pipeline)
    offset = pp_rank * (cfg.num_layers // pipeline)
    mine = expert_slice(cfg, expert, ep_rank) if cfg.num_experts else range(0)
    for p in stage_params(cfg, vocab_size, tensor=tensor, pipeline=pipeline, pp_rank=pp_rank):
        e = expert_index(p.name)
        if e is not None and e not in mine:
            continue
        full = _fuse(p, [hf_get(n) for n in p.hf], cfg)
        if tuple(full.shape) != p.shape:
            raise ShapeMismatchError(
                f"tensor {p.name} built from {', '.join(p.hf)} has shape {list(full.shape)}, "
                f"expected {list(p.shape)}"
            )
        name = (
            local_name(p.name, offset)
            if e is None
            else expert_renamed(local_name(p.name, offset), -mine.start)
        )
        yield name, shard(full, p.dim, p.stride, tp_rank, tensor)


def hf_to_mcore_state(
    hf_state: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    *,
    vocab_size: int,
    tensor: int = 1,
    pipeline: int = 1,
    tp_rank: int = 0,
    pp_rank: int = 0,
    expert: int = 1,
    ep_rank: int = 0,
) -> dict[str, torch.Tensor]:
    """The local state dict of rank (``tp_rank``, ``pp_rank``, ``ep_rank``) with names as ``build_model`` gives them;
    padded vocabulary rows are zero. ``hf_state`` may be lazy: only the tensors this rank needs are read."""
    return {  # copies: a slice must not keep its full tensor alive, nor alias the caller's tensors
        name: t.clone()
        for name, t in iter_mcore_rank(
            hf_state.__getitem__,
            cfg,
            vocab_size=vocab_size,
            tensor=tensor,
            pipeline=pipeline,
            tp_rank=tp_rank,
            pp_rank=pp_rank,
            expert=expert,
            ep_rank=ep_rank,
        )
    }


LocalGetter = Callable[[int, int, str], torch.Tensor]  # (tp_rank, pp_rank, local name) -> tensor


class HFView(Mapping[str, torch.Tensor]):
    """A lazy Hugging Face state dict over per-rank megatron-core tensors: each item gathers the TP shards of one
    parameter (the last one is kept, so q/k/v and gate/up read their fused tensor once)."""

    def __init__(
        self, get_local: LocalGetter, cfg: ModelConfig, *, vocab_size: int, tensor: int, pipeline: int
    ):
        check_layout(cfg, tensor, pipeline)
        self.cfg, self.vocab_size, self.tensor, self.pipeline = cfg, vocab_size, tensor, pipeline
        self._get = get_local
        self.shapes = hf_shapes(cfg, vocab_size)
        self._where: dict[str, tuple[Param, int, int]] = {}  # hf name -> (param, its stage, index in _split)
        per = cfg.num_layers // pipeline
        for pp in range(pipeline):
            for p in stage_params(cfg, vocab_size, tensor=tensor, pipeline=pipeline, pp_rank=pp):
                if p.name == "output_layer.weight" and cfg.tie_embeddings:
                    continue  # the first stage's embedding is the one Hugging Face keeps
                for i, n in enumerate(p.hf):
                    self._where[n] = (p, pp, i)
        self._offsets = [pp * per for pp in range(pipeline)]
        self._cache: tuple[str, list[torch.Tensor]] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(name)
        p, pp, i = self._where[name]
        if self._cache is None or self._cache[0] != p.name:
            local = local_name(p.name, self._offsets[pp])
            shards = [self._get(t, pp, local) for t in range(self.tensor if p.dim is not None else 1)]
            full = unshard(shards, p.dim, p.stride)
            self._cache = (p.name, _split(p, full, self.cfg, self.vocab_size))
        return self._cache[1][i]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def mcore_to_hf_state(
    ranks: Mapping[tuple[int, int], Mapping[str, torch.Tensor]]
    | Callable[[int, int], Mapping[str, torch.Tensor]],
    cfg: ModelConfig,
    *,
    vocab_size: int,
    tensor: int = 1,
    pipeline: int = 1,
) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict (vocabulary unpadded) from every rank's local state dict: ``ranks[(tp, pp)]``
    or a callable ``ranks(tp, pp)`` that loads one rank's dict."""
    if callable(ranks):
        load = ranks
    else:
        table = ranks

        def load(t: int, p: int) -> Mapping[str, torch.Tensor]:
            return table[(t, p)]

    def get(t: int, p: int, name: str) -> torch.Tensor:
        state = load(t, p)
        if name not in state:
            raise MissingTensorError(f"rank tp {t} pp {p}: tensor {name} is missing")
        return state[name]

    view = HFView(get, cfg, vocab_size=vocab_size, tensor=tensor, pipeline=pipeline)
    return {name: view[name].clone() for name in view}
