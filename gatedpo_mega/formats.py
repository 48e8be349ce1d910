"""On-disk formats and name tables, defined once for training, conversion and the transformers backend.

A training checkpoint is ``OUTPUT/checkpoints/step-00000040/``, complete once ``meta.json`` is in it and the
folder has its final name (``training/checkpoint.py`` writes it as ``.tmp-step-00000040`` and renames it); an mcore
folder is marked by ``gatedpo_mcore.json`` (``convert/mcore.py``). Discovery raises the caller's error type
(training and conversion each have their own).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

# Parameter and compute dtypes by their config name (``model.dtype``, ``--dtype``).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Tokenizer files. A Hugging Face tokenizer folder holds the first three (``tokenizer.json`` is the whole tokenizer,
# for the ``tokenizers`` library); a SentencePiece model is ``tokenizer.model``, alone in its folder when trained here.
HF_TOKENIZER = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_SPECIAL_TOKENS = "special_tokens_map.json"
SPM_MODEL = "tokenizer.model"
# The tokenizer's folder inside an mcore folder (and inside a checkpoint that carries one).
TOKENIZER_DIR = "tokenizer"

# Files of a Hugging Face folder that are not weights or config.json: copied along with the model.
TOKENIZER_FILES = (
    HF_TOKENIZER,
    HF_TOKENIZER_CONFIG,
    SPM_MODEL,
    HF_SPECIAL_TOKENS,
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

TRAIN_FORMAT = "gatedpo-train-checkpoint"
TRAIN_VERSION = 1
TRAIN_META = "meta.json"  # written last: a folder holding it under its final name is complete
TRAIN_FILES = (
    "files"  # meta.json's record of every other file: {relative path: {"size": bytes, "sha256": hex}}
)
CHECKPOINTS = "checkpoints"
INCOMPLETE_PREFIX = ".tmp-"
STEP_NAME = re.compile(r"^step-(\d{8})$")
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"  # DeepSpeed's checkpoint tag: its files are in ``deepspeed/state/``

MCORE_META = "gatedpo_mcore.json"
MCORE_FORMAT = "gatedpo-mcore"
MCORE_VERSION = 1


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoints_root(output_dir) / f"step-{step:08d}"


def incomplete_dir(final: Path) -> Path:
    """Where the checkpoint ``final`` is written before it is renamed (never read)."""
    return final.with_name(f"{INCOMPLETE_PREFIX}{final.name}")


def is_incomplete(path: Path) -> bool:
    return INCOMPLETE_PREFIX in path.name


def _complete_in(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_NAME.match(p.name) and (p / TRAIN_META).is_file()]
    return sorted(found, key=lambda p: p.name)  # eight digits: the names sort as the steps


def step_folders(output_dir: str | Path) -> list[Path]:
    """Every checkpoint folder under its final name, oldest first, including one whose ``meta.json`` is gone
    (damaged: it was renamed only after ``meta.json`` was written)."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if STEP_NAME.match(p.name) and p.is_dir())


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return _complete_in(checkpoints_root(output_dir))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def find_checkpoint(path: str | Path, error: type[Exception]) -> Path:
    """``path`` itself when it is a checkpoint; the latest complete one when it is a run's output folder or its
    ``checkpoints/`` folder. Otherwise ``error`` (the caller's type) saying which: an incomplete ``.tmp-*`` folder
    (never read), no folder, or a folder without checkpoints."""
    p = Path(path)
    if is_incomplete(p):
        raise error(f"{p}: an incomplete checkpoint (the run stopped while writing it)")
    if not p.is_dir():
        raise error(f"{p}: no such checkpoint folder")
    if (p / TRAIN_META).is_file():
        return p
    found = _complete_in(checkpoints_root(p)) or _complete_in(p)
    if not found:
        raise error(f"{p}: not a training checkpoint (no meta.json) nor a run with checkpoints")
    return found[-1]


def module_states_file(checkpoint: Path, mp_rank: int, zero_stage: int) -> Path:
    """DeepSpeed's model-states file of model-parallel rank ``mp_rank`` (``pp_rank * TP + tp_rank``); under ZeRO 3
    it holds no weights, only the parameter shapes."""
    prefix = "zero_pp_rank_0_" if zero_stage == 3 else ""
    return checkpoint / DEEPSPEED_DIR / DEEPSPEED_TAG / f"{prefix}mp_rank_{mp_rank:02d}_model_states.pt"


def experts_file(checkpoint: Path, ep_rank: int, mp_rank: int) -> Path:
    """The experts of expert-parallel rank ``ep_rank`` and model-parallel rank ``mp_rank`` in a checkpoint written
    with ``parallel.expert`` > 1 (DeepSpeed's model-states file holds one EP rank's only): ``{"module": {name:
    tensor}}``, names as the model-states file has them but with global expert indices."""
    return checkpoint / "experts" / f"ep_rank_{ep_rank:03d}_mp_rank_{mp_rank:02d}_experts.pt"


def format_mismatch(meta: dict[str, Any], fmt: str, version: int) -> str | None:
    """What is wrong with a meta record's format and version (None: it is ``fmt`` version ``version``)."""
    if meta.get("format") == fmt and meta.get("version") == version:
        return None
    return (
        f"format {meta.get('format')!r} version {meta.get('version')!r}, expected {fmt!r} version {version}"
    )
