"""LoRA adapters on megatron-core's tensor-parallel linears, cut over TP the way each layer is.

One adapter per Hugging Face linear (``q_proj`` ... ``down_proj``), also inside megatron-core's fused layers: each
targeted ``W x`` gains ``scale * B (A dropout(x))``. ``linear_qkv`` holds q/k/v and ``linear_fc1`` gate/up, so
targeting q and v alone, or all three with their own ``A``, is what PEFT does on the Hugging Face model, exactly.

- Column-parallel layers (``linear_qkv``, ``linear_fc1``): the input is the same on every TP rank. Each ``A``
  [r, in] is replicated; each ``B`` [out, r] is cut along its rows as the layer's output is. ``h = A x`` is computed
  on every rank and passes ``copy_to_group`` (backward: the sum of the ranks' partial gradients), so ``A``'s
  gradient is the whole one, the same on every rank.
- Row-parallel layers (``linear_proj``, ``linear_fc2``): the input is cut over TP. ``A`` [r, in] is cut along its
  columns as the layer's weight is, ``B`` [out, r] replicated: ``h = reduce_from_group(A_local x_local)``, the
  same on every rank, and so is ``B``'s gradient.

A replicated factor thus gets the same gradient on every TP rank (it stays one tensor and DeepSpeed counts it once in
the gradient norm: it has no ``tensor_model_parallel`` attribute); a cut one carries megatron-core's attributes.
Every factor is drawn whole from a generator seeded by the run seed and its global name (``A`` as PEFT's default,
uniform in +-1/sqrt(in); ``B`` zero), so a seed gives the same adapters at every TP x PP layout.

The base model is frozen: megatron-core's linears then compute no weight gradient (``linear_with_frozen_weight``).
``adapters(model, mode)`` switches every adapter ``off`` (the base model: LoRA's reference, no copy), back ``on``,
or to ``initial``, the adapters as they were when ``freeze_initial`` was called (a run that starts from a PEFT
adapter has that policy as its reference).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from gatedpo_mega.config import ModelConfig
from gatedpo_mega.ops.collectives import ProcessGroup, copy_to_group, reduce_from_group


@dataclass(frozen=True, slots=True)
class Site:
    """A megatron-core linear and the Hugging Face linears it holds: their output rows (full, unsharded, in the
    fused order) and how many blocks they are interleaved in (q/k/v: one block per query group)."""

    mcore: str  # within a layer: self_attention.linear_qkv ...
    parallel: str  # column | row
    hf: tuple[str, ...]  # q_proj, k_proj, v_proj ...
    hf_prefix: str  # self_attn | mlp
    in_features: int
    out_features: tuple[int, ...]  # per Hugging Face linear
    blocks: int = (
        1  # the fused output is [blocks x (part 0 rows, part 1 rows, ...)] (cut over TP by whole blocks)
    )

    def factor_shape(self, hf: str, factor: str, rank: int) -> tuple[int, int]:
        """The full (unsharded) shape of ``hf``'s factor ``A`` [rank, in] or ``B`` [out, rank]: PEFT's
        ``lora_A.weight`` / ``lora_B.weight`` of that Hugging Face linear."""
        return (rank, self.in_features) if factor == "A" else (self.out_features[self.hf.index(hf)], rank)

    def cut_dim(self, factor: str) -> int | None:
        """The dimension TP cuts ``factor`` along (contiguous pieces), or None (replicated): a column-parallel
        layer's ``B`` along its rows (the layer's output), a row-parallel layer's ``A`` along its columns (its input)."""
        if self.parallel == "column":
            return 0 if factor == "B" else None
        return 1 if factor == "A" else None


def sites(cfg: ModelConfig) -> list[Site]:
    """The four adaptable linears of a decoder layer."""
    h, hd, nh, ng, f = (
        cfg.hidden_size, cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups, cfg.ffn_hidden_size,
    )  # fmt: skip
    return [
        Site("self_attention.linear_qkv", "column", ("q_proj", "k_proj", "v_proj"), "self_attn", h,
             (nh * hd, ng * hd, ng * hd), blocks=ng),
        Site("self_attention.linear_proj", "row", ("o_proj",), "self_attn", nh * hd, (h,)),
        Site("mlp.linear_fc1", "column", ("gate_proj", "up_proj"), "mlp", h, (f, f)),
        Site("mlp.linear_fc2", "row", ("down_proj",), "mlp", f, (h,)),
    ]  # fmt: skip


def adapter_param_name(layer: int, site: Site, hf: str, factor: str) -> str:
    """The global megatron-core name of an adapter factor (``factor``: A or B)."""
    return f"decoder.layers.{layer}.{site.mcore}.lora.{factor}.{hf}"


@dataclass(frozen=True, slots=True)
class Factor:
    """One adapter factor of the whole model: its layer (global index), linear, Hugging Face name, A or B, full
    shape and TP cut (``Site.cut_dim``)."""

    layer: int
    site: Site
    hf: str
    factor: str  # A | B
    shape: tuple[int, int]
    dim: int | None

    @property
    def name(self) -> str:
        return adapter_param_name(self.layer, self.site, self.hf, self.factor)


def adapter_factors(cfg: ModelConfig, layers: Iterable[int]) -> list[Factor]:
    """Every factor ``cfg.lora`` gives the global ``layers``: per layer, per linear, per target, ``A`` then ``B``."""
    targets = cfg.lora.target_modules
    return [
        Factor(layer, site, hf, factor, site.factor_shape(hf, factor, cfg.lora.rank), site.cut_dim(factor))
        for layer in layers
        for site in sites(cfg)
        for hf in site.hf
        if hf in targets
        for factor in "AB"
    ]


ADAPTER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)\.lora\.([AB])\.(\w+)$")


def is_adapter(name: str) -> bool:
    return ".lora." in name


def _mark_cut(p: torch.nn.Parameter, dim: int) -> None:
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(p, True, dim, 1)


class LoraAdapter(torch.nn.Module):
    """The adapters of one megatron-core linear (``Site``) on one TP rank; ``forward(x)`` is the increment of the
    layer's local output."""

    def __init__(
        self,
        site: Site,
        targets: list[str],
        *,
        rank: int,
        scale: float,
        dropout: float,
        tp_group: ProcessGroup | None,
        tp_rank: int,
        tp_size: int,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.site, self.targets, self.scale, self.dropout = site, targets, scale, dropout
        self.tp_group, self.tp_rank, self.tp_size = tp_group, tp_rank, tp_size
        self.mode = "on"
        self.initial: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.A = torch.nn.ParameterDict()
        self.B = torch.nn.ParameterDict()
        for hf in targets:
            for factor, table in (("A", self.A), ("B", self.B)):
                shape = list(site.factor_shape(hf, factor, rank))
                dim = site.cut_dim(factor)
                if dim is not None:
                    shape[dim] //= tp_size
                table[hf] = p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
                if dim is not None:
                    _mark_cut(p, dim)

    def extra_repr(self) -> str:
        return f"{self.site.parallel}, targets={self.targets}, scale={self.scale:g}"

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout drawn over the whole input (a row-parallel rank keeps its slice): the same mask at every TP."""
        if not (self.dropout > 0.0 and self.training and self.mode == "on" and torch.is_grad_enabled()):
            return x  # training forwards only: no dropout in a reference or evaluation pass
        cut = self.site.parallel == "row"
        full = x.shape[-1] * (self.tp_size if cut else 1)
        keep = torch.empty(*x.shape[:-1], full, device=x.device, dtype=x.dtype).bernoulli_(1.0 - self.dropout)
        if cut:
            keep = keep.narrow(-1, self.tp_rank * x.shape[-1], x.shape[-1])
        return x * keep / (1.0 - self.dropout)

    def _factors(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        if self.mode == "initial":
            return [(hf, *self.initial[hf]) for hf in self.targets]
        return [(hf, self.A[hf], self.B[hf]) for hf in self.targets]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = self._factors()
        rank = factors[0][1].shape[0]
        a = torch.cat([f[1] for f in factors]) if len(factors) > 1 else factors[0][1]
        h = self._drop(x) @ a.t()  # [..., targets x r]
        if self.site.parallel == "row":
            h = reduce_from_group(h, self.tp_group)
            return (h @ factors[0][2].t()) * self.scale
        h = copy_to_group(h, self.tp_group)
        lead = x.shape[:-1]
        blocks = max(1, self.site.blocks // self.tp_size)
        parts = []
        for hf, out in zip(self.site.hf, self.site.out_features, strict=True):
            rows = out // self.tp_size // blocks
            if hf in self.targets:
                i = self.targets.index(hf)
                d = (h[..., i * rank : (i + 1) * rank] @ factors[i][2].t()) * self.scale
                parts.append(d.view(*lead, blocks, rows))
            else:
                parts.append(h.new_zeros(*lead, blocks, rows))
        return torch.cat(parts, dim=-1).view(*lead, -1)

    def freeze_initial(self) -> None:
        self.initial = {hf: (self.A[hf].detach().clone(), self.B[hf].detach().clone()) for hf in self.targets}


def _add_increment(module: torch.nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
    """Forward hook on a megatron-core linear (``(output, bias)``): add its adapters' increment."""
    adapter: LoraAdapter = module.lora  # type: ignore[assignment]
    if adapter.mode == "off":
        return output
    x = args[0] if args else kwargs["input_"]
    out, bias = output
    return out + adapter(x).to(out.dtype), bias


def _input_needs_grad(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.requires_grad_(True) if torch.is_grad_enabled() and not output.requires_grad else output


def add_adapters(
    model: torch.nn.Module,
    cfg: ModelConfig,
    *,
    layer_offset: int,
    tp_group: ProcessGroup | None,
    tp_rank: int,
    tp_size: int,
    seed: int,
) -> None:
    """Freeze ``model`` and give each targeted linear its adapters (``model.lora``), initialised from ``seed``."""
    lora = cfg.lora
    model.requires_grad_(False)
    embedding = getattr(model, "embedding", None)  # the first pipeline stage's
    if embedding is not None:
        # A frozen embedding's output needs no gradient, and then neither does a recomputed layer's output
        # (model.recompute=full: megatron-core's checkpoint passes gradients only to inputs that require them):
        # the adapters inside would get none. The layers' input asks for its gradient instead.
        embedding.register_forward_hook(_input_needs_grad)
    dtype = next(model.parameters()).dtype
    by_name = {s.mcore: s for s in sites(cfg)}
    for name, module in list(model.named_modules()):
        m = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", name)
        site = by_name.get(m.group(2)) if m else None
        targets = [hf for hf in site.hf if hf in lora.target_modules] if site else []
        if not targets:
            continue
        assert site is not None and m is not None
        module.lora = LoraAdapter(
            site, targets, rank=lora.rank, scale=lora.scale, dropout=lora.dropout,
            tp_group=tp_group, tp_rank=tp_rank, tp_size=tp_size, dtype=dtype,
        )  # fmt: skip
        module.register_forward_hook(_add_increment, with_kwargs=True)
        init_adapter(module.lora, int(m.group(1)) + layer_offset, seed)


def init_adapter(adapter: LoraAdapter, layer: int, seed: int) -> None:
    """PEFT's default: ``A`` uniform in +-1/sqrt(in) (Kaiming-uniform with a = sqrt(5)), ``B`` zero; each ``A``
    drawn whole from its own global-name generator, this rank keeping its slice."""
    from gatedpo_mega.megatron.model import _generator, local_slice

    site = adapter.site
    bound = 1.0 / math.sqrt(site.in_features)
    with torch.no_grad():
        for hf in adapter.targets:
            a = adapter.A[hf]
            shape = (a.shape[0], site.in_features)
            g = _generator(seed, adapter_param_name(layer, site, hf, "A"))
            full = (torch.rand(shape, generator=g) * 2.0 - 1.0) * bound
            a.copy_(local_slice(full, a, adapter.tp_rank, adapter.tp_size).to(a.dtype))
            adapter.B[hf].zero_()


def lora_adapters(model: torch.nn.Module) -> list[LoraAdapter]:
    return [m for m in model.modules() if isinstance(m, LoraAdapter)]


def has_adapters(model: torch.nn.Module) -> bool:
    return any(isinstance(m, LoraAdapter) for m in model.modules())


def freeze_initial(model: torch.nn.Module) -> None:
    """Keep a frozen copy of every adapter as it is now, for ``adapters(model, "initial")``."""
    for a in lora_adapters(model):
        a.freeze_initial()


@contextlib.contextmanager
def adapters(model: torch.nn.Module, mode: str) -> Iterator[None]:
    """Run ``model`` with its adapters ``on``, ``off`` (the base model) or ``initial`` inside the block."""
    found = lora_adapters(model)
    before = [a.mode for a in found]
    for a in found:
        a.mode = mode
    try:
        yield
    finally:
        for a, m in zip(found, before, strict=True):
            a.mode = m
