"""``gatedpo data inspect`` and ``gatedpo data train-tokenizer``.

The main CLI registers these with ``add_data_commands(sub)``; ``python -m gatedpo_mega.data.cli data ...`` runs
them alone, with the same one-line errors and exit codes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gatedpo_mega.errors import UserError, run_command


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        action="append",
        metavar="FILE",
        help="YAML config file; repeat to merge several, later files winning (default: built-in defaults)",
    )
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def _run_seed(cfg: Any) -> int:
    train = getattr(cfg, "train", None)
    return int(getattr(train, "seed", 0))


def percentiles(values: Any) -> str:
    import numpy as np

    v = np.asarray(values)
    if v.size == 0:
        return "-"
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return f"{p50:8.0f} {p90:8.0f} {p99:8.0f} {v.max():8d} {v.mean():8.1f}"


def marked_row(tok: Any, input_ids: Any, labels: Any) -> str:
    """The row's text with the tokens that carry a loss in ``[[...]]``; everything else is masked (no loss)."""
    ids = [int(t) for t in input_ids]
    has_loss = [False] + [
        int(label) != -100 for label in labels[:-1]
    ]  # labels[t] is the target of token t + 1
    end = len(ids)
    while end > 0 and ids[end - 1] == tok.pad_id and not has_loss[end - 1]:
        end -= 1  # right padding
    out: list[str] = []
    run: list[int] = []
    run_loss = False
    for i in range(end):
        if has_loss[i] != run_loss and run:
            out.append(f"[[{tok.decode(run)}]]" if run_loss else tok.decode(run))
            run = []
        run_loss = has_loss[i]
        run.append(ids[i])
    if run:
        out.append(f"[[{tok.decode(run)}]]" if run_loss else tok.decode(run))
    return "".join(out)


def inspect_data(cfg: Any, seed: int) -> str:
    from gatedpo_mega.data.loader import collate
    from gatedpo_mega.data.pipeline import ensure_tokenizer, load_preference_data

    ensure_tokenizer(cfg.data, seed=seed)
    data = load_preference_data(cfg.data, seed=seed)
    tok = data.tokenizer
    lines = [data.report.format()]
    lines.append(
        f"  tokenizer {tok.path}: vocab {tok.vocab_size}, bos {tok.bos_id}, eos {tok.eos_id}, pad {tok.pad_id}"
    )
    lines.append(f"  cache {data.cache_path}")
    lines.append(f"  tokens per pair (train)      {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'mean':>8}")
    t = data.train
    for name, values in (
        ("prompt", t.prompt_lengths),
        ("chosen", t.chosen_lengths),
        ("rejected", t.rejected_lengths),
        ("row (prompt + longer)", t.row_lengths),
    ):
        lines.append(f"    {name:26} {percentiles(values)}")
    batch = collate(t, [0], pad_to_multiple=cfg.data.pad_to_multiple, pad_id=tok.pad_id)
    lines.append(f"pair 0 (record {int(t.source_index[0])}); [[...]] carries the loss, the rest is masked:")
    for j, name in enumerate(("chosen", "rejected")):
        n = int(batch.loss_mask[j].sum())
        lines.append(f"--- {name} ({n} loss tokens, row padded to {batch.input_ids.shape[1]}):")
        lines.append(marked_row(tok, batch.input_ids[j], batch.labels[j]))
    return "\n".join(lines)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from gatedpo_mega.training.preflight import load_run_config

    cfg, _ = load_run_config(args.config, args.overrides)
    print(inspect_data(cfg, _run_seed(cfg)))
    return 0


def train_tokenizer(cfg: Any, *, vocab_size: int, output: str | None, seed: int) -> Path:
    from gatedpo_mega.data.pipeline import train_data_tokenizer

    data = cfg.data
    name = "builtin" if data.source == "builtin" else Path(data.source).name.split(".")[0]
    out = Path(output) if output else Path(data.cache_dir) / "tokenizers" / f"{name}-{vocab_size}"
    return train_data_tokenizer(data, vocab_size=vocab_size, out_dir=out, seed=seed)


def _cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from gatedpo_mega.training.preflight import load_run_config

    cfg, _ = load_run_config(args.config, args.overrides)
    if args.vocab_size < 300:
        raise UserError(
            f"--vocab-size {args.vocab_size} must be >= 300 (256 byte pieces plus specials and words)"
        )
    path = train_tokenizer(cfg, vocab_size=args.vocab_size, output=args.output, seed=_run_seed(cfg))
    print(f"wrote {path}; use it with data.tokenizer={path} (or its folder {path.parent})")
    return 0


def add_data_commands(subparsers: Any) -> None:
    """Register ``data inspect`` and ``data train-tokenizer`` on the main parser's subcommands."""
    data = subparsers.add_parser("data", help="inspect preference data; train a tokenizer on it")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("inspect", help="counts, drops by reason, length percentiles and one decoded pair")
    _add_config_args(p)
    p.set_defaults(func=_cmd_inspect)
    p = sub.add_parser(
        "train-tokenizer", help="train a SentencePiece model on the data's text (no hub needed)"
    )
    _add_config_args(p)
    p.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size (default 8000)")
    p.add_argument(
        "--output", help="folder for tokenizer.model (default: DATA.CACHE_DIR/tokenizers/NAME-VOCAB)"
    )
    p.set_defaults(func=_cmd_train_tokenizer)


def main(argv: Sequence[str] | None = None) -> int:
    """The data commands alone, with the main CLI's error handling (one line, exit 2)."""
    parser = argparse.ArgumentParser(prog="gatedpo")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
