"""The bridge from the data pipeline to a run: this rank's step batches and its share of the reference pass."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch.distributed as dist

from gatedpo_mega.config import Config
from gatedpo_mega.data import PreferenceLoader, load_preference_data
from gatedpo_mega.data.batch import PreferenceBatch
from gatedpo_mega.data.loader import collate
from gatedpo_mega.data.tokenized import TokenizedPairs
from gatedpo_mega.errors import ConfigError
from gatedpo_mega.megatron.parallel import Layout
from gatedpo_mega.training.initial_weights import source_identity, source_vocab_size


class StepSource(Protocol):
    """Where a run's batches come from (``gatedpo_mega.data.PreferenceLoader`` in production)."""

    num_micro_batches: int

    def __next__(self) -> list[PreferenceBatch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(slots=True)
class RunData:
    steps: StepSource  # this DP rank's micro-batches, one list per optimizer step
    reference_batches: list[PreferenceBatch]  # this DP rank's share of every pair, for the reference pass
    num_pairs: int
    vocab_size: int
    reference_file: Path | None  # cached reference log-probs (None: always compute)
    report: str = ""
    # Held-out pairs: this DP rank's micro-batches (the same number on every rank; ``eval_counted`` False marks
    # the fillers that even them out, which are run but not counted).
    eval_batches: list[PreferenceBatch] | None = None
    eval_counted: list[bool] | None = None
    num_eval_pairs: int = 0
    eval_reference_file: Path | None = None


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
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
    batches = [collate(pairs, c, pad_to_multiple=pad, pad_id=pad_id, packing=cfg.data.packing) for c in mine]
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
    # Rank 0 tokenizes and writes the cache; the others wait, then read it.
    if layout.rank == 0:
        data = load_preference_data(cfg.data, seed=cfg.train.seed)
    dist.barrier()
    if layout.rank != 0:
        data = load_preference_data(cfg.data, seed=cfg.train.seed)
    tok = data.tokenizer
    vocab = run_vocab_size(cfg, tok.vocab_size)
    t = cfg.train
    try:
        steps = PreferenceLoader(
            data.train, global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
            dp_rank=layout.dp_rank, dp_size=layout.dp, seed=t.seed, pad_to_multiple=cfg.data.pad_to_multiple,
            pad_id=tok.pad_id, packing=cfg.data.packing,
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
        collate(data.train, c, pad_to_multiple=d.pad_to_multiple, pad_id=tok.pad_id, packing=d.packing)
        for c in chunks
    ]
    report = data.report.format() + "\n" + steps.describe()
    key = reference_key(cfg, vocab)
    run = RunData(
        steps=steps,
        reference_batches=ref,
        num_pairs=n,
        vocab_size=vocab,
        reference_file=data.cache_path / f"reference-{key}.pt",
        report=report,
    )
    if t.eval_every:
        if data.eval is None or not len(data.eval):
            raise ConfigError(
                f"train.eval_every={t.eval_every} needs held-out pairs; data.eval_fraction={cfg.data.eval_fraction} "
                "left none"
            )
        evals = data.eval
        if t.eval_max_pairs and len(evals) > t.eval_max_pairs:
            evals = evals.subset(np.arange(t.eval_max_pairs))
        run.eval_batches, run.eval_counted = eval_micro_batches(evals, cfg, layout, tok.pad_id)
        run.num_eval_pairs = len(evals)
        run.eval_reference_file = data.cache_path / f"reference-eval{len(evals)}-{key}.pt"
    return run
