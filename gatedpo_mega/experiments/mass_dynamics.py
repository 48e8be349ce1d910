"""The mass-dynamics experiment, one command from data to report:

    gatedpo mass-dynamics --config configs/mass_dynamics.yaml

1. a SentencePiece tokenizer trained on the preference data's text;
2. per model size, one SFT checkpoint per start (``starts``: e.g. SFT on chosen responses, the standard pipeline,
   and extended SFT on chosen and rejected responses), from a seeded initialisation;
3. the gate sweep on the ``sweep_arm`` arm of every size, from the first start;
4. from each checkpoint, every arm (objective x gate; ``start_arms`` may name fewer for a start) with every seed: the
   same data order per seed, the same steps, the reference = that SFT model;
5. a tensor-parallel check: the first gated arm's first seed again at TP 2, whose row must equal the TP 1 row;
6. ``gatedpo analyze`` tables and plots per size and start, for the sweep and across sizes; grids of the eval
   trajectories (chosen likelihood, top-1 and entropy on rejected tokens); the SFT checkpoints as language models of
   the eval text; the sweep rule's pick; ``report.md``.

Runs that finished are kept (a run is done when its final checkpoint exists); an interrupted run resumes from its
latest checkpoint, so the command can be run again after a crash and continues where it stopped. A run whose config
equals one already made (a sweep point that is an arm) is that run.

The spec (YAML) holds lists of training-config overrides: ``base`` (every run), ``starts`` (name -> the SFT run's
overrides), ``preference`` (every arm), ``arms`` and ``sizes`` and ``sweep`` (name -> overrides), ``start_arms``
(start -> arm names), ``seeds``, ``tokenizer_vocab_size`` (0: the base's own ``data.tokenizer``), ``output_dir``,
``tensor_parallel_check``; ``config``, a training config file every run starts from (its path relative to the
working directory), and ``nproc``, the processes each run starts.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gatedpo_mega.analysis import COLUMN_SETS
from gatedpo_mega.errors import ConfigError

RULES = ("squeeze", "chosen")


@dataclass(kw_only=True)
class Spec:
    output_dir: str = "outputs/mass-dynamics"
    tokenizer_vocab_size: int = 2000
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    base: list[str] = field(default_factory=list)
    starts: dict[str, list[str]] = field(
        default_factory=dict
    )  # name -> SFT overrides; the first hosts the sweep
    start_arms: dict[str, list[str]] = field(default_factory=dict)  # start -> its arms (absent: every arm)
    preference: list[str] = field(default_factory=list)
    arms: dict[str, list[str]] = field(default_factory=dict)
    sizes: dict[str, list[str]] = field(default_factory=dict)
    sweep: dict[str, list[str]] = field(default_factory=dict)
    sweep_arm: str = "dpo"  # the arm whose gate the sweep varies
    tensor_parallel_check: bool = True
    config: str = ""  # a training config file under every run's overrides
    nproc: int = 1  # processes per run (the layout in the config or ``base`` must fit them)
    name: str = "mass-dynamics"  # the experiment's name in its progress lines and report
    # The tables' columns: "squeeze" (accuracy, Δ log p per token against the reference, Δ top-1 and entropy) or
    # "change" (the Gate-DPO paper's: Δ chosen, Δ rejected, margin, Δ others, per response and per token).
    columns: str = "squeeze"
    # The sweep's rule (pick_default): "squeeze" (keep accuracy and the chosen likelihood, then the least change of
    # top-1 on rejected tokens) or "chosen" (keep accuracy, then the largest Δ chosen at the worst size).
    pick_by: str = "squeeze"


def load_spec(path: str | Path, overrides: list[str] = ()) -> Spec:  # type: ignore[assignment]
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment spec {p} does not exist")
    tree = yaml.safe_load(p.read_text()) or {}
    for text in overrides:
        key, sep, raw = text.partition("=")
        if not sep:
            raise ConfigError(f"override {text!r} is not of the form key=value")
        tree[key] = yaml.safe_load(raw)
    known = set(Spec.__dataclass_fields__)
    for key in tree:
        if key not in known:
            raise ConfigError(
                f"experiment spec {p}: unknown key '{key}'; allowed: {', '.join(sorted(known))}"
            )
    spec = Spec(**tree)
    if spec.config and not Path(spec.config).is_file():
        raise ConfigError(f"experiment spec {p}: config={spec.config} does not exist")
    if spec.nproc < 1:
        raise ConfigError(f"experiment spec {p}: nproc={spec.nproc} must be at least 1")
    if not spec.arms or not spec.sizes or not spec.seeds or not spec.starts:
        raise ConfigError(f"experiment spec {p}: arms, sizes, starts and seeds must not be empty")
    for start, names in spec.start_arms.items():
        if start not in spec.starts:
            raise ConfigError(f"experiment spec {p}: start_arms names start {start!r}, not one of the starts")
        unknown = [a for a in names if a not in spec.arms]
        if unknown:
            raise ConfigError(f"experiment spec {p}: start_arms.{start} names {', '.join(unknown)}, not arms")
    for key, allowed in (("columns", tuple(COLUMN_SETS)), ("pick_by", RULES)):
        if getattr(spec, key) not in allowed:
            raise ConfigError(
                f"experiment spec {p}: {key}={getattr(spec, key)!r} is not one of {', '.join(allowed)}"
            )
    if spec.sweep and spec.sweep_arm not in spec.arms:
        raise ConfigError(f"experiment spec {p}: sweep_arm={spec.sweep_arm!r} is not one of the arms")
    return spec


def _resolved(spec: Spec, overrides: list[str], out: Path) -> Any:
    """A run's config, as ``gatedpo train`` builds it (the model fields of ``model.init_from`` read from it)."""
    from gatedpo_mega.training.preflight import load_run_config

    cfg, _ = load_run_config(
        spec.config or None,
        [*overrides, f"train.output_dir={out}", "train.resume=auto", "train.keep_checkpoints=1"],
    )
    return cfg


def _read_gate(gate: Any) -> Any:
    """``gate`` with the fields its shape and signal do not read set to a fixed value (all of them without a gate),
    so that a changed default of a field a run never read leaves the run valid."""
    from dataclasses import replace

    from gatedpo_mega.gate import GateConfig

    if gate.shape == "none":
        return GateConfig(shape="none")
    unread = {"temperature": gate.shape != "sigmoid", "alpha": gate.shape != "power",
              "slope": gate.shape != "psigmoid", "quantile": gate.signal != "q10"}  # fmt: skip
    return replace(gate, **{k: 0.5 for k, unused in unread.items() if unused})


def _same_run(a: Any, b: Any) -> bool:
    """Two resolved configs that train the same model on the same batches (the output folder and the run's name
    aside, and the gate fields nothing reads)."""
    from dataclasses import replace

    def key(c: Any) -> Any:
        return replace(c, gate=_read_gate(c.gate), train=replace(c.train, output_dir=".", run_name=""))

    return key(a) == key(b)


def _train(spec: Spec, overrides: list[str], out: Path, *, nproc: int | None = None) -> None:
    """One training run, skipped when its final checkpoint exists, resumed when it was interrupted. A finished
    run whose saved config differs from this one is refused (its folder would be reported under a wrong name)."""
    from gatedpo_mega.config import load_config
    from gatedpo_mega.formats import latest_checkpoint, step_dir
    from gatedpo_mega.training.launch import launch

    cfg = _resolved(spec, overrides, out)
    saved = out / "config.yaml"
    if saved.exists():
        before = load_config(saved, [f"train.output_dir={out}"])
        if not _same_run(before, cfg):
            raise ConfigError(
                f"{out} holds a run with another config ({saved}); delete the folder or use another output_dir"
            )
    latest = latest_checkpoint(out)
    if latest == step_dir(out, cfg.train.max_steps):
        print(f"[{spec.name}] done already: {out}", flush=True)
        return
    t0 = time.perf_counter()
    print(f"[{spec.name}] train {out}", flush=True)
    code = launch(cfg, nproc or spec.nproc, quiet=True)
    if code:
        raise SystemExit(code)
    print(f"[{spec.name}]   {time.perf_counter() - t0:.0f} s", flush=True)


def _tokenizer(spec: Spec, out: Path) -> list[str]:
    """The overrides that name the experiment's tokenizer: one trained on the data (once), or none (0 pieces)."""
    from gatedpo_mega.data.cli import train_tokenizer
    from gatedpo_mega.training.preflight import load_run_config

    if not spec.tokenizer_vocab_size:
        return []
    path = out / "tokenizer" / "tokenizer.model"
    if not path.exists():
        cfg, _ = load_run_config(spec.config or None, spec.base)
        train_tokenizer(cfg, vocab_size=spec.tokenizer_vocab_size, output=str(path.parent), seed=0)
    return [f"data.tokenizer={path}"]


def _sft_row(run_dir: Path, cfg: Any, vocab: int) -> dict[str, Any]:
    """What an SFT checkpoint is as a language model of the eval text: its size, and on the eval pairs' chosen
    responses (last evaluation) the loss per token, the perplexity and the next-token entropy."""
    from gatedpo_mega.analysis import load_run
    from gatedpo_mega.planner import total_parameters

    run = load_run(run_dir)
    last = run.eval[max(run.eval)] if run.eval else {}
    row: dict[str, Any] = {
        "parameters": total_parameters(cfg, vocab),
        "step": max(run.eval) if run.eval else None,
    }
    if "logps/chosen" in last and last.get("tokens/chosen"):
        nll = -last["logps/chosen"] / last["tokens/chosen"]
        row |= {
            "nll_per_token": nll,
            "perplexity": math.exp(nll),
            "entropy": last.get("squeeze/entropy_chosen"),
        }
    return row


def _sft_table(rows: dict[tuple[str, str], dict[str, Any]], vocab: int) -> str:
    lines = [
        "| size | start | parameters | eval loss / token (nats) | perplexity | entropy / token (nats) |",
        "|---|---|---|---|---|---|",
    ]
    for (size, start), r in rows.items():
        cells = [f"{r['parameters']:,}"]
        cells += [
            f"{r[k]:.3f}" if r.get(k) is not None else "–" for k in ("nll_per_token", "perplexity", "entropy")
        ]
        lines.append(f"| {size} | {start} | " + " | ".join(cells) + " |")
    lines += ["", f"On the eval pairs' chosen responses, at the end of SFT; a uniform guess over the {vocab:,} "
              f"entries has perplexity {vocab:,} and entropy {math.log(vocab):.2f} nats."]  # fmt: skip
    return "\n".join(lines)


def _objective(spec: Spec, arm: str) -> str:
    """The objective an arm trains (its own ``objective.name``, else the preference runs', else dpo)."""
    names = [
        a.split("=", 1)[1] for a in [*spec.preference, *spec.arms[arm]] if a.startswith("objective.name=")
    ]
    return names[-1] if names else "dpo"


def _groups(named: dict[str, list[Path]]) -> list[Any]:
    """One analysis group per name (an arm, a sweep point, a size): its seeds' runs, labelled with the spec's name."""
    from gatedpo_mega.analysis import RUN_SPECIFIC_KEYS, Group, load_run

    groups = []
    for name, paths in named.items():
        runs = [load_run(p) for p in paths]
        shared = {k: v for k, v in runs[0].config.items() if k not in RUN_SPECIFIC_KEYS}
        groups.append(Group(label=name, runs=runs, config=shared))
    return groups


def run_experiment(spec: Spec) -> Path:
    """Every run of ``spec`` and the report; returns the path of ``report.md``.

    Order: the SFT checkpoints (every size x start); the sweep (every size, from the first start, with the arms of
    the sweep arm's objective as its centre); every other arm. A run whose config equals one already trained (a
    sweep point that is an arm) is that run, not a second one. Every table, plot legend and progress bar names a
    run by the spec's names: size, start, arm (or sweep point), seed."""
    from gatedpo_mega.analysis import (
        format_table,
        summary_rows,
        write_grid,
        write_report,
    )
    from gatedpo_mega.planner import plan_vocab_size

    out = Path(spec.output_dir)
    t0 = time.perf_counter()
    base = [*spec.base, *_tokenizer(spec, out), f"data.cache_dir={out / 'cache'}"]
    first_start = next(iter(spec.starts))
    trained: list[tuple[Any, Path]] = []  # (resolved config, folder) of every run so far
    columns = COLUMN_SETS[spec.columns]

    def table(rows: list[dict[str, Any]], first: str = "arm") -> str:
        return format_table(rows, columns, first)

    def run(args: list[str], d: Path, name: str, nproc: int | None = None) -> Path:
        args = [*args, f"train.run_name={name}"]
        cfg = _resolved(spec, args, d)
        same = next((p for c, p in trained if _same_run(c, cfg)), None)
        if same is not None:
            return same
        _train(spec, args, d, nproc=nproc)
        trained.append((cfg, d))
        return d

    def pref(size: str, start: str) -> list[str]:
        sft = out / size / start / "sft"
        return [*base, *spec.sizes[size], *spec.preference, f"model.init_from={sft}"]

    sft_rows: dict[tuple[str, str], dict[str, Any]] = {}
    vocab = 0
    for size, size_args in spec.sizes.items():
        for start, start_args in spec.starts.items():
            d = out / size / start / "sft"
            args = [*base, *size_args, *start_args]
            run(args, d, f"{size}/{start}/sft")
            cfg = _resolved(spec, args, d)
            # the model's vocabulary: as configured, the source's or the tokenizer's
            vocab = plan_vocab_size(cfg)
            sft_rows[(size, start)] = _sft_row(d, cfg, vocab)

    runs: dict[str, list[Path]] = {}  # "<size>/<start>/<arm>" or "<size>/sweep/<name>" -> seed folders
    objective = _objective(spec, spec.sweep_arm)
    centre = [a for a in spec.arms if _objective(spec, a) == objective]  # e.g. dpo and its gated arms

    def arm_runs(size: str, start: str, arm: str) -> list[Path]:
        key = f"{size}/{start}/{arm}"
        if key not in runs:
            runs[key] = [run([*pref(size, start), *spec.arms[arm], f"train.seed={seed}"],
                             out / size / start / arm / f"seed{seed}", f"{key}/seed{seed}") for seed in spec.seeds]  # fmt: skip
        return runs[key]

    sweep_rows: dict[str, list[dict[str, Any]]] = {}
    sweep_groups: dict[str, Any] = {}
    if spec.sweep:
        for size in spec.sizes:
            named = {a: arm_runs(size, first_start, a) for a in centre}
            for name, gate_args in spec.sweep.items():
                paths = [
                    run([*pref(size, first_start), *spec.arms[spec.sweep_arm], *gate_args, f"train.seed={seed}"],
                        out / size / "sweep" / name / f"seed{seed}", f"{size}/sweep/{name}/seed{seed}")
                    for seed in spec.seeds
                ]  # fmt: skip
                same = next((a for a, ps in named.items() if ps == paths), None)
                if same is not None:  # a point that is an arm: one row, named both ways
                    named[f"{same} = {name}"] = named.pop(same)
                else:
                    named[name] = paths
            groups = _groups(named)
            write_report(groups, out / "report" / f"sweep-{size}", columns)
            sweep_rows[size] = summary_rows(groups)
            sweep_groups[size] = groups
    for size in spec.sizes:
        for start in spec.starts:
            for arm in spec.start_arms.get(start, list(spec.arms)):
                arm_runs(size, start, arm)

    tp_rows = None
    if spec.tensor_parallel_check:
        size = next(iter(spec.sizes))
        arm = next(
            (a for a, args in spec.arms.items() if "gate.shape=none" not in args), next(iter(spec.arms))
        )
        d = out / "tp2" / arm
        args = [*pref(size, first_start), *spec.arms[arm], f"train.seed={spec.seeds[0]}", "parallel.tensor=2",
                f"train.run_name={size}/{first_start}/{arm}/seed{spec.seeds[0]} TP 2"]  # fmt: skip
        _train(spec, args, d, nproc=2)
        tp_rows = summary_rows(
            _groups({f"{arm} TP 1": arm_runs(size, first_start, arm)[:1], f"{arm} TP 2": [d]})
        )

    report = out / "report"
    sections = [
        f"# {spec.name}: results\n",
        f"Spec: `{spec.output_dir}`; seeds {spec.seeds}; {time.perf_counter() - t0:.0f} s for the runs this "
        "invocation made (runs found done are not re-run).\n",
        "## The SFT checkpoints (every preference run's start and reference)\n",
        _sft_table(sft_rows, vocab),
        "",
    ]
    arm_groups: dict[str, Any] = {}
    for size in spec.sizes:
        for start in spec.starts:
            groups = _groups(
                {a: runs[f"{size}/{start}/{a}"] for a in spec.arms if f"{size}/{start}/{a}" in runs}
            )
            write_report(groups, report / f"{size}-{start}", columns)
            arm_groups[f"{size}, from {start}"] = groups
            sections += [f"## Arms, model size `{size}`, from `{start}`\n", table(summary_rows(groups)), ""]
    trajectories = ["logps/chosen_delta_per_token", "squeeze/top1_rejected", "squeeze/entropy_rejected"]
    write_grid(arm_groups, trajectories, report / "trajectories-arms.png")
    sections += ["Eval trajectories of every arm: `report/trajectories-arms.png`.", ""]
    if sweep_rows:
        write_grid(sweep_groups, trajectories, report / "trajectories-sweep.png")
        sections += ["Eval trajectories of the sweep: `report/trajectories-sweep.png`.", ""]
        for size, rows in sweep_rows.items():
            sections += [f"## Gate sweep on the `{spec.sweep_arm}` arm, size `{size}`, from `{first_start}`\n",
                         table(rows, "gate"), ""]  # fmt: skip
        sections += [
            "## The rule's pick\n",
            pick_default(sweep_rows, plain=spec.sweep_arm, rule=spec.pick_by),
            "",
        ]
    if len(spec.sizes) > 1:
        groups = _groups({f"{s} {a}": runs[f"{s}/{first_start}/{a}"] for s in spec.sizes for a in centre})
        write_report(groups, report / "sizes", columns)
        sections += ["## Sizes: gated smaller model against ungated larger model\n",
                     table(summary_rows(groups), "size, arm"), ""]  # fmt: skip
    if tp_rows is not None:
        sections += ["## Tensor parallelism: the same arm and seed at TP 1 and TP 2\n", table(tp_rows), ""]
        (report / "tp_check.json").parent.mkdir(parents=True, exist_ok=True)
        (report / "tp_check.json").write_text(json.dumps(tp_rows, indent=1))
    (report / "sft.json").parent.mkdir(parents=True, exist_ok=True)
    (report / "sft.json").write_text(json.dumps({f"{k[0]}/{k[1]}": v for k, v in sft_rows.items()}, indent=1))
    path = out / "report.md"
    path.write_text("\n".join(sections) + "\n")
    print(path.read_text(), flush=True)
    print(f"[{spec.name}] the report: {path} (tables); plots: {report}/*/overview.png; "
          f"runs: {out}/<size>/<start>/<arm>/seed<N>", flush=True)  # fmt: skip
    return path


def pick_default(
    rows_by_size: dict[str, list[dict[str, Any]]], plain: str = "dpo", rule: str = "squeeze"
) -> str:
    """The sweep's pick, by a rule fixed before looking, on the eval pairs of every size; ``plain`` labels the
    ungated row (the sweep arm), every other row is a gate.

    ``squeeze``: at each size a gate must keep preference learning (eval accuracy at least plain DPO's minus 0.03)
    and the chosen likelihood (change per token at least plain DPO's minus its std over seeds); among the gates that
    do at every size, the pick has the least squeezing at its worst size: the smallest max over sizes of |change of
    top-1 probability on rejected tokens| (sharpening is squeezing; flattening the distribution is a distortion too).

    ``chosen``: at each size a gate must keep preference learning (eval accuracy at least plain DPO's minus 0.03);
    among the gates that do at every size, the pick has the largest Δ chosen (the change of the chosen responses'
    summed log-likelihood from the first evaluation to the last) at its worst size."""

    def mean(row: dict[str, Any], key: str) -> float:
        s = row.get(key)
        return float(s["mean"]) if s else float("nan")

    def is_plain(label: str) -> bool:
        return label == plain or label.startswith(f"{plain} = ")

    floors: dict[
        str, tuple[float, float, float]
    ] = {}  # size -> (accuracy, chosen change, plain top-1 change)
    for size, rows in rows_by_size.items():
        row = next((r for r in rows if is_plain(r["label"])), None)
        if row is None:
            return f"No plain row ({plain}) in the sweep of size {size}: no pick."
        std = (row.get("chosen_delta_per_token") or {}).get("std") or 0.0
        floors[size] = (
            mean(row, "accuracy") - 0.03, mean(row, "chosen_delta_per_token") - std, mean(row, "d_top1_rejected"),
        )  # fmt: skip
    by_label: dict[str, dict[str, dict[str, Any]]] = {}
    for size, rows in rows_by_size.items():
        for r in rows:
            if not is_plain(r["label"]):
                by_label.setdefault(r["label"], {})[size] = r

    def eligible(per_size: dict[str, dict[str, Any]]) -> bool:
        return len(per_size) == len(floors) and all(
            mean(r, "accuracy") >= floors[s][0]
            and (rule == "chosen" or mean(r, "chosen_delta_per_token") >= floors[s][1])
            for s, r in per_size.items()
        )

    def score(label: str) -> float:  # smaller is better
        if rule == "chosen":
            return -min(mean(r, "d_chosen") for r in by_label[label].values())
        return max(abs(mean(r, "d_top1_rejected")) for r in by_label[label].values())

    ok = [label for label, per_size in by_label.items() if eligible(per_size)]
    if rule == "chosen":
        bounds = "; ".join(f"`{s}`: eval accuracy >= {a:.3f}" for s, (a, _, _) in floors.items())
        head = (
            f"Rule: at every size, eval accuracy >= plain {plain}'s - 0.03 ({bounds}); then the largest Δ chosen "
            f"(summed over the response, first to last evaluation) at the worst size. "
        )
    else:
        bounds = "; ".join(
            f"`{s}`: eval accuracy >= {a:.3f}, chosen change per token >= {c:+.4f} (plain's top-1 change {t:+.4f})"
            for s, (a, c, t) in floors.items()
        )
        head = (
            f"Rule: at every size, eval accuracy >= plain {plain}'s - 0.03 and chosen change per token >= plain's - "
            f"one std ({bounds}); then the smallest |change of top-1 on rejected tokens| at the worst size. "
        )
    head += f"{len(ok)} of {len(by_label)} gates are eligible at every size."
    if not ok:
        return head + " No gate keeps eval accuracy within the rule's bounds: no pick."
    ranked = sorted(ok, key=score)
    pick = ranked[0]
    detail = "; ".join(
        f"`{s}`: Δ chosen {mean(r, 'd_chosen'):+.3f}, top-1 change {mean(r, 'd_top1_rejected'):+.4f} on rejected "
        f"tokens, chosen change {mean(r, 'chosen_delta_per_token'):+.4f} per token, eval accuracy "
        f"{mean(r, 'accuracy'):.3f}"
        for s, r in by_label[pick].items()
    )
    order = ", ".join(
        f"{label} ({-score(label) if rule == 'chosen' else score(label):+.4g})" for label in ranked
    )
    what = "worst-size Δ chosen" if rule == "chosen" else "worst-size |top-1 change|"
    return f"{head} Pick: **{pick}**: {detail}. Eligible gates by the rule ({what}): {order}."
