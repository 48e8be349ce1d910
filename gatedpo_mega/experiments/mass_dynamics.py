"""The mass-dynamics experiment, one command from data to report:

    gatedpo mass-dynamics --config configs/mass_dynamics.yaml

1. a SentencePiece tokenizer trained on the preference data's text;
2. per model size, extended SFT (chosen and rejected responses) from a seeded initialisation;
3. from that one checkpoint, every arm (objective x gate) with every seed: the same data order per seed, the same
   steps, the reference = the SFT model;
4. a sweep over the gate family on the ``dpo`` arm of the first size;
5. a tensor-parallel check: the first gated arm's first seed again at TP 2, whose row must equal the TP 1 row;
6. ``gatedpo analyze`` tables and plots per size, for the sweep and across sizes, and ``report.md``.

Runs that finished are kept (a run is done when its final checkpoint exists); an interrupted run resumes from its
latest checkpoint, so the command can be run again after a crash and continues where it stopped.

The spec (YAML) holds lists of training-config overrides: ``base`` (every run), ``sft``, ``preference`` (every arm),
``arms`` and ``sizes`` and ``sweep`` (name -> overrides), ``seeds``, ``tokenizer_vocab_size`` (0: the base's own
``data.tokenizer``), ``output_dir``, ``tensor_parallel_check``; ``config``, a training config file every run starts
from (its path relative to the working directory), and ``nproc``, the processes each run starts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gatedpo_mega.errors import ConfigError


@dataclass(kw_only=True)
class Spec:
    output_dir: str = "outputs/mass-dynamics"
    tokenizer_vocab_size: int = 2000
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    base: list[str] = field(default_factory=list)
    sft: list[str] = field(default_factory=list)
    preference: list[str] = field(default_factory=list)
    arms: dict[str, list[str]] = field(default_factory=dict)
    sizes: dict[str, list[str]] = field(default_factory=dict)
    sweep: dict[str, list[str]] = field(default_factory=dict)
    sweep_arm: str = "dpo"  # the arm whose gate the sweep varies
    tensor_parallel_check: bool = True
    config: str = ""  # a training config file under every run's overrides
    nproc: int = 1  # processes per run (the layout in the config or ``base`` must fit them)
    name: str = "mass-dynamics"  # the experiment's name in its progress lines and report


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
    if not spec.arms or not spec.sizes or not spec.seeds:
        raise ConfigError(f"experiment spec {p}: arms, sizes and seeds must not be empty")
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


def _same_run(a: Any, b: Any) -> bool:
    """Two resolved configs that train the same model on the same batches (the output folder aside)."""
    from dataclasses import replace

    return replace(a, train=replace(a.train, output_dir=b.train.output_dir)) == b


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


def run_experiment(spec: Spec) -> Path:
    """Every run of ``spec`` and the report; returns the path of ``report.md``."""
    from gatedpo_mega.analysis import format_table, group_runs, load_run, summary_rows, write_report

    out = Path(spec.output_dir)
    t0 = time.perf_counter()
    base = [*spec.base, *_tokenizer(spec, out), f"data.cache_dir={out / 'cache'}"]
    runs: dict[str, list[Path]] = {}
    first_size = next(iter(spec.sizes))
    for size, size_args in spec.sizes.items():
        sft_dir = out / size / "sft"
        _train(spec, [*base, *size_args, *spec.sft], sft_dir)
        pref = [*base, *size_args, *spec.preference, f"model.init_from={sft_dir}"]
        for arm, arm_args in spec.arms.items():
            for seed in spec.seeds:
                d = out / size / arm / f"seed{seed}"
                _train(spec, [*pref, *arm_args, f"train.seed={seed}"], d)
                runs.setdefault(f"{size}/{arm}", []).append(d)
        if size == first_size:
            centre = [a for a in spec.arms if a.startswith(spec.sweep_arm)]  # e.g. dpo and dpo+gate
            for name, gate_args in spec.sweep.items():
                for seed in spec.seeds:
                    args = [*pref, *spec.arms[spec.sweep_arm], *gate_args, f"train.seed={seed}"]
                    d = out / "sweep" / name / f"seed{seed}"
                    # A sweep point that is one of the arms (the default gate) is that arm's run, not a second one.
                    same = [out / size / a / f"seed{seed}" for a in centre
                            if _same_run(_resolved(spec, args, d), _resolved(spec, [*pref, *spec.arms[a], f"train.seed={seed}"], d))]  # fmt: skip
                    if same:
                        d = same[0]
                    else:
                        _train(spec, args, d)
                    runs.setdefault(f"sweep/{name}", []).append(d)
    tp_rows = None
    if spec.tensor_parallel_check:
        size, size_args = first_size, spec.sizes[first_size]
        arm = next(
            (a for a, args in spec.arms.items() if "gate.shape=none" not in args), next(iter(spec.arms))
        )
        d = out / "tp2" / arm
        pref = [*base, *size_args, *spec.preference, f"model.init_from={out / size / 'sft'}"]
        _train(spec, [*pref, *spec.arms[arm], f"train.seed={spec.seeds[0]}", "parallel.tensor=2"], d, nproc=2)
        tp1 = load_run(out / size / arm / f"seed{spec.seeds[0]}")
        tp2 = load_run(d)
        tp_rows = summary_rows(group_runs([tp1]) + group_runs([tp2]))
        tp_rows[0]["label"], tp_rows[1]["label"] = f"{arm} TP 1", f"{arm} TP 2"

    report = out / "report"
    sections = [
        f"# {spec.name}: results\n",
        f"Spec: `{spec.output_dir}`; seeds {spec.seeds}; {time.perf_counter() - t0:.0f} s for the runs this "
        "invocation made (runs found done are not re-run).\n",
    ]
    by_arm = ["objective.name", "gate.shape"]
    for size in spec.sizes:
        groups = group_runs([load_run(p) for a in spec.arms for p in runs[f"{size}/{a}"]], label_by=by_arm)
        write_report(groups, report / size)
        sections += [f"## Arms, model size `{size}`\n", format_table(summary_rows(groups)), ""]
    if spec.sweep:
        sweep_keys = ["gate.shape", "gate.signal", "gate.granularity", "gate.tau"]
        centre = [a for a in spec.arms if a.startswith(spec.sweep_arm)]
        paths = [p for a in centre for p in runs[f"{first_size}/{a}"]]
        paths += [p for n in spec.sweep for p in runs[f"sweep/{n}"] if p not in paths]
        members = [load_run(p) for p in paths]
        groups = group_runs(members, label_by=sweep_keys)
        rows = summary_rows(groups)
        write_report(groups, report / "sweep")
        sections += [
            f"## Gate sweep on the `{spec.sweep_arm}` arm, size `{first_size}`\n",
            format_table(rows),
            "",
        ]
        sections += [pick_default(rows), ""]
    if len(spec.sizes) > 1:
        chosen = [load_run(p) for s in spec.sizes for a in spec.arms if a.startswith(spec.sweep_arm)
                  for p in runs[f"{s}/{a}"]]  # fmt: skip
        groups = group_runs(chosen, label_by=["model.hidden_size", "model.num_layers", "gate.shape"])
        write_report(groups, report / "sizes")
        sections += ["## Sizes: gated smaller model against ungated larger model\n",
                     format_table(summary_rows(groups)), ""]  # fmt: skip
    if tp_rows is not None:
        sections += [
            "## Tensor parallelism: the same arm and seed at TP 1 and TP 2\n",
            format_table(tp_rows),
            "",
        ]
        (report / "tp_check.json").parent.mkdir(parents=True, exist_ok=True)
        (report / "tp_check.json").write_text(json.dumps(tp_rows, indent=1))
    path = out / "report.md"
    path.write_text("\n".join(sections) + "\n")
    print(path.read_text(), flush=True)
    plots = ", ".join(str(report / size / "overview.png") for size in spec.sizes)
    print(f"[{spec.name}] the report: {path} (tables); plots: {plots}; runs: {out}/<size>/<arm>/seed<N>")
    return path


def pick_default(rows: list[dict[str, Any]]) -> str:
    """The sweep's pick, by a rule fixed before looking: among gates that keep preference learning (eval accuracy
    at least plain DPO's minus 0.03) and the chosen likelihood (change per token at least plain DPO's minus its
    std over seeds), the one with the least squeezing: the smallest |change of top-1 probability on rejected
    tokens| (sharpening is squeezing; flattening the distribution is a distortion too)."""

    def mean(row: dict[str, Any], key: str) -> float:
        s = row.get(key)
        return float(s["mean"]) if s else float("nan")

    plain = next((r for r in rows if "gate=none" in r["label"]), None)
    if plain is None:
        return "No plain-DPO row (gate=none) in the sweep: no pick."
    chosen_std = (plain.get("chosen_delta_per_token") or {}).get("std") or 0.0
    acc_floor = mean(plain, "accuracy") - 0.03
    chosen_floor = mean(plain, "chosen_delta_per_token") - chosen_std
    eligible = [
        r for r in rows if r is not plain and mean(r, "accuracy") >= acc_floor
        and mean(r, "chosen_delta_per_token") >= chosen_floor
    ]  # fmt: skip
    if not eligible:
        return "No gate keeps both eval accuracy and chosen likelihood within the rule's bounds: no pick."
    pick = min(eligible, key=lambda r: abs(mean(r, "d_top1_rejected")))
    return (
        f"Rule: eval accuracy >= plain DPO's - 0.03 (>= {acc_floor:.3f}), chosen change per token >= plain DPO's - "
        f"one std (>= {chosen_floor:+.4f}); then the smallest |change of top-1 on rejected tokens| (plain DPO: "
        f"{mean(plain, 'd_top1_rejected'):+.4f}). {len(eligible)} of {len(rows) - 1} gates are eligible. Pick: "
        f"**{pick['label']}**: top-1 change {mean(pick, 'd_top1_rejected'):+.4f}, entropy change "
        f"{mean(pick, 'd_entropy_rejected'):+.3f} on rejected tokens, chosen change "
        f"{mean(pick, 'chosen_delta_per_token'):+.4f} per token, eval accuracy {mean(pick, 'accuracy'):.3f}."
    )
