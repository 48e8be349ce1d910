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


# torch 2.13 renames the single-tensor collectives (the old names warn); earlier releases have only the old ones
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _staged(x: torch.Tensor, group: ProcessGroup) -> bool:
    """gloo on device tensors (ranks sharing one GPU, where NCCL refuses): the collective runs on host copies."""
    return x.device.type != "cpu" and dist.get_backend(group) == "gloo"


def _all_gather(x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in rank order."""
    n = dist.get_world_size(group)
    front = x.movedim(dim, 0).contiguous()  # collectives read contiguous memory (pytorch/pytorch#192920)
    staged = _staged(front, group)
    src = front.cpu() if staged else front
    out = src.new_empty((n * src.shape[0], *src.shape[1:]))
    _all_gather_single(out, src, group=group)
    return (out.to(x.device) if staged else out).movedim(0, dim)


def _own_slice(grad: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    return grad.chunk(dist.get_world_size(group), dim)[dist.get_rank(group)].contiguous()


class _Gather(torch.autograd.Function):
    """Forward: all-gather along ``dim``; the subclasses differ in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)


class _GatherToReplicated(_Gather):
    """Backward: this rank's slice (the consumer is replicated: every rank computes the same gradient of the
    whole)."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _own_slice(grad, ctx.group, ctx.dim), None, None


class _GatherShared(_Gather):
    """Backward: reduce-scatter (every rank used every rank's part, so each part's gradient is the sum over
    ranks)."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        front = grad.movedim(ctx.dim, 0).contiguous()  # SDPA's backward hands back strided gradients
        n = dist.get_world_size(ctx.group)
        staged = _staged(front, ctx.group)
        src = front.cpu() if staged else front
        out = src.new_empty((src.shape[0] // n, *src.shape[1:]))
        _reduce_scatter_single(out, src, group=ctx.group)
        return (out.to(grad.device) if staged else out).movedim(0, ctx.dim), None, None


def gather_to_replicated(x: torch.Tensor, group: ProcessGroup | None, dim: int) -> torch.Tensor:
    """All ranks' ``x`` along ``dim``, for a consumer replicated on every rank; backward keeps this rank's slice."""
    if group_size(group) == 1:
        return x
    return _GatherToReplicated.apply(x, group, dim)


def gather_shared(x: torch.Tensor, group: ProcessGroup | None, dim: int) -> torch.Tensor:
    """All ranks' ``x`` along ``dim``, for a consumer that differs per rank (each rank's queries attend to the
    gathered keys); backward sums the gradients over ranks and keeps this rank's slice."""
    if group_size(group) == 1:
        return x
    return _GatherShared.apply(x, group, dim)
