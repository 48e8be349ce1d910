"""The parallel layout: validated from the config before any process group starts, then built by megatron-core.

This module and ``step.py``'s caller are the only places that read ``megatron.core.parallel_state``; everything
downstream receives the groups in a ``Layout``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from gatedpo_mega.config import Config
from gatedpo_mega.errors import ConfigError


def validate_layout(cfg: Config, world_size: int) -> int:
    """Check that ``cfg`` can run on ``world_size`` processes; returns the data-parallel size."""
    tp, pp, m, t = cfg.parallel.tensor, cfg.parallel.pipeline, cfg.model, cfg.train
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not a multiple of parallel.tensor x parallel.pipeline = {tp} x {pp}"
        )
    dp = world_size // (tp * pp)
    checks = [
        (
            m.num_layers % pp == 0,
            f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline={pp}",
        ),
        (
            m.num_attention_heads % tp == 0,
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tensor={tp}",
        ),
        (
            m.num_query_groups % tp == 0,
            f"model.num_query_groups={m.num_query_groups} is not divisible by parallel.tensor={tp}",
        ),
        (
            m.ffn_hidden_size % tp == 0,
            f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by parallel.tensor={tp}",
        ),
        (
            t.global_batch_size % (t.micro_batch_size * dp) == 0,
            f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size="
            f"{t.micro_batch_size} x data-parallel size {dp} (world {world_size} / (tensor {tp} x pipeline {pp}))",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return dp


@dataclass(frozen=True, slots=True)
class Layout:
    """This rank's place in the TP x PP x DP grid and the groups it talks over."""

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

    @property
    def first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logger(self) -> bool:
        """The one rank that holds the step's metrics and writes them: last stage, first TP and DP rank."""
        return self.last_stage and self.tp_rank == 0 and self.dp_rank == 0

    @property
    def logger_rank(self) -> int:
        return self.tp * self.dp * (self.pp - 1)  # megatron-core's rank order: tp fastest, then dp, then pp


def initialize_layout(tensor: int, pipeline: int, *, timeout_minutes: float = 30.0) -> Layout:
    """megatron-core's groups on the already initialised default process group."""
    from megatron.core import parallel_state as ps

    from gatedpo_mega.megatron.cpu_shim import apply_cpu_shim

    apply_cpu_shim()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
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
    )
