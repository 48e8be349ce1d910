"""Hugging Face ``config.json`` <-> ``ModelConfig`` for the families of ``gatedpo_mega.families`` (Llama 2/3,
Mistral, Qwen2, Qwen3).

Everything the megatron-core model built by ``gatedpo_mega.megatron.model`` cannot represent is refused by name:
other model types, rope scaling, sliding-window attention, biases other than Qwen2's q/k/v bias, activations other
than SiLU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gatedpo_mega.config import LoraConfig, ModelConfig
from gatedpo_mega.convert.errors import UnsupportedModelError
from gatedpo_mega.families import FAMILIES, FEATURES, Family, family_of, feature


def _rope_theta(hf: dict[str, Any], where: str) -> float:
    """transformers >= 5 writes ``rope_parameters``; earlier versions ``rope_theta`` and ``rope_scaling``."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if isinstance(params, dict) and "rope_type" not in params and params:
        # per-layer-type parameters ({"full_attention": {...}}): all must be plain rotary embeddings
        kinds = list(params.values())
        params = kinds[0] if all(k == kinds[0] for k in kinds) and isinstance(kinds[0], dict) else None
        if params is None:
            raise UnsupportedModelError(f"{where}: rope_parameters differ between layer types")
    for block in (params, scaling):
        if isinstance(block, dict):
            kind = block.get("rope_type", block.get("type", "default"))
            if kind != "default":
                raise UnsupportedModelError(
                    f"{where}: rope scaling '{kind}' is not supported (only plain rotary embeddings)"
                )
            if float(block.get("partial_rotary_factor", 1.0)) != 1.0:
                raise UnsupportedModelError(f"{where}: partial_rotary_factor != 1 is not supported")
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModelError(f"{where}: partial_rotary_factor != 1 is not supported")
    theta = (params or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def _experts(hf: dict[str, Any], family: Family, where: str) -> dict[str, Any]:
    """The mixture-of-experts fields of a Mixtral or Qwen3-MoE ``config.json``; what the MoE layer cannot represent
    (dense layers between sparse ones, router noise, shared experts) is refused by name."""
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    topk = hf.get("num_experts_per_tok")
    width = hf.get("moe_intermediate_size", hf.get("intermediate_size"))
    for key, value in (
        ("num_experts", experts),
        ("num_experts_per_tok", topk),
        ("moe_intermediate_size", width),
    ):
        if not isinstance(value, int) or isinstance(value, bool):
            raise UnsupportedModelError(f"{where}: {key} is missing or not an integer")
    if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
        raise UnsupportedModelError(
            f"{where}: dense layers between the sparse ones (decoder_sparse_step={hf.get('decoder_sparse_step', 1)}, "
            f"mlp_only_layers={hf.get('mlp_only_layers')}) are not supported: every layer is a mixture of experts"
        )
    if hf.get("router_jitter_noise", 0.0):
        raise UnsupportedModelError(
            f"{where}: router_jitter_noise={hf['router_jitter_noise']} is not supported"
        )
    if hf.get("shared_expert_intermediate_size"):
        raise UnsupportedModelError(f"{where}: shared experts are not supported")
    # Mixtral always renormalises the top k probabilities; Qwen3-MoE where norm_topk_prob says so.
    norm = bool(hf.get("norm_topk_prob", False)) if family.model_type == "qwen3_moe" else True
    return {
        "num_experts": experts,
        "moe_router_topk": topk,
        "moe_ffn_hidden_size": width,
        "moe_norm_topk_prob": norm,
    }


def hf_model_config(
    hf_config: dict[str, Any],
    *,
    dtype: str = "fp32",
    make_vocab_size_divisible_by: int | None = None,
    where: str = "config.json",
) -> tuple[ModelConfig, int]:
    """The ``ModelConfig`` and true vocabulary size of a Hugging Face config of a supported family, or
    ``UnsupportedModelError`` naming the option that cannot be represented."""
    hf = hf_config
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise UnsupportedModelError(
            f"{where}: model_type '{kind}' is not supported (supported: {', '.join(FAMILIES)})"
        )
    family = FAMILIES[kind]
    required = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
    )
    for key in required:
        if not isinstance(hf.get(key), int):
            raise UnsupportedModelError(f"{where}: {key} is missing or not an integer")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    groups = hf.get("num_key_value_heads") or heads
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{where}: hidden_act '{hf['hidden_act']}' is not supported (only silu)")
    head_dim = hf.get("head_dim")
    if head_dim is not None and not isinstance(head_dim, int):
        raise UnsupportedModelError(f"{where}: head_dim is not an integer")
    if hf.get("attention_bias"):
        raise UnsupportedModelError(
            f"{where}: attention_bias=true puts a bias on o_proj, which the megatron-core model does not have"
        )
    if hf.get("mlp_bias"):
        raise UnsupportedModelError(f"{where}: mlp_bias=true is not supported")
    window = hf.get("sliding_window")
    sliding = (
        hf.get("use_sliding_window", family.sliding_window_default)
        and window is not None
        and window < hf.get("max_position_embeddings", 0)
    )
    if sliding or "sliding_attention" in (hf.get("layer_types") or []):
        raise UnsupportedModelError(
            f"{where}: sliding-window attention (sliding_window={window}) is not supported; "
            "set sliding_window to null if the model was trained without it"
        )
    if hf.get("pretraining_tp", 1) != 1:
        raise UnsupportedModelError(f"{where}: pretraining_tp={hf['pretraining_tp']} is not supported")
    theta = _rope_theta(hf, where)
    fields: dict[str, Any] = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=hf["intermediate_size"],
        head_dim=0 if head_dim is None or head_dim * heads == hidden else head_dim,  # 0: hidden / heads
        vocab_size=hf["vocab_size"],
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rotary_base=theta,
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **{k: v for k, v in family.features.items() if k != "moe"},
        **(_experts(hf, family, where) if family.moe_block else {}),
        init_std=float(hf.get("initializer_range", 0.02)),
        dtype=dtype,
    )
    if make_vocab_size_divisible_by is not None:
        fields["make_vocab_size_divisible_by"] = make_vocab_size_divisible_by
    try:
        cfg = ModelConfig(**fields)
    except ValueError as e:
        raise UnsupportedModelError(f"{where}: {e}") from None
    return cfg, int(hf["vocab_size"])


def model_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def model_config_from_dict(d: dict[str, Any], where: str) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    fields = {k: v for k, v in d.items() if k in names}
    try:
        if isinstance(fields.get("lora"), dict):  # a saved config's model.lora section
            fields["lora"] = LoraConfig(**fields["lora"])
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise UnsupportedModelError(f"{where}: model config: {e}") from None


HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def to_hf_config(
    cfg: ModelConfig, vocab_size: int, base: dict[str, Any] | None, *, dtype: str
) -> dict[str, Any]:
    """``config.json`` for the converted model: the original one (``base``) with the dtype updated, or, for a
    model trained from scratch, a config of the first family with its features (Llama; Qwen2 for a q/k/v bias,
    Qwen3 for q/k norms)."""
    if base is not None:
        out = dict(base)
        out.pop("torch_dtype", None)
        out["dtype"] = HF_DTYPES[dtype]
        out.setdefault("architectures", [FAMILIES[out["model_type"]].architecture])
        return out
    family = family_of(cfg)
    if family is None:
        features = ", ".join(f"{k}={feature(cfg, k)}" for k in FEATURES)
        raise UnsupportedModelError(f"no Hugging Face family has a model with {features}")
    out = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_epsilon,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},
        "dtype": HF_DTYPES[dtype],
        **family.scratch_config,
    }
    if cfg.num_experts:
        out |= {
            ("num_experts" if family.model_type == "qwen3_moe" else "num_local_experts"): cfg.num_experts,
            "num_experts_per_tok": cfg.moe_router_topk,
            "router_aux_loss_coef": cfg.moe_aux_loss_coef,
        }
        if family.model_type == "qwen3_moe":
            out |= {
                "moe_intermediate_size": cfg.moe_ffn_hidden_size,
                "norm_topk_prob": cfg.moe_norm_topk_prob,
            }
        elif not cfg.moe_norm_topk_prob:
            raise UnsupportedModelError(
                "Mixtral renormalises its top-k router probabilities: model.moe_norm_topk_prob=false has no family"
            )
        else:
            out["intermediate_size"] = cfg.moe_ffn_hidden_size
    return out
