"""LoRA on the transformers backend, through PEFT: ``model.lora`` as a ``peft.LoraConfig`` on the Hugging Face
model, the base frozen, only the adapters trained.

The trained adapter is PEFT's ``default``. Its ``A`` factors are drawn as the megatron backend draws them
(``gatedpo_mega/megatron/lora.py`` ``init_adapter``: uniform in +-1/sqrt(in) from a generator seeded by the run seed
and the factor's global megatron-core name; ``B`` zero), so a seed gives the same adapters at every data-parallel
size and on either backend. With ``model.init_adapter`` the adapter is that PEFT folder instead, loaded twice: as
``default`` (trained) and as ``initial`` (frozen), which ``adapters(model, "initial")`` switches to for the live
reference. The output layer is not a target: the fused head (``hf/model.py`` ``FusedLMHead``) stays as it is.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gatedpo_mega.config import ModelConfig
from gatedpo_mega.convert.peft import check_adapter
from gatedpo_mega.errors import UserError

DEFAULT = "default"  # PEFT's name of the adapter that trains
INITIAL = "initial"  # model.init_adapter, loaded a second time and frozen: the starting policy's adapter
# A decoder linear in a Hugging Face Llama-family model: model.layers.{i}.self_attn.q_proj ...
LAYER_LINEAR = re.compile(r"(?:^|\.)layers\.(\d+)\.\w+\.(\w+)$")


def is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def add_lora(model: torch.nn.Module, cfg: ModelConfig, *, seed: int) -> torch.nn.Module:
    """``model`` (a causal LM, on the CPU) as a ``PeftModel`` with ``cfg.lora``'s adapters: seeded, or read from
    ``cfg.init_adapter`` (whose rank, alpha and targets must agree with ``cfg.lora``). The base is frozen."""
    import peft

    lora = cfg.lora
    where = f"model.init_from={cfg.init_from}"
    try:
        if cfg.init_adapter:
            check_adapter(cfg, tensors=False)  # plain LoRA agreeing with model.lora (convert/peft.py)
            # The model's own dtype for the adapters (as on the megatron backend; DeepSpeed keeps fp32 masters).
            model = peft.PeftModel.from_pretrained(
                model, cfg.init_adapter, is_trainable=True, autocast_adapter_dtype=False, torch_device="cpu"
            )
            model.load_adapter(
                cfg.init_adapter,
                INITIAL,
                is_trainable=False,
                autocast_adapter_dtype=False,
                torch_device="cpu",
            )
            return model
        # lora_alpha is typed int; a float scales the same (alpha / r), and an integral one is written as an int
        alpha: Any = int(lora.alpha) if lora.alpha.is_integer() else lora.alpha
        config = peft.LoraConfig(
            r=lora.rank, lora_alpha=alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
            bias="none", task_type="CAUSAL_LM",
        )  # fmt: skip
        model = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        what = f"model.init_adapter={cfg.init_adapter}" if cfg.init_adapter else where
        raise UserError(f"{what}: PEFT cannot add model.lora's adapters ({str(e).splitlines()[0]})") from None
    seed_adapters(model, seed)
    return model


def _lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()  # type: ignore[operator]
    for name, m in base.named_modules():
        if isinstance(m, LoraLayer):
            yield name, m


def seed_adapters(model: torch.nn.Module, seed: int) -> None:
    """Each ``A`` of the ``default`` adapter uniform in +-1/sqrt(in), drawn whole from the generator the megatron
    backend draws that factor from (its global megatron-core name; a linear outside a decoder layer: its own name);
    each ``B`` zero. The same on every rank, whatever torch's global generator holds."""
    from gatedpo_mega.megatron.lora import adapter_param_name, sites
    from gatedpo_mega.megatron.model import _generator

    site_of = {hf: s for s in sites(ModelConfig()) for hf in s.hf}  # names only: any shape will do
    with torch.no_grad():
        for name, m in _lora_layers(model):
            a, b = m.lora_A[DEFAULT].weight, m.lora_B[DEFAULT].weight
            hit = LAYER_LINEAR.search(name)
            key = (
                adapter_param_name(int(hit[1]), site_of[hit[2]], hit[2], "A")
                if hit and hit[2] in site_of
                else name
            )
            bound = 1.0 / math.sqrt(a.shape[1])  # times the bound, as megatron/lora.py (bit for bit)
            full = (torch.rand(tuple(a.shape), generator=_generator(seed, key)) * 2.0 - 1.0) * bound
            a.copy_(full.to(a.dtype))
            b.zero_()


@contextlib.contextmanager
def adapters(model: torch.nn.Module, mode: str) -> Iterator[None]:
    """Run the ``PeftModel`` ``model`` with its adapter ``on``, ``off`` (the base model) or ``initial`` (the frozen
    ``model.init_adapter``) inside the block, in eval mode (no adapter dropout) unless ``on``. Which parameters
    require gradients is as before afterwards."""
    if mode == "on":
        yield
        return
    if not is_peft(model):
        raise RuntimeError(f"adapters {mode!r}: the model has no PEFT adapters")
    peft_model: Any = model
    was_training = model.training
    model.eval()
    try:
        if mode == "off":
            with peft_model.disable_adapter():
                yield
        elif mode == "initial":
            peft_model.set_adapter(INITIAL)  # marks it trainable for the while (no gradient is taken here)
            try:
                yield
            finally:
                peft_model.set_adapter(DEFAULT)  # DEFAULT trainable again, INITIAL frozen
        else:
            raise ValueError(f"adapters mode {mode!r}: on, off or initial")
    finally:
        model.train(was_training)


def merged_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict (CPU copies) of the policy the ``PeftModel`` computes: each adapted linear's weight
    ``W + (B @ A) * alpha / r`` in float32 from ``W``, back in ``W``'s dtype (as PEFT's ``merge_and_unload``), the
    other tensors as they are, under the base model's own names. Under ZeRO-3, inside the parameters' gather."""
    layers = dict(_lora_layers(model))
    out = {}
    for key, value in model.get_base_model().state_dict().items():  # type: ignore[operator]
        if ".lora_" in key:
            continue
        module, _, leaf = key.rpartition(".")
        owner = module.removesuffix(".base_layer")
        v = value.detach()
        if owner != module and owner in layers:
            key = f"{owner}.{leaf}"
            if leaf == "weight":
                m = layers[owner]
                delta = m.lora_B[DEFAULT].weight.float() @ m.lora_A[DEFAULT].weight.float()
                v = (v.float() + delta * m.scaling[DEFAULT]).to(v.dtype)
        out[key] = v.cpu().clone()
    return out


def save_adapter_folder(model: torch.nn.Module, dst: Path) -> None:
    """The trained (``default``) adapter as a PEFT folder, ``adapter_config.json`` + ``adapter_model.safetensors``,
    which ``PeftModel.from_pretrained`` loads on the base. Rank 0, inside ZeRO-3's gather."""
    peft_model: Any = model
    peft_model.save_pretrained(
        str(dst), selected_adapters=[DEFAULT], safe_serialization=True, save_embedding_layers=False
    )
