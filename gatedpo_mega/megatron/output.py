"""The fused output layer: the last stage returns per-token statistics instead of logits.

``FusedOutputLayer`` takes the place of ``GPTModel.output_layer`` (keeping its weight, so parameter names, the
initialisation and DeepSpeed see the same tensor) and runs ``fused_token_logprobs`` inside the module's forward,
where DeepSpeed ZeRO-3 has the weight gathered. Each forward is preceded by ``set_output_request``: the micro-batch's
targets, and with the fused objective a ``PairObjective``, in which case the layer runs ``fused_preference_loss``
and hands the per-pair losses back on the request. GPTModel then returns ``[B, S, 3]``: target log-prob, top-1
log-prob, entropy. With context parallelism the layer sees this rank's tokens and gathers their statistics over the
CP group into whole rows (three floats a token; the logits never leave the rank).
"""

from __future__ import annotations

from typing import Any

import torch

from gatedpo_mega.loss import OutputRequest
from gatedpo_mega.ops import fused_token_logprobs
from gatedpo_mega.ops.streaming import fused_preference_loss


class FusedOutputLayer(torch.nn.Module):
    def __init__(self, original: torch.nn.Module, *, tp_group: Any, vocab_size: int) -> None:
        super().__init__()
        weight = getattr(original, "weight", None)
        if weight is None:
            self.register_parameter("weight", None)  # tied: GPTModel passes the embedding weight in
        else:
            self.weight = weight
        self.tp_group = tp_group
        self.vocab_size = vocab_size
        self.request: OutputRequest | None = None  # set before each forward, consumed by it

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor | None = None, **_: Any
    ) -> tuple[torch.Tensor, None]:
        request, self.request = self.request, None
        if request is None:
            raise RuntimeError("FusedOutputLayer needs set_output_request(model, request) before the forward")
        w = weight if weight is not None else self.weight
        packing = request.packing
        if request.objective is not None and torch.is_grad_enabled():
            # The pair loss needs whole rows: a packed row's hidden states go back to the padded layout.
            rows = hidden.transpose(0, 1) if packing is None else packing.rows(hidden[:, 0])
            targets = request.targets if packing is None else request.row_targets
            assert targets is not None
            losses, *pair_stats = fused_preference_loss(
                rows, w, targets, request.objective, tp_group=self.tp_group, vocab_size=self.vocab_size
            )
            request.pair_losses = losses
            return torch.stack(pair_stats, dim=-1).transpose(0, 1), None
        stats = torch.stack(
            fused_token_logprobs(
                hidden, w, request.targets.t(), tp_group=self.tp_group, vocab_size=self.vocab_size
            ),
            dim=-1,
        )  # [S, B, 3]
        if request.shard is not None:  # context parallelism: every rank's tokens, whole rows
            stats = request.shard.whole(stats, dim=0)
        if packing is not None:  # [T, 1, 3] -> [W, 2B, 3]
            stats = packing.rows(stats[:, 0]).transpose(0, 1)
        return stats, None  # GPTModel transposes to [B, S, 3]


def install_fused_output(model: torch.nn.Module, *, tp_group: Any, vocab_size: int) -> None:
    original = model.output_layer
    assert isinstance(original, torch.nn.Module)
    model.output_layer = FusedOutputLayer(original, tp_group=tp_group, vocab_size=vocab_size)


def set_output_request(model: torch.nn.Module, request: OutputRequest) -> bool:
    """Hand the micro-batch's request to the fused output layer, if this stage has one; returns whether it does."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    layer = getattr(inner, "output_layer", None)
    if isinstance(layer, FusedOutputLayer):
        layer.request = request
        return True
    return False
