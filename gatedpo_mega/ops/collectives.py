"""Collectives over an explicit process group, with the backward each one needs inside a model.

`torch.distributed.nn.functional.all_reduce` sums the incoming gradients in backward, which is right for a
loss that differs per rank but makes the gradient ``world_size`` times too large when everything after the
all-reduce is replicated on every rank (the tensor-parallel case). Megatron solves this with a pair of
conjugate functions (``reduce_from_tensor_model_parallel_region`` / ``copy_to_tensor_model_parallel_region``);
these are the same pair, taking the group as an argument instead of reading global state.

``group=None`` means "no group": every function is then the identity, so single-process code needs no branch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

ProcessGroup = Any  # torch.distributed.ProcessGroup; kept loose so callers may pass None


def group_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce_(
    tensor: torch.Tensor, op: dist.ReduceOp.RedOpType, group: ProcessGroup | None
) -> torch.Tensor:
    """In-place all-reduce outside autograd; the identity for ``group=None`` or a group of one."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _ReduceFromGroup(torch.autograd.Function):
    """Forward: all-reduce SUM. Backward: identity (the consumer is replicated on every rank)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        return all_reduce_(x.clone(), dist.ReduceOp.SUM, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _CopyToGroup(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce SUM (each rank holds part of the input's gradient)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return all_reduce_(grad.clone(), dist.ReduceOp.SUM, ctx.group), None


def reduce_from_group(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Sum ``x`` over ``group``; the gradient passes through unchanged (replicated consumer)."""
    if group_size(group) == 1:
        return x
    return _ReduceFromGroup.apply(x, group)


def copy_to_group(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Identity forward; sums the gradient over ``group`` in backward (partial gradients per rank)."""
    if group_size(group) == 1:
        return x
    return _CopyToGroup.apply(x, group)
