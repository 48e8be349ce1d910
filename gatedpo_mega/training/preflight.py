"""What a run reads, checked in the launching process before any worker or process group starts.

Each check is the one the ranks run later, called early: the data pipeline itself (every record read and validated,
tokenized into the cache the ranks then read), the packages of the ``train.report_to`` trackers, the tokenizer (trained here first when the config asks for it), and ``model.init_from`` against the config (every
mismatch in one message). A refusal is one ``UserError`` line, seconds after launch, with no peer to stop.
"""

from __future__ import annotations

from gatedpo_mega.config import Config
from gatedpo_mega.data import load_preference_data
from gatedpo_mega.data.pipeline import ensure_tokenizer
from gatedpo_mega.training.data import run_vocab_size
from gatedpo_mega.training.initial_weights import check_source_fits, read_source
from gatedpo_mega.training.reporters import check_installed


def preflight(cfg: Config, *, data: bool = True) -> None:
    """Raise the first problem with ``cfg``'s inputs. ``data=False`` when the run's data does not come from the
    pipeline (a ``make_data`` of its own)."""
    check_installed(cfg.train.report_to)  # the cheapest first: a missing package, before the data is read
    vocab = None
    if data:
        ensure_tokenizer(cfg.data, seed=cfg.train.seed)
        tokenizer = load_preference_data(cfg.data, seed=cfg.train.seed).tokenizer
        vocab = run_vocab_size(cfg, tokenizer.vocab_size)
    if cfg.model.init_from:
        src = read_source(cfg.model.init_from)
        check_source_fits(cfg, src, vocab if vocab is not None else cfg.model.vocab_size or src.vocab_size)
