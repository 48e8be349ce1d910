"""The parallel layout: validated from the config before any process group starts, then built by megatron-core;
and how tensor parallelism cuts a full tensor.

This module and ``step.py``'s caller are the only places that read ``megatron.core.parallel_state``; everything
downstream receives the groups in a ``Layout``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gatedpo_mega.config import Config, ModelConfig
from gatedpo_mega.errors import ConfigError


def indivisible(model: ModelConfig, tensor: int, pipeline: int) -> tuple[str, int, str, int] | None:
    """The first model size that ``tensor`` x ``pipeline`` does not divide, as (field, value, axis, size): layers
    are split over pipeline stages; heads, key/value groups and the MLP over tensor ranks. None: all divide."""
    checks = (
        ("num_layers", model.num_layers, "pipeline", pipeline),
        ("num_attention_heads", model.num_attention_heads, "tensor", tensor),
        ("num_query_groups", model.num_query_groups, "tensor", tensor),
        ("moe_ffn_hidden_size", model.moe_ffn_hidden_size, "tensor", tensor)
        if model.num_experts
        else ("ffn_hidden_size", model.ffn_hidden_size, "tensor", tensor),
    )
    return next((c for c in checks if c[1] % c[3]), None)


def shard(full: torch.Tensor, dim: int | None, stride: int, tp_rank: int, tensor: int) -> torch.Tensor:
    """Rank ``tp_rank``'s slice of ``full``, as megatron-core cuts it: ``tensor * stride`` chunks along ``dim``,
    every ``tensor``-th (``partition_stride`` 2 gives each rank its slice of both halves of [gate; up])."""
    if dim is None or tensor == 1:
        return full
    pieces = torch.chunk(full, tensor * stride, dim=dim)
    return torch.cat(pieces[tp_rank::tensor], dim=dim)


def unshard(shards: list[torch.Tensor], dim: int | None, stride: int) -> torch.Tensor:
    """The inverse of ``shard`` over all TP ranks' slices."""
    if dim is None or len(shards) == 1:
        return shards[0]
    parts = [torch.chunk(s, stride, dim=dim) for s in shards]
    return torch.cat([parts[r][k] for k in range(stride) for r in range(len(shards))], dim=dim)


def validate_layout(cfg: Config, world_size: int) -> int:
    """Check that ``cfg`` can run on ``world_size`` processes; returns the data-parallel size."""
    tp, pp, cp, m, t = cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.context, cfg.model, cfg.train
    if world_size % (tp * pp * cp):
        what = "parallel.tensor x parallel.pipeline" + (" x parallel.context" if cp > 1 else "")
        sizes = f"{tp} x {pp}" + (f" x {cp}" if cp > 1 else "")
        raise ConfigError(f"world size {world_size} is not a multiple of {what} = {sizes}")
    dp = world_size // (tp * pp * cp)
    ep = cfg.parallel.expert
    if ep > 1 and dp % ep:
        raise ConfigError(
            f"parallel.expert={ep} does not divide the data-parallel size {dp} (world {world_size} / (tensor {tp} x "
            f"pipeline {pp}"
            + (f" x context {cp}" if cp > 1 else "")
            + ")): the experts are split over data-parallel ranks"
        )
    bad = indivisible(m, tp, pp)
    if bad:
        field, value, axis, size = bad
        raise ConfigError(f"model.{field}={value} is not divisible by parallel.{axis}={size}")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size="
            f"{t.micro_batch_size} x data-parallel size {dp} (world {world_size} / (tensor {tp} x pipeline {pp}"
            + (f" x context {cp}))" if cp > 1 else "))")
        )
    return dp


@dataclass(frozen=True, slots=True)
class Layout:
    """This rank's place in the TP x CP x DP x PP grid and the groups it talks over."""

    rank: int
    world: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Any
    pp_group: Any
    dp_group: Any
    mp_group: Any  # tensor x pipeline: every rank holding a part of one model replica
    embedding_group: Any  # first and last pipeline stage (tied embeddings); None without pipeline parallelism
    cp: int = 1  # context parallelism: the ranks that share each row's tokens (megatron/context.py)
    cp_rank: int = 0
    cp_group: Any = None  # None without context parallelism
    dp_cp_group: Any = (
        None  # data x context: where gradients are reduced and ZeRO partitions; dp_group if cp=1
    )
    ep: int = 1  # expert parallelism: the data-parallel ranks over which a layer's experts are split
    ep_rank: int = 0
    ep_group: Any = None  # None without expert parallelism
    # The ranks holding the same experts (data / EP of them): where expert gradients are reduced and partitioned.
    expert_dp_group: Any = None
    expert_dp_rank: int = 0

    @property
    def grad_group(self) -> Any:
        """The ranks that hold the same parameters and reduce their gradients: data x context parallel."""
        return self.dp_cp_group if self.dp_cp_group is not None else self.dp_group

    @property
    def grad_rank(self) -> int:
        """This rank's place in ``grad_group`` (its ZeRO partition): megatron-core puts CP inside DP."""
        return self.dp_rank * self.cp + self.cp_rank

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logger(self) -> bool:
        """The one rank that holds the step's metrics and writes them: last stage, first TP and DP rank."""
        return self.last_stage and self.tp_rank == 0 and self.dp_rank == 0 and self.cp_rank == 0

    @property
    def logger_rank(self) -> int:
        # megatron-core's rank order: tp fastest, then cp, then dp, then pp
        return self.tp * self.cp * self.dp * (self.pp - 1)


def initialize_layout(
    tensor: int, pipeline: int, *, context: int = 1, expert: int = 1, timeout_minutes: float = 30.0
) -> Layout:
    """megatron-core's groups on the already initialised default process group."""
    from megatron.core import parallel_state as ps

    from gatedpo_mega.megatron.cpu_shim import apply_cpu_shim

    apply_cpu_shim()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        context_parallel_size=context,
        expert_model_parallel_size=expert,
        distributed_timeout_minutes=timeout_minutes,  # type: ignore[arg-type]  # a timedelta takes floats
    )
    return Layout(
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        tp=tensor,
        pp=pipeline,
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        mp_group=ps.get_model_parallel_group(),
        embedding_group=ps.get_embedding_group(check_initialized=False) if pipeline > 1 else None,
        cp=context,
        cp_rank=ps.get_context_parallel_rank(),
        cp_group=ps.get_context_parallel_group() if context > 1 else None,
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True) if context > 1 else None,
        ep=expert,
        ep_rank=ps.get_expert_model_parallel_rank() if expert > 1 else 0,
        ep_group=ps.get_expert_model_parallel_group() if expert > 1 else None,
        expert_dp_group=ps.get_expert_data_parallel_group() if expert > 1 else None,
        expert_dp_rank=ps.get_expert_data_parallel_rank() if expert > 1 else 0,
    )
