"""The seam between the training loop and a model library: what differs between megatron-core and transformers.

The loop, the reference pass and evaluation see only this protocol; each backend implements it in its own room
(``gatedpo_mega/megatron/backend.py``, ``gatedpo_mega/hf/backend.py``). Adding a backend: implement the protocol
there and name it in ``BACKENDS``.

Two ways to drive a step's micro-batches exist (``gatedpo_mega.deepspeed.engine``): a backend's own schedule
(megatron-core's pipeline schedules, gradient accumulation in ``.grad``, then DeepSpeed reduces and steps), or
DeepSpeed's engine (``engine.backward`` / ``engine.step`` per micro-batch), which ZeRO 2/3 need for their
backward hooks and which a model without pipeline stages uses. ``engine_driver`` says which.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from gatedpo_mega.config import Config
    from gatedpo_mega.data.batch import PreferenceBatch
    from gatedpo_mega.loss import LossContext, OutputRequest
    from gatedpo_mega.megatron.parallel import Layout

# loss_func(batch, ctx, output, *, request) -> (loss, aux), as in gatedpo_mega.loss
LossFunc = Callable[..., tuple[torch.Tensor, dict[str, Any]]]


class Backend(Protocol):
    engine_driver: bool  # DeepSpeed's engine runs the micro-batches (no schedule of the backend's own)

    def build(self, layout: Layout, vocab_size: int, device: torch.device) -> torch.nn.Module:
        """This rank's part of the model with its initial weights (seeded, or from ``model.init_from``)."""
        ...

    def forward(self, model: torch.nn.Module, batch: PreferenceBatch, request: OutputRequest) -> torch.Tensor:
        """One micro-batch: logits ``[2B, T, V/TP]`` or fused statistics ``[2B, T, 3]`` on the last stage."""
        ...

    def schedule(
        self,
        model: torch.nn.Module,
        batches: list[PreferenceBatch],
        loss_func: LossFunc,
        ctx: LossContext,
        *,
        forward_only: bool,
    ) -> list[dict[str, Any]]:
        """Forward (and backward) of every micro-batch; ``loss_func``'s aux outputs on the last stage."""
        ...

    def adapters(self, model: torch.nn.Module, mode: str) -> AbstractContextManager[None]:
        """A context in which ``model``'s LoRA adapters are ``on``, ``off`` (the base model: LoRA's live reference)
        or ``initial`` (as they were when the model was built: a run from ``model.init_adapter``); no gradients are
        taken inside ``off`` or ``initial``. ``on`` with no adapters: nothing changes."""
        ...

    def after_backward(self, model: torch.nn.Module, layout: Layout) -> None:
        """Gradient work the backend owes before DeepSpeed reduces over data-parallel ranks."""
        ...

    def save_final(self, engine: Any, layout: Layout) -> None:
        """Write what the backend's users load after the last step (collective)."""
        ...


BACKENDS = {
    "megatron": "gatedpo_mega.megatron.backend:MegatronBackend",
    "transformers": "gatedpo_mega.hf.backend:TransformersBackend",
}


def make_backend(cfg: Config) -> Backend:
    module, _, name = BACKENDS[cfg.model.backend].partition(":")
    backend: Backend = getattr(importlib.import_module(module), name)(cfg)
    return backend
