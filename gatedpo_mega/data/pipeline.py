"""``load_preference_data``: records to tokenized pairs, cached on disk, with every drop counted by reason.

Order of work: resolve the tokenizer, hash (files, tokenizer, settings) into the cache key, and re-use the cached
pairs if present; otherwise read records, turn each into a (prompt, chosen, rejected) example or count why not,
tokenize in batches (``data.num_proc`` processes), truncate, split off the eval set, and write the cache.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from gatedpo_mega.data import builtin
from gatedpo_mega.data.config import EVAL_SET_FIELDS, DataConfig
from gatedpo_mega.data.errors import DataError
from gatedpo_mega.data.records import BUILTIN_TEMPLATES, Drop, Example, Fields, Render, to_example
from gatedpo_mega.data.sources import Bad, files_digest, read_records, resolve_files
from gatedpo_mega.data.tokenized import DataReport, Pair, TokenizedPairs
from gatedpo_mega.data.tokenizer import SPM_FILE, Tokenizer, load_tokenizer, train_sentencepiece

CACHE_VERSION = 1  # bump when tokenization or the cache layout changes
CHUNK = 256  # examples per tokenizer call (and per task sent to a worker process)
# Settings that do not change the tokenized pairs, so they stay out of the cache key.
_NOT_IN_KEY = (
    "cache_dir", "num_proc", "pad_to_multiple", "packing", "tokenizer", "source", "train_tokenizer_if_missing",
    "tokenizer_vocab_size", "eval_sets", "max_train_pairs", "probe_pairs",
)  # fmt: skip


@dataclass(slots=True)
class PreferenceData:
    tokenizer: Tokenizer
    train: TokenizedPairs
    eval: TokenizedPairs | None
    report: DataReport
    fingerprint: str  # hash of files + tokenizer + settings
    cache_path: Path  # folder of this tokenized dataset (training keeps reference log-probs beside it)


def data_seed(cfg: DataConfig, seed: int) -> int:
    return cfg.seed if cfg.seed is not None else seed


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def builtin_tokenizer_folder(cfg: DataConfig, seed: int) -> Path:
    """Where the built-in tokenizer of ``cfg`` is kept: ``data.cache_dir/builtin/tokenizer-v1-seed0-vocab512/``."""
    name = f"tokenizer-v{builtin.VERSION}-seed{data_seed(cfg, seed)}-vocab{cfg.builtin_vocab_size}"
    return Path(cfg.cache_dir) / "builtin" / name


def builtin_tokenizer_file(cfg: DataConfig, seed: int, *, folder: Path | None = None) -> Path:
    """The built-in tokenizer's SentencePiece model in ``folder`` (default: its place in the cache), trained there
    first when missing: deterministically, so every build gives the same file."""
    model = (folder or builtin_tokenizer_folder(cfg, seed)) / SPM_FILE
    if not model.is_file():
        s = data_seed(cfg, seed)
        train_sentencepiece(builtin.corpus(builtin.generate(4000, s)), vocab_size=cfg.builtin_vocab_size,
                            out_dir=model.parent, seed=s)  # fmt: skip
    return model


def builtin_tokenizer(cfg: DataConfig, seed: int) -> Tokenizer:
    """The SentencePiece model trained on the built-in dataset, built once under ``data.cache_dir``."""
    return load_tokenizer(str(builtin_tokenizer_file(cfg, seed)))


def resolve_tokenizer(cfg: DataConfig, seed: int) -> Tokenizer:
    return builtin_tokenizer(cfg, seed) if cfg.tokenizer == "builtin" else load_tokenizer(cfg.tokenizer)


def train_data_tokenizer(cfg: DataConfig, *, vocab_size: int, out_dir: Path, seed: int) -> Path:
    """A SentencePiece model trained on the prompts and responses of ``cfg``'s records (hh rendering for chat
    messages); returns ``out_dir/tokenizer.model``."""
    from gatedpo_mega.data.records import render_hh

    report = DataReport(source=cfg.source)
    texts = [
        t
        for _, e in iter_examples(cfg, report, seed=seed, render=render_hh)
        for t in (e.prompt, e.chosen, e.rejected)
    ]
    if not texts:
        raise DataError(f"data.source {cfg.source}: no usable records to train a tokenizer on")
    return train_sentencepiece(texts, vocab_size=vocab_size, out_dir=out_dir, seed=seed)


# Training throughput on 2 CPU cores, in bytes of data files as stored (the HH sample: 0.64 MB gzip, ~1.6 s).
_TOKENIZER_BYTES_PER_S = 400_000


def ensure_tokenizer(cfg: DataConfig, *, seed: int) -> Path | None:
    """With ``data.train_tokenizer_if_missing``, train the tokenizer ``data.tokenizer`` names when it does not
    exist yet (saying so in one line); returns the file written, or None when there was nothing to do."""
    target = Path(cfg.tokenizer).expanduser()
    if not cfg.train_tokenizer_if_missing or target.exists():
        return None
    files = [] if cfg.source == "builtin" else resolve_files(cfg.source, cfg.split)
    size = sum(f.stat().st_size for f in files if f.is_file())
    about = f", about {max(1, round(size / _TOKENIZER_BYTES_PER_S))} s" if size else ""
    print(
        f"tokenizer {cfg.tokenizer} not found: training it on the data ({cfg.tokenizer_vocab_size} pieces{about})",
        flush=True,
    )
    is_file = target.suffix == ".model"
    written = train_data_tokenizer(
        cfg, vocab_size=cfg.tokenizer_vocab_size, out_dir=target.parent if is_file else target, seed=seed
    )
    if is_file and written != target:
        written.replace(target)
    return target if is_file else written


def chat_renderer(cfg: DataConfig, tok: Tokenizer) -> Render:
    if cfg.chat_template in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[cfg.chat_template]
    if cfg.chat_template == "tokenizer" or tok.chat_template:
        return tok.render_chat
    return BUILTIN_TEMPLATES["hh"]


# ---------------------------------------------------------------------------------------------------------------
# Records to examples


def iter_examples(
    cfg: DataConfig, report: DataReport, *, seed: int, render: Render
) -> Iterator[tuple[int, Example]]:
    """``(record index, example)`` for each usable record; every other record is counted in ``report`` (or, with
    ``on_bad_record: error``, a malformed one raises)."""
    if cfg.source == "builtin":
        pairs = builtin.generate(cfg.builtin_pairs, data_seed(cfg, seed), cfg.builtin_off_policy)
        for i, ex in enumerate(pairs):
            report.records += 1
            yield i, ex
        return
    skip = cfg.on_bad_record == "skip"
    fields = Fields(cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)
    index = -1
    for loc, rec in read_records(cfg.source, split=cfg.split):
        out: Example | Drop | Bad = (
            rec
            if isinstance(rec, Bad)
            else to_example(loc, rec, fmt=cfg.format, fields=fields, render=render)
        )
        index += 1
        report.records += 1
        if isinstance(out, Bad):
            if not skip:
                raise DataError(out.message + " (data.on_bad_record: skip counts such records and goes on)")
            report.drop(out.reason, out.message)
        elif isinstance(out, Drop):
            report.drop(out.reason)
        else:
            yield index, out


# ---------------------------------------------------------------------------------------------------------------
# Tokenization (batched; several processes when data.num_proc > 1)

_worker_tok: Tokenizer | None = None


def _init_worker(spec: str) -> None:
    global _worker_tok
    _worker_tok = load_tokenizer(spec)


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    assert _worker_tok is not None
    return _worker_tok.encode_batch(texts)


def _flat_texts(examples: list[Example]) -> list[list[str]]:
    return [
        [t for e in examples[i : i + CHUNK] for t in (e.prompt, e.chosen, e.rejected)]
        for i in range(0, len(examples), CHUNK)
    ]


def encode_examples(tok: Tokenizer, examples: list[Example], num_proc: int) -> list[tuple[list[int], ...]]:
    """Token ids of ``(prompt, chosen, rejected)`` per example, without specials."""
    chunks = _flat_texts(examples)
    if num_proc > 1 and len(chunks) > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        with mp.get_context("fork").Pool(min(num_proc, len(chunks)), _init_worker, (tok.path,)) as pool:
            encoded = pool.map(_encode_chunk, chunks)
    else:
        encoded = [tok.encode_batch(c) for c in chunks]
    flat = [ids for chunk in encoded for ids in chunk]
    return [tuple(flat[i : i + 3]) for i in range(0, len(flat), 3)]


def truncate(
    prompt: list[int], chosen: list[int], rejected: list[int], *, bos: int | None, eos: int, cfg: DataConfig
) -> tuple[Pair | None, bool, bool]:
    """BOS + prompt (its end kept, ``max_prompt_length``), then response + EOS cut to ``max_length``.
    Returns the pair (``None`` when a response keeps no token with a loss), and whether prompt / a response
    was cut."""
    head = [bos] if bos is not None and cfg.max_prompt_length > 0 else []
    room = cfg.max_prompt_length - len(head)
    p = head + (prompt[len(prompt) - room :] if len(prompt) > room else prompt)
    prompt_cut = len(prompt) > room
    budget = cfg.max_length - len(p)
    c, r = [*chosen, eos][:budget], [*rejected, eos][:budget]
    response_cut = len(chosen) + 1 > budget or len(rejected) + 1 > budget
    # The first response token is predicted from the last prompt token: with no prompt it has no loss.
    first = 0 if p else 1
    if len(c) - first <= 0 or len(r) - first <= 0:
        return None, prompt_cut, response_cut
    return Pair(p, c, r), prompt_cut, response_cut


def is_eval(prompt: str, fraction: float) -> bool:
    """The fixed held-out rule: a hash of the prompt text, so equal prompts land in the same split."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest(), "big")
    return h / 2.0**64 < fraction


# ---------------------------------------------------------------------------------------------------------------
# The entry point


def fingerprint(cfg: DataConfig, tok: Tokenizer, *, seed: int) -> str:
    settings = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_KEY}
    if cfg.source == "builtin":
        settings["seed"] = data_seed(cfg, seed)
        data = f"builtin-v{builtin.VERSION}"
    else:
        data = files_digest(resolve_files(cfg.source, cfg.split))
    key = {"version": CACHE_VERSION, "settings": settings, "data": data, "tokenizer": tok.fingerprint()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def tokenize(
    cfg: DataConfig, tok: Tokenizer, *, seed: int, purpose: str = "training"
) -> tuple[TokenizedPairs, TokenizedPairs, DataReport]:
    report = DataReport(source=cfg.source)
    indexed = list(iter_examples(cfg, report, seed=seed, render=chat_renderer(cfg, tok)))
    encoded = encode_examples(tok, [e for _, e in indexed], cfg.num_proc)
    splits: dict[bool, tuple[list[Pair], list[int]]] = {False: ([], []), True: ([], [])}
    cut = {"prompt": 0, "response": 0}
    for (index, ex), (p, c, r) in zip(indexed, encoded, strict=True):
        pair, prompt_cut, response_cut = truncate(p, c, r, bos=tok.bos_id, eos=tok.eos_id, cfg=cfg)
        if pair is None:
            report.drop("no_response_token")
            continue
        cut["prompt"] += prompt_cut
        cut["response"] += response_cut
        pairs, indices = splits[is_eval(ex.prompt, cfg.eval_fraction)]
        pairs.append(pair)
        indices.append(index)
    report.truncated = cut
    train, evals = (TokenizedPairs.from_pairs(*splits[k]) for k in (False, True))
    report.kept, report.train, report.eval = len(train) + len(evals), len(train), len(evals)
    if len(train) == 0:
        raise DataError(f"data.source {cfg.source}: no usable {purpose} pairs ({_summary(report)})")
    return train, evals, report


def _summary(report: DataReport) -> str:
    drops = ", ".join(f"{k} {v}" for k, v in sorted(report.dropped.items())) or "none"
    return f"{report.records} records read, {report.kept} kept; dropped: {drops}"


def load_preference_data(cfg: DataConfig, *, seed: int, purpose: str = "training") -> PreferenceData:
    """Tokenized train (and eval) pairs for ``cfg``; the second call with the same files, tokenizer and settings
    re-uses the cache under ``data.cache_dir``."""
    tok = resolve_tokenizer(cfg, seed)
    fp = fingerprint(cfg, tok, seed=seed)
    path = Path(cfg.cache_dir) / "pairs" / fp[:20]
    if not (path / "report.json").is_file():
        train, evals, report = tokenize(cfg, tok, seed=seed, purpose=purpose)
        _write_cache(path, train, evals, report)
    report = DataReport.from_json((path / "report.json").read_text())
    train = TokenizedPairs.load(path / "train.npz")
    if cfg.max_train_pairs and len(train) > cfg.max_train_pairs:
        train = train.subset(np.arange(cfg.max_train_pairs))  # the loader's line reports the pairs it uses
    evals = TokenizedPairs.load(path / "eval.npz")
    return PreferenceData(tok, train, evals if len(evals) else None, report, fp, path)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation sets of their own (data.eval_sets)


def eval_set_config(cfg: DataConfig, name: str) -> DataConfig:
    """``cfg`` reading eval set ``name``: its source and the reading options it gives (the rest as ``cfg``'s), every
    pair kept (no hash split)."""
    spec = cfg.eval_sets[name]
    given = {f: getattr(spec, f) for f in EVAL_SET_FIELDS if getattr(spec, f) is not None}
    return replace(cfg, source=spec.source, **given, eval_fraction=0.0, eval_sets={}, max_train_pairs=0)


def load_eval_set(cfg: DataConfig, name: str, *, seed: int) -> PreferenceData:
    """Eval set ``name`` read, validated and tokenized (cached) as training data is, its pairs in ``.train``; a
    problem is one line naming the set."""
    set_cfg = eval_set_config(cfg, name)
    try:
        return load_preference_data(set_cfg, seed=seed, purpose="evaluation")
    except DataError as e:
        # The pipeline names its source as data.source; here the set is what the user wrote.
        message = str(e).replace(f"data.source {set_cfg.source}", set_cfg.source)
        raise DataError(f"data.eval_sets.{name}: {message}") from None


def _write_cache(path: Path, train: TokenizedPairs, evals: TokenizedPairs, report: DataReport) -> None:
    """Write into a private folder, then rename: concurrent ranks never see half a cache."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train.save(tmp / "train.npz")
    evals.save(tmp / "eval.npz")
    (tmp / "report.json").write_text(report.to_json())  # last: its presence marks a complete cache
    try:
        tmp.rename(path)
    except OSError:  # another process finished first; its cache is the same
        shutil.rmtree(tmp, ignore_errors=True)
