"""A mixture of experts around megatron-core's MoE layer: what it reads from a micro-batch, how its load-balancing
loss is weighted, and what a step reports about the routing.

- **Padding** is kept out of the routing statistics: megatron-core's router takes a ``padding_mask`` (True on
  padding) and leaves those tokens out of the load-balancing loss, as Hugging Face's ``load_balancing_loss_func``
  does with the attention mask. Padded and packed micro-batches then give the same loss.
- **The load-balancing loss** is attached to the router's output by megatron-core (``MoEAuxLossAutoScaler``): its
  gradient enters backward scaled by a global factor. megatron-core's schedule sets it to 1 / micro-batches; the
  engine-driven path (ZeRO 2) sets the same factor here, so the loss is ``moe_aux_loss_coef`` x the mean over the
  step's micro-batches whichever driver runs them. It is never part of a reference forward (no gradient there).
- **The step's report**: the mean load-balancing loss per layer and micro-batch (megatron-core's tracker, read and
  cleared once a step), and how evenly the step's real tokens were spread over each layer's experts (tokens per
  expert over their mean: 1 is even; the busiest layer's largest and smallest).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def expert_config(model: torch.nn.Module) -> Any:
    """The model's ``TransformerConfig`` when it has experts, else None."""
    config = getattr(getattr(model, "module", model), "config", None)
    return config if getattr(config, "num_moe_experts", None) else None


def set_aux_loss_scale(scale: float, device: torch.device) -> None:
    """The factor megatron-core's ``MoEAuxLossAutoScaler`` multiplies the load-balancing loss's gradient by."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.full((1,), scale, device=device))  # its schedule's shape


class RoutingLog:
    """Counts each layer's real tokens per expert over the policy's training forwards (hooks on the routers; a
    forward without gradients and padding are not counted) and reports them with the load-balancing loss once a
    step (``report``)."""

    def __init__(self, model: torch.nn.Module, *, num_layers: int) -> None:
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
        from megatron.core.transformer.moe.router import TopKRouter

        # megatron-core's tracker is the process's: sized by the first model that logged to it
        get_moe_layer_wise_logging_tracker().pop("load_balancing_loss", None)
        config = expert_config(model)
        self.experts = int(config.num_moe_experts) if config is not None else 0
        self.num_layers = num_layers
        self.counts = torch.zeros(num_layers, max(self.experts, 1), dtype=torch.float64)
        self.handles = []
        for module in model.modules():
            if isinstance(module, TopKRouter):
                layer = int(module.layer_number) - 1  # megatron-core's global layer number, from 1
                self.handles.append(module.register_forward_hook(self._hook(layer)))

    def _hook(self, layer: int) -> Any:
        def count(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not (module.training and torch.is_grad_enabled()):
                # A reference or evaluation forward; with model.recompute=full the first of a layer's two forwards
                # (megatron-core runs it without gradients; the one recomputed in backward is counted, as the
                # load-balancing loss is attached there).
                return
            routing_map = output[1].detach()
            padding = args[1] if len(args) > 1 else None
            if padding is not None:
                routing_map = routing_map & ~padding.reshape(-1, 1).to(routing_map.device)
            self.counts[layer] += routing_map.sum(0).to("cpu", torch.float64)

        return count

    def report(self, *, tp: int, dp: int, micro_batches: int, device: torch.device) -> dict[str, float]:
        """The step's routing metrics on every rank (one all-reduce over the world), and both logs cleared.
        Tensor-parallel ranks route the same tokens and count them once; data-parallel ranks their own."""
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        tracker = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
        losses = torch.zeros(self.num_layers, dtype=torch.float64)
        if tracker is not None:
            values = tracker["values"].detach().to("cpu", torch.float64)
            losses[: values.numel()] = values[: self.num_layers]
            tracker["values"].zero_()
        both = torch.cat([losses[:, None], self.counts], dim=1).to(device)
        if dist.is_initialized():
            dist.all_reduce(both)
        both = both.cpu()
        self.counts.zero_()
        loss = float(both[:, 0].sum()) / (tp * dp * micro_batches * self.num_layers)
        counts = both[:, 1:] / tp
        load = counts / counts.mean(dim=1, keepdim=True).clamp(min=1e-12)
        return {
            "moe/aux_loss": loss,
            "moe/load_max": float(load.max()),
            "moe/load_min": float(load.min()),
        }

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
