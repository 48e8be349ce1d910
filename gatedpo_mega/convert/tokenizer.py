"""The tokenizer of a Hugging Face export: the one training encoded with, as a folder ``AutoTokenizer`` loads.

A Hugging Face tokenizer folder is copied as it is. A SentencePiece model (the built-in tokenizer, one written by
``gatedpo data train-tokenizer``, or any other ``.model``) is converted to a ``tokenizer.json`` for the
``tokenizers`` library, so loading it needs neither sentencepiece nor protobuf; ``tokenizer.model`` is kept beside
it. The conversion follows the model's own normalizer spec (transformers' ``SpmConverter``), and the export checks
that it gives SentencePiece's ids on a set of probe strings before writing anything.

Ids as training used them: ``encode(text, add_special_tokens=False)`` gives the ids training gave ``text``; with
special tokens, BOS comes first (training puts it before every prompt) and no EOS is added (training appends it to
each response). One difference is inherent to Hugging Face tokenizers: text that spells a special or byte piece
(``</s>``, ``<0x41>``) is encoded as that piece, where SentencePiece encodes the characters.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gatedpo_mega.convert.errors import ConvertError
from gatedpo_mega.convert.folders import copy_tokenizer_files
from gatedpo_mega.formats import (
    HF_SPECIAL_TOKENS,
    HF_TOKENIZER,
    HF_TOKENIZER_CONFIG,
    SPM_MODEL,
    TOKENIZER_DIR,
)

if TYPE_CHECKING:
    from gatedpo_mega.config import Config

# Strings the exported tokenizer must encode exactly as SentencePiece does (checked on every export).
PROBE = (
    "\n\nHuman: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    " 12 plus 345 is 357.",
    "héllo wörld, naïve café; Ünïcödé ÀÉÎÕÜ",
    "日本語のテキスト 中文 한국어 🤖👍🏽",
    "a   b\t\tc\n\n\n d  ",
    "  leading and trailing  ",
    "",
    " ",
    "0123456789 3.14159 -42 1e10",
    "ＦＵＬＬ ｗｉｄｔｈ ① ﬁ x\u00a0y\u200bz",
    "mixed CASE, punctuation!?... (brackets) [x] {y} 'q' \"dq\" #$%&*+/=@\\^_`|~",
)
# SentencePiece model types (``TrainerSpec.ModelType`` in sentencepiece_model.proto); tokenizers has the first two.
_UNIGRAM, _BPE = 1, 2
_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


@dataclass(frozen=True, slots=True)
class TokenizerSource:
    """Where an export's tokenizer comes from: a Hugging Face folder (copied) or a SentencePiece model (converted)."""

    path: Path
    kind: str  # "hf" | "sentencepiece"
    origin: str  # how it was found, for the report line


def classify(path: Path, origin: str) -> TokenizerSource | None:
    """A tokenizer at ``path``: a ``.model`` file, a Hugging Face folder (``tokenizer.json`` or
    ``tokenizer_config.json``), or a folder holding only ``tokenizer.model``; None when there is none."""
    if path.is_file():
        return TokenizerSource(path, "sentencepiece", origin)
    if not path.is_dir():
        return None
    if any((path / n).is_file() for n in (HF_TOKENIZER, HF_TOKENIZER_CONFIG)):
        return TokenizerSource(path, "hf", origin)
    if (path / SPM_MODEL).is_file():
        return TokenizerSource(path / SPM_MODEL, "sentencepiece", origin)
    return None


def run_tokenizer(checkpoint: Path, *, scratch: Path) -> TokenizerSource | None:
    """The tokenizer a training run encoded with, from its checkpoint: the checkpoint's ``tokenizer/`` when present,
    else what its ``config.yaml`` says (``config_tokenizer``)."""
    own = classify(checkpoint / TOKENIZER_DIR, "the checkpoint")
    if own is not None:
        return own
    from gatedpo_mega.config import load_config
    from gatedpo_mega.errors import UserError

    try:
        cfg = load_config(checkpoint / "config.yaml")
    except (UserError, OSError):
        return None
    return config_tokenizer(cfg, scratch=scratch)


def config_tokenizer(cfg: Config, *, scratch: Path) -> TokenizerSource | None:
    """The tokenizer a run of ``cfg`` encodes with: ``data.tokenizer`` (the built-in one from ``data.cache_dir``,
    trained again into ``scratch`` when that cache is gone: its training is deterministic), else what
    ``model.init_from`` holds; None when neither is there."""
    if cfg.data.tokenizer == "builtin":
        return _builtin(cfg, scratch)
    candidates = [(Path(cfg.data.tokenizer).expanduser(), f"data.tokenizer={cfg.data.tokenizer}")]
    if cfg.model.init_from:
        init = Path(cfg.model.init_from)
        candidates += [(init / TOKENIZER_DIR, "model.init_from"), (init, "model.init_from")]
    for path, origin in candidates:
        source = classify(path, origin)
        if source is not None:
            return source
    return None


def _builtin(cfg: Config, scratch: Path) -> TokenizerSource:
    from gatedpo_mega.data.pipeline import builtin_tokenizer_file, builtin_tokenizer_folder, data_seed

    about = f"the built-in tokenizer (data.seed {data_seed(cfg.data, cfg.train.seed)})"
    cached = builtin_tokenizer_folder(cfg.data, cfg.train.seed) / SPM_MODEL
    if cached.is_file():
        return TokenizerSource(cached, "sentencepiece", about)
    rebuilt = builtin_tokenizer_file(cfg.data, cfg.train.seed, folder=scratch)
    return TokenizerSource(rebuilt, "sentencepiece", f"{about}, trained again: {cached} is gone")


def spm_to_hf(model: bytes, where: str) -> dict[str, str]:
    """The files of a Hugging Face tokenizer folder (name -> text) equivalent to the SentencePiece model ``model``."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
    try:
        proto.ParseFromString(model)
    except Exception as e:  # protobuf's DecodeError
        raise ConvertError(f"{where}: not a SentencePiece model ({e})") from None
    kind = proto.trainer_spec.model_type
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if kind == _UNIGRAM:
        vocab: Any = pieces
    elif kind == _BPE:
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    else:
        raise ConvertError(
            f"{where}: a SentencePiece {_MODEL_TYPES.get(kind, kind)} model; only unigram and bpe models convert "
            "to a Hugging Face tokenizer"
        )
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    spec = proto.trainer_spec
    specials = {
        "unk_token": _piece(pieces, spec.unk_id),
        "bos_token": _piece(pieces, spec.bos_id),
        "eos_token": _piece(pieces, spec.eos_id),
        "pad_token": _piece(pieces, spec.pad_id),
    }
    specials = {k: v for k, v in specials.items() if v is not None}
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials.values()])
    bos = specials.get("bos_token")
    if bos is not None:  # training puts BOS before the prompt; EOS after each response is its own
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, spec.bos_id)]
        )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": bos is not None,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    return {
        HF_TOKENIZER: tok.to_str(pretty=True) + "\n",
        HF_TOKENIZER_CONFIG: json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        HF_SPECIAL_TOKENS: json.dumps(specials, indent=2, ensure_ascii=False) + "\n",
    }


def _piece(pieces: list[tuple[str, float]], i: int) -> str | None:
    return pieces[i][0] if 0 <= i < len(pieces) else None


def probe_difference(model_file: Path, folder: Path, texts: tuple[str, ...] = PROBE) -> str | None:
    """The first of ``texts`` that the Hugging Face tokenizer in ``folder`` encodes differently from the
    SentencePiece model (None: all the same), as loaded by ``AutoTokenizer``."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    for text in texts:
        want = list(sp.encode(text))
        got = list(hf(text, add_special_tokens=False)["input_ids"])
        if got != want:
            return f"{text!r}: SentencePiece {want[:12]}, Hugging Face {got[:12]}"
    return None


def write_tokenizer(source: TokenizerSource, dst: Path) -> list[str]:
    """The tokenizer files of ``source`` in ``dst`` (a Hugging Face folder is copied; a SentencePiece model is
    converted, checked against the probe strings, and kept as ``tokenizer.model``); returns the names written."""
    if source.kind == "hf":
        return copy_tokenizer_files(source.path, dst)
    files = spm_to_hf(source.path.read_bytes(), str(source.path))
    with tempfile.TemporaryDirectory(prefix="gatedpo-tokenizer-") as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        problem = probe_difference(source.path, Path(tmp))
        if problem:
            raise ConvertError(
                f"{source.path}: the converted tokenizer encodes differently from SentencePiece: {problem}"
            )
        dst.mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copyfile(Path(tmp) / name, dst / name)
    shutil.copyfile(source.path, dst / SPM_MODEL)
    return [*files, SPM_MODEL]
