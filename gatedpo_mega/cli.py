"""The ``gatedpo`` command. Each subcommand is a thin shell over a module that does the work."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gatedpo_mega.convert.commands import add_convert_commands
from gatedpo_mega.data.cli import add_data_commands
from gatedpo_mega.environment import quiet_known_warnings, set_defaults
from gatedpo_mega.errors import UserError, run_command


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        action="append",
        metavar="FILE",
        help="YAML config file; repeat to merge several, later files winning (default: built-in defaults)",
    )
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def _cmd_squeeze(args: argparse.Namespace) -> int:
    from gatedpo_mega.config import dump_config, load_config
    from gatedpo_mega.squeeze import format_table, run_squeeze, write_report

    cfg = load_config(args.config, args.overrides)
    sq = cfg.squeeze
    out = Path(sq.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    cells = len(sq.rejected_probs) * len(sq.shapes)
    print(
        f"squeeze: {cells} cells x {sq.seeds} seeds x {sq.steps} steps, gate tau {cfg.gate.tau:g} "
        f"({cfg.gate.signal}) -> {out} (config.yaml there)",
        flush=True,
    )
    rows = run_squeeze(sq, cfg.gate, progress=True)
    paths = write_report(rows, out)
    print(format_table(rows))
    print(f"wrote {paths['table']}, {paths['plot']} and {paths['json']}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from gatedpo_mega.analysis import COLUMN_SETS, group_runs, load_run, summary_tables, write_report

    label_by = [k.strip() for k in args.label_by.split(",") if k.strip()] if args.label_by else None
    groups = group_runs([load_run(d) for d in args.run_dirs], label_by=label_by)
    for g in groups:
        print(f"{g.label}: {len(g.runs)} run(s), seeds {', '.join(str(r.seed) for r in g.runs)}")
    columns = COLUMN_SETS[args.columns]
    paths = write_report(groups, Path(args.out), columns)
    print(summary_tables(groups, columns))
    n_plots = len(paths) - 3  # besides summary.md, summary.json and overview.png
    print(f"wrote {paths['table']}, {paths['json']}, {paths['overview']} and {n_plots} plots")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from gatedpo_mega.config import dump_config
    from gatedpo_mega.training.preflight import load_run_config

    cfg, notes = load_run_config(args.config, args.overrides)
    for note in notes:  # on stderr: stdout stays the YAML a run reads
        print(f"gatedpo config: {note}", file=sys.stderr)
    print(dump_config(cfg), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from gatedpo_mega.training.launch import launch
    from gatedpo_mega.training.preflight import load_run_config

    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    overrides = [*args.overrides, "train.resume=true"] if args.resume else args.overrides
    cfg, notes = load_run_config(args.config, overrides)
    return launch(cfg, args.nproc, notes=notes)


def _cmd_plan(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from gatedpo_mega import planner
    from gatedpo_mega.training.preflight import load_run_config

    cfg, notes = load_run_config(
        args.config, args.overrides
    )  # model.init_from's shapes, as training reads them
    for line in notes:
        print(f"gatedpo: {line}", file=sys.stderr)
    for flag in ("nproc", "gpus", "vocab_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.gpu_memory is not None and not args.gpu_memory > 0:
        raise UserError(f"--gpu-memory must be > 0 GiB, got {args.gpu_memory}")
    if (args.gpus is None) != (args.gpu_memory is None):
        raise UserError("--gpus and --gpu-memory go together: how many GPUs, and the memory of one in GiB")
    target = args.target or ("cuda" if args.gpus else planner.host_target())
    vocab = args.vocab_size or planner.plan_vocab_size(cfg)
    p = cfg.parallel
    world = (
        args.nproc or args.gpus or p.tensor * p.pipeline * p.context * p.expert
    )  # EP splits data-parallel ranks
    out: dict[str, object] = {}
    text: list[str] = []
    try:
        plan = planner.plan_memory(cfg, world=world, vocab_size=vocab, target=target)
        out = planner.plan_json(plan)
        text.append(planner.format_plan(plan))
    except UserError as e:
        if args.gpus is None:
            raise
        text.append(f"the configured layout on {world} GPUs: {e}")
        out["configured_layout_error"] = str(e)
    refusal = ""
    if args.gpus is not None:
        limit = int(args.gpu_memory * planner.GiB)
        found = planner.feasible(cfg, args.gpus, vocab, limit, target)
        out["feasible"] = [dataclasses.asdict(c) for c in found]
        if found:
            text += ["", planner.format_candidates(found, args.gpus, limit)]
        else:
            fit = planner.smallest_fit(cfg, args.gpus, vocab, limit, target)
            out["smallest_gpu_count"] = fit
            where = f"the smallest GPU count that fits is {fit}" if fit else "no count up to 4096 fits"
            refusal = (
                f"this model does not fit any layout on {args.gpus} GPUs of {args.gpu_memory:g} GiB; {where}"
            )
    print(json.dumps(out, indent=1) if args.json else "\n".join(text))
    if refusal:
        print(f"gatedpo: error: {refusal}", file=sys.stderr)
        return 1
    return 0


def _cmd_checkpoint_verify(args: argparse.Namespace) -> int:
    from gatedpo_mega.training.checkpoint import verify_report

    lines, ok = verify_report(Path(args.path))
    print("\n".join(lines))
    return 0 if ok else 2


def _cmd_mass_dynamics(args: argparse.Namespace) -> int:
    from gatedpo_mega.experiments.mass_dynamics import load_spec, run_experiment

    run_experiment(load_spec(args.config, args.overrides))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gatedpo", description="Gate-DPO on megatron-core and DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train with Gate-DPO on megatron-core (TP x PP) and DeepSpeed ZeRO")
    _add_config_args(p)
    p.add_argument("--nproc", type=int, help="start N local processes (not needed under torchrun/deepspeed)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest complete checkpoint in train.output_dir",
    )
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser(
        "plan",
        help="the busiest rank's memory, part by part, for a config; with --gpus, the layouts that fit and their speed",
    )
    _add_config_args(p)
    p.add_argument(
        "--nproc", type=int, help="ranks to plan for (default: tensor x pipeline, data-parallel 1)"
    )
    p.add_argument("--gpus", type=int, help="rank every layout of this many GPUs that fits --gpu-memory")
    p.add_argument("--gpu-memory", type=float, metavar="GiB", help="memory of one GPU (with --gpus)")
    p.add_argument(
        "--target", choices=("cuda", "cpu"), help="what to predict: a GPU's allocator peak or a CPU process's "
        "resident peak (default: cuda with --gpus or on a GPU host, else cpu)",
    )  # fmt: skip
    p.add_argument(
        "--vocab-size",
        type=int,
        help="the vocabulary (default: the config's, init_from's or the tokenizer's)",
    )
    p.add_argument(
        "--json", action="store_true", help="one JSON object (per_rank_peak_bytes, the parts, the layouts)"
    )
    p.set_defaults(func=_cmd_plan)
    add_data_commands(sub)
    p = sub.add_parser("checkpoint", help="training checkpoints: verify their files")
    cs = p.add_subparsers(dest="checkpoint_command", required=True)
    p = cs.add_parser(
        "verify",
        help="check a checkpoint's files against the sizes and SHA-256 it recorded (exit 2 when damaged); for a "
        "run folder, every checkpoint, and which one --resume would continue from",
    )
    p.add_argument("path", metavar="PATH", help="a checkpoint folder, or a run's output folder")
    p.set_defaults(func=_cmd_checkpoint_verify)
    add_convert_commands(sub)
    p = sub.add_parser("squeeze", help="the squeeze demonstration: DPO vs each gate shape on a softmax model")
    _add_config_args(p)
    p.set_defaults(func=_cmd_squeeze)
    p = sub.add_parser("config", help="print the resolved configuration")
    _add_config_args(p)
    p.set_defaults(func=_cmd_config)
    p = sub.add_parser("analyze", help="compare runs: a plot per quantity and a table, one line/row per arm")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (config.yaml + metrics.jsonl)")
    p.add_argument("--out", required=True, help="folder for the PNG plots, summary.md and summary.json")
    p.add_argument(
        "--label-by",
        metavar="KEYS",
        help="comma-separated config keys naming each arm (default: objective.name, gate.shape and the keys that differ)",
    )
    p.add_argument(
        "--columns",
        choices=("squeeze", "change"),
        default="squeeze",
        help="the table's columns: squeeze (accuracy, Δ log p per token, Δ top-1 and entropy) or change (Δ chosen, "
        "Δ rejected, margin, Δ others (data.probe_pairs), per response and per token)",
    )
    p.set_defaults(func=_cmd_analyze)
    p = sub.add_parser(
        "experiment",
        aliases=["mass-dynamics"],
        help="an experiment: SFT, then every arm x seed from it, a gate sweep, a report with tables and plots",
    )
    p.add_argument(
        "--config", required=True, help="experiment spec (configs/demo.yaml, configs/mass_dynamics.yaml)"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="spec overrides (e.g. output_dir=...)")
    p.set_defaults(func=_cmd_mass_dynamics)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    set_defaults(os.environ)  # before anything imports deepspeed; worker processes inherit it
    quiet_known_warnings()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides after an option (``--resume key=value``) arrive here; anything else is refused
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return run_command(args.func, args)


def entry() -> None:
    """The ``gatedpo`` command (and ``python -m gatedpo_mega.cli``). ``gatedpo train`` ends without the
    interpreter's finalisation once its run has torn its process group down and closed its files
    (``launch.leave``), whether it ran the run itself or as one rank of torchrun, deepspeed or srun; ``main``
    itself returns, for callers that go on."""
    code = main()
    if sys.argv[1:2] == ["train"]:
        from gatedpo_mega.training.launch import leave

        leave(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
