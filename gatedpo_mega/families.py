"""Model families and the tensors of a decoder layer, each defined once.

Every family is the same decoder (RMSNorm, SwiGLU, rotary embeddings, grouped-query attention) with a few switches,
the *features* (``ModelConfig`` fields): Llama and Mistral have none, Qwen2 a q/k/v bias, Qwen3 an RMSNorm over
each head's query and key; Mixtral is Mistral and Qwen3-MoE is Qwen3 with a mixture of experts in place of the MLP
(``moe``: ``model.num_experts`` > 0). A family is one ``Family`` entry: what its Hugging Face ``config.json`` says and which
features its checkpoints have. A feature is a ``ModelConfig`` field plus its rows in ``layer_tensors`` (names,
shapes, tensor-parallel cut, initialisation) and its megatron-core options below.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gatedpo_mega.config import ModelConfig

Shape = tuple[int, ...]

# Switches that add tensors to a layer (see ``layer_tensors``): ModelConfig fields, and ``moe`` (num_experts > 0).
FEATURES = ("qkv_bias", "qk_norm", "moe")
# ModelConfig fields that fix the weights' names and shapes: a checkpoint, an mcore folder or a Hugging Face folder
# fits a run only where these agree.
SHAPE_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "head_dim",
    "tie_embeddings", "qkv_bias", "qk_norm", "num_experts", "moe_ffn_hidden_size",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Family:
    """A Hugging Face model family this codebase converts and trains."""

    model_type: str  # config.json's ``model_type``
    architecture: str  # its ``architectures[0]``
    features: Mapping[str, bool]  # the value of every FEATURES switch in this family's checkpoints
    sliding_window_default: bool = False  # transformers' ``use_sliding_window`` when config.json has none
    # What a config.json written for a model trained here (no original to copy) sets beyond the common keys.
    scratch_config: Mapping[str, Any] = field(default_factory=dict)
    # A mixture of experts: the layer's block ("mlp" | "block_sparse_moe") and its experts' gate, up and down names.
    moe_block: str = ""
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")


_PLAIN = {"qkv_bias": False, "qk_norm": False, "moe": False}
_NO_WINDOW = {"use_sliding_window": False, "sliding_window": None}
# In the order a model trained from scratch picks its family: the first whose features it has.
FAMILIES = {
    f.model_type: f
    for f in (
        Family(
            "llama", "LlamaForCausalLM", _PLAIN, scratch_config={"attention_bias": False, "mlp_bias": False}
        ),
        Family("mistral", "MistralForCausalLM", _PLAIN, sliding_window_default=True),
        Family("qwen2", "Qwen2ForCausalLM", {**_PLAIN, "qkv_bias": True}, scratch_config=_NO_WINDOW),
        Family(
            "qwen3",
            "Qwen3ForCausalLM",
            {**_PLAIN, "qk_norm": True},
            scratch_config={**_NO_WINDOW, "attention_bias": False},
        ),
        Family(
            "mixtral",
            "MixtralForCausalLM",
            {**_PLAIN, "moe": True},
            sliding_window_default=True,
            scratch_config={"sliding_window": None, "router_jitter_noise": 0.0},
            moe_block="block_sparse_moe",
            expert_names=("w1", "w3", "w2"),
        ),
        Family(
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            {**_PLAIN, "qk_norm": True, "moe": True},
            scratch_config={
                **_NO_WINDOW,
                "attention_bias": False,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
            },
            moe_block="mlp",
        ),
    )
}


def feature(cfg: ModelConfig, name: str) -> bool:
    """The value of the FEATURES switch ``name`` in ``cfg``."""
    return cfg.num_experts > 0 if name == "moe" else bool(getattr(cfg, name))


def family_of(cfg: ModelConfig) -> Family | None:
    """The first family whose checkpoints have exactly ``cfg``'s features (None: no family expresses them)."""
    for family in FAMILIES.values():
        if all(feature(cfg, k) == v for k, v in family.features.items()):
            return family
    return None


_DEFAULTS = dataclasses.asdict(ModelConfig())


def saved_value(saved: Mapping[str, Any], key: str) -> Any:
    """The value of the ModelConfig field ``key`` in a saved model config; a field missing from it (written before
    the field existed) reads as ModelConfig's default."""
    return saved.get(key, _DEFAULTS[key])


def differences(
    saved: Mapping[str, Any], mine: Mapping[str, Any], fields: tuple[str, ...]
) -> list[tuple[str, Any, Any]]:
    """Each of ``fields`` whose values differ, as (field, saved value (``saved_value``), mine)."""
    out = []
    for key in fields:
        theirs = saved_value(saved, key)
        if theirs != mine[key]:
            out.append((key, theirs, mine[key]))
    return out


def first_difference(
    saved: Mapping[str, Any], mine: Mapping[str, Any], fields: tuple[str, ...]
) -> tuple[str, Any, Any] | None:
    """The first of ``differences``, or None."""
    found = differences(saved, mine, fields)
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------- megatron-core


def transformer_options(cfg: ModelConfig, *, expert: int = 1) -> dict[str, Any]:
    """The ``TransformerConfig`` arguments the features and the head size set; with experts, megatron-core's MoE
    layer as Mixtral and Qwen3-MoE route: top k of the router's logits in the model dtype, softmax over all experts
    (``moe_router_pre_softmax``) or over the top k (the same as renormalising the first over the top k), every token
    kept (no capacity), experts split over ``expert`` ranks and reached by the all-to-all dispatcher."""
    out: dict[str, Any] = {
        "kv_channels": cfg.kv_channels,
        "add_qkv_bias": cfg.qkv_bias,
        "qk_layernorm": cfg.qk_norm,
    }
    if cfg.num_experts:
        out |= {
            "num_moe_experts": cfg.num_experts,
            "moe_ffn_hidden_size": cfg.moe_ffn_hidden_size,
            "moe_router_topk": cfg.moe_router_topk,
            "moe_router_pre_softmax": not cfg.moe_norm_topk_prob,
            "moe_router_load_balancing_type": "aux_loss",
            "moe_aux_loss_coeff": cfg.moe_aux_loss_coef,
            "moe_grouped_gemm": False,  # SequentialMLP: one MLP module per expert, as the checkpoints have them
            "expert_model_parallel_size": expert,
        }
    return out


def layer_spec_options(cfg: ModelConfig) -> dict[str, Any]:
    """``get_gpt_layer_local_spec``'s arguments. Its q/k layernorms normalise each head over ``kv_channels`` in
    ``get_query_key_value_tensors``, before the rotary embedding, as Qwen3's q_norm/k_norm do."""
    out: dict[str, Any] = {"normalization": "RMSNorm", "qk_layernorm": cfg.qk_norm}
    if cfg.num_experts:
        out |= {"num_experts": cfg.num_experts, "moe_grouped_gemm": False}
    return out


# ---------------------------------------------------------------------------------------------- layer tensors


@dataclass(frozen=True, slots=True)
class LayerTensor:
    """One tensor of a decoder layer: megatron-core's name and full shape, the Hugging Face tensors it is made of,
    how tensor parallelism cuts it and how it is initialised."""

    mcore: str  # under ``decoder.layers.{i}.``
    hf: tuple[str, ...]  # under ``model.layers.{i}.``; several are fused ([q; k; v] per group, or [gate; up])
    hf_shapes: tuple[Shape, ...]
    shape: Shape
    dim: int | None  # the dimension TP cuts, or None (replicated)
    stride: int = 1
    # normal | residual (std / sqrt(2 L): the outputs into the residual stream) | ones | zeros
    init: str = "normal"


def layer_tensors(cfg: ModelConfig) -> list[LayerTensor]:
    """Every tensor of one decoder layer of ``cfg``, in the order Hugging Face checkpoints list them."""
    h, f, hd = cfg.hidden_size, cfg.ffn_hidden_size, cfg.kv_channels
    q, kv = cfg.num_attention_heads * hd, cfg.num_query_groups * hd

    def qkv(kind: str) -> tuple[str, ...]:
        return tuple(f"self_attn.{x}_proj.{kind}" for x in "qkv")

    out = [
        LayerTensor(
            "self_attention.linear_qkv.weight", qkv("weight"), ((q, h), (kv, h), (kv, h)), (q + 2 * kv, h), 0
        )
    ]
    if cfg.qkv_bias:
        out.append(
            LayerTensor("self_attention.linear_qkv.bias", qkv("bias"), ((q,), (kv,), (kv,)), (q + 2 * kv,), 0, init="zeros")
        )  # fmt: skip
    if cfg.qk_norm:  # one weight of head size, shared by every head (and so by every tensor rank)
        for x in "qk":
            out.append(
                LayerTensor(f"self_attention.{x}_layernorm.weight", (f"self_attn.{x}_norm.weight",), ((hd,),), (hd,), None, init="ones")
            )  # fmt: skip
    out.append(
        LayerTensor("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), ((h, q),), (h, q), 1, init="residual")
    )  # fmt: skip
    if cfg.num_experts:
        out += expert_tensors(cfg)
    else:
        out += [
            LayerTensor("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), ((f, h), (f, h)), (2 * f, h), 0, stride=2),
            LayerTensor("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), ((h, f),), (h, f), 1, init="residual"),
        ]  # fmt: skip
    out += [
        LayerTensor("input_layernorm.weight", ("input_layernorm.weight",), ((h,),), (h,), None, init="ones"),
        LayerTensor("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), ((h,),), (h,), None, init="ones"),
    ]  # fmt: skip
    return out


def expert_tensors(cfg: ModelConfig) -> list[LayerTensor]:
    """The router and every expert of a mixture-of-experts layer (global expert indices; under expert parallelism
    rank r holds experts ``r * E / EP`` on as its ``local_experts.0`` on: ``EXPERT``). Each expert is a SwiGLU MLP cut
    over TP as the dense one; the router is replicated."""
    family = family_of(cfg)
    if family is None or not family.moe_block:
        raise ValueError(f"no Hugging Face family has a mixture of experts with qkv_bias={cfg.qkv_bias}")
    h, f, block = cfg.hidden_size, cfg.moe_ffn_hidden_size, family.moe_block
    gate, up, down = family.expert_names
    out = [
        LayerTensor(
            "mlp.router.weight",
            (f"{block}.gate.weight",),
            ((cfg.num_experts, h),),
            (cfg.num_experts, h),
            None,
        )
    ]
    for e in range(cfg.num_experts):
        mc, hf = f"mlp.experts.local_experts.{e}", f"{block}.experts.{e}"
        out += [
            LayerTensor(f"{mc}.linear_fc1.weight", (f"{hf}.{gate}.weight", f"{hf}.{up}.weight"), ((f, h), (f, h)), (2 * f, h), 0, stride=2),
            LayerTensor(f"{mc}.linear_fc2.weight", (f"{hf}.{down}.weight",), ((h, f),), (h, f), 1, init="residual"),
        ]  # fmt: skip
    return out


LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
# An expert's parameters within a layer: ``mlp.experts.local_experts.{e}.rest``.
EXPERT = re.compile(r"^(.*\.local_experts\.)(\d+)(\..*)$")


def expert_renamed(name: str, offset: int) -> str:
    """``name`` with its expert index (if it has one) moved by ``offset``: local -> global index under expert
    parallelism (``+ ep_rank * E / EP``), and back (``-``)."""
    m = EXPERT.match(name)
    return f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}" if m else name


def expert_index(name: str) -> int | None:
    """The expert index in ``name``, or None (not an expert's parameter)."""
    m = EXPERT.match(name)
    return int(m.group(2)) if m else None


# The tensors outside the layers (the output layer is absent where tied at PP 1), and how each is initialised.
OUTER_INIT = {
    "embedding.word_embeddings.weight": "normal",
    "decoder.final_layernorm.weight": "ones",
    "output_layer.weight": "normal",
}


def init_rules(cfg: ModelConfig) -> dict[str, str]:
    """How each megatron-core parameter is initialised, by its name (a layer's by its name within the layer)."""
    return {**OUTER_INIT, **{t.mcore: t.init for t in layer_tensors(cfg)}}


def init_rule(rules: dict[str, str], name: str) -> str:
    m = LAYER.match(name)
    key = m.group(2) if m else name
    if key not in rules:
        raise KeyError(f"no initialisation rule for parameter {name}")
    return rules[key]
