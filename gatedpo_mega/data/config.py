"""Configuration of the preference data pipeline (the ``data`` section of the config tree)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from gatedpo_mega.validate import choice, not_empty, valid_seed

FORMATS = ("auto", "hh", "plain", "chat")
CHAT_TEMPLATES = ("auto", "tokenizer", "hh", "chatml")
ON_BAD_RECORD = ("error", "skip")
# The name the training data's hash split (data.eval_fraction) is evaluated under beside named eval sets.
HELDOUT = "heldout"
PROBE = "probe"  # the metric prefix of data.probe_pairs: eval/probe/<metric>
# How an eval set reads its records: these fields of ``data``, each overridable per set.
EVAL_SET_FIELDS = ("format", "split", "prompt_field", "chosen_field", "rejected_field", "chat_template")


@dataclass(kw_only=True, slots=True)
class EvalSetConfig:
    """One evaluation set of ``data.eval_sets``: its own source; every field left null reads as ``data``'s."""

    SHORTHAND: ClassVar[str] = "source"  # ``data.eval_sets.NAME=path``: the set written as its source alone

    source: str = ""  # a data file or folder, or a Hugging Face Hub dataset id (not "builtin")
    format: str | None = None  # null: data.format
    split: str | None = None  # null: data.split
    prompt_field: str | None = None  # null: data.prompt_field
    chosen_field: str | None = None  # null: data.chosen_field
    rejected_field: str | None = None  # null: data.rejected_field
    chat_template: str | None = None  # null: data.chat_template


@dataclass(kw_only=True, slots=True)
class DataConfig:
    source: str = "builtin"  # "builtin" (generated, no download), a data file or folder, or a Hugging Face Hub dataset id
    split: str = "train"  # split of a save_to_disk DatasetDict or a Hub dataset (the files that name it)
    format: str = (
        "auto"  # auto | hh (two transcripts) | plain (prompt/chosen/rejected strings) | chat (messages)
    )
    prompt_field: str = "prompt"  # record field holding the prompt (optional for hh and chat)
    chosen_field: str = "chosen"  # record field holding the preferred response (or transcript, or messages)
    rejected_field: str = "rejected"  # record field holding the dispreferred response
    chat_template: str = (
        "auto"  # auto (the tokenizer's, else hh) | tokenizer | hh | chatml: renders chat messages
    )
    tokenizer: str = "builtin"  # "builtin", a Hugging Face tokenizer folder, or a SentencePiece .model file
    # A data.tokenizer path that does not exist yet: train a SentencePiece tokenizer of tokenizer_vocab_size pieces
    # on the data there first (what ``gatedpo data train-tokenizer`` does), instead of refusing the run.
    train_tokenizer_if_missing: bool = False
    tokenizer_vocab_size: int = 8000
    max_length: int = 128  # prompt + response tokens per row
    max_prompt_length: int = 64  # prompts longer than this keep their end
    pad_to_multiple: int = 8  # row length is padded to a multiple of this (tensor parallelism, kernels)
    # Each micro-batch's rows back to back in one row, no padding between them; every document attends only to
    # itself (model.attention=sdpa) and its positions restart at 0. The same pairs per micro-batch as unpacked.
    packing: bool = False
    on_bad_record: str = "error"  # error: stop at the first bad record | skip: count, report and go on
    eval_fraction: float = 0.05  # held-out share, chosen by a hash of the prompt text (0: no eval split)
    max_train_pairs: int = 0  # train on the first N training pairs (after the hash split) only; 0: all
    # Evaluation sets of their own, by name: ``{hh: data/hh_test.jsonl, mine: {source: m.jsonl, format: plain}}``
    # (each an EvalSetConfig, or its source alone). Metrics are logged as eval/<name>/<metric>; the hash split
    # above, when data.eval_fraction > 0, is evaluated beside them as eval/heldout/<metric>. Empty: only the hash
    # split, as eval/<metric>.
    eval_sets: dict[str, EvalSetConfig] = field(default_factory=dict)
    # Probe pairs: the first N pairs of the hash split, evaluated apart as eval/probe/<metric> (and not in the
    # split's own metrics): examples the run never trains on, whose log-likelihood change is the spill-over of
    # training onto what it should not touch ("Δ others"). 0: none.
    probe_pairs: int = 0
    num_proc: int = 1  # tokenizer processes
    builtin_pairs: int = 4000  # size of the generated built-in dataset
    builtin_vocab_size: int = 512  # vocabulary of the built-in SentencePiece tokenizer
    # Share of built-in pairs whose rejected response is another model's: the same wrong answer after a hedge
    # ("Hmm, I think ...") no chosen response uses. A model trained on the chosen responses gives those tokens
    # the extremely low probabilities the gate is for (data/builtin.py). 0: every pair as before.
    builtin_off_policy: float = 0.0
    seed: int | None = (
        0  # seed of the built-in data and tokenizer (fixed: train.seed orders batches); null: train.seed
    )
    cache_dir: str = "outputs/cache"  # tokenized datasets, keyed by a hash of files, tokenizer and settings

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("data.source must not be empty (use 'builtin' for the generated dataset)")
        choice("data.format", self.format, FORMATS)
        choice("data.chat_template", self.chat_template, CHAT_TEMPLATES)
        choice("data.on_bad_record", self.on_bad_record, ON_BAD_RECORD)
        for key in ("prompt_field", "chosen_field", "rejected_field", "tokenizer"):
            not_empty(f"data.{key}", getattr(self, key))
        if self.chosen_field == self.rejected_field:
            raise ValueError(f"data.chosen_field and data.rejected_field are both {self.chosen_field!r}")
        if self.train_tokenizer_if_missing and self.tokenizer == "builtin":
            raise ValueError(
                "data.train_tokenizer_if_missing=true needs data.tokenizer to be a path to train into "
                "('builtin' is built by itself)"
            )
        if self.tokenizer_vocab_size < 300:
            raise ValueError(
                f"data.tokenizer_vocab_size={self.tokenizer_vocab_size} must be >= 300 "
                "(256 byte-fallback pieces plus the specials and some words)"
            )
        if self.max_length < 2:
            raise ValueError(f"data.max_length={self.max_length} must be >= 2")
        if not 0 <= self.max_prompt_length < self.max_length:
            raise ValueError(
                f"data.max_prompt_length={self.max_prompt_length} must be in [0, data.max_length={self.max_length})"
            )
        if self.pad_to_multiple < 1:
            raise ValueError(f"data.pad_to_multiple={self.pad_to_multiple} must be >= 1")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction={self.eval_fraction} must be in [0, 1)")
        if self.probe_pairs < 0:
            raise ValueError(f"data.probe_pairs={self.probe_pairs} must be >= 0 (0: none)")
        if self.probe_pairs and not self.eval_fraction:
            raise ValueError(
                f"data.probe_pairs={self.probe_pairs} are taken from the held-out split: data.eval_fraction must be > 0"
            )
        if self.max_train_pairs < 0:
            raise ValueError(f"data.max_train_pairs={self.max_train_pairs} must be >= 0 (0: every pair)")
        if self.num_proc < 1:
            raise ValueError(f"data.num_proc={self.num_proc} must be >= 1")
        if not 0.0 <= self.builtin_off_policy <= 1.0:
            raise ValueError(f"data.builtin_off_policy={self.builtin_off_policy} must be in [0, 1]")
        if self.builtin_pairs < 1:
            raise ValueError(f"data.builtin_pairs={self.builtin_pairs} must be >= 1")
        if not 300 <= self.builtin_vocab_size <= 32000:
            raise ValueError(
                f"data.builtin_vocab_size={self.builtin_vocab_size} must be in [300, 32000] "
                "(256 byte-fallback pieces plus the specials and some words)"
            )
        if self.seed is not None:
            valid_seed("data.seed", self.seed)
        not_empty("data.cache_dir", self.cache_dir)
        for name, spec in self.eval_sets.items():
            check_eval_set(name, spec, self)


def check_eval_set(name: str, spec: EvalSetConfig, data: DataConfig) -> None:
    """Raise ``ValueError`` naming ``data.eval_sets.<name>`` when the set's name or options are unusable."""
    key = f"data.eval_sets.{name}"
    if not name or "/" in name or name != name.strip():
        raise ValueError(f"{key}: a set name must be non-empty, without '/' or surrounding spaces")
    if name in (HELDOUT, PROBE):
        what = "the data.eval_fraction split" if name == HELDOUT else "data.probe_pairs"
        raise ValueError(f"{key}: '{name}' names {what}; choose another name")
    if not spec.source or spec.source == "builtin":
        raise ValueError(f"{key}.source must name a data file, folder or Hub dataset")
    if spec.format is not None:
        choice(f"{key}.format", spec.format, FORMATS)
    if spec.chat_template is not None:
        choice(f"{key}.chat_template", spec.chat_template, CHAT_TEMPLATES)
    for f in ("split", "prompt_field", "chosen_field", "rejected_field"):
        if getattr(spec, f) is not None:
            not_empty(f"{key}.{f}", getattr(spec, f))
    chosen = spec.chosen_field or data.chosen_field
    if chosen == (spec.rejected_field or data.rejected_field):
        raise ValueError(f"{key}: chosen_field and rejected_field are both {chosen!r}")
