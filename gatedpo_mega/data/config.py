"""Configuration of the preference data pipeline (the ``data`` section of the config tree)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, slots=True)
class DataConfig:
    source: str = "builtin"  # "builtin" (generated, no download) or a path to a data file or folder
    tokenizer: str = "builtin"  # "builtin", a Hugging Face tokenizer folder, or a SentencePiece .model file
    max_length: int = 128  # prompt + response tokens per row
    max_prompt_length: int = 64  # prompts longer than this keep their end
    pad_to_multiple: int = 8  # row length is padded to a multiple of this (tensor parallelism, kernels)
    cache_dir: str = "outputs/cache"  # tokenized datasets, keyed by a hash of files, tokenizer and settings

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"data.max_length={self.max_length} must be >= 2")
        if not 0 <= self.max_prompt_length < self.max_length:
            raise ValueError(
                f"data.max_prompt_length={self.max_prompt_length} must be in [0, data.max_length={self.max_length})"
            )
        if self.pad_to_multiple < 1:
            raise ValueError(f"data.pad_to_multiple={self.pad_to_multiple} must be >= 1")
