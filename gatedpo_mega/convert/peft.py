"""The PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), in and out.

The tensors are those of ``peft.get_peft_model_state_dict`` on a Llama-family ``*ForCausalLM`` (peft 0.21), full
(unsharded): ``base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight`` and
``base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight``, ``lora_A.weight`` = A [r, in] and
``lora_B.weight`` = B [out, r], each Hugging Face linear ``W`` becoming ``W + (lora_alpha / r) B A``: the factors of
``gatedpo_mega/megatron/lora.py``, whose ``Site`` says which megatron-core linear holds each and how TP cuts it.

Read as ``model.init_adapter``: the config's ``r``, ``lora_alpha`` and ``target_modules`` fill ``model.lora``
(``read_adapter_config``); whatever else changes what the adapter computes, or trains more than A and B, is refused
in one line naming the file and field (``PLAIN``). Written by ``gatedpo convert zero-to-hf --adapter-only``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from gatedpo_mega.config import LORA_TARGETS, LoraConfig, ModelConfig
from gatedpo_mega.convert.errors import AdapterError
from gatedpo_mega.convert.safetensors_io import SafetensorsReader, SafetensorsWriter
from gatedpo_mega.megatron.lora import Factor, Site, adapter_factors, is_adapter

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def hf_module(layer: int, site: Site, hf: str) -> str:
    """The Hugging Face module an adapter sits on: ``model.layers.{i}.self_attn.q_proj`` ..."""
    return f"model.layers.{layer}.{site.hf_prefix}.{hf}"


def peft_name(f: Factor) -> str:
    """The factor's tensor in ``adapter_model.safetensors``."""
    return f"base_model.model.{hf_module(f.layer, f.site, f.hf)}.lora_{f.factor}.weight"


def _unset(v: Any) -> bool:
    return v is None or v == [] or v == {} or v is False


# adapter_config.json fields whose other values this LoRA cannot compute (a field left out is PEFT's default: fine).
PLAIN: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("peft_type", lambda v: v in (None, "LORA"), "not a LoRA adapter"),
    ("use_rslora", _unset, "rsLoRA (scaling lora_alpha / sqrt(r))"),
    ("use_dora", _unset, "DoRA (a learned magnitude per output)"),
    ("bias", lambda v: v in (None, "none"), "trained biases"),
    ("lora_bias", _unset, "a bias on lora_B"),
    ("fan_in_fan_out", _unset, "transposed (Conv1D) weights"),
    ("rank_pattern", _unset, "ranks per module"),
    ("alpha_pattern", _unset, "alphas per module"),
    ("layers_to_transform", _unset, "a subset of the layers"),
    ("layer_replication", _unset, "replicated layers"),
    ("exclude_modules", _unset, "excluded modules"),
    ("modules_to_save", _unset, "fully trained modules besides the adapters"),
    ("trainable_token_indices", _unset, "trained token embeddings"),
    ("target_parameters", _unset, "adapters on parameters"),
)


def _where(folder: str | Path, file: str) -> str:
    return f"model.init_adapter: {Path(folder) / file}"


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """``model.lora``'s fields from ``folder/adapter_config.json``: ``rank``, ``alpha`` and ``target_modules`` (the
    canonical list); anything that is not plain LoRA on the seven decoder linears is one ``AdapterError``."""
    path = Path(folder) / ADAPTER_CONFIG
    where = _where(folder, ADAPTER_CONFIG)
    if not Path(folder).is_dir():
        raise AdapterError(
            f"model.init_adapter={folder}: no such folder (a PEFT adapter: {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})"
        )
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterError(
            f"{where} is missing (a PEFT adapter folder holds {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{where}: not a JSON object")
    for key, ok, what in PLAIN:
        if not ok(config.get(key)):
            raise AdapterError(
                f"{where}: {key}={json.dumps(config[key])}: {what} is not supported (plain LoRA only)"
            )
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"{where}: r={json.dumps(r)} must be a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise AdapterError(f"{where}: lora_alpha={json.dumps(alpha)} must be a positive number")
    return {"rank": r, "alpha": float(alpha), "target_modules": _targets(config.get("target_modules"), where)}


def _targets(value: Any, where: str) -> list[str]:
    if value == "all-linear":
        return list(LORA_TARGETS)
    if isinstance(value, str):
        raise AdapterError(
            f"{where}: target_modules={json.dumps(value)}: a regular expression; list the module names "
            f"({', '.join(LORA_TARGETS)})"
        )
    if not isinstance(value, list) or not value or not all(isinstance(n, str) for n in value):
        raise AdapterError(f"{where}: target_modules={json.dumps(value)} must be a list of module names")
    for name in value:
        if name not in LORA_TARGETS:
            raise AdapterError(
                f"{where}: target_modules names {name!r}, which model.lora cannot adapt (it adapts the decoder's "
                f"{', '.join(LORA_TARGETS)})"
            )
    return [n for n in LORA_TARGETS if n in value]


def lora_mismatches(fields: Mapping[str, Any], lora: LoraConfig) -> list[str]:
    """Each ``model.lora`` field the adapter's config (``read_adapter_config``) disagrees with, as ``what A (adapter)
    vs B (config)``."""
    spelled = {"rank": "r", "alpha": "lora_alpha", "target_modules": "target_modules"}
    return [
        f"model.lora.{key} {_show(fields[key])} ({ADAPTER_CONFIG} {spelled[key]}) vs {_show(getattr(lora, key))} (config)"
        for key in ("rank", "alpha", "target_modules")
        if fields[key] != getattr(lora, key)
    ]


def _show(v: Any) -> str:
    return ",".join(v) if isinstance(v, list) else f"{v:g}" if isinstance(v, float) else str(v)


def check_adapter(cfg: ModelConfig, *, tensors: bool = True) -> None:
    """``cfg.init_adapter`` fits ``cfg`` (its LoRA config, then with ``tensors`` every tensor's name and shape, from
    the safetensors header alone), or one ``AdapterError``: before any process starts, and on every rank before it
    reads a tensor (``load_peft_adapter``)."""
    _check_config(cfg)
    if tensors:
        with _open_weights(cfg.init_adapter) as r:
            _check_tensors(r, cfg, _where(cfg.init_adapter, ADAPTER_WEIGHTS))


def _check_config(cfg: ModelConfig) -> None:
    found = lora_mismatches(read_adapter_config(cfg.init_adapter), cfg.lora)
    if found:
        raise AdapterError(
            f"model.init_adapter={cfg.init_adapter} disagrees with the config: " + "; ".join(found)
        )


def _open_weights(folder: str | Path) -> SafetensorsReader:
    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        bin_only = (Path(folder) / "adapter_model.bin").exists()
        hint = " (found adapter_model.bin: convert it to safetensors first)" if bin_only else ""
        raise AdapterError(f"{_where(folder, ADAPTER_WEIGHTS)} is missing{hint}")
    return SafetensorsReader(path)


def _check_tensors(r: SafetensorsReader, cfg: ModelConfig, where: str) -> dict[str, Factor]:
    """The factors of the whole model by their PEFT names, each present in ``r`` with its full shape; no others."""
    expected = {peft_name(f): f for f in adapter_factors(cfg, range(cfg.num_layers))}
    for name, f in expected.items():
        if name not in r:
            raise AdapterError(f"{where}: tensor {name} is missing")
        if r.shape(name) != f.shape:
            raise AdapterError(
                f"{where}: tensor {name} has shape {list(r.shape(name))}, expected {list(f.shape)}"
            )
    for name in r.names():
        if name not in expected:
            raise AdapterError(
                f"{where}: unexpected tensor {name} (not an adapter of this {cfg.num_layers}-layer model)"
            )
    return expected


def load_peft_adapter(
    model: torch.nn.Module, cfg: ModelConfig, layer_offset: int, tp_rank: int, tp_size: int
) -> None:
    """Copy this rank's slice of every factor of ``cfg.init_adapter`` into ``model``'s ``LoraAdapter`` parameters
    (``model``: one pipeline stage, its layers from ``layer_offset``; built by ``add_adapters``)."""
    from gatedpo_mega.megatron.model import global_name, local_slice

    _check_config(cfg)
    folder = cfg.init_adapter
    with _open_weights(folder) as r:
        by_name = {f.name: f for f in _check_tensors(r, cfg, _where(folder, ADAPTER_WEIGHTS)).values()}
        with torch.no_grad():
            for local, p in model.named_parameters():
                if not is_adapter(local):
                    continue
                f = by_name[global_name(local, layer_offset)]
                p.copy_(local_slice(r.read(peft_name(f)), p, tp_rank, tp_size).to(p.dtype))


def adapter_config(lora: LoraConfig, base: str | None) -> dict[str, Any]:
    """``adapter_config.json`` for ``lora`` (``base``: ``base_model_name_or_path``)."""
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": lora.rank,
        "lora_alpha": alpha, "lora_dropout": lora.dropout, "target_modules": list(lora.target_modules),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
        "alpha_pattern": {},
    }  # fmt: skip


def write_peft_folder(
    dst: Path,
    cfg: ModelConfig,
    get: Callable[[Factor], torch.Tensor],
    *,
    dtype: torch.dtype,
    base: str | None,
) -> Path:
    """``dst/adapter_config.json`` and ``dst/adapter_model.safetensors``: every factor of ``cfg`` (``get(factor)``:
    the full tensor) written in ``dtype``, one at a time."""
    order = adapter_factors(cfg, range(cfg.num_layers))
    entries = {peft_name(f): (f.shape, dtype) for f in order}
    w = SafetensorsWriter(dst / ADAPTER_WEIGHTS, entries, {"format": "pt"})
    try:
        for f in order:
            w.write(peft_name(f), get(f))
    except BaseException:
        w.abort()
        raise
    w.close()
    (dst / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(cfg.lora, base), indent=2) + "\n")
    return dst / ADAPTER_WEIGHTS
