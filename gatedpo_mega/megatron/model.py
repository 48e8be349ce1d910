"""The megatron-core GPTModel for a Llama-family config, and an initialisation that is the same at every layout.

megatron-core initialises each pipeline stage and tensor shard from the running RNG, so TP 1 and TP 2 (or PP 1 and
PP 2) start from different weights. Here every parameter is drawn from its own generator, seeded by the run seed
and the parameter's *global* name (layer index after the pipeline offset), as the full unsharded tensor; each rank
keeps its slice, cut the way megatron-core cuts it (``partition_dim`` / ``partition_stride`` attributes). A given
seed therefore gives bit-identical models at every TP x PP layout, which the equivalence tests rely on.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from gatedpo_mega.config import ModelConfig
from gatedpo_mega.families import (
    LAYER,
    expert_renamed,
    init_rule,
    init_rules,
    layer_spec_options,
    transformer_options,
)
from gatedpo_mega.formats import DTYPES
from gatedpo_mega.megatron.compat import gpt_model, moe_without_transformer_engine, whole_layer_cuda_graphs
from gatedpo_mega.megatron.cpu_shim import apply_cpu_shim
from gatedpo_mega.megatron.output import install_fused_output
from gatedpo_mega.megatron.parallel import shard


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """The embedding rows: the true vocabulary rounded up to a multiple of ``divisible_by * TP``."""
    multiple = divisible_by * tensor_parallel
    return int(math.ceil(vocab_size / multiple) * multiple)


@dataclass(frozen=True, slots=True)
class StageInfo:
    pre_process: bool  # this stage holds the embedding
    post_process: bool  # this stage holds the final norm and the output layer
    layer_offset: int  # global index of this stage's first layer
    tp_rank: int
    tp_size: int
    expert_offset: int = 0  # global index of this rank's first expert (ep_rank * num_experts / EP)


def expert_offset(cfg: ModelConfig, ep_rank: int, expert: int) -> int:
    """The global index of expert-parallel rank ``ep_rank``'s first expert."""
    return ep_rank * (cfg.num_experts // expert) if cfg.num_experts else 0


def transformer_config(
    cfg: ModelConfig, *, tensor: int, pipeline: int, context: int = 1, expert: int = 1
):  # -> TransformerConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = DTYPES[cfg.dtype]
    on_cpu = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        **whole_layer_cuda_graphs(TransformerConfig),  # none are captured; the default is deprecated
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,  # preference optimisation runs without dropout (policy and reference must agree)
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        context_parallel_size=context,  # rotary positions per rank (megatron/context.py's zigzag)
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True,
        perform_initialization=True,  # sets the tensor-parallel attributes; ``init_parameters`` then redraws
        init_method_std=cfg.init_std,
        # Fused kernels are CUDA-only; their unfused forms are megatron-core's reference paths.
        bias_dropout_fusion=not on_cpu,
        apply_rope_fusion=False,
        masked_softmax_fusion=not on_cpu,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        deallocate_pipeline_outputs=False,
        variable_seq_lengths=pipeline > 1,  # micro-batches are length-bucketed: stages exchange shapes first
        moe_token_dispatcher_type="alltoall",  # (megatron-core requires it for the line above, experts or not)
        # model.recompute=full: keep each layer's input only and run its forward again in backward (memory for
        # time, as gradient checkpointing does).
        recompute_granularity="full" if cfg.recompute == "full" else None,
        recompute_method="uniform" if cfg.recompute == "full" else None,
        recompute_num_layers=1 if cfg.recompute == "full" else None,
        **transformer_options(cfg, expert=expert),  # head size, q/k/v bias, q/k norm, experts
    )


def layer_spec(cfg: ModelConfig):  # -> ModuleSpec
    """megatron-core's local layer spec, with ``SDPAttention`` as its core attention for ``model.attention=sdpa``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(**layer_spec_options(cfg))
    if cfg.attention == "sdpa":
        from gatedpo_mega.megatron.attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def build_model(
    cfg: ModelConfig,
    *,
    vocab_size: int,
    stage: StageInfo,
    pipeline: int,
    seed: int,
    tp_group: Any = None,
    context: int = 1,
    expert: int = 1,
):  # -> GPTModel
    """This rank's stage of the model, initialised by ``init_parameters``; with ``cfg.fused_logprobs`` the last
    stage's output layer is ``FusedOutputLayer`` over ``tp_group``."""
    apply_cpu_shim()
    if cfg.num_experts:
        moe_without_transformer_engine()
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed)  # named RNG states for dropout regions (CPU generators on CPU)
    tconf = transformer_config(cfg, tensor=stage.tp_size, pipeline=pipeline, context=context, expert=expert)
    model = gpt_model(
        config=tconf,
        transformer_layer_spec=layer_spec(cfg),
        vocab_size=padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by, stage.tp_size),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=stage.pre_process,
        post_process=stage.post_process,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rotary_base),
    )
    init_parameters(model, cfg, stage=stage, seed=seed)
    # megatron-core builds its norms in fp32 whatever params_dtype says (WrappedTorchNorm); DeepSpeed casts the whole
    # trained module to the run's dtype. Casting here too makes every copy of the model (the policy, a live or
    # precomputed reference, a converter's) the same function: at step 1 the policy is the reference, to the bit.
    model.to(DTYPES[cfg.dtype])
    if cfg.tie_embeddings and pipeline > 1 and stage.post_process and not stage.pre_process:
        # The last stage's copy of the tied embedding: its gradient is summed with the first stage's, and
        # DeepSpeed must count the shared weight once in the gradient norm.
        model.output_layer.weight.ds_pipe_replicated = True
    if cfg.fused_logprobs and stage.post_process:
        install_fused_output(model, tp_group=tp_group, vocab_size=vocab_size)
    return model


def global_name(local_name: str, layer_offset: int, expert_offset: int = 0) -> str:
    """``decoder.layers.{i}.x`` of a pipeline stage -> ``decoder.layers.{i + layer_offset}.x``, and an expert's
    ``local_experts.{j}`` of an expert-parallel rank -> ``local_experts.{j + expert_offset}``."""
    m = LAYER.match(local_name)
    if m:
        return f"decoder.layers.{int(m.group(1)) + layer_offset}.{expert_renamed(m.group(2), expert_offset)}"
    return local_name


def full_shape(param: torch.nn.Parameter, tp_size: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size  # type: ignore[attr-defined]
    return tuple(shape)


def local_slice(full: torch.Tensor, param: torch.nn.Parameter, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's slice of ``full``, cut as megatron-core marked ``param`` (``partition_dim``/``_stride``)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)  # type: ignore[attr-defined]
    return shard(full, dim, stride, tp_rank, tp_size)


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def init_tensor(cfg: ModelConfig, name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The full (unsharded) float32 initial value of the parameter of global ``name`` and full ``shape``: Normal(0,
    std) weights (std / sqrt(2 L) on the two residual-branch outputs, as GPT-2 and Megatron scale them), ones for
    norms, zeros for biases (the rules of ``families.layer_tensors``), each drawn from its own global-name generator.
    A tied output layer is the embedding's draw."""
    if cfg.tie_embeddings and name == "output_layer.weight":
        name = "embedding.word_embeddings.weight"  # the same draw as the embedding it mirrors
    rule = init_rule(init_rules(cfg), name)
    if rule == "ones":
        return torch.ones(shape)
    if rule == "zeros":
        return torch.zeros(shape)
    std = {"normal": cfg.init_std, "residual": cfg.init_std / math.sqrt(2.0 * cfg.num_layers)}[rule]
    return torch.randn(shape, generator=_generator(seed, name)) * std


def init_parameters(model: torch.nn.Module, cfg: ModelConfig, *, stage: StageInfo, seed: int) -> None:
    """Every parameter of ``model`` (one pipeline stage, one TP rank) from ``init_tensor``: this rank's slice."""
    with torch.no_grad():
        for local, p in model.named_parameters():
            full = init_tensor(
                cfg,
                global_name(local, stage.layer_offset, stage.expert_offset),
                full_shape(p, stage.tp_size),
                seed,
            )
            p.copy_(local_slice(full, p, stage.tp_rank, stage.tp_size).to(p.dtype))
