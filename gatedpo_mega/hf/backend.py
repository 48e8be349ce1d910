"""The transformers backend: a Hugging Face causal LM from ``model.init_from``, data-parallel under DeepSpeed ZeRO
1-3 (DeepSpeed's engine drives every micro-batch), saved back as a Hugging Face folder after the last step."""

from __future__ import annotations

import tempfile
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


class TransformersBackend:
    engine_driver = True  # no pipeline stages, no schedule: DeepSpeed's engine runs the micro-batches

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def build(self, layout: Layout, vocab_size: int, device: torch.device) -> torch.nn.Module:
        m = self.cfg.model
        return load_hf_model(m.init_from, dtype=m.dtype, fused=m.fused_logprobs).to(device)

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
        out = Path(self.cfg.train.output_dir) / "hf"
        with tempfile.TemporaryDirectory(prefix="gatedpo-tokenizer-") as scratch:
            # Rank 0 writes the folder; the tokenizer training encoded with, which may not be init_from's own.
            tok = config_tokenizer(self.cfg, scratch=Path(scratch)) if layout.rank == 0 else None
            save_hf_folder(
                engine, self.cfg.model.init_from, out, rank=layout.rank, zero_stage=self.cfg.parallel.zero_stage,
                tokenizer=tok,
            )  # fmt: skip
        if layout.rank == 0:
            print(f"wrote the trained model as a Hugging Face folder: {out}", flush=True)
