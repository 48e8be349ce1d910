"""The transformers backend: a Hugging Face causal LM from ``model.init_from``, data-parallel under DeepSpeed ZeRO
1-3 (DeepSpeed's engine drives every micro-batch), saved back as a Hugging Face folder after the last step. With
``model.lora`` the model is a PEFT ``PeftModel`` (``hf/lora.py``): the base frozen, the adapters trained, and the
adapter also saved as a PEFT folder."""

from __future__ import annotations

import tempfile
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gatedpo_mega.convert.tokenizer import config_tokenizer
from gatedpo_mega.data.batch import PreferenceBatch
from gatedpo_mega.hf.model import hf_forward, load_hf_model, save_hf_folder
from gatedpo_mega.loss import LossContext, OutputRequest, output_request

if TYPE_CHECKING:
    from gatedpo_mega.backend import LossFunc
    from gatedpo_mega.config import Config
    from gatedpo_mega.megatron.parallel import Layout


ADAPTER_DIR = "hf-adapter"  # under train.output_dir, beside hf/: a LoRA run's adapter as a PEFT folder


class TransformersBackend:
    engine_driver = True  # no pipeline stages, no schedule: DeepSpeed's engine runs the micro-batches

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def build(self, layout: Layout, vocab_size: int, device: torch.device) -> torch.nn.Module:
        m = self.cfg.model
        model = load_hf_model(m.init_from, dtype=m.dtype, fused=m.fused_logprobs)
        if m.lora.enabled:  # the base frozen, PEFT's adapters on its linears (seeded, or model.init_adapter)
            from gatedpo_mega.hf.lora import add_lora

            model = add_lora(model, m, seed=self.cfg.train.seed)
        return model.to(device)

    def adapters(self, model: torch.nn.Module, mode: str) -> AbstractContextManager[None]:
        """PEFT's: ``off`` is ``disable_adapter()``, ``initial`` the frozen copy of ``model.init_adapter``."""
        from gatedpo_mega.hf.lora import adapters

        return adapters(model, mode)

    def forward(self, model: torch.nn.Module, batch: PreferenceBatch, request: OutputRequest) -> torch.Tensor:
        return hf_forward(model, batch.input_ids, request.targets)

    def schedule(
        self,
        model: torch.nn.Module,
        batches: list[PreferenceBatch],
        loss_func: LossFunc,
        ctx: LossContext,
        *,
        forward_only: bool,
    ) -> list[dict[str, Any]]:
        """Forward-only passes (reference, evaluation), one micro-batch at a time; training goes through the
        engine driver."""
        assert forward_only, "the transformers backend trains through DeepSpeed's engine"
        out = []
        for b in batches:
            request = output_request(ctx, b)
            out.append(loss_func(b, ctx, self.forward(model, b, request), request=request)[1])
        return out

    def after_backward(self, model: torch.nn.Module, layout: Layout) -> None:
        """Nothing: DeepSpeed's engine reduces the gradients."""

    def save_final(self, engine: Any, layout: Layout) -> None:
        """``OUTPUT/hf/``: the trained model (with LoRA: the adapters merged into the base); with LoRA also
        ``OUTPUT/hf-adapter/``: the adapter alone, a PEFT folder for ``PeftModel.from_pretrained`` on the base."""
        out = Path(self.cfg.train.output_dir) / "hf"
        adapter = Path(self.cfg.train.output_dir) / ADAPTER_DIR if self.cfg.model.lora.enabled else None
        with tempfile.TemporaryDirectory(prefix="gatedpo-tokenizer-") as scratch:
            # Rank 0 writes the folder; the tokenizer training encoded with, which may not be init_from's own.
            tok = config_tokenizer(self.cfg, scratch=Path(scratch)) if layout.rank == 0 else None
            save_hf_folder(
                engine, self.cfg.model.init_from, out, rank=layout.rank, zero_stage=self.cfg.parallel.zero_stage,
                tokenizer=tok, adapter_dst=adapter,
            )  # fmt: skip
        if layout.rank == 0:
            merged = " (the LoRA adapters merged into the base)" if adapter is not None else ""
            print(f"wrote the trained model as a Hugging Face folder{merged}: {out}", flush=True)
            if adapter is not None:
                print(f"wrote the LoRA adapter as a PEFT folder: {adapter}", flush=True)
