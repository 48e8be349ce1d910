"""Tokenizers: a Hugging Face tokenizer folder or a SentencePiece ``.model``, behind one small interface.

``gatedpo data train-tokenizer`` and the built-in dataset train SentencePiece models here; they are saved as
``FOLDER/tokenizer.model``, which loads both as the file and as the folder.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from gatedpo_mega.data.errors import DataError
from gatedpo_mega.formats import HF_TOKENIZER, HF_TOKENIZER_CONFIG, SPM_MODEL

SPM_FILE = SPM_MODEL
# Ids of the specials in every model trained here (SentencePiece's own defaults, plus a pad).
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


class Tokenizer(Protocol):
    path: str  # what load_tokenizer() takes to build it again (in worker processes)
    vocab_size: int
    bos_id: int | None  # prepended to every prompt where the tokenizer has that convention
    eos_id: int
    pad_id: int
    chat_template: str | None

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def decode(self, ids: list[int]) -> str: ...
    def render_chat(self, conversation: list[dict[str, str]]) -> str: ...
    def fingerprint(self) -> str: ...


def _digest(files: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


class SentencePieceTokenizer:
    def __init__(self, model_file: Path) -> None:
        import sentencepiece as spm

        self.path = str(model_file)
        self._file = model_file
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as e:
            raise DataError(f"data.tokenizer {model_file}: not a SentencePiece model ({e})") from None
        self.vocab_size = int(self.sp.get_piece_size())
        self.bos_id = int(self.sp.bos_id()) if self.sp.bos_id() >= 0 else None
        if self.sp.eos_id() < 0:
            raise DataError(f"data.tokenizer {model_file}: the SentencePiece model has no EOS piece")
        self.eos_id = int(self.sp.eos_id())
        self.pad_id = int(self.sp.pad_id()) if self.sp.pad_id() >= 0 else self.eos_id
        self.chat_template: str | None = None

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(x) for x in self.sp.encode(texts)]

    def decode(self, ids: list[int]) -> str:
        return str(self.sp.decode([int(i) for i in ids]))

    def piece(self, i: int) -> str:
        return str(self.sp.id_to_piece(int(i)))

    def render_chat(self, conversation: list[dict[str, str]]) -> str:
        raise DataError(
            f"data.tokenizer {self.path} has no chat template; set data.chat_template to hh or chatml"
        )

    def fingerprint(self) -> str:
        return _digest([self._file])


class HFTokenizer:
    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        self.path = str(folder)
        self._folder = folder
        try:
            self.tok: Any = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # transformers raises OSError, ValueError, KeyError ... for a bad folder
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise DataError(
                f"data.tokenizer {folder}: not a loadable Hugging Face tokenizer ({first})"
            ) from None
        self.vocab_size = len(self.tok)
        if self.tok.eos_token_id is None:
            raise DataError(f"data.tokenizer {folder}: the tokenizer has no EOS token")
        self.eos_id = int(self.tok.eos_token_id)
        self.pad_id = int(self.tok.pad_token_id) if self.tok.pad_token_id is not None else self.eos_id
        # BOS convention: the tokenizer itself puts BOS first when asked for special tokens.
        with_specials = self.tok("a", add_special_tokens=True)["input_ids"]
        bos = self.tok.bos_token_id
        self.bos_id = int(bos) if bos is not None and with_specials[:1] == [bos] else None
        self.chat_template = getattr(self.tok, "chat_template", None) or None

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(x) for x in self.tok(texts, add_special_tokens=False)["input_ids"]]

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode([int(i) for i in ids], skip_special_tokens=False))

    def piece(self, i: int) -> str:
        return str(self.tok.convert_ids_to_tokens(int(i)))

    def render_chat(self, conversation: list[dict[str, str]]) -> str:
        text = str(self.tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))
        bos = self.tok.bos_token
        if self.bos_id is not None and bos and text.startswith(bos):
            text = text[len(bos) :]  # the pipeline adds BOS as an id, never twice
        return text

    def fingerprint(self) -> str:
        return _digest(p for p in self._folder.iterdir() if p.is_file())


def load_tokenizer(spec: str) -> SentencePieceTokenizer | HFTokenizer:
    """A ``.model`` file, a folder with ``tokenizer.json`` / ``tokenizer_config.json`` (Hugging Face), or a folder
    with only ``tokenizer.model`` (as ``train-tokenizer`` writes it)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return SentencePieceTokenizer(path)
    if path.is_dir():
        if any((path / f).is_file() for f in (HF_TOKENIZER, HF_TOKENIZER_CONFIG)):
            return HFTokenizer(path)
        if (path / SPM_FILE).is_file():
            return SentencePieceTokenizer(path / SPM_FILE)
        raise DataError(
            f"data.tokenizer {spec}: folder has neither tokenizer.json/tokenizer_config.json nor {SPM_FILE}"
        )
    raise DataError(
        f"data.tokenizer {spec}: no such file or folder (use 'builtin', a tokenizer folder, or a .model file; "
        "hub names are not fetched)"
    )


def train_sentencepiece(texts: Iterable[str], *, vocab_size: int, out_dir: Path, seed: int = 0) -> Path:
    """Train a unigram SentencePiece model from in-memory text, deterministically (one thread, fixed seed);
    byte fallback so that no input is ever unknown. Returns ``out_dir/tokenizer.model``."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buf,
            vocab_size=vocab_size,
            model_type="unigram",
            num_threads=1,
            byte_fallback=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            max_sentence_length=1 << 16,
            # Exact round-trips, and prompt ids + response ids == ids of the concatenation: no normalisation,
            # no dummy space in front, whitespace (newlines included) kept as it is.
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            hard_vocab_limit=False,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(
            f"training the SentencePiece tokenizer failed: {str(e).strip().splitlines()[-1]}"
        ) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / SPM_FILE
    tmp = out_dir / f".{SPM_FILE}.{os.getpid()}.tmp"
    tmp.write_bytes(buf.getvalue())
    tmp.replace(target)
    return target
