"""One configuration tree: dataclasses, loaded from YAML, with ``key.sub=value`` overrides.

Unknown keys and bad values fail here, before any process group starts, with the key's full name and what is
allowed. The resolved tree is what runs print at start and save beside their outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gatedpo_mega.backend import BACKENDS
from gatedpo_mega.data.config import DataConfig
from gatedpo_mega.errors import ConfigError
from gatedpo_mega.gate import GateConfig
from gatedpo_mega.objectives import SFT_OBJECTIVES, ObjectiveConfig
from gatedpo_mega.squeeze import SqueezeConfig
from gatedpo_mega.validate import choice, not_empty, positive, valid_seed

T = TypeVar("T")

# Longer than any run waits on a collective, and far inside what ``datetime.timedelta(minutes=...)`` holds.
MAX_TIMEOUT_MINUTES = 365 * 24 * 60  # one year

# Where ``train.report_to`` can send the metrics besides ``metrics.jsonl`` (gatedpo_mega/training/reporters.py).
REPORT_TO = ("tensorboard", "wandb", "mlflow")


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    # context parallelism (CP): each row's tokens split over this many ranks in the load-balanced zigzag order;
    # attention runs on keys and values gathered over them (gatedpo_mega/megatron/context.py)
    context: int = 1
    # expert parallelism (EP): a mixture-of-experts model's experts split over this many data-parallel ranks, each
    # token sent to its experts' ranks and back (megatron-core's all-to-all dispatcher); 1 without experts
    expert: int = 1
    zero_stage: int = 1

    def __post_init__(self) -> None:
        choice("parallel.tensor", self.tensor, (1, 2, 4, 8))
        choice("parallel.pipeline", self.pipeline, (1, 2, 4))
        choice("parallel.context", self.context, (1, 2, 4, 8, 16))
        choice("parallel.expert", self.expert, (1, 2, 4, 8, 16, 32, 64))
        choice("parallel.zero_stage", self.zero_stage, (0, 1, 2, 3))
        if self.pipeline > 1 and self.zero_stage > 1:
            raise ValueError(
                f"parallel.zero_stage={self.zero_stage} with parallel.pipeline={self.pipeline}: DeepSpeed shards "
                "gradients (stage 2) and parameters (stage 3) only without pipeline parallelism; use zero_stage 0 or 1"
            )


# The linear layers LoRA can adapt, by their Hugging Face names (megatron-core fuses q/k/v into linear_qkv and
# gate/up into linear_fc1; gatedpo_mega/megatron/lora.py keeps one adapter per name inside the fused layer).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(kw_only=True, slots=True)
class LoraConfig:
    """Low-rank adapters (LoRA) on the decoder's linear layers, with the base model frozen: each targeted
    ``W x`` becomes ``W x + (alpha / rank) B A dropout(x)``, ``A`` [rank, in] and ``B`` [out, rank] (zero at the
    start, so the first step's policy is the base). rank 0: off, every parameter is trained."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0  # on each adapter's input only (the base and the reference see no dropout)
    # Hugging Face names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) or all-linear (all seven)
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])

    def __post_init__(self) -> None:
        positive("model.lora.rank", self.rank, allow_zero=True)
        positive("model.lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout={self.dropout} must be in [0, 1)")
        names = list(self.target_modules)
        not_empty("model.lora.target_modules", names)
        if "all-linear" in names:
            names = [n for n in names if n != "all-linear"] + list(LORA_TARGETS)
        for name in names:
            if name not in LORA_TARGETS:
                raise ValueError(
                    f"model.lora.target_modules: {name!r} is not one of {', '.join(LORA_TARGETS)} (or all-linear)"
                )
        self.target_modules = [n for n in LORA_TARGETS if n in names]  # one spelling: the canonical order

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """A Llama-family decoder (RMSNorm, SwiGLU, rotary embeddings, grouped-query attention)."""

    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2  # key/value heads (grouped-query attention); = heads for multi-head attention
    ffn_hidden_size: int = 176
    head_dim: int = 0  # channels per attention head; 0: hidden_size / num_attention_heads (Qwen3: its own)
    vocab_size: int = 0  # 0: the tokenizer's vocabulary size
    make_vocab_size_divisible_by: int = 64  # the padded vocabulary is a multiple of this x parallel.tensor
    max_position_embeddings: int = 512
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = False  # share the input embedding and the output layer
    qkv_bias: bool = False  # bias on the query/key/value projection (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head's query and key, before the rotary embedding (Qwen3)
    init_std: float = 0.02
    # Mixture of experts (Qwen3-MoE, Mixtral): every layer's MLP is num_experts SwiGLU experts of
    # moe_ffn_hidden_size, each token sent to the moe_router_topk experts with the largest
    # router logits and their outputs weighted by the router's softmax, over all experts and renormalised over the
    # top k (moe_norm_topk_prob=true: Mixtral, Qwen3-30B-A3B) or not. 0 experts: a dense MLP.
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0
    moe_router_topk: int = 2
    moe_norm_topk_prob: bool = True
    # The router's load-balancing loss (Switch Transformer's E * sum_e f_e P_e per layer, over the non-padding tokens
    # of each micro-batch) times this, added to the policy's objective; not part of the logged loss.
    moe_aux_loss_coef: float = 0.001
    dtype: str = "fp32"  # fp32 | bf16 (parameters and compute; the optimizer keeps fp32 master weights)
    # Core attention: sdpa (torch's scaled_dot_product_attention: causal without a mask tensor, memory linear in
    # the sequence length, documents of a packed row kept apart) or local (megatron-core's, [T, T] scores).
    attention: str = "sdpa"
    # Activation recomputation: none, or full (each layer's forward runs again in backward; only layer inputs are
    # kept: about a third more compute for a fraction of the activation memory).
    recompute: str = "none"
    fused_logprobs: bool = True  # output layer + log-probs per token chunk, never holding the logits
    # The output layer computes the whole preference loss in three matmuls (fused_preference_loss) instead of
    # recomputing logits in backward (four): faster, plus two [V/TP, H] float32 accumulators of memory.
    fused_objective: bool = False
    # Start from these weights instead of the seeded initialisation: a Hugging Face folder (config.json +
    # safetensors), a folder written by ``gatedpo convert hf-to-mcore``/``reshard``, or a training checkpoint
    # (``OUTPUT/checkpoints/step-N``, or ``OUTPUT`` for its latest), or a Hugging Face Hub model id
    # (``org/name[@revision]``, read from the local Hugging Face cache). ``gatedpo train`` reads the shape fields
    # above, norm_epsilon and rotary_base from it (leave them out; a written one must agree), max_position_embeddings
    # where not written, and an mcore folder's or checkpoint's make_vocab_size_divisible_by (its embedding is padded).
    init_from: str = ""
    backend: str = "megatron"  # megatron | transformers (a Hugging Face causal LM from init_from, under ZeRO)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) to start the adapters from,
    # instead of A random and B zero; its rank, alpha and targets fill model.lora's (a written one must agree).
    # The reference is then the starting policy: the base with this adapter, frozen.
    init_adapter: str = ""

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "ffn_hidden_size",
        ):
            positive(f"model.{name}", getattr(self, name))
        positive("model.head_dim", self.head_dim, allow_zero=True)
        if not self.head_dim and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} must be divisible by model.num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim and self.head_dim * self.num_attention_heads == self.hidden_size:
            # One spelling per model, so that shape comparisons between configs are exact.
            raise ValueError(
                f"model.head_dim={self.head_dim} is hidden_size / num_attention_heads: leave it 0"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} must be divisible by "
                f"model.num_query_groups={self.num_query_groups}"
            )
        positive("model.vocab_size", self.vocab_size, allow_zero=True)
        positive("model.num_experts", self.num_experts, allow_zero=True)
        positive("model.moe_ffn_hidden_size", self.moe_ffn_hidden_size, allow_zero=True)
        positive("model.moe_router_topk", self.moe_router_topk)
        positive("model.moe_aux_loss_coef", self.moe_aux_loss_coef, allow_zero=True)
        if self.num_experts and self.moe_router_topk > self.num_experts:
            raise ValueError(
                f"model.moe_router_topk={self.moe_router_topk} is more than model.num_experts={self.num_experts}"
            )
        if self.num_experts == 1:
            raise ValueError("model.num_experts=1 is a dense MLP: set 0 (or 2 and more experts)")
        if bool(self.num_experts) != bool(self.moe_ffn_hidden_size):
            raise ValueError(
                f"model.moe_ffn_hidden_size={self.moe_ffn_hidden_size} with model.num_experts={self.num_experts}: "
                "the experts' width is set exactly when there are experts"
            )
        positive("model.make_vocab_size_divisible_by", self.make_vocab_size_divisible_by)
        for name in ("max_position_embeddings", "rotary_base", "norm_epsilon", "init_std"):
            positive(f"model.{name}", getattr(self, name))
        if self.rotary_base >= 2**63:  # megatron-core takes it as a 64-bit integer
            raise ValueError(f"model.rotary_base={self.rotary_base:g} must be below 2**63")
        choice("model.dtype", self.dtype, ("fp32", "bf16"))
        choice("model.backend", self.backend, tuple(BACKENDS))
        choice("model.attention", self.attention, ("sdpa", "local"))
        choice("model.recompute", self.recompute, ("none", "full"))
        if self.fused_objective and (not self.fused_logprobs or self.backend != "megatron"):
            raise ValueError(
                "model.fused_objective=true needs model.fused_logprobs=true and model.backend=megatron"
            )
        if self.backend == "transformers" and not self.init_from:
            raise ValueError("model.backend=transformers needs model.init_from: a Hugging Face model folder")
        if self.init_adapter and not self.lora.enabled:
            # A run's config has model.lora filled from the adapter's adapter_config.json by then
            # (training/preflight.py load_run_config); a config built from the files alone (load_config) has not.
            raise ValueError(
                f"model.init_adapter={self.init_adapter!r} starts LoRA adapters: set model.lora.rank, or load the "
                "config as gatedpo train does (load_run_config), which reads it from the adapter's adapter_config.json"
            )

    @property
    def kv_channels(self) -> int:
        """Channels per attention head (megatron-core's name)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    max_steps: int = 20
    micro_batch_size: int = 2  # pairs per micro-batch (2x rows: chosen and rejected)
    global_batch_size: int = (
        8  # pairs per optimizer step = micro_batch_size x accumulation x data-parallel size
    )
    seed: int = 1234
    output_dir: str = "outputs/run"
    save_every: int = 0  # steps between checkpoints (0: only the final one)
    save_final: bool = True  # a checkpoint after the last step
    keep_checkpoints: int = 0  # how many of the latest complete checkpoints to keep (0: all)
    # Continue from the latest checkpoint in output_dir that verifies: true (``--resume``; refused when there is
    # none), auto (start at step 0 when there is none: a restarted or requeued job finishes by itself), or false.
    resume: bool | str = False
    # A damaged latest checkpoint on resume: fall back to the newest that verifies (false: refuse the resume).
    resume_fallback: bool = True
    eval_every: int = (
        0  # steps between evaluations (hash split, data.eval_sets) (0: none; also after the last step)
    )
    eval_max_pairs: int = 0  # evaluate on the first N pairs of each evaluation set (0: all)
    # precomputed (once, from the initial weights) | live (a forward per step: a frozen copy of the initial model;
    # with LoRA the policy itself with its adapters off, no copy) | auto (live with LoRA, precomputed otherwise)
    reference: str = "auto"
    collective_timeout_minutes: float = 30.0  # a rank stuck in a collective this long fails the run
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine decay floor
    warmup_steps: int = 2
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables
    reference_batch_size: int = 16  # pairs per forward-only micro-batch of the reference pass
    # Trackers that get every metric besides metrics.jsonl, from rank 0: tensorboard, wandb, mlflow (a list, or
    # "wandb,mlflow" on the command line; [] or none: metrics.jsonl only). wandb and mlflow are optional packages.
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    run_name: str = ""  # the run's name in wandb and mlflow ("": the name of train.output_dir)
    # Signals on which every rank finishes its step, a checkpoint of that step is written and verified, and the run
    # exits with 75 (preempted: requeue it). A signal one rank receives stops all of them at the same step.
    # [] or none: the signals keep their default action (the process ends, unsaved).
    save_on_signal: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])

    def __post_init__(self) -> None:
        self.report_to = _choices("train.report_to", self.report_to, REPORT_TO, "tracker")
        self.save_on_signal = _choices("train.save_on_signal", self.save_on_signal, SIGNALS, "signal")
        for name in ("max_steps", "micro_batch_size", "global_batch_size", "reference_batch_size"):
            positive(f"train.{name}", getattr(self, name))
        for name in ("save_every", "keep_checkpoints", "eval_every", "eval_max_pairs"):
            positive(f"train.{name}", getattr(self, name), allow_zero=True)
        choice("train.reference", self.reference, ("auto", "precomputed", "live"))
        if isinstance(self.resume, str) and self.resume != "auto":
            raise ValueError(f"train.resume must be true, false or auto; got {self.resume!r}")
        valid_seed("train.seed", self.seed)
        not_empty("train.output_dir", self.output_dir)  # empty would write into the current folder
        positive("train.collective_timeout_minutes", self.collective_timeout_minutes)
        if self.collective_timeout_minutes > MAX_TIMEOUT_MINUTES:
            raise ValueError(
                f"train.collective_timeout_minutes={self.collective_timeout_minutes} must be <= "
                f"{MAX_TIMEOUT_MINUTES} (one year)"
            )
        positive("train.lr", self.lr)
        positive("train.min_lr", self.min_lr, allow_zero=True)
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} must be <= train.lr={self.lr}")
        positive("train.weight_decay", self.weight_decay, allow_zero=True)
        positive("train.adam_eps", self.adam_eps)
        positive("train.warmup_steps", self.warmup_steps, allow_zero=True)
        positive("train.grad_clip", self.grad_clip, allow_zero=True)
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"train.adam_betas={self.adam_betas} must be two numbers in [0, 1)")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )


def _choices(key: str, names: list[str], allowed: tuple[str, ...], what: str) -> list[str]:
    """A list option of ``allowed`` names (``what`` each is) without repeats; ``[none]`` is the empty list."""
    if "none" in names:
        if len(names) > 1:
            raise ValueError(f"{key}={names}: none names no {what} and goes alone")
        return []
    for name in names:
        if name not in allowed:
            raise ValueError(f"{key}: {name!r} is not one of {', '.join(allowed)} (or none)")
    return list(dict.fromkeys(names))


# The signals a scheduler sends before it stops a job (SLURM's --signal, Kubernetes and spot instances: SIGTERM).
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")


@dataclass(kw_only=True, slots=True)
class Config:
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    squeeze: SqueezeConfig = field(default_factory=SqueezeConfig)

    def __post_init__(self) -> None:
        if self.train.reference == "auto":
            lora_live = self.model.lora.enabled and self.objective.name not in SFT_OBJECTIVES
            self.train.reference = "live" if lora_live else "precomputed"
        if self.objective.name in SFT_OBJECTIVES and self.gate.enabled:
            raise ValueError(
                f"gate.shape={self.gate.shape}: the gate attenuates preference gradients on rejected responses; "
                f"objective.name={self.objective.name} has none, set gate.shape=none"
            )
        if self.model.backend == "transformers" and (self.parallel.tensor, self.parallel.pipeline) != (1, 1):
            raise ValueError(
                "model.backend=transformers runs data-parallel under ZeRO only: parallel.tensor and "
                "parallel.pipeline must be 1 (for TP/PP use the default backend with model.init_from)"
            )
        self._check_experts()
        cp = self.parallel.context
        if cp > 1 and self.model.backend == "transformers":
            raise ValueError(
                f"parallel.context={cp} with model.backend=transformers: context parallelism runs in the megatron-core "
                "backend's attention; use model.backend=megatron with model.init_from (the same weights)"
            )
        if cp > 1 and self.model.attention != "sdpa":
            raise ValueError(
                f"parallel.context={cp} with model.attention={self.model.attention}: that attention core sees only "
                "this rank's tokens; use model.attention=sdpa, which gathers the keys and values over the CP ranks"
            )
        if cp > 1 and self.model.fused_objective:
            raise ValueError(
                f"parallel.context={cp} with model.fused_objective=true: the fused objective streams whole rows through "
                "the output layer, and each CP rank holds a part of every row; use model.fused_objective=false (the "
                "fused log-probs still never hold the logits)"
            )
        if self.model.fused_objective and self.parallel.zero_stage == 3:
            raise ValueError(
                "model.fused_objective=true with parallel.zero_stage=3: ZeRO-3 gathers the output layer's weight for "
                "backward through the layer's outputs, which the fused objective's loss does not pass through; use "
                "parallel.zero_stage <= 2 (or model.fused_objective=false)"
            )
        if self.objective.name in SFT_OBJECTIVES and self.model.fused_objective:
            raise ValueError(
                f"model.fused_objective=true computes preference objectives, not {self.objective.name}"
            )
        if self.data.packing and self.model.backend == "transformers":
            raise ValueError(
                "data.packing=true with model.backend=transformers: a Hugging Face model keeps packed documents apart "
                "only through a dense [T, T] block mask, which packing exists to avoid; use model.backend=megatron "
                "with model.init_from (the same weights) to pack"
            )
        if self.data.packing and self.model.attention != "sdpa":
            raise ValueError(
                f"data.packing=true with model.attention={self.model.attention}: that attention core cannot keep the "
                "documents of a packed row apart; use model.attention=sdpa"
            )
        if self.data.eval_sets and not self.train.eval_every:
            raise ValueError(
                f"data.eval_sets ({', '.join(self.data.eval_sets)}) are evaluated every train.eval_every steps; "
                "set train.eval_every > 0"
            )
        if self.data.probe_pairs and not self.train.eval_every:
            raise ValueError(
                f"data.probe_pairs={self.data.probe_pairs} are evaluated every train.eval_every steps; "
                "set train.eval_every > 0"
            )
        if self.objective.name in SFT_OBJECTIVES and self.train.reference == "live":
            raise ValueError(f"train.reference=live: objective.name={self.objective.name} uses no reference")
        if self.model.max_position_embeddings < self.data.max_length:
            raise ValueError(
                f"model.max_position_embeddings={self.model.max_position_embeddings} must be >= "
                f"data.max_length={self.data.max_length}"
            )

    def _check_experts(self) -> None:
        """What expert parallelism and a mixture of experts run with, each refusal naming its reason."""
        m, ep, zero = self.model, self.parallel.expert, self.parallel.zero_stage
        if ep > 1 and not m.num_experts:
            raise ValueError(
                f"parallel.expert={ep} splits a mixture of experts: model.num_experts is 0 (a dense model)"
            )
        if ep > 1 and m.num_experts % ep:
            raise ValueError(f"parallel.expert={ep} does not divide model.num_experts={m.num_experts}")
        if ep > 1 and zero not in (1, 2):
            why = (
                "DeepSpeed's stage 3 refuses MoE parameters"
                if zero == 3
                else "without ZeRO DeepSpeed saves one rank's experts in a checkpoint and clips by an average of the ranks' norms"
            )
            raise ValueError(
                f"parallel.expert={ep} with parallel.zero_stage={zero}: {why}; use zero_stage 1 or 2"
            )
        if not m.num_experts:
            return
        if self.parallel.tensor > 1:
            raise ValueError(
                f"model.num_experts={m.num_experts} with parallel.tensor={self.parallel.tensor}: megatron-core's MoE "
                "layer trains with tensor parallelism only under sequence parallelism, which this project does not run; "
                "split the experts with parallel.expert and the layers with parallel.pipeline"
            )
        if self.parallel.context > 1:
            raise ValueError(
                f"model.num_experts={m.num_experts} with parallel.context={self.parallel.context}: a mixture of experts "
                "with context parallelism is not supported (the router's load-balancing loss would need the whole rows)"
            )
        if m.lora.enabled:
            raise ValueError(
                f"model.num_experts={m.num_experts} with model.lora.rank={m.lora.rank}: LoRA adapts dense layers "
                "only; train a mixture of experts with every parameter (model.lora.rank=0)"
            )
        if m.backend != "megatron":
            raise ValueError(f"model.num_experts={m.num_experts} runs in model.backend=megatron")


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _allowed_keys(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotated type ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        shorthand = getattr(tp, "SHORTHAND", None)  # a section written as the value of one of its fields
        if shorthand is not None and isinstance(value, str):
            value = {shorthand: value}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {_allowed_keys(tp)}; got {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:  # the member the value already is (``bool | str``: true, or "auto")
            if isinstance(a, type) and isinstance(value, a) and not (a is int and isinstance(value, bool)):
                return _coerce(key, value, a)
        return _coerce(key, value, inner[0])
    if origin is dict:  # a mapping of names the user chooses (data.eval_sets)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of names to values; got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _coerce(f"{key}.{k}", v, item) for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(tp)
        if item is str and isinstance(value, str):  # ``key=a,b`` on the command line; "" is the empty list
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list; got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number; got {value!r}")
        return _finite(key, value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer; got {value!r}")
        # Every integer ends up in torch, numpy or C as 64 bits; beyond that it is an OverflowError there.
        if not -(2**63) <= value < 2**63:
            raise ConfigError(f"{key}={value} must be an integer in [-2**63, 2**63)")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false; got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string; got {value!r}")
        return value
    return value


def _finite(key: str, value: int | float) -> float:
    """``value`` as a float, refused when NaN or infinite: no key gives them a meaning, NaN passes every range
    check (each comparison is false) and both reach the trainer as a traceback or a non-finite loss."""
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{key}={value} must be a finite number")
    return number


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key '{key}'; allowed here: {_allowed_keys(cls)}")
        kwargs[k] = _coerce(key, v, hints[k])
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` -> (``key.sub``, value parsed as a YAML scalar or list)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    try:
        return key, yaml.safe_load(raw) if raw else ""
    except (yaml.YAMLError, ValueError):  # ValueError: an integer beyond Python's 4300-digit conversion limit
        raise ConfigError(f"override {text!r}: value is not valid YAML") from None


ConfigPaths = str | Path | list[str | Path] | tuple[str | Path, ...] | None


def _read_file(p: Path) -> dict[str, Any]:
    """One YAML file's top-level mapping (empty for an empty file), each problem one line naming the file."""
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {p}{where}: not valid YAML") from None
    except ValueError as e:  # an integer beyond Python's 4300-digit conversion limit
        raise ConfigError(f"config file {p}: not valid YAML ({e})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {p}: the top level must be a mapping of sections")
    return loaded or {}


def _check_keys(tree: dict[str, Any], cls: type, prefix: str, source: Path) -> None:
    """Unknown keys refused naming the file they came from (values are checked once, on the merged tree)."""
    hints = typing.get_type_hints(cls)
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in hints:
            raise ConfigError(
                f"config file {source}: unknown config key '{key}'; allowed here: {_allowed_keys(cls)}"
            )
        tp = hints[k]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(v, dict):
            _check_keys(v, tp, key, source)


def merge_trees(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists included) is replaced."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_trees(out[k], v)
        else:
            out[k] = v
    return out


def _load_file(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A file's tree: its ``include:`` files (a path or a list, relative to it) merged in order, then its own keys."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(resolved) :], resolved))
        raise ConfigError(f"config file {path}: include cycle {cycle}")
    tree = _read_file(path)
    include = tree.pop("include", None)
    if include is None:
        includes: list[Any] = []
    elif isinstance(include, str):
        includes = [include]
    elif isinstance(include, list) and include and all(isinstance(i, str) and i for i in include):
        includes = include
    else:
        raise ConfigError(
            f"config file {path}: include must be a file path or a list of them; got {include!r}"
        )
    _check_keys(tree, Config, "", path)
    merged: dict[str, Any] = {}
    for name in includes:
        merged = merge_trees(merged, _load_file(path.parent / name, (*chain, resolved)))
    return merge_trees(merged, tree)


def load_tree(paths: ConfigPaths = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """What the user wrote, as one tree: each YAML file in order (later files win; mappings merge, lists are
    replaced; a file's ``include:`` comes before its own keys), then ``key.sub=value`` overrides. A key absent from
    it was not written (the default applies)."""
    if paths is None:
        paths = []
    elif isinstance(paths, str | Path):
        paths = [paths]
    tree: dict[str, Any] = {}
    for path in paths:
        tree = merge_trees(tree, _load_file(Path(path)))
    for text in overrides:
        _set_path(tree, *parse_override(text))
    return tree


def build_config(tree: dict[str, Any]) -> Config:
    """The resolved configuration of ``tree``: defaults where it has no key, every value checked."""
    return _build(Config, tree)


def load_config(paths: ConfigPaths = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The resolved configuration of the YAML files ``paths`` and the ``overrides`` (``load_tree``), as written: a
    run's config from the user's files also takes the model fields ``model.init_from`` fixes
    (``gatedpo_mega.training.preflight.load_run_config``)."""
    return build_config(load_tree(paths, overrides))


def read_field(cls: type, prefix: str, name: str, value: Any) -> Any:
    """``value`` written for the field ``name`` of ``cls`` (at ``prefix.name``) as ``build_config`` reads it."""
    return _coerce(f"{prefix}.{name}", value, typing.get_type_hints(cls)[name])


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
