"""The bridge from the data pipeline to a run: this rank's step batches and its share of the reference pass."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import torch.distributed as dist

from gatedpo_mega.config import Config
from gatedpo_mega.data import PreferenceLoader, load_preference_data
from gatedpo_mega.data.loader import collate
from gatedpo_mega.errors import ConfigError
from gatedpo_mega.megatron.parallel import Layout
from gatedpo_mega.training.loop import RunData


def reference_key(cfg: Config, vocab_size: int) -> str:
    """What the initial weights depend on: the model shape, the vocabulary and the seed (not the layout)."""
    blob = json.dumps(
        {"model": asdict(cfg.model), "vocab": vocab_size, "seed": cfg.train.seed}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_run_data(cfg: Config, layout: Layout) -> RunData:
    # Rank 0 tokenizes and writes the cache; the others wait, then read it.
    if layout.rank == 0:
        data = load_preference_data(cfg.data, seed=cfg.train.seed)
    dist.barrier()
    if layout.rank != 0:
        data = load_preference_data(cfg.data, seed=cfg.train.seed)
    tok = data.tokenizer
    vocab = cfg.model.vocab_size or tok.vocab_size
    if vocab < tok.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tok.vocab_size}"
        )
    t = cfg.train
    try:
        steps = PreferenceLoader(
            data.train, global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
            dp_rank=layout.dp_rank, dp_size=layout.dp, seed=t.seed, pad_to_multiple=cfg.data.pad_to_multiple,
            pad_id=tok.pad_id,
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
    ref = [
        collate(data.train, c, pad_to_multiple=cfg.data.pad_to_multiple, pad_id=tok.pad_id) for c in chunks
    ]
    report = data.report.format() + "\n" + steps.describe()
    return RunData(
        steps=steps,
        reference_batches=ref,
        num_pairs=n,
        vocab_size=vocab,
        reference_file=data.cache_path / f"reference-{reference_key(cfg, vocab)}.pt",
        report=report,
    )
