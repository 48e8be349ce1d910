"""``gatedpo convert``: hf-to-mcore, mcore-to-hf, reshard and zero-to-hf.

Each command reads its source lazily, writes into a temporary folder beside the destination and renames it when
complete; every refusal is one line naming the file or tensor.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

from gatedpo_mega.config import ModelConfig
from gatedpo_mega.convert.errors import ConvertError, UnsupportedModelError
from gatedpo_mega.convert.folders import (
    HFFolder,
    copy_tokenizer_files,
    parse_size,
    staged_destination,
    write_generation_config,
    write_hf_weights,
)
from gatedpo_mega.convert.hf_config import hf_model_config, to_hf_config
from gatedpo_mega.convert.lora_checkpoint import adapter_tensor, hf_weights
from gatedpo_mega.convert.mapping import HFView, LocalGetter, check_hf_names, check_layout, hf_shapes
from gatedpo_mega.convert.mcore import McoreFolder, write_mcore_folder
from gatedpo_mega.convert.peft import write_peft_folder
from gatedpo_mega.convert.tokenizer import TokenizerSource, classify, run_tokenizer, write_tokenizer
from gatedpo_mega.convert.train_checkpoint import TrainCheckpoint
from gatedpo_mega.formats import DTYPES, MCORE_META, TOKENIZER_DIR, TRAIN_META
from gatedpo_mega.megatron.model import padded_vocab_size

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
DEFAULT_SHARD = "2GB"


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def hf_to_mcore(
    src: str | Path,
    dst: str | Path,
    *,
    tensor: int,
    pipeline: int,
    force: bool = False,
    dtype: str | None = None,
    vocab_divisible_by: int | None = None,
) -> Path:
    src, dst = Path(src), Path(dst)
    folder = HFFolder(src)
    try:
        first = "model.embed_tokens.weight"
        src_dtype = folder.dtype(first) if first in folder else torch.float32
        if dtype is None:
            if src_dtype not in DTYPE_NAMES:
                raise UnsupportedModelError(
                    f"{src}: weights are {str(src_dtype).removeprefix('torch.')}; the model runs in fp32 or bf16: "
                    "pass --dtype fp32 or --dtype bf16"
                )
            dtype = DTYPE_NAMES[src_dtype]
        cfg, vocab = hf_model_config(
            folder.config,
            dtype=dtype,
            make_vocab_size_divisible_by=vocab_divisible_by,
            where=str(src / "config.json"),
        )
        check_layout(cfg, tensor, pipeline)
        check_hf_names(set(folder), cfg, vocab, str(src), folder.shape)
        target = DTYPES[dtype]
        with staged_destination(dst, force=force, sources=(src,)) as tmp:
            write_mcore_folder(
                tmp,
                lambda n: folder[n].to(target),
                cfg,
                vocab_size=vocab,
                tensor=tensor,
                pipeline=pipeline,
                hf_config=folder.config,
            )
            copy_tokenizer_files(src, tmp / TOKENIZER_DIR)
    finally:
        folder.close()
    padded = padded_vocab_size(vocab, cfg.make_vocab_size_divisible_by, tensor)
    print(
        f"wrote {dst}: {cfg.num_layers} layers, vocabulary {vocab} (padded to {padded}), {dtype}, "
        f"tensor {tensor} x pipeline {pipeline} ({tensor * pipeline} rank files)"
    )
    return dst


def _write_hf(
    dst: Path,
    view: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    vocab: int,
    *,
    base_config: dict[str, Any] | None,
    dtype: str,
    max_shard_size: int,
    tokenizer: TokenizerSource | None,
    release: Any = None,
) -> list[str]:
    files = write_hf_weights(
        dst, hf_shapes(cfg, vocab), DTYPES[dtype], view, max_shard_size=max_shard_size, on_shard_done=release
    )
    config = to_hf_config(cfg, vocab, base_config, dtype=dtype)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        write_tokenizer(tokenizer, dst)
    write_generation_config(dst, config)
    return files


def _report(dst: Path, files: list[str], dtype: str, tokenizer: TokenizerSource | None) -> None:
    size = sum((dst / f).stat().st_size for f in files)
    tok = (
        f"tokenizer from {tokenizer.origin} ({tokenizer.path})"
        if tokenizer
        else "no tokenizer found (pass --tokenizer DIR or FILE.model)"
    )
    print(f"wrote {dst}: {len(files)} safetensors shard(s), {_gb(size)}, {dtype}; {tok}")


def _given_tokenizer(tokenizer: str | Path) -> TokenizerSource:
    found = classify(Path(tokenizer).expanduser(), "--tokenizer")
    if found is None:
        raise ConvertError(
            f"--tokenizer {tokenizer}: no tokenizer there (a Hugging Face tokenizer folder, a SentencePiece .model "
            "file, or a folder holding tokenizer.model)"
        )
    return found


def mcore_to_hf(
    src: str | Path,
    dst: str | Path,
    *,
    force: bool = False,
    max_shard_size: str = DEFAULT_SHARD,
    dtype: str | None = None,
    tokenizer: str | Path | None = None,
) -> Path:
    """An mcore folder, or a training checkpoint's module weights, to a Hugging Face folder."""
    src, dst = Path(src), Path(dst)
    limit = parse_size(max_shard_size)
    given = _given_tokenizer(tokenizer) if tokenizer else None
    if (src / MCORE_META).exists():
        folder = McoreFolder(src)
        try:
            dtype = dtype or folder.cfg.dtype
            tok = given or classify(src / TOKENIZER_DIR, "the mcore folder")
            view = HFView(
                folder.get,
                folder.cfg,
                vocab_size=folder.vocab_size,
                tensor=folder.tensor,
                pipeline=folder.pipeline,
            )
            with staged_destination(dst, force=force, sources=(src,)) as tmp:
                files = _write_hf(
                    tmp,
                    view,
                    folder.cfg,
                    folder.vocab_size,
                    base_config=folder.hf_config,
                    dtype=dtype,
                    max_shard_size=limit,
                    tokenizer=tok,
                )
                if tok is None and (src / TOKENIZER_DIR / "generation_config.json").is_file():
                    shutil.copyfile(
                        src / TOKENIZER_DIR / "generation_config.json", tmp / "generation_config.json"
                    )
        finally:
            folder.close()
        _report(dst, files, dtype, tok)
        return dst
    return _train_to_hf(src, dst, source="module", force=force, limit=limit, dtype=dtype, tokenizer=given)


def zero_to_hf(
    src: str | Path,
    dst: str | Path,
    *,
    force: bool = False,
    max_shard_size: str = DEFAULT_SHARD,
    dtype: str | None = None,
    tokenizer: str | Path | None = None,
    adapter_only: bool = False,
) -> Path:
    """A training checkpoint's fp32 master weights (any ZeRO stage) to a Hugging Face folder: a LoRA run's adapters
    merged into its base, or with ``adapter_only`` a PEFT adapter folder."""
    limit = parse_size(max_shard_size)
    given = _given_tokenizer(tokenizer) if tokenizer else None
    return _train_to_hf(
        Path(src), Path(dst), source="fp32", force=force, limit=limit, dtype=dtype, tokenizer=given,
        adapter_only=adapter_only,
    )  # fmt: skip


def _train_to_hf(
    src: Path,
    dst: Path,
    *,
    source: str,
    force: bool,
    limit: int,
    dtype: str | None,
    tokenizer: TokenizerSource | None,
    adapter_only: bool = False,
) -> Path:
    """``tokenizer``: the one to write (default: the run's, ``run_tokenizer``). A LoRA run's checkpoint holds its
    adapters only: merged into its base (``lora_checkpoint``), or alone as a PEFT folder (``adapter_only``)."""
    if not (src / TRAIN_META).exists() and not src.is_dir():
        raise ConvertError(f"{src}: no such checkpoint folder")
    ckpt = TrainCheckpoint(src, source=source)
    lora = ckpt.cfg.lora
    if adapter_only and not lora.enabled:
        raise ConvertError(
            f"--adapter-only: {ckpt.path} is not a LoRA run's checkpoint (model.lora.rank is 0: it holds the whole "
            "model); export it without --adapter-only"
        )
    dtype = dtype or ckpt.cfg.dtype
    with (
        contextlib.ExitStack() as stack,
        tempfile.TemporaryDirectory(prefix="gatedpo-tokenizer-") as scratch,
        staged_destination(dst, force=force, sources=(ckpt.path,)) as tmp,
    ):
        tok = tokenizer or run_tokenizer(ckpt.path, scratch=Path(scratch))
        if adapter_only:
            get = partial(adapter_tensor, ckpt)
            written = write_peft_folder(
                tmp, ckpt.cfg, get, dtype=DTYPES[dtype], base=ckpt.cfg.init_from or None
            )
            files = [written.name]
            if tok is not None:
                write_tokenizer(tok, tmp)
        else:
            files = _write_hf(
                tmp,
                hf_weights(ckpt, stack),
                ckpt.cfg,
                ckpt.vocab_size,
                base_config=ckpt.hf_config,
                dtype=dtype,
                max_shard_size=limit,
                tokenizer=tok,
                release=ckpt.release,
            )
    ckpt.release()
    what = "fp32 master weights" if ckpt.source == "fp32" else "module weights"
    if lora.enabled:
        base = f"model.init_from={ckpt.cfg.init_from}" if ckpt.cfg.init_from else "the seeded initialisation"
        how = "alone, as a PEFT adapter" if adapter_only else f"merged into their base, {base}"
        what += f" of LoRA adapters (rank {lora.rank}, alpha {lora.alpha:g}, {','.join(lora.target_modules)}) {how}"
    print(f"{ckpt.path}: step {ckpt.meta.get('step')}, ZeRO {ckpt.zero_stage}, {what}")
    _report(dst, files, dtype, tok)
    return dst


def reshard(src: str | Path, dst: str | Path, *, tensor: int, pipeline: int, force: bool = False) -> Path:
    src, dst = Path(src), Path(dst)
    folder = McoreFolder(src)
    try:
        cfg, vocab = folder.cfg, folder.vocab_size
        check_layout(cfg, tensor, pipeline)
        get: LocalGetter = folder.get
        view = HFView(get, cfg, vocab_size=vocab, tensor=folder.tensor, pipeline=folder.pipeline)
        with staged_destination(dst, force=force, sources=(src,)) as tmp:
            write_mcore_folder(
                tmp,
                view.__getitem__,
                cfg,
                vocab_size=vocab,
                tensor=tensor,
                pipeline=pipeline,
                hf_config=folder.hf_config,
            )
            if (src / TOKENIZER_DIR).is_dir():
                shutil.copytree(src / TOKENIZER_DIR, tmp / TOKENIZER_DIR)
    finally:
        folder.close()
    print(
        f"wrote {dst}: tensor {folder.tensor} x pipeline {folder.pipeline} -> tensor {tensor} x pipeline {pipeline}"
    )
    return dst


# ---------------------------------------------------------------------------------------------------------- CLI


def _cmd_hf_to_mcore(a: argparse.Namespace) -> int:
    hf_to_mcore(
        a.src, a.dst, tensor=a.tensor, pipeline=a.pipeline, force=a.force, dtype=a.dtype,
        vocab_divisible_by=a.vocab_divisible_by,
    )  # fmt: skip
    return 0


def _cmd_mcore_to_hf(a: argparse.Namespace) -> int:
    mcore_to_hf(
        a.src, a.dst, force=a.force, max_shard_size=a.max_shard_size, dtype=a.dtype, tokenizer=a.tokenizer
    )
    return 0


def _cmd_zero_to_hf(a: argparse.Namespace) -> int:
    zero_to_hf(
        a.src, a.dst, force=a.force, max_shard_size=a.max_shard_size, dtype=a.dtype, tokenizer=a.tokenizer,
        adapter_only=a.adapter_only,
    )  # fmt: skip
    return 0


def _cmd_reshard(a: argparse.Namespace) -> int:
    reshard(a.src, a.dst, tensor=a.tensor, pipeline=a.pipeline, force=a.force)
    return 0


def add_convert_commands(sub: Any) -> None:
    """Register ``gatedpo convert ...`` on the main parser's subparsers."""
    conv = sub.add_parser(
        "convert", help="convert checkpoints: Hugging Face <-> megatron-core, reshard, ZeRO -> HF"
    )
    cs = conv.add_subparsers(dest="convert_command", required=True)

    def common(p: argparse.ArgumentParser, src_help: str) -> None:
        p.add_argument("--src", required=True, help=src_help)
        p.add_argument("--dst", required=True, help="destination folder (written whole, or not at all)")
        p.add_argument("--force", action="store_true", help="replace an existing non-empty destination")

    def layout(p: argparse.ArgumentParser) -> None:
        p.add_argument("--tensor", type=int, default=1, help="tensor-parallel size of the output (default 1)")
        p.add_argument(
            "--pipeline", type=int, default=1, help="pipeline-parallel size of the output (default 1)"
        )

    def hf_out(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-shard-size", default=DEFAULT_SHARD, help="largest output shard (default 2GB)")
        p.add_argument("--dtype", choices=("fp32", "bf16"), help="output dtype (default: the model's)")
        p.add_argument(
            "--tokenizer",
            help="tokenizer to write: a Hugging Face tokenizer folder (copied) or a SentencePiece .model file "
            "(converted); default: the one the source was trained with or came with",
        )

    p = cs.add_parser(
        "hf-to-mcore", help="Hugging Face Llama/Mistral/Qwen2/Qwen3 folder -> mcore folder at TP x PP"
    )
    common(p, "Hugging Face model folder (config.json + safetensors)")
    layout(p)
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="weights dtype (default: the source's)")
    p.add_argument(
        "--vocab-divisible-by", type=int, help="pad the vocabulary to a multiple of this x tensor (64)"
    )
    p.set_defaults(func=_cmd_hf_to_mcore)

    p = cs.add_parser(
        "mcore-to-hf", help="mcore folder (or a training checkpoint's module weights) -> Hugging Face"
    )
    common(p, "mcore folder, or a training checkpoint folder")
    hf_out(p)
    p.set_defaults(func=_cmd_mcore_to_hf)

    p = cs.add_parser("reshard", help="mcore folder -> mcore folder at another TP x PP")
    common(p, "mcore folder")
    layout(p)
    p.set_defaults(func=_cmd_reshard)

    p = cs.add_parser(
        "zero-to-hf", help="training checkpoint (DeepSpeed ZeRO 0-3) fp32 weights -> Hugging Face"
    )
    common(p, "training checkpoint folder (OUTPUT/checkpoints/step-N), or a run's output folder (latest)")
    hf_out(p)
    p.add_argument(
        "--adapter-only",
        action="store_true",
        help="a LoRA run's checkpoint: write its adapters as a PEFT folder (adapter_config.json + "
        "adapter_model.safetensors) instead of merging them into the base",
    )
    p.set_defaults(func=_cmd_zero_to_hf)
