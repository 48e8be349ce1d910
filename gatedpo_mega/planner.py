"""What a run needs before it starts: the busiest rank's memory, part by part, and the layouts that fit.

Everything here is arithmetic on the config: parameter counts come from the same per-layer tensor table the model
and the converters use (``families.layer_tensors``), cut by tensor parallelism as megatron-core cuts them and split
over pipeline stages as the backend splits them; DeepSpeed's ZeRO stages hold what their optimizers allocate
(``docs/planning.md`` says where each term comes from). No model is built and no process group started.

With LoRA (``model.lora.rank`` > 0) the base is frozen: its weights stay (in the model's dtype, cut by TP and PP,
and by DP under ZeRO-3) but have no gradient and no optimizer state; the adapters (``megatron/lora.py``) get
gradients, fp32 master weights and Adam's moments, sharded by ZeRO as full parameters are; a linear's input is
kept for backward only where an adapter reads it; the live reference is the policy with its adapters off: no copy.

With context parallelism (``parallel.context`` = CP > 1, ``megatron/context.py``) the world is TP x CP x DP x PP:
every CP rank of a data-parallel replica holds the replica's TP/PP shard and runs its model on 1/CP of each row's
tokens (rows padded to a multiple of 2 CP), so every per-token term is divided by CP; attention keeps each layer's
keys and values gathered over the whole row, the loss gathers 3 float32 statistics a token of the whole row, and
ZeRO partitions over DP x CP (DeepSpeed's data-parallel group with context parallelism).

With a mixture of experts (``model.num_experts`` = E > 0, ``megatron/experts.py``) every layer's MLP is E SwiGLU
experts and a router; expert parallelism (``parallel.expert`` = EP) splits each layer's experts over EP of the
data-parallel ranks (E/EP each), the router and the rest stay whole on every rank. ZeRO 1/2 partition the dense
parameters over DP and the experts over the expert-data-parallel group, DP/EP (``expert_zero_group``), and step the
experts as their own optimizer group. Each token runs in ``moe_router_topk`` = k experts: the step time counts k
experts' FLOPs a token (``active_layer_parameters``) and the all-to-all that sends every token to its experts' ranks
and back (``expert_exchange_bytes``); the activations keep k copies of each token's expert intermediates
(``moe_token_bytes``). The config refuses MoE with TP > 1, CP > 1 and LoRA, and EP > 1 without ZeRO 1/2.

Two targets:

- ``cuda``: the allocator's peak (``torch.cuda.max_memory_allocated``), what ``memory/peak_mib_max_rank`` records on
  a GPU. The CUDA context and the allocator's cache are outside it.
- ``cpu``: the peak resident memory of the process (``ru_maxrss``), what ``memory/peak_mib_max_rank`` records on a
  CPU host: the tensors plus the process baseline (Python, torch, megatron-core and DeepSpeed loaded, the data) and
  the blocks the C allocator keeps after a free (``HOST_RETAINED``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

from gatedpo_mega.config import Config, ParallelConfig
from gatedpo_mega.errors import ConfigError, UserError
from gatedpo_mega.families import LayerTensor, expert_index, layer_tensors
from gatedpo_mega.megatron.lora import Site, sites
from gatedpo_mega.ops.logprobs import DEFAULT_CHUNK_ELEMENTS

MiB = 2**20
GiB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
FP32 = 4

# DeepSpeed's bucket sizes as gatedpo_mega/deepspeed/engine.py configures them (elements).
REDUCE_BUCKET = 50_000_000
ZERO3_MAX_LIVE = 1_000_000_000  # DeepSpeed's stage3_max_live_parameters default
# The resident memory of a rank before its model exists, measured on this project's CPU set (constraints/cpu-py311.txt:
# torch 2.13, megatron-core 0.16, DeepSpeed 0.19): a 2-layer, 64-wide model's peak over a whole run, less the 116 MiB
# that wandb and mlflow took when megatron-core and DeepSpeed still imported them (environment.py). A GPU's
# allocator peak has no such term.
CPU_BASELINE_BYTES = 474 * MiB
MALLOC_MMAP_MAX = 32 * MiB  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    bytes: int
    note: str


@dataclass(frozen=True, slots=True)
class RankPlan:
    """The memory of one pipeline stage's ranks (every tensor and data-parallel rank of a stage holds the same)."""

    stage: int
    parameters: int  # on this rank (its tensor-parallel share of its stage), LoRA adapters included
    trained: int  # of them, those the optimizer steps: all of them, or the LoRA adapters alone
    parts: tuple[Part, ...]  # resident through the step
    backward: tuple[Part, ...]  # on top, at the end of backward: gradients, activations, output temporaries
    step: tuple[
        Part, ...
    ]  # on top, during the optimizer step: gradients, their fp32 copies, AdamW's temporaries

    @property
    def peak_phase(self) -> str:
        return "backward" if _sum(self.backward) >= _sum(self.step) else "optimizer step"

    @property
    def peak_parts(self) -> tuple[Part, ...]:
        return self.backward if self.peak_phase == "backward" else self.step

    @property
    def total(self) -> int:
        return _sum(self.parts) + _sum(self.peak_parts)


def _sum(parts: tuple[Part, ...]) -> int:
    return sum(p.bytes for p in parts)


@dataclass(frozen=True, slots=True)
class Plan:
    cfg: Config
    dp: int
    vocab_size: int
    target: str  # cuda | cpu
    tokens: int  # per micro-batch row x rows (the longest rows data.max_length allows), over every CP rank
    ranks: tuple[RankPlan, ...]  # one per pipeline stage

    @property
    def busiest(self) -> RankPlan:
        return max(self.ranks, key=lambda r: r.total)

    @property
    def per_rank_peak_bytes(self) -> int:
        return self.busiest.total

    @property
    def step_time(self) -> float:
        return step_seconds(self.cfg, self.dp, self.vocab_size)


# ------------------------------------------------------------------------------------------------- parameters


def padded_vocab(cfg: Config, vocab_size: int) -> int:
    multiple = cfg.model.make_vocab_size_divisible_by * cfg.parallel.tensor
    return math.ceil(vocab_size / multiple) * multiple


def _elements(cfg: Config, t: LayerTensor) -> int:
    """``t``'s elements on one tensor rank."""
    return math.prod(t.shape) // (cfg.parallel.tensor if t.dim is not None else 1)


def local_experts(cfg: Config) -> int:
    """The experts of each layer one rank holds: E / EP (0 for a dense model)."""
    return cfg.model.num_experts // cfg.parallel.expert


def layer_split(cfg: Config) -> tuple[int, int]:
    """One decoder layer's parameters on one tensor rank as (everything but the experts, one expert): the router is
    in the first (replicated on every rank), an expert's ``linear_fc1`` [2f, h] and ``linear_fc2`` [h, f] in the
    second (0 for a dense model)."""
    dense = expert = 0
    for t in layer_tensors(cfg.model):
        e = expert_index(t.mcore)
        if e is None:
            dense += _elements(cfg, t)
        elif e == 0:
            expert += _elements(cfg, t)
    return dense, expert


def layer_parameters(cfg: Config) -> int:
    """One decoder layer's parameters on one tensor rank: with experts, its E / EP of them."""
    dense, expert = layer_split(cfg)
    return dense + local_experts(cfg) * expert


def active_layer_parameters(cfg: Config) -> int:
    """The parameters of one layer a token runs through on one tensor rank: everything but the experts, and the
    ``moe_router_topk`` experts it is routed to (a dense layer: all of them)."""
    dense, expert = layer_split(cfg)
    return dense + (cfg.model.moe_router_topk * expert if cfg.model.num_experts else 0)


def stage_expert_parameters(cfg: Config) -> int:
    """The expert parameters on one rank of a pipeline stage: its layers' E / EP experts each (0 for a dense
    model)."""
    return cfg.model.num_layers // cfg.parallel.pipeline * local_experts(cfg) * layer_split(cfg)[1]


def stage_parameters(cfg: Config, vocab_size: int, stage: int) -> int:
    """Parameters on one tensor rank of pipeline stage ``stage``: its layers, the embedding on the first stage, the
    final norm and the output layer on the last (a tied output layer is the embedding itself at pipeline 1 and a
    copy of it on the last stage otherwise)."""
    m, tp, pp = cfg.model, cfg.parallel.tensor, cfg.parallel.pipeline
    table = padded_vocab(cfg, vocab_size) * m.hidden_size // tp
    n = m.num_layers // pp * layer_parameters(cfg)
    first, last = stage == 0, stage == pp - 1
    if first:
        n += table
    if last:
        n += m.hidden_size
        if not (m.tie_embeddings and first):
            n += table
    return n


def _unsplit(cfg: Config) -> Config:
    """``cfg`` on one rank: TP, PP, CP and EP 1 (a ZeRO stage every model allows at EP 1)."""
    return replace(cfg, parallel=ParallelConfig(tensor=1, pipeline=1, zero_stage=cfg.parallel.zero_stage))


def total_parameters(cfg: Config, vocab_size: int) -> int:
    """The model's parameters, counted once (the true vocabulary, no padding, a tied output layer once), every
    expert included."""
    m = cfg.model
    table = vocab_size * m.hidden_size
    return (
        m.num_layers * layer_parameters(_unsplit(cfg))
        + m.hidden_size
        + table * (1 if m.tie_embeddings else 2)
    )


def active_parameters(cfg: Config, vocab_size: int) -> int:
    """The parameters a token runs through, counted once: ``total_parameters`` with each layer's experts cut to
    the ``moe_router_topk`` it is routed to (a dense model: all of them)."""
    one = _unsplit(cfg)
    skipped = layer_parameters(one) - active_layer_parameters(one)
    return total_parameters(cfg, vocab_size) - cfg.model.num_layers * skipped


def stage_active_parameters(cfg: Config, vocab_size: int, stage: int) -> int:
    """The parameters of pipeline stage ``stage`` one tensor rank's tokens run through: ``stage_parameters`` with each
    layer's experts counted as the k a token is routed to. Under EP a rank's experts run the tokens the other ranks
    send them; balanced routing sends each rank as many as it has (T k expert passes a rank for T tokens a rank),
    so this counts one rank's expert FLOPs at any EP."""
    layers = cfg.model.num_layers // cfg.parallel.pipeline
    skipped = layer_parameters(cfg) - active_layer_parameters(cfg)
    return stage_parameters(cfg, vocab_size, stage) - layers * skipped


# ------------------------------------------------------------------------------------------------- LoRA


def _lora_sites(cfg: Config) -> list[tuple[Site, list[str]]]:
    """The adaptable linears of a layer that LoRA targets, each with its targeted Hugging Face names."""
    lora = cfg.model.lora
    if not lora.enabled:
        return []
    found = [(s, [hf for hf in s.hf if hf in lora.target_modules]) for s in sites(cfg.model)]
    return [(s, targets) for s, targets in found if targets]


def lora_layer_tensors(cfg: Config) -> list[int]:
    """The element counts of one layer's adapter factors on one tensor rank (``megatron/lora.py``): per targeted
    Hugging Face linear, ``A`` [r, in] and ``B`` [out, r]; a column-parallel site (q/k/v, gate/up) keeps ``A`` whole
    and cuts ``B``'s rows over TP, a row-parallel one (o_proj, down_proj) cuts ``A``'s columns and keeps ``B``."""
    r, tp = cfg.model.lora.rank, cfg.parallel.tensor
    out: list[int] = []
    for site, targets in _lora_sites(cfg):
        column = site.parallel == "column"
        for hf in targets:
            rows = site.out_features[site.hf.index(hf)]
            out += [r * (site.in_features // (1 if column else tp)), rows // (tp if column else 1) * r]
    return out


def stage_adapter_parameters(cfg: Config) -> int:
    """LoRA adapter parameters on one tensor rank of a pipeline stage (0 without LoRA)."""
    return cfg.model.num_layers // cfg.parallel.pipeline * sum(lora_layer_tensors(cfg))


def adapter_parameters(cfg: Config) -> int:
    """The model's LoRA adapter parameters, counted once (what PEFT calls its trainable parameters)."""
    return stage_adapter_parameters(_unsplit(cfg))


# ------------------------------------------------------------------------------------------------- activations


def row_length(cfg: Config) -> int:
    """A full-length row's tokens: ``data.max_length``, padded to a multiple of 2 CP under context parallelism (each
    CP rank takes two of the 2 CP chunks, the load-balanced zigzag order)."""
    cp = cfg.parallel.context
    return cfg.data.max_length if cp == 1 else math.ceil(cfg.data.max_length / (2 * cp)) * 2 * cp


def rows_tokens(cfg: Config) -> int:
    """Tokens of one micro-batch at full length: chosen and rejected rows of ``micro_batch_size`` pairs, whole (over
    every CP rank)."""
    return 2 * cfg.train.micro_batch_size * row_length(cfg)


def local_tokens(cfg: Config) -> int:
    """Tokens of one micro-batch that one rank runs its layers on: its 1/CP share of each row."""
    return rows_tokens(cfg) // cfg.parallel.context


def zero_group(cfg: Config, dp: int) -> int:
    """The ranks ZeRO partitions optimizer state, gradients and parameters over: data-parallel x context-parallel
    (DeepSpeed's data-parallel group, deepspeed/engine.py; every CP rank holds the same parameters, as every DP rank does)."""
    return dp * cfg.parallel.context


def expert_zero_group(cfg: Config, dp: int) -> int:
    """The ranks ZeRO partitions the experts' optimizer state and gradients over, and reduces their gradients over:
    the expert-data-parallel group, DP / EP ranks holding the same experts (deepspeed/engine.py registers it; at EP
    1 the experts are ordinary parameters: ``zero_group``)."""
    return zero_group(cfg, dp) // cfg.parallel.expert


def linear_inputs_kept(cfg: Config) -> int:
    """Elements per token of the four linears' inputs kept for backward on one tensor rank: all of them for their
    weight gradients; with LoRA only where an adapter reads the input (it keeps it for ``A``'s gradient): the
    frozen base keeps none (megatron-core's ``linear_with_frozen_weight`` saves its weight alone)."""
    tp = cfg.parallel.tensor
    targeted = {s.mcore for s, _ in _lora_sites(cfg)}
    moe = cfg.model.num_experts > 0  # the MLP's linears are the experts': moe_token_bytes
    return sum(
        s.in_features // (tp if s.parallel == "row" else 1)
        for s in sites(cfg.model)
        if (not cfg.model.lora.enabled or s.mcore in targeted) and not (moe and s.hf_prefix == "mlp")
    )


def moe_token_bytes(cfg: Config) -> int:
    """Bytes a token's mixture-of-experts block keeps for backward (megatron-core 0.16's router, all-to-all
    dispatcher and SequentialMLP experts; 0 for a dense model): the router's input (the normed hidden state, h, which
    the dispatcher permutes from); the router's logits and the top-k probabilities scattered over the E experts in
    the model dtype, the fp32 softmax over all E that the load-balancing loss keeps, and the boolean routing map
    [tokens, E]; then for each of the k experts the token is routed to: the dispatched hidden state (the expert's
    ``linear_fc1`` input, h), fc1's output [2f] (SwiGLU's input), SwiGLU's output [f] (kept by the multiply by the
    routing probability) and that product [f] (``linear_fc2``'s input). The permutation and the all-to-all keep
    nothing (index copies): their buffers are ``expert_exchange_buffer_bytes``."""
    m = cfg.model
    if not m.num_experts:
        return 0
    b = DTYPE_BYTES[m.dtype]
    h, f, k, e = m.hidden_size, m.moe_ffn_hidden_size // cfg.parallel.tensor, m.moe_router_topk, m.num_experts
    router = h * b + e * (2 * b + FP32 + 1)
    return router + k * (h + 2 * f + f + f) * b


def expert_exchange_buffer_bytes(cfg: Config, tokens: int) -> int:
    """One layer's token exchange, live while that layer runs (0 for a dense model): the k permuted copies of each
    of ``tokens`` tokens [tokens x k, h] and what the all-to-all returns in their place (the same size, balanced
    routing), in either direction (dispatch forward, combine's gradient backward)."""
    m = cfg.model
    return 2 * tokens * m.moe_router_topk * m.hidden_size * DTYPE_BYTES[m.dtype] if m.num_experts else 0


def gathered_kv_bytes(cfg: Config, tokens: int) -> int:
    """The keys and values one layer's attention keeps for backward on one tensor rank when a rank runs ``tokens``
    tokens: its own (CP 1), or under context parallelism those gathered over the CP group, the whole rows'
    (``tokens`` x CP), of which its own are a part."""
    m = cfg.model
    kv = m.num_query_groups * m.kv_channels // cfg.parallel.tensor
    return 2 * kv * tokens * cfg.parallel.context * DTYPE_BYTES[m.dtype]


def layer_activation_bytes(cfg: Config, tokens: int) -> int:
    """What one decoder layer keeps for backward on one tensor rank that runs ``tokens`` tokens (under context
    parallelism its 1/CP share: ``local_tokens``) (no sequence parallelism: the norms' inputs are whole on every
    tensor rank; SDPA keeps q, k, v, its output and the log-sum-exp, never [T, T] scores; ``attention=local``, which
    the config allows at CP 1 only, keeps the scores and their softmax). k and v are ``gathered_kv_bytes``; LoRA's
    own tensors are ``adapter_activation_bytes``."""
    m, tp = cfg.model, cfg.parallel.tensor
    b = DTYPE_BYTES[m.dtype]
    h, f = m.hidden_size, (0 if m.num_experts else m.ffn_hidden_size // tp)  # experts: moe_token_bytes
    q = m.num_attention_heads * m.kv_channels // tp
    per_token = (
        2 * h  # the two norms' inputs
        + linear_inputs_kept(cfg)  # the projections' inputs: normed (h, h), attention's output (q), SwiGLU's (f)
        + q  # attention's q (k and v: gathered_kv_bytes)
        + q  # attention's output
        + 2 * f  # [gate; up] out (SwiGLU's input)
    )  # fmt: skip
    total = (per_token * b + moe_token_bytes(cfg)) * tokens + gathered_kv_bytes(cfg, tokens)
    if m.attention == "local":
        heads = m.num_attention_heads // tp
        rows = 2 * cfg.train.micro_batch_size
        total += 2 * heads * rows * cfg.data.max_length**2 * b
    return total


def loss_gather_bytes(cfg: Config) -> int:
    """Under context parallelism the loss gathers 3 float32 statistics per token of the whole rows over the CP group
    (the last stage, one micro-batch); nothing at CP 1."""
    return 3 * FP32 * rows_tokens(cfg) if cfg.parallel.context > 1 else 0


def adapter_activation_bytes(cfg: Config, tokens: int) -> int:
    """What one layer's LoRA adapters keep for backward on one tensor rank, beyond the input they share with
    ``linear_inputs_kept``: the rank-r intermediate ``A x`` of every target (whole on every tensor rank), the
    concatenated ``A`` of a fused site with several targets, and with dropout the mask over the whole input of
    each site (a row-parallel rank keeps a slice of a whole mask) while the dropped input takes the input's place."""
    lora = cfg.model.lora
    b = DTYPE_BYTES[cfg.model.dtype]
    total = 0
    for site, targets in _lora_sites(cfg):
        k = len(targets)
        total += tokens * lora.rank * k
        if site.parallel == "column" and k > 1:
            total += site.in_features * lora.rank * k
        if lora.dropout > 0:
            total += tokens * site.in_features
    return total * b


def in_flight(cfg: Config, stage: int) -> int:
    """Micro-batches whose activations a stage holds at once under megatron-core's 1F1B schedule: the first stage
    warms up with one per later stage."""
    pp = cfg.parallel.pipeline
    micro = micro_batches(cfg, 1)
    return 1 if pp == 1 else min(pp - stage, micro)


def micro_batches(cfg: Config, dp: int) -> int:
    t = cfg.train
    return max(1, t.global_batch_size // (t.micro_batch_size * dp))


def output_temporaries(cfg: Config, vocab_size: int, tokens: int) -> tuple[int, str]:
    """The output layer's logits and their float32 temporaries on the last stage, for one micro-batch."""
    m, tp = cfg.model, cfg.parallel.tensor
    local = padded_vocab(cfg, vocab_size) // tp
    b = DTYPE_BYTES[m.dtype]
    if m.fused_logprobs:
        chunk = min(tokens, max(1, DEFAULT_CHUNK_ELEMENTS // (local * tp)))
        # the chunk's logits and two float32 workspaces; fused_objective adds two [V/TP, H] float32 accumulators
        # of the output layer's gradient, which a frozen output layer (LoRA) does not have
        extra = 2 * local * m.hidden_size * FP32 if m.fused_objective and not m.lora.enabled else 0
        what = f"fused: {chunk} tokens of logits at a time" + (
            " + 2 float32 [V/TP, H] accumulators" if extra else ""
        )
        return chunk * local * (b + 2 * FP32) + extra, what
    # whole logits kept for backward, and the float32 log-softmax with its gradient
    return tokens * local * (b + 3 * FP32), "unfused: the whole [rows x tokens, V/TP] logits"


# ------------------------------------------------------------------------------------------------- memory


def rank_tensors(cfg: Config, vocab_size: int, stage: int) -> list[int]:
    """The element counts of a stage's parameters on one tensor rank."""
    m, tp, pp = cfg.model, cfg.parallel.tensor, cfg.parallel.pipeline
    held = local_experts(cfg)  # a rank holds E / EP experts of each layer
    layer = [_elements(cfg, t) for t in layer_tensors(m) if (e := expert_index(t.mcore)) is None or e < held]
    out = layer * (m.num_layers // pp)
    table = padded_vocab(cfg, vocab_size) * m.hidden_size // tp
    if stage == 0:
        out.append(table)
    if stage == pp - 1:
        out.append(m.hidden_size)
        if not (m.tie_embeddings and stage == 0):
            out.append(table)
    return out


def adapter_tensors(cfg: Config) -> list[int]:
    """The element counts of a stage's LoRA adapter factors on one tensor rank."""
    return lora_layer_tensors(cfg) * (cfg.model.num_layers // cfg.parallel.pipeline)


def retained_by_malloc(cfg: Config, vocab_size: int, stage: int) -> int:
    """Bytes of the parameters glibc's malloc keeps after they are freed: ZeRO flattens every parameter it steps
    into one buffer and frees the originals (ZeRO-3 partitions every parameter, a frozen one too); blocks of 32 MiB
    and more (its largest mmap threshold) go back to the system, the smaller ones stay in the heap the process
    holds. With LoRA, ZeRO 1 and 2 flatten the adapters alone."""
    wb = DTYPE_BYTES[cfg.model.dtype]
    freed = adapter_tensors(cfg)
    if not cfg.model.lora.enabled or cfg.parallel.zero_stage == 3:
        freed = freed + rank_tensors(cfg, vocab_size, stage)
    return sum(n * wb for n in freed if n * wb < MALLOC_MMAP_MAX)


def rank_plan(cfg: Config, dp: int, vocab_size: int, stage: int, target: str) -> RankPlan:
    """What DeepSpeed (gatedpo_mega/deepspeed/engine.py: torch's AdamW, no offload) and megatron-core hold on one
    rank of ``stage``. Without ZeRO, DeepSpeed steps AdamW on the parameters (fp32) or on an fp32 copy of each
    (bf16), unsharded; from stage 1 it flattens the parameters and steps one flat fp32 partition of 1/(DP x CP)
    (``zero_group``). With LoRA what it steps is the adapters alone (the parameters that require a gradient). Under
    expert parallelism the rank's experts are their own optimizer group, partitioned 1/(DP / EP)
    (``expert_zero_group``), and DeepSpeed steps one group at a time: its fp32 gradient partition and AdamW's
    temporaries are those of the larger group."""
    m, par, t = cfg.model, cfg.parallel, cfg.train
    zero, lora = par.zero_stage, m.lora.enabled
    wb = DTYPE_BYTES[m.dtype]
    base = stage_parameters(cfg, vocab_size, stage)
    adapters = stage_adapter_parameters(cfg)
    n = base + adapters  # held
    trained = adapters if lora else n  # stepped: gradients and optimizer state
    last = stage == par.pipeline - 1
    shards = zero_group(cfg, dp)
    split = shards if zero >= 1 else 1
    part_n = math.ceil(n / split)
    experts = stage_expert_parameters(cfg)  # trained: the config refuses LoRA with experts
    esplit = expert_zero_group(cfg, dp) if zero >= 1 else 1
    dense_part, expert_part = math.ceil((trained - experts) / split), math.ceil(experts / esplit)
    part_t = dense_part + expert_part
    # the flat fp32 partition DeepSpeed steps at once: the experts are a group of their own under EP only
    group_t = max(dense_part, expert_part) if par.expert > 1 else part_t
    of = "of the adapters" if lora else "of the weights"
    if par.expert > 1:
        of = f"of the dense weights, 1/{esplit} of the {experts:,} expert weights"
    parts: list[Part] = []

    def add(into: list[Part], name: str, nbytes: float, note: str) -> None:
        if nbytes > 0:
            into.append(Part(name, int(nbytes), note))

    frozen = ", frozen (LoRA): no gradient, no optimizer state" if lora else ""
    held = (
        f", {experts:,} of them experts ({local_experts(cfg)} of {m.num_experts} a layer, EP {par.expert})"
        if experts
        else ""
    )
    if zero == 3:
        add(
            parts,
            "weights",
            math.ceil(base / shards) * wb,
            f"{m.dtype}, 1/{shards} of {base:,} (ZeRO-3){frozen}{held}",
        )
    else:
        add(parts, "weights", base * wb, f"{m.dtype}, {base:,} parameters{frozen}{held}")
    if lora:
        cut = f"1/{shards} of {adapters:,} (ZeRO-3)" if zero == 3 else f"{adapters:,} parameters"
        add(
            parts, "LoRA adapters", math.ceil(adapters / (shards if zero == 3 else 1)) * wb,
            f"{m.dtype}, {cut}: rank {m.lora.rank} on {', '.join(m.lora.target_modules)}",
        )  # fmt: skip
    if zero >= 1 or wb == 2:
        add(parts, "optimizer: fp32 master weights", part_t * FP32, f"1/{split} {of}")
    add(parts, "optimizer: Adam moments", 2 * part_t * FP32, f"2 x fp32, 1/{split} {of}")
    if t.reference == "live" and lora:
        if m.init_adapter:
            add(parts, "reference model", adapters * wb, "the starting adapters, frozen (model.init_adapter)")
        else:
            parts.append(Part("reference model", 0, "none: the policy with its adapters off (LoRA)"))
    elif t.reference == "live":
        add(
            parts,
            "reference model",
            (part_n if zero == 3 else n) * wb,
            "a frozen copy (train.reference=live)",
        )
    if target == "cpu":
        add(
            parts, "process baseline", CPU_BASELINE_BYTES, "Python, torch, megatron-core, DeepSpeed, the data"
        )
        if zero >= 1:
            kept = retained_by_malloc(cfg, vocab_size, stage)
            add(
                parts,
                "host allocator",
                kept,
                f"freed {'adapters' if lora and zero < 3 else 'weights'} under 32 MiB each, kept by malloc "
                "(DeepSpeed flattened them)",
            )

    # Gradients as they stand at the end of backward.
    grads: list[Part] = []
    which = "every adapter's .grad (the frozen base has none)" if lora else "every parameter's .grad"
    if zero <= 1:
        add(grads, "gradients", trained * wb, f"{m.dtype}, {which} (accumulated over micro-batches)")
    else:
        add(
            grads,
            "gradients",
            part_t * wb,
            f"{m.dtype}, 1/{split} {of} (ZeRO-{zero} partitions them as they are reduced)",
        )
        add(
            grads,
            "communication: reduce bucket",
            min(REDUCE_BUCKET, trained) * wb,
            "ZeRO's gradient reduction bucket",
        )
    if zero == 3:
        # DeepSpeed keeps a gathered parameter until it has not been used for stage3_max_reuse_distance elements
        # and holds at most stage3_max_live_parameters (both 1e9 by default): up to 1e9 parameters whole.
        live = min(n, ZERO3_MAX_LIVE)
        add(
            grads,
            "ZeRO-3 gathered weights",
            live * wb,
            f"{live:,} parameters whole between forward and backward",
        )

    tokens = local_tokens(cfg)
    layers = m.num_layers // par.pipeline
    flight = in_flight(cfg, stage)
    over_cp = f" (1/{par.context} of each row: context parallelism)" if par.context > 1 else ""
    backward: list[Part] = list(grads)
    if m.recompute == "full":
        kept = layers * tokens * m.hidden_size * wb * flight + layer_activation_bytes(cfg, tokens)
        add(
            backward,
            "activations",
            kept,
            f"layer inputs x {layers} layers x {flight} micro-batch(es) + one layer recomputed{over_cp}",
        )
        add(
            backward,
            "activations: LoRA adapters",
            adapter_activation_bytes(cfg, tokens),
            "one layer recomputed",
        )
    else:
        add(
            backward, "activations", layers * layer_activation_bytes(cfg, tokens) * flight,
            f"{layers} layers x {tokens} tokens x {flight} micro-batch(es) in flight{over_cp}"
            + (" (the frozen linears keep no input)" if lora else ""),
        )  # fmt: skip
        add(
            backward, "activations: LoRA adapters", layers * adapter_activation_bytes(cfg, tokens) * flight,
            f"rank-{m.lora.rank} intermediates" + (", dropout masks" if m.lora.dropout > 0 else "")
            + f" x {layers} layers x {flight} micro-batch(es)",
        )  # fmt: skip
    add(
        backward, "MoE: token exchange buffers", expert_exchange_buffer_bytes(cfg, tokens),
        f"one layer's {tokens} x top-{m.moe_router_topk} permuted tokens and the all-to-all's copy",
    )  # fmt: skip
    if last:
        out, what = output_temporaries(cfg, vocab_size, tokens)
        add(backward, "output layer + log-probs", out, what)
        add(
            backward, "loss: gathered over CP", loss_gather_bytes(cfg),
            f"3 x fp32 a token of the whole rows ({rows_tokens(cfg)} tokens)",
        )  # fmt: skip

    # The optimizer step: the gradients the optimizer reads in fp32, then AdamW's temporaries: on a GPU torch's
    # foreach AdamW takes sqrt(v) of every tensor it steps at once (one temporary of their size); on a CPU its
    # single-tensor AdamW holds sqrt(v) and its quotient for one tensor at a time. From ZeRO 1 that tensor is the
    # flat partition.
    step: list[Part] = list(grads)
    if zero == 0:
        add(
            step,
            "communication: flattened gradients",
            trained * wb,
            "DeepSpeed's all-reduce of the gradients",
        )
        if wb == 2:
            add(step, "gradients: fp32 copies", trained * FP32, "each gradient in fp32 for its master weight")
        largest = max(adapter_tensors(cfg) if lora else rank_tensors(cfg, vocab_size, stage))
        temps = trained * FP32 if target == "cuda" else 2 * largest * FP32
    else:
        group = " (the larger optimizer group: DeepSpeed steps one at a time)" if par.expert > 1 else ""
        if zero in (1, 3) or wb == 2:
            # ZeRO-2 steps on its fp32 gradient partition itself; ZeRO-3 flattens its per-parameter partitions into
            # a new tensor (stage3.py, _prepare_fp32_grad_for_sub_group), in fp32 too.
            add(
                step, "gradients: fp32 partition", group_t * FP32,
                f"the flat 1/{split} DeepSpeed steps on{group}",
            )  # fmt: skip
        temps = (1 if target == "cuda" else 2) * group_t * FP32
    how = (
        "foreach: sqrt(v) of every tensor at once"
        if target == "cuda"
        else "sqrt(v) and its quotient, per tensor"
    )
    add(step, "optimizer step temporaries", temps, f"AdamW's {how}")
    return RankPlan(
        stage=stage,
        parameters=n,
        trained=trained,
        parts=tuple(parts),
        backward=tuple(backward),
        step=tuple(step),
    )


def plan_memory(cfg: Config, *, world: int, vocab_size: int, target: str = "cuda") -> Plan:
    """The plan of ``cfg`` on ``world`` ranks; a layout that cannot run is refused as training refuses it (among
    them a world that TP x PP x CP does not divide)."""
    from gatedpo_mega.megatron.parallel import validate_layout

    if cfg.model.backend != "megatron":
        raise UserError(
            f"gatedpo plan: model.backend={cfg.model.backend} is not planned (its layers are the Hugging Face "
            "model's own); plan the same weights with model.backend=megatron, which trains them at any TP x PP"
        )
    dp = validate_layout(cfg, world)
    ranks = tuple(rank_plan(cfg, dp, vocab_size, s, target) for s in range(cfg.parallel.pipeline))
    return Plan(cfg=cfg, dp=dp, vocab_size=vocab_size, target=target, tokens=rows_tokens(cfg), ranks=ranks)


# ------------------------------------------------------------------------------------------------- step time


# A GPU of the H100/H200 class, for ranking layouts only (the ratios between layouts are the result, not the
# seconds): dense bf16 throughput as achieved by training (about 40% of the 989 TFLOP/s peak), NVLink within a node,
# InfiniBand (400 Gb/s per GPU) between nodes, and a fixed cost per layer and micro-batch (kernel launches,
# synchronisation) that makes very small micro-batches slow.
ACHIEVED_FLOPS = 400e12
NVLINK_BYTES_PER_S = 300e9
NETWORK_BYTES_PER_S = 50e9
GPUS_PER_NODE = 8
LAYER_OVERHEAD_S = 60e-6
# megatron-core's SequentialMLP runs a layer's local experts one after another (fc1, SwiGLU, the probability
# multiply, fc2 and their backward for each): a fixed cost per local expert, layer and micro-batch, as above.
EXPERT_OVERHEAD_S = 20e-6


def flops_per_parameter_token(cfg: Config) -> float:
    """Multiply-adds x 2 per parameter and token of a training step: forward 2, backward 4 (the inputs' gradients
    and the weights'), a recomputed forward 2 more. With LoRA the frozen base has no weight gradients (backward 2)
    and the live reference is one more forward of the same model (adapters off); the adapters' own are negligible."""
    m = cfg.model
    recompute = 2 if m.recompute == "full" else 0
    if m.lora.enabled:
        return 4 + recompute + (2 if cfg.train.reference == "live" else 0)
    return 6 + recompute


def context_gather_bytes(cfg: Config) -> float:
    """Bytes one rank receives per micro-batch gathering keys and values over the CP group: in each layer of its
    stage, the all-gather of the whole rows' k and v forward and the reduce-scatter of their gradients backward, each
    moving (CP - 1)/CP of them; 0 at CP 1."""
    m, cp = cfg.model, cfg.parallel.context
    layers = m.num_layers // cfg.parallel.pipeline
    return 2 * layers * gathered_kv_bytes(cfg, local_tokens(cfg)) * (cp - 1) / cp


def expert_exchange_bytes(cfg: Config) -> float:
    """Bytes one rank sends per micro-batch exchanging tokens with its expert-parallel group: in each layer of its
    stage, the all-to-all dispatching the k copies of each of its tokens [tokens x k, h] to their experts' ranks
    and the one combining the experts' outputs back, forward, and the two carrying their gradients backward; of
    each, (EP - 1)/EP leaves the rank under balanced routing; 0 at EP 1 and for a dense model."""
    m, ep = cfg.model, cfg.parallel.expert
    if not m.num_experts:
        return 0.0
    layers = m.num_layers // cfg.parallel.pipeline
    exchanged = local_tokens(cfg) * m.moe_router_topk * m.hidden_size * DTYPE_BYTES[m.dtype]
    return 4 * layers * exchanged * (ep - 1) / ep


def step_seconds(cfg: Config, dp: int, vocab_size: int) -> float:
    """Seconds per step on the GPU above: the busiest stage's compute on a rank's tokens (1/CP of each row)
    stretched by the pipeline bubble, a fixed cost per layer and micro-batch, the tensor-parallel all-reduces and
    the context-parallel k/v gathers (within a node while TP x CP fits one, as megatron-core's tp-cp-dp-pp rank
    order places them) and the gradient traffic over DP x CP (across nodes once the job spans more than one): the
    trained parameters' gradients, and under ZeRO-3 the gathers of every parameter (forward, backward and a live
    LoRA reference's forward). With experts, the FLOPs are those of the k experts a token runs through
    (``stage_active_parameters``), each local expert adds a fixed cost, the expert-parallel all-to-all
    (``expert_exchange_bytes``) goes over NVLink while TP x CP x EP fits a node, and the experts' gradients are
    reduced over DP / EP ranks."""
    m, par = cfg.model, cfg.parallel
    tp, pp, cp, ep = par.tensor, par.pipeline, par.context, par.expert
    tokens = local_tokens(cfg)
    micro = micro_batches(cfg, dp)
    params = max(stage_parameters(cfg, vocab_size, s) for s in range(pp))
    active = max(stage_active_parameters(cfg, vocab_size, s) for s in range(pp))
    layers = m.num_layers // pp
    compute = flops_per_parameter_token(cfg) * active * tokens / ACHIEVED_FLOPS + 3 * layers * (
        LAYER_OVERHEAD_S + local_experts(cfg) * EXPERT_OVERHEAD_S
    )
    wb = DTYPE_BYTES[m.dtype]
    # two all-reduces of [tokens, hidden] per layer forward and two backward, each moving 2 (tp-1)/tp of it
    tp_bytes = 4 * layers * tokens * m.hidden_size * wb * 2 * (tp - 1) / tp
    cp_rate = NETWORK_BYTES_PER_S if tp * cp > GPUS_PER_NODE else NVLINK_BYTES_PER_S
    ep_rate = NETWORK_BYTES_PER_S if tp * cp * ep > GPUS_PER_NODE else NVLINK_BYTES_PER_S
    per_micro = (
        compute
        + tp_bytes / NVLINK_BYTES_PER_S
        + context_gather_bytes(cfg) / cp_rate
        + expert_exchange_bytes(cfg) / ep_rate
    )
    world = tp * pp * cp * dp
    dp_rate = NETWORK_BYTES_PER_S if world > GPUS_PER_NODE else NVLINK_BYTES_PER_S
    shards = zero_group(cfg, dp)  # gradients are all-reduced, and ZeRO-3 gathers parameters, over DP x CP
    share = (shards - 1) / shards
    if m.lora.enabled:
        dp_bytes = 2 * stage_adapter_parameters(cfg) * wb * share
        if par.zero_stage == 3:
            dp_bytes += (3 if cfg.train.reference == "live" else 2) * params * wb * share
    else:
        experts = stage_expert_parameters(cfg)  # reduced over the expert-data-parallel group, DP / EP
        eshards = expert_zero_group(cfg, dp)
        moved = (params - experts) * share + experts * (eshards - 1) / eshards
        dp_bytes = 2 * moved * wb * (1.5 if par.zero_stage == 3 else 1.0)
    return per_micro * (micro + pp - 1) + dp_bytes / dp_rate


# ------------------------------------------------------------------------------------------------- layouts


@dataclass(frozen=True, slots=True)
class Candidate:
    tensor: int
    pipeline: int
    context: int
    dp: int
    zero_stage: int
    micro_batch_size: int
    peak_bytes: int
    step_time: float
    expert: int = 1  # expert parallelism: the data-parallel ranks each layer's experts are split over


EXPERT_SIZES = (1, 2, 4, 8, 16, 32, 64)  # parallel.expert's choices


def layout_grid(cfg: Config, gpus: int) -> Iterator[tuple[int, int, int, int, int, int]]:
    """(tensor, pipeline, context, expert, data, ZeRO stage) of ``gpus`` ranks worth planning: a mixture of experts
    at TP 1 and CP 1 (the config refuses more), EP dividing DP and the experts, ZeRO 1/2 at EP > 1; a dense model
    at EP 1. What the config or the layout still refuses (ZeRO 2/3 with PP, a shape TP or PP does not divide) is
    left to ``candidates``, which builds each."""
    e = cfg.model.num_experts
    for tp, pp, cp in itertools.product((1, 2, 4, 8), (1, 2, 4), (1, 2, 4, 8)):
        if gpus % (tp * pp * cp) or (e and (tp > 1 or cp > 1)):
            continue
        dp = gpus // (tp * pp * cp)
        for ep in EXPERT_SIZES if e else (1,):
            if dp % ep or (e % ep if e else ep > 1):
                continue
            for zero in (1, 2) if ep > 1 else (0, 1, 2, 3):
                yield tp, pp, cp, ep, dp, zero


def candidates(cfg: Config, gpus: int, vocab_size: int, target: str = "cuda") -> Iterator[Candidate]:
    """Every layout of ``gpus`` ranks (tensor x pipeline x context x data, experts split over EP of the data ranks)
    the model divides, the batch allows and the config accepts, with its plan."""
    t = cfg.train
    for tp, pp, cp, ep, dp, zero in layout_grid(cfg, gpus):
        for micro in (1, 2, 4, 8, 16):
            if t.global_batch_size % (micro * dp):
                continue
            try:
                trial = replace(  # Config's own checks run here: what training refuses is never planned
                    cfg,
                    parallel=ParallelConfig(tensor=tp, pipeline=pp, context=cp, expert=ep, zero_stage=zero),
                    train=replace(t, micro_batch_size=micro),
                )
                plan = plan_memory(trial, world=gpus, vocab_size=vocab_size, target=target)
            except (ConfigError, ValueError):
                continue
            yield Candidate(tp, pp, cp, dp, zero, micro, plan.per_rank_peak_bytes, plan.step_time, expert=ep)


def feasible(
    cfg: Config, gpus: int, vocab_size: int, limit_bytes: int, target: str = "cuda"
) -> list[Candidate]:
    """The layouts of ``gpus`` ranks that fit ``limit_bytes`` per rank, fastest first."""
    fits = [c for c in candidates(cfg, gpus, vocab_size, target) if c.peak_bytes <= limit_bytes]
    return sorted(fits, key=lambda c: (c.step_time, c.peak_bytes))


def smallest_fit(
    cfg: Config, gpus: int, vocab_size: int, limit_bytes: int, target: str = "cuda", most: int = 4096
) -> int | None:
    """The smallest GPU count above ``gpus`` on which some layout fits (counts of 1, 2, 4, then multiples of 8: whole
    nodes); None up to ``most``."""
    counts = [n for n in (1, 2, 4) if n > gpus] + list(range(max(8, (gpus // 8 + 1) * 8), most + 1, 8))
    return next((n for n in counts if feasible(cfg, n, vocab_size, limit_bytes, target)), None)


# ------------------------------------------------------------------------------------------------- output


def host_target() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def plan_vocab_size(cfg: Config) -> int:
    """The vocabulary a run of ``cfg`` gets, without reading the data: as configured, else ``model.init_from``'s,
    else the tokenizer's (a tokenizer the run will train: the size it is asked for)."""
    from pathlib import Path

    from gatedpo_mega.data.tokenizer import load_tokenizer
    from gatedpo_mega.training.initial_weights import source_vocab_size

    d = cfg.data
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    if cfg.model.init_from:
        return source_vocab_size(cfg.model.init_from)
    if d.tokenizer == "builtin":
        return d.builtin_vocab_size
    if not Path(d.tokenizer).exists() and d.train_tokenizer_if_missing:
        return d.tokenizer_vocab_size
    return load_tokenizer(d.tokenizer).vocab_size


def _mib(n: int) -> str:
    return f"{n / MiB:,.0f}"


def format_plan(plan: Plan) -> str:
    cfg, r = plan.cfg, plan.busiest
    par, m = cfg.parallel, cfg.model
    stage = f"pipeline stage {r.stage} of {par.pipeline}" if par.pipeline > 1 else "every rank"
    cp = par.context
    grid = f"TP {par.tensor}" + (f" x CP {cp}" if cp > 1 else "") + f" x PP {par.pipeline} x DP {plan.dp}"
    if cfg.model.num_experts:
        grid += f" (EP {par.expert}: experts over {par.expert} of the DP ranks)"
    length = f"{cfg.data.max_length} tokens" + (
        f" ({row_length(cfg) // cp} a rank over CP {cp})" if cp > 1 else ""
    )
    head = (
        f"plan: {cfg.model.num_layers} layers x {cfg.model.hidden_size}, vocabulary {plan.vocab_size:,}, "
        f"{total_parameters(cfg, plan.vocab_size) / 1e9:.3g}B parameters"
        + (
            f" ({active_parameters(cfg, plan.vocab_size) / 1e9:.3g}B active: {m.moe_router_topk} of "
            f"{m.num_experts} experts a token)"
            if m.num_experts
            else ""
        )
        + f"; {grid}, ZeRO {par.zero_stage}, "
        f"{cfg.model.dtype}, micro-batch {cfg.train.micro_batch_size} pairs x {length}; target {plan.target}"
    )
    on_it = f"{r.parameters:,} parameters on it"
    lora = cfg.model.lora
    if lora.enabled:
        n = adapter_parameters(cfg)
        head += (
            f"\nLoRA rank {lora.rank} on {', '.join(lora.target_modules)}: {n:,} adapter parameters trained "
            f"({100 * n / total_parameters(cfg, plan.vocab_size):.2g}% of the model), the base frozen; reference "
            f"{cfg.train.reference}"
        )
        on_it += f", {r.trained:,} of them trained"
    lines = [head, f"busiest rank: {stage} ({on_it})", ""]
    lines.append(f"| {'part':<38} | {'MiB':>9} | where it comes from")
    lines.append(f"|{'-' * 40}|{'-' * 11}|{'-' * 30}")
    for p in r.parts:
        lines.append(f"| {p.name:<38} | {_mib(p.bytes):>9} | {p.note}")
    for p in r.peak_parts:
        lines.append(f"| {p.name + ' (' + r.peak_phase + ')':<38} | {_mib(p.bytes):>9} | {p.note}")
    what = "peak resident memory" if plan.target == "cpu" else "allocator peak"
    lines.append(f"| {'total (' + what + ')':<38} | {_mib(r.total):>9} | {r.total / GiB:.2f} GiB")
    return "\n".join(lines)


def format_candidates(found: list[Candidate], gpus: int, limit_bytes: int, top: int = 12) -> str:
    if not found:
        return ""
    best = found[0].step_time
    ep = any(
        c.expert > 1 for c in found
    )  # the EP column: a mixture of experts split over data-parallel ranks
    lines = [
        f"layouts on {gpus} GPUs of {limit_bytes / GiB:g} GiB that fit, fastest first (step time relative to the "
        f"first; {len(found)} fit):",
        "| TP | PP | CP | "
        + ("EP | " if ep else "")
        + "DP | ZeRO | micro-batch | peak GiB | relative step time |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if ep else ""),
    ]
    for c in found[:top]:
        lines.append(
            f"| {c.tensor} | {c.pipeline} | {c.context} | " + (f"{c.expert} | " if ep else "")
            + f"{c.dp} | {c.zero_stage} | {c.micro_batch_size} | {c.peak_bytes / GiB:.1f} | {c.step_time / best:.2f} |"
        )  # fmt: skip
    return "\n".join(lines)


def plan_json(plan: Plan) -> dict[str, object]:
    r = plan.busiest
    return {
        "per_rank_peak_bytes": plan.per_rank_peak_bytes,
        "target": plan.target,
        "busiest_stage": r.stage,
        "parameters_on_rank": r.parameters,
        "trained_parameters_on_rank": r.trained,
        "total_parameters": total_parameters(plan.cfg, plan.vocab_size),
        "active_parameters": active_parameters(plan.cfg, plan.vocab_size),
        "lora_rank": plan.cfg.model.lora.rank,
        "adapter_parameters": adapter_parameters(plan.cfg),
        "vocab_size": plan.vocab_size,
        "layout": {
            "tensor": plan.cfg.parallel.tensor,
            "pipeline": plan.cfg.parallel.pipeline,
            "context": plan.cfg.parallel.context,
            "data": plan.dp,
            "zero_stage": plan.cfg.parallel.zero_stage,
            "micro_batch_size": plan.cfg.train.micro_batch_size,
        }
        | ({"expert": plan.cfg.parallel.expert} if plan.cfg.model.num_experts else {}),
        "parts": {p.name: p.bytes for p in r.parts},
        "peak_phase": r.peak_phase,
        "peak_parts": {p.name: p.bytes for p in r.peak_parts},
        "stages": [{"stage": s.stage, "parameters": s.parameters, "peak_bytes": s.total} for s in plan.ranks],
        "step_seconds_h100_class": plan.step_time,
    }
