"""The bridge from the data pipeline to a run: this rank's step batches and its share of the reference pass."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch.distributed as dist

from gatedpo_mega.config import Config
from gatedpo_mega.data import PreferenceLoader, load_preference_data
from gatedpo_mega.data.batch import PreferenceBatch
from gatedpo_mega.data.config import HELDOUT, PROBE
from gatedpo_mega.data.loader import collate
from gatedpo_mega.data.pipeline import PreferenceData, load_eval_set
from gatedpo_mega.data.tokenized import TokenizedPairs
from gatedpo_mega.errors import ConfigError
from gatedpo_mega.megatron.parallel import Layout
from gatedpo_mega.training.initial_weights import files_identity, source_identity, source_vocab_size


class StepSource(Protocol):
    """Where a run's batches come from (``gatedpo_mega.data.PreferenceLoader`` in production)."""

    num_micro_batches: int

    def __next__(self) -> list[PreferenceBatch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(slots=True)
class EvalData:
    """One evaluation set: this DP rank's micro-batches (the same number on every rank; ``counted`` False marks the
    fillers that even them out, which are run but not counted)."""

    prefix: str  # of its metric names: "eval/" (the hash split alone, as always) or "eval/<name>/"
    batches: list[PreferenceBatch]
    counted: list[bool]
    num_pairs: int
    reference_file: Path | None = None  # cached reference log-probs of its pairs (None: always compute)


@dataclass(slots=True)
class RunData:
    steps: StepSource  # this DP rank's micro-batches, one list per optimizer step
    reference_batches: list[PreferenceBatch]  # this DP rank's share of every pair, for the reference pass
    num_pairs: int
    vocab_size: int
    reference_file: Path | None  # cached reference log-probs (None: always compute)
    report: str = ""
    evals: list[EvalData] = field(default_factory=list)  # the evaluation sets (train.eval_every > 0)


def reference_key(cfg: Config, vocab_size: int) -> str:
    """What the initial weights depend on: the model shape, the vocabulary, the seed and the ``init_from``
    source's files (not the layout)."""
    model = asdict(cfg.model)
    for how in ("fused_logprobs", "fused_objective", "attention", "recompute"):  # ways of computing
        model.pop(how)
    blob = json.dumps(
        {
            "model": model,
            "vocab": vocab_size,
            "seed": None
            if cfg.model.init_from
            else cfg.train.seed,  # it draws the weights only without init_from
            "init": source_identity(cfg.model.init_from),
            # the starting adapters' files (the reference of a run from model.init_adapter is that policy)
            **({"adapter": files_identity(Path(cfg.model.init_adapter))} if cfg.model.init_adapter else {}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def document_multiple(cfg: Config) -> int:
    """What every row (packed: every document) must span a multiple of: context parallelism's ``2 CP`` chunks."""
    return 2 * cfg.parallel.context if cfg.parallel.context > 1 else 1


def eval_micro_batches(
    pairs: TokenizedPairs, cfg: Config, layout: Layout, pad_id: int
) -> tuple[list[PreferenceBatch], list[bool]]:
    """Every held-out pair once: sorted by length, cut into micro-batches of ``train.reference_batch_size``,
    dealt round-robin over DP ranks; ranks with fewer get fillers (repeats, not counted) so that every rank runs
    the same number of forwards (ZeRO-3 gathers parameters collectively in each)."""
    n = len(pairs)
    size = cfg.train.reference_batch_size
    order = sorted(range(n), key=lambda i: (int(pairs.row_lengths[i]), i))
    chunks = [order[i : i + size] for i in range(0, n, size)]
    mine = chunks[layout.dp_rank :: layout.dp]
    counted = [True] * len(mine)
    rounds = -(-len(chunks) // layout.dp)
    while len(mine) < rounds:
        mine.append(chunks[0])
        counted.append(False)
    pad = cfg.data.pad_to_multiple
    batches = [
        collate(
            pairs, c, pad_to_multiple=pad, pad_id=pad_id, packing=cfg.data.packing,
            document_multiple=document_multiple(cfg),
        )
        for c in mine
    ]  # fmt: skip
    return batches, counted


def run_vocab_size(cfg: Config, tokenizer_vocab: int) -> int:
    """The model's vocabulary: as configured, else the initial weights' (model.init_from), else the tokenizer's."""
    vocab = cfg.model.vocab_size or source_vocab_size(cfg.model.init_from) or tokenizer_vocab
    if vocab < tokenizer_vocab:
        raise ConfigError(
            f"the model's vocabulary ({vocab}) is smaller than the tokenizer's {tokenizer_vocab}: the tokenizer "
            "does not belong to this model"
        )
    return vocab


def make_run_data(cfg: Config, layout: Layout) -> RunData:
    t = cfg.train

    def load() -> tuple[PreferenceData, list[tuple[str, TokenizedPairs, Path, int]]]:
        data = load_preference_data(cfg.data, seed=t.seed)
        return data, eval_sets(cfg, data.eval, data.cache_path, seed=t.seed) if t.eval_every else []

    # Rank 0 tokenizes and writes the caches; the others wait, then read them.
    if layout.rank == 0:
        data, sets = load()
    dist.barrier()
    if layout.rank != 0:
        data, sets = load()
    tok = data.tokenizer
    vocab = run_vocab_size(cfg, tok.vocab_size)
    try:
        steps = PreferenceLoader(
            data.train, global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
            dp_rank=layout.dp_rank, dp_size=layout.dp, seed=t.seed, pad_to_multiple=cfg.data.pad_to_multiple,
            pad_id=tok.pad_id, packing=cfg.data.packing, document_multiple=document_multiple(cfg),
        )  # fmt: skip
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # Each pair belongs to exactly one DP rank (i % dp); a short last micro-batch repeats its own first pair.
    n = len(data.train)
    mine = sorted(range(layout.dp_rank, n, layout.dp), key=lambda i: int(data.train.row_lengths[i]))
    size = t.reference_batch_size
    chunks = [mine[i : i + size] for i in range(0, len(mine), size)]
    if chunks and len(chunks[-1]) < size:
        chunks[-1] = chunks[-1] + [chunks[-1][0]] * (size - len(chunks[-1]))
    d = cfg.data
    ref = [
        collate(
            data.train,
            c,
            pad_to_multiple=d.pad_to_multiple,
            pad_id=tok.pad_id,
            packing=d.packing,
            document_multiple=document_multiple(cfg),
        )
        for c in chunks
    ]
    report = data.report.format() + "\n" + steps.describe()
    key = reference_key(cfg, vocab)
    # data.max_train_pairs shares the tokenized cache; its reference log-probs are a file of their own
    subset = f"-first{n}" if cfg.data.max_train_pairs else ""
    run = RunData(
        steps=steps,
        reference_batches=ref,
        num_pairs=n,
        vocab_size=vocab,
        reference_file=data.cache_path / f"reference-{key}{subset}.pt",
        report=report,
    )
    run.evals = [
        eval_data(prefix, pairs, path, cfg, layout, tok.pad_id, key, offset)
        for prefix, pairs, path, offset in sets
    ]
    if cfg.data.eval_sets or cfg.data.probe_pairs:
        run.report += "".join(f"\n{prefix[:-1]}: {len(pairs)} pairs" for prefix, pairs, _, _ in sets)
    return run


def eval_sets(
    cfg: Config, heldout: TokenizedPairs | None, cache_path: Path, *, seed: int
) -> list[tuple[str, TokenizedPairs, Path, int]]:
    """``(metric prefix, pairs, cache folder, offset in the hash split)`` of each evaluation set: the hash split
    alone as ``eval/``, or each of ``data.eval_sets`` as ``eval/<name>/`` with the hash split (when it holds pairs)
    as ``eval/heldout/``; the hash split's first ``data.probe_pairs`` as ``eval/probe/``, apart from the rest."""
    probes = cfg.data.probe_pairs
    held = len(heldout) if heldout is not None else 0
    if probes and held <= probes:
        raise ConfigError(
            f"data.probe_pairs={probes} would take every one of the {held} held-out pairs "
            f"(data.eval_fraction={cfg.data.eval_fraction}); fewer probes or a larger split"
        )
    rest = heldout.subset(np.arange(probes, held)) if heldout is not None and probes else heldout
    if not cfg.data.eval_sets:
        if rest is None or not len(rest):
            raise ConfigError(
                f"train.eval_every={cfg.train.eval_every} needs held-out pairs; "
                f"data.eval_fraction={cfg.data.eval_fraction} left none (or name data.eval_sets)"
            )
        sets = [("eval/", rest, cache_path, probes)]
    else:
        sets = [(f"eval/{HELDOUT}/", rest, cache_path, probes)] if rest is not None and len(rest) else []
        for name in cfg.data.eval_sets:
            loaded = load_eval_set(cfg.data, name, seed=seed)
            sets.append((f"eval/{name}/", loaded.train, loaded.cache_path, 0))
    if probes:
        assert heldout is not None
        sets.append((f"eval/{PROBE}/", heldout.subset(np.arange(probes)), cache_path, 0))
    return sets


def eval_data(
    prefix: str, pairs: TokenizedPairs, cache_path: Path, cfg: Config, layout: Layout, pad_id: int, key: str,
    offset: int = 0,
) -> EvalData:  # fmt: skip
    """One set's first ``train.eval_max_pairs`` pairs (0: all) as this rank's micro-batches. ``offset``: where the
    pairs start in their source's pairs (the cached reference log-probs are named by the pairs they hold)."""
    limit = cfg.train.eval_max_pairs
    if limit and len(pairs) > limit:
        pairs = pairs.subset(np.arange(limit))
    batches, counted = eval_micro_batches(pairs, cfg, layout, pad_id)
    start = f"-from{offset}" if offset else ""
    ref = cache_path / f"reference-eval{len(pairs)}{start}-{key}.pt"
    return EvalData(prefix, batches, counted, len(pairs), ref)
