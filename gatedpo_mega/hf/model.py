"""The transformers backend: a Hugging Face causal LM, loaded from a local folder and trained data-parallel under
DeepSpeed ZeRO 1-3 with the same op, gate and objectives as the megatron-core path.

The output layer is replaced by ``FusedLMHead`` (same weight, same parameter name) so the logits are never held:
the causal LM's ``lm_head(hidden)`` call returns the per-token statistics ``[B, T, 3]`` instead, computed inside
the module's forward, where ZeRO-3 has the weight gathered. With ``model.fused_logprobs: false`` the model returns
its logits and ``token_logprobs`` reduces them.
"""

from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from gatedpo_mega.convert.tokenizer import TokenizerSource, write_tokenizer
from gatedpo_mega.errors import UserError
from gatedpo_mega.formats import DTYPES, TOKENIZER_FILES
from gatedpo_mega.ops import fused_token_logprobs


class FusedLMHead(torch.nn.Module):
    def __init__(self, original: torch.nn.Module, *, vocab_size: int) -> None:
        super().__init__()
        weight = original.weight
        assert isinstance(weight, torch.nn.Parameter)
        self.weight = weight  # the same parameter (tied to the embedding where the model ties them)
        self.vocab_size = vocab_size
        self.targets: torch.Tensor | None = None  # [B, T], set before each forward

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            raise RuntimeError("FusedLMHead needs its targets (hf_forward sets them) before the forward")
        stats = fused_token_logprobs(hidden, self.weight, self.targets, vocab_size=self.vocab_size)
        self.targets = None
        return torch.stack(stats, dim=-1)


def load_hf_model(path: str | Path, *, dtype: str, fused: bool) -> torch.nn.Module:
    """A causal LM from a local Hugging Face folder (no download), with ``FusedLMHead`` when ``fused``."""
    from transformers import AutoModelForCausalLM

    src = Path(path)
    if not (src / "config.json").is_file():
        raise UserError(f"model.init_from={src}: no config.json (a Hugging Face model folder is needed)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src, dtype=DTYPES[dtype], local_files_only=True, attn_implementation="sdpa"
        )
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"model.init_from={src}: transformers cannot load it ({str(e).splitlines()[0]})"
        ) from None
    model.config.use_cache = False
    head = model.get_output_embeddings()
    if fused:
        if not isinstance(head, torch.nn.Linear) or head.bias is not None:
            raise UserError(
                f"model.init_from={src}: the output layer is not a bias-free linear layer, which the fused "
                "log-probs need; set model.fused_logprobs=false"
            )
        model.set_output_embeddings(FusedLMHead(head, vocab_size=model.config.vocab_size))
    return model


def hf_forward(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B, T, 3]`` statistics with the fused head, else the logits ``[B, T, V]``. Rows are right-padded, so
    the causal mask alone keeps padding out of every real token's attention."""
    inner: Any = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    head = inner.get_output_embeddings()
    if isinstance(head, FusedLMHead):
        head.targets = labels
    return model(input_ids=input_ids, use_cache=False).logits


def save_hf_folder(
    engine: Any,
    src: str | Path,
    dst: Path,
    *,
    rank: int,
    zero_stage: int,
    tokenizer: TokenizerSource | None = None,
    adapter_dst: Path | None = None,
) -> None:
    """Write the trained model as a Hugging Face folder (safetensors, config, and ``tokenizer``, else the tokenizer
    files of ``src``) into ``dst``, atomically. With LoRA (a ``PeftModel``) that is the adapters merged into the base
    (``hf/lora.py`` ``merged_state``), and ``adapter_dst`` gets the adapter alone as a PEFT folder (with the same
    tokenizer). Collective under ZeRO-3 (the parameters are gathered)."""
    import deepspeed
    import torch.distributed as dist

    from gatedpo_mega.hf.lora import is_peft, merged_state, save_adapter_folder

    model = engine.module
    peft = is_peft(model)
    hf: Any = model.get_base_model() if peft else model
    params = list(model.parameters())
    gather = (
        deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3 else nullcontext()
    )
    with gather:
        if rank == 0:
            tmp = _staging(dst)
            head = hf.get_output_embeddings()
            fused = isinstance(head, FusedLMHead)
            if fused:  # save the plain linear layer (the same weight)
                linear = torch.nn.Linear(head.weight.shape[1], head.weight.shape[0], bias=False)
                linear.weight = head.weight
                hf.set_output_embeddings(linear)
            try:
                if peft:
                    state = merged_state(model)
                else:
                    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                hf.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            finally:
                if fused:
                    hf.set_output_embeddings(head)
            _add_tokenizer(tmp, src, tokenizer)
            if peft and adapter_dst is not None:
                tmp_adapter = _staging(adapter_dst)
                save_adapter_folder(model, tmp_adapter)
                _add_tokenizer(tmp_adapter, None, tokenizer)
                _publish(tmp_adapter, adapter_dst)
            _publish(tmp, dst)
    dist.barrier()


def _staging(dst: Path) -> Path:
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _add_tokenizer(tmp: Path, src: str | Path | None, tokenizer: TokenizerSource | None) -> None:
    """``tokenizer`` into ``tmp``, else the tokenizer files of ``src`` (and its generation config in either case)."""
    if tokenizer is not None:
        write_tokenizer(tokenizer, tmp)
    if src is None:
        return
    for name in TOKENIZER_FILES if tokenizer is None else ("generation_config.json",):
        if (Path(src) / name).is_file() and not (tmp / name).exists():
            shutil.copy2(Path(src) / name, tmp / name)


def _publish(tmp: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
