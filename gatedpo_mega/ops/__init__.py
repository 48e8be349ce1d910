"""Tensor ops: vocab-parallel per-token log-probabilities and the collectives they use."""

from gatedpo_mega.ops.collectives import copy_to_group, reduce_from_group
from gatedpo_mega.ops.fused import fused_pair_loss, fused_token_logprobs
from gatedpo_mega.ops.logprobs import IGNORE_INDEX, token_logprobs

__all__ = [
    "IGNORE_INDEX",
    "copy_to_group",
    "fused_pair_loss",
    "fused_token_logprobs",
    "reduce_from_group",
    "token_logprobs",
]
