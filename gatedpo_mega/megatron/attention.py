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
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


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
        **_: Any,  # cp_comm_type, pg_collection: no context parallelism here
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
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
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            # The document bounds as the batch knew them on the host; reading cu_seqlens would wait for the device.
            bounds = getattr(packed_seq_params, "host_bounds", ()) or packed_seq_params.cu_seqlens_q.tolist()
            out = torch.cat(
                [
                    self._causal(query[a:b, None], key[a:b, None], value[a:b, None])
                    for a, b in pairwise(bounds)
                ]
            )
            return out.reshape(out.shape[0], -1)
        out = self._causal(query, key, value)
        return out.reshape(out.shape[0], out.shape[1], -1)

    def _causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention over ``[s, b, h, d]`` tensors; returns ``[s, b, heads, d]``."""
        q, k, v = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # [b, h, s, d]
        gqa = q.shape[1] != k.shape[1]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        return out.permute(2, 0, 1, 3)
