"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``, in megatron-core's layer spec.

megatron-core's local spec computes attention as ``softmax(mask(Q K^T)) V`` with the ``[b x heads, s, s]`` scores
materialised and a dense ``[s, s]`` mask from the caller. ``SDPAttention`` takes its place as the spec's
``core_attention``: causal by ``is_causal`` (no mask tensor), grouped-query attention by ``enable_gqa`` (no copy of
K/V where the kernel supports it), and torch picks the kernel: flash or memory-efficient attention on GPU, its
fused CPU kernel here; none holds the scores, so memory grows linearly in the sequence length.

Packed micro-batches arrive in megatron-core's ``thd`` layout (``PackedSeqParams(qkv_format="thd")``): every
document of the micro-batch back to back in one row, ``cu_seqlens`` marking where each starts. megatron-core then
applies the rotary embedding per document (positions restart at each ``cu_seqlens`` boundary), and this module runs
causal attention on each document alone, so no token ever attends across a boundary.

With context parallelism (``megatron/context.py``) each rank holds two chunks of every row (or document) in the
zigzag order. The keys and values of the whole row are gathered over the CP group (their gradients are summed back
in backward), and each local chunk attends to the keys of every chunk up to and including its own: one SDPA call
per chunk, causal aligned to the last key. On a GPU that is ``causal_lower_right``, which torch runs on the flash
kernel (bf16/fp16) or the memory-efficient one without a mask tensor, and otherwise with the mask materialised. torch's CPU kernel would need that mask as a ``[chunk, keys]``
tensor, kept for backward in every layer (more than the activations CP saves at long rows), so on a CPU
``PrefixCausal`` runs the kernel twice without a mask, on the earlier chunks' keys (all visible) and on the chunk's
own (causal), and merges the two by their log-sum-exp, as ring and flash attention merge blocks.
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch.nn.attention.bias import causal_lower_right

from gatedpo_mega.megatron.context import chunk_ids, natural_order
from gatedpo_mega.ops.collectives import gather_shared, group_rank, group_size


class SDPAttention(MegatronModule):
    """Drop-in for megatron-core's ``DotProductAttention`` (same constructor and forward signature)."""

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        pg_collection: Any = None,
        **_: Any,  # cp_comm_type: the keys and values are all-gathered
    ) -> None:
        super().__init__(config=config)
        self.cp_group = None
        if config.context_parallel_size > 1:
            if pg_collection is not None and getattr(pg_collection, "cp", None) is not None:
                self.cp_group = pg_collection.cp
            else:
                from megatron.core import parallel_state

                self.cp_group = parallel_state.get_context_parallel_group()
        head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError("SDPAttention runs without attention dropout (model.attention=local has it)")

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: Any = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        """``[s, b, heads, d]`` query and ``[s, b, groups, d]`` key/value -> ``[s, b, heads x d]``; in the
        ``thd`` layout ``[t, heads, d]`` and ``[t, groups, d]`` -> ``[t, heads x d]``."""
        if attention_bias is not None:
            raise ValueError("SDPAttention does not take an attention bias")
        cp = group_size(self.cp_group)
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            # The document bounds as the batch knew them on the host; reading cu_seqlens would wait for the device.
            bounds = getattr(packed_seq_params, "host_bounds", ()) or packed_seq_params.cu_seqlens_q.tolist()
            if cp > 1:
                out = self._context_parallel(query[:, None], key[:, None], value[:, None], bounds)
                return out.reshape(out.shape[0], -1)
            out = torch.cat(
                [
                    self._causal(query[a:b, None], key[a:b, None], value[a:b, None])
                    for a, b in pairwise(bounds)
                ]
            )
            return out.reshape(out.shape[0], -1)
        if cp > 1:
            out = self._context_parallel(query, key, value, (0, query.shape[0] * cp))
        else:
            out = self._causal(query, key, value)
        return out.reshape(out.shape[0], out.shape[1], -1)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention over ``[s, b, h, d]`` tensors; returns ``[s, b, heads, d]``."""
        return self._attend(q, k, v, is_causal=True)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **mask: Any) -> torch.Tensor:
        q, k, v = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # [b, h, s, d]
        gqa = q.shape[1] != k.shape[1]
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale, enable_gqa=gqa, **mask)
        return out.permute(2, 0, 1, 3)

    def _last_of(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of ``[L, b, h, d]`` queries that are the last ``L`` of the ``[K, b, g, d]`` keys."""
        queries, keys = q.shape[0], k.shape[0]
        if queries == keys:
            return self._attend(q, k, v, is_causal=True)
        if q.device.type != "cpu":
            return self._attend(q, k, v, attn_mask=causal_lower_right(queries, keys))
        q, k, v = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # [b, h, s, d]
        return PrefixCausal.apply(q, k, v, self.scale).permute(2, 0, 1, 3)

    def _context_parallel(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: tuple[int, ...] | list[int]
    ) -> torch.Tensor:
        """This rank's zigzag chunks of every document (``bounds``: their starts in the whole row, the end
        included) attending to the gathered keys and values; ``[s/CP, b, h, d]`` in, the same layout out."""
        cp, rank = group_size(self.cp_group), group_rank(self.cp_group)
        order = natural_order(tuple(bounds), cp, q.device)
        # the whole row's keys and values in natural order: each chunk's keys below are a view of them
        k_all, v_all = (gather_shared(x, self.cp_group, 0).index_select(0, order) for x in (k, v))
        outs = []
        for a, b in pairwise(bounds):
            size = (b - a) // (2 * cp)  # one chunk of this document
            for half, c in enumerate(chunk_ids(cp, rank)):
                start = a // cp + half * size  # where this chunk sits among this rank's tokens
                end = a + (c + 1) * size  # its last key: the end of chunk c of this document
                outs.append(self._last_of(q[start : start + size], k_all[a:end], v_all[a:end]))
        return torch.cat(outs)


_CPU_FLASH = "_scaled_dot_product_flash_attention_for_cpu"


class PrefixCausal(torch.autograd.Function):
    """``[b, h, L, d]`` queries, the last ``L`` of ``K`` causal positions, over ``[b, g, K, d]`` keys and values,
    with torch's CPU flash kernel and no mask tensor: the ``K - L`` earlier keys (every query sees them all) and the
    last ``L`` (causal, square) are attended separately and merged by their log-sum-exp; backward runs the
    kernel's backward on each block with the merged output and log-sum-exp, which gives each block's exact share."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        flash = getattr(torch.ops.aten, _CPU_FLASH)
        cut = k.shape[2] - q.shape[2]
        o1, l1 = flash(q, k[:, :, :cut], v[:, :, :cut], 0.0, False, scale=scale)
        o2, l2 = flash(q, k[:, :, cut:], v[:, :, cut:], 0.0, True, scale=scale)
        lse = torch.logaddexp(l1, l2)
        out = (torch.exp(l1 - lse)[..., None] * o1 + torch.exp(l2 - lse)[..., None] * o2).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v, out, lse = ctx.saved_tensors
        backward = getattr(torch.ops.aten, _CPU_FLASH + "_backward")
        cut = k.shape[2] - q.shape[2]
        grad = grad.contiguous()
        dq1, dk1, dv1 = backward(grad, q, k[:, :, :cut], v[:, :, :cut], out, lse, 0.0, False, scale=ctx.scale)
        dq2, dk2, dv2 = backward(grad, q, k[:, :, cut:], v[:, :, cut:], out, lse, 0.0, True, scale=ctx.scale)
        return dq1 + dq2, torch.cat([dk1, dk2], 2), torch.cat([dv1, dv2], 2), None
