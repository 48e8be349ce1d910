"""The ``gatedpo`` command. Each subcommand is a thin shell over a module that does the work."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gatedpo_mega.convert.commands import add_convert_commands
from gatedpo_mega.data.cli import add_data_commands
from gatedpo_mega.errors import UserError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def _cmd_squeeze(args: argparse.Namespace) -> int:
    from gatedpo_mega.config import dump_config, load_config
    from gatedpo_mega.squeeze import format_table, run_squeeze, write_report

    cfg = load_config(args.config, args.overrides)
    sq = cfg.squeeze
    print(dump_config(cfg), flush=True)
    cells = len(sq.rejected_probs) * len(sq.shapes)
    print(f"squeeze: {cells} cells x {sq.seeds} seeds x {sq.steps} steps", flush=True)
    rows = run_squeeze(sq, cfg.gate)
    paths = write_report(rows, Path(sq.output_dir))
    print(format_table(rows))
    print(f"wrote {paths['table']}, {paths['plot']} and {paths['json']}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from gatedpo_mega.config import dump_config, load_config

    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from gatedpo_mega.config import load_config
    from gatedpo_mega.training.launch import launch

    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    return launch(load_config(args.config, args.overrides), args.nproc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gatedpo", description="Gate-DPO on megatron-core and DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train with Gate-DPO on megatron-core (TP x PP) and DeepSpeed ZeRO")
    _add_config_args(p)
    p.add_argument("--nproc", type=int, help="start N local processes (not needed under torchrun/deepspeed)")
    p.set_defaults(func=_cmd_train)
    add_data_commands(sub)
    add_convert_commands(sub)
    p = sub.add_parser("squeeze", help="the squeeze demonstration: DPO vs each gate shape on a softmax model")
    _add_config_args(p)
    p.set_defaults(func=_cmd_squeeze)
    p = sub.add_parser("config", help="print the resolved configuration")
    _add_config_args(p)
    p.set_defaults(func=_cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as e:
        print(f"gatedpo: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("gatedpo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
