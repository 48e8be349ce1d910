"""Run analysis: training runs in, comparison plots and a summary table out (``gatedpo analyze``).

A run folder holds ``config.yaml`` (the resolved config) and ``metrics.jsonl`` (one object per optimizer step, plus
``eval/<name>`` keys on evaluation steps; a step-0 row may hold only the evaluation before training). Runs whose
configs agree on everything but the seed and the output folder are seeds of one *arm* (a :class:`Group`); plots
show each arm's mean over seeds as a line and min..max over seeds as a band, and the table reports each arm as
``mean ± std`` over seeds.

    runs = [load_run(p) for p in paths]
    groups = group_runs(runs)                  # or label_by=["objective.name", "gate.shape"]
    print(format_table(summary_rows(groups)))
    write_report(groups, Path("outputs/analysis"))
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from gatedpo_mega.errors import UserError

# Keys that tell seeds of one arm apart without making them different arms.
RUN_SPECIFIC_KEYS = ("train.seed", "train.output_dir", "train.resume", "train.run_name")
DEFAULT_LABEL_KEYS = ("objective.name", "gate.shape")

# Plotted quantities, in overview order: metric name -> panel title.
QUANTITIES: dict[str, str] = {
    "logps/chosen_delta_per_token": "Δ log p(chosen) / token vs reference",
    "logps/rejected_delta_per_token": "Δ log p(rejected) / token vs reference",
    "rewards/margins": "reward margin",
    "rewards/accuracies": "preference accuracy",
    "squeeze/top1_chosen": "top-1 probability, chosen tokens",
    "squeeze/entropy_chosen": "entropy, chosen tokens",
    "squeeze/top1_rejected": "top-1 probability, rejected tokens",
    "squeeze/entropy_rejected": "entropy, rejected tokens",
    "gate/mean": "gate mean",
    "gate/frac_attenuated": "fraction of rejected tokens attenuated",
    "loss": "loss",
}

# Summary columns: (row key, header, how the number is computed).
SQUEEZE_COLUMNS = (
    ("accuracy", "eval acc."),
    ("chosen_delta_per_token", "Δ log p chosen / tok"),
    ("rejected_delta_per_token", "Δ log p rejected / tok"),
    ("d_top1_rejected", "Δ top-1 rejected"),
    ("d_entropy_rejected", "Δ entropy rejected"),
    ("d_top1_chosen", "Δ top-1 chosen"),
    ("d_entropy_chosen", "Δ entropy chosen"),
    ("frac_attenuated", "attenuated (train, last 10%)"),
)
# The mass-dynamics columns of the Gate-DPO paper's tables: changes from the first to the last evaluation of the
# summed log-likelihood of a response (mean over pairs), of the chosen and the rejected responses, their difference,
# and of the probe pairs' chosen responses (data.probe_pairs: "Δ others"); then the same per response token.
CHANGE_COLUMNS = (
    ("accuracy", "eval acc."),
    ("d_chosen", "Δ chosen"),
    ("d_rejected", "Δ rejected"),
    ("margin", "margin"),
    ("d_others", "Δ others"),
    ("d_chosen_per_token", "Δ chosen / tok"),
    ("d_rejected_per_token", "Δ rejected / tok"),
    ("d_others_per_token", "Δ others / tok"),
)
COLUMN_SETS = {
    "squeeze": SQUEEZE_COLUMNS,
    "change": CHANGE_COLUMNS,
}  # gatedpo analyze --columns, a spec's columns
_LAST_VALUE = {
    "accuracy": "rewards/accuracies",
    "chosen_delta_per_token": "logps/chosen_delta_per_token",
    "rejected_delta_per_token": "logps/rejected_delta_per_token",
}
_CHANGE = {
    "d_top1_rejected": "squeeze/top1_rejected",
    "d_entropy_rejected": "squeeze/entropy_rejected",
    "d_top1_chosen": "squeeze/top1_chosen",
    "d_entropy_chosen": "squeeze/entropy_chosen",
    "d_chosen": "logps/chosen",
    "d_rejected": "logps/rejected",
    "d_others": "probe/logps/chosen",
}
# Changes per response token: (column, the change, the token count it is divided by).
_PER_TOKEN = (
    ("d_chosen_per_token", "d_chosen", "tokens/chosen"),
    ("d_rejected_per_token", "d_rejected", "tokens/rejected"),
    ("d_others_per_token", "d_others", "probe/tokens/chosen"),
)


@dataclass
class Run:
    """One training run: its flattened config (``"gate.tau" -> 1e-4``) and its records by step.

    ``train`` holds the optimizer-step metrics, ``eval`` the ``eval/<name>`` metrics with the prefix removed.
    """

    path: Path
    config: dict[str, Any]
    train: dict[int, dict[str, float]]
    eval: dict[int, dict[str, float]]

    @property
    def seed(self) -> Any:
        return self.config.get("train.seed")


@dataclass
class Group:
    """The seeds of one arm: runs whose configs differ only in :data:`RUN_SPECIFIC_KEYS`."""

    label: str
    runs: list[Run]
    config: dict[str, Any] = field(default_factory=dict)  # the shared config, without the run-specific keys


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = tuple(v) if isinstance(v, list) else v
    return flat


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: missing (a run folder holds config.yaml and metrics.jsonl)")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise UserError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: expected a mapping of config sections, got {type(tree).__name__}")
    return _flatten(tree)


def _read_metrics(path: Path) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, float]]]:
    if not path.is_file():
        raise UserError(f"{path}: missing (a run folder holds config.yaml and metrics.jsonl)")
    train: dict[int, dict[str, float]] = {}
    evals: dict[int, dict[str, float]] = {}
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            step = record.pop("step", None)
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                raise UserError(f"{path}:{lineno}: 'step' must be a non-negative integer, got {step!r}")
            t: dict[str, float] = {}
            e_: dict[str, float] = {}
            for k, v in record.items():
                if v is None:  # a metric this step could not compute
                    continue
                if not _number(v):
                    raise UserError(f"{path}:{lineno}: '{k}' must be a number, got {v!r}")
                if k.startswith("eval/"):
                    e_[k.removeprefix("eval/")] = float(v)
                else:
                    t[k] = float(v)
            # A resumed run may repeat steps; the later record is the one that continued.
            if t:
                train[step] = t
            if e_:
                evals[step] = e_
    if not train and not evals:
        raise UserError(f"{path}: no metric records")
    return dict(sorted(train.items())), dict(sorted(evals.items()))


def load_run(path: str | Path) -> Run:
    """Read ``config.yaml`` and ``metrics.jsonl`` from a run folder; bad input raises :class:`UserError`."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a run folder (no such directory)")
    config = _read_config(path / "config.yaml")
    train, evals = _read_metrics(path / "metrics.jsonl")
    return Run(path=path, config=config, train=train, eval=evals)


def _show(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return ",".join(_show(x) for x in v)
    return str(v)


def _label(config: dict[str, Any], keys: Sequence[str]) -> str:
    parts = []
    for k in keys:
        if k.startswith("gate.") and k != "gate.shape" and config.get("gate.shape") == "none":
            continue  # no gate: its other fields are read by nothing
        v = _show(config.get(k))
        parts.append(v if k == "objective.name" else f"gate={v}" if k == "gate.shape" else f"{k}={v}")
    return " ".join(parts)


def group_runs(runs: Sequence[Run], label_by: Sequence[str] | None = None) -> list[Group]:
    """Runs that differ only in seed and output folder form one group, in order of first appearance.

    The label names ``objective.name`` and ``gate.shape`` plus every other key that differs between groups,
    or exactly the keys of ``label_by``.
    """
    if not runs:
        raise UserError("no runs to analyze")
    buckets: dict[tuple[tuple[str, str], ...], list[Run]] = {}
    for run in runs:
        shared = {k: v for k, v in run.config.items() if k not in RUN_SPECIFIC_KEYS}
        buckets.setdefault(tuple(sorted((k, repr(v)) for k, v in shared.items())), []).append(run)
    configs = [
        {k: v for k, v in rs[0].config.items() if k not in RUN_SPECIFIC_KEYS} for rs in buckets.values()
    ]
    all_keys = sorted({k for c in configs for k in c})
    if label_by is not None:
        unknown = [k for k in label_by if k not in all_keys and k not in RUN_SPECIFIC_KEYS]
        if unknown:
            raise UserError(
                f"--label-by: unknown config key(s) {', '.join(unknown)} (e.g. {', '.join(all_keys[:6])})"
            )
        keys = list(label_by)
    else:
        differing = [k for k in all_keys if len({repr(c.get(k)) for c in configs}) > 1]
        keys = [k for k in DEFAULT_LABEL_KEYS if k in all_keys]
        keys += [k for k in differing if k not in keys]
    groups = []
    for cfg, rs in zip(configs, buckets.values(), strict=True):
        rs = sorted(rs, key=lambda r: (str(type(r.seed)), r.seed if r.seed is not None else 0))
        groups.append(Group(label=_label(rs[0].config, keys), runs=rs, config=cfg))
    seen: dict[str, int] = {}
    for g in groups:  # labels that do not tell groups apart (a too-short --label-by) get a number
        seen[g.label] = seen.get(g.label, 0) + 1
        if seen[g.label] > 1:
            g.label = f"{g.label} [{seen[g.label]}]"
    return groups


# -- the table ---------------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    std = float(a.std(ddof=1)) if len(a) >= 2 else None
    return {"mean": float(a.mean()), "std": std, "n": len(a), "values": a.tolist()}


def _eval_records(run: Run, eval_set: str | None) -> dict[int, dict[str, float]]:
    """The run's evaluation records; of one ``data.eval_sets`` set (its ``<set>/`` prefix removed) when named."""
    if eval_set is None:
        return run.eval
    prefix = f"{eval_set}/"
    out = {}
    for step, rec in run.eval.items():
        sub = {k.removeprefix(prefix): v for k, v in rec.items() if k.startswith(prefix)}
        if sub:
            out[step] = sub
    return out


def _endpoints(run: Run, eval_set: str | None = None) -> tuple[str, dict[str, float], dict[str, float]]:
    """The records the table compares: (source, first, last). Eval rows if any evaluation followed training."""
    evals = _eval_records(run, eval_set)
    if any(step > 0 for step in evals) or (evals and not run.train):
        rows = list(evals.values())
        return "eval", rows[0], rows[-1]
    rows = list(run.train.values())
    return "train", rows[0], rows[-1]


def _run_numbers(run: Run, eval_set: str | None = None) -> tuple[str, dict[str, float]]:
    source, first, last = _endpoints(run, eval_set)
    out: dict[str, float] = {}
    for col, key in _LAST_VALUE.items():
        if key in last:
            out[col] = last[key]
    for col, key in _CHANGE.items():
        if key in first and key in last:
            out[col] = last[key] - first[key]
    if "d_chosen" in out and "d_rejected" in out:
        out["margin"] = out["d_chosen"] - out["d_rejected"]
    for col, change, tokens in _PER_TOKEN:
        if change in out and last.get(tokens):
            out[col] = out[change] / last[tokens]
    frac = [r["gate/frac_attenuated"] for r in run.train.values() if "gate/frac_attenuated" in r]
    if frac:
        tail = frac[-max(1, math.ceil(0.1 * len(frac))) :]
        out["frac_attenuated"] = float(np.mean(tail))
    return source, out


def summary_rows(groups: Sequence[Group], eval_set: str | None = None) -> list[dict[str, Any]]:
    """One row per group: seeds, then each column as ``{"mean", "std", "n", "values"}`` over seeds (or None).

    Last-evaluation numbers, of the evaluation set ``eval_set`` when named (``data.eval_sets``, or ``heldout``, the
    hash split beside them); ``source`` is ``"train"`` when a run had no such evaluation after step 0 and its last
    (and, for changes, first) train record stood in.
    """
    rows = []
    for g in groups:
        per_run = [_run_numbers(r, eval_set) for r in g.runs]
        row: dict[str, Any] = {
            "label": g.label,
            "eval_set": eval_set,
            "seeds": len(g.runs),
            "seed_values": [r.seed for r in g.runs],
            "runs": [str(r.path) for r in g.runs],
            "train_fallback": sum(src == "train" for src, _ in per_run),
        }
        for col in dict([*SQUEEZE_COLUMNS, *CHANGE_COLUMNS]):
            row[col] = _stats([nums[col] for _, nums in per_run if col in nums])
        rows.append(row)
    return rows


def _fmt(s: dict[str, Any] | None, signed: bool) -> str:
    if s is None:
        return "–"
    m = f"{s['mean']:+.4g}" if signed else f"{s['mean']:.4g}"
    return m if s["std"] is None else f"{m} ± {s['std']:.4g}"


def format_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]] = SQUEEZE_COLUMNS, first: str = "arm"
) -> str:
    """A Markdown table of :func:`summary_rows` (``columns``: (row key, header) pairs; the first column's header
    ``first``), with footnotes."""
    head = [first, "seeds", *(h for _, h in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        label = row["label"] + (" †" if row["train_fallback"] else "")
        cells = [_fmt(row[col], signed=col != "accuracy" and col != "frac_attenuated") for col, _ in columns]
        lines.append(f"| {label} | {row['seeds']} | " + " | ".join(cells) + " |")
    lines.append("")
    named = rows[0].get("eval_set") if rows else None
    what = (
        "Δ top-1 / entropy" if columns is SQUEEZE_COLUMNS else
        "Δ: summed over a response's tokens (mean over pairs) or per response token (/ tok), margin = Δ chosen − Δ "
        "rejected, Δ others on the probe pairs' chosen responses (data.probe_pairs); each Δ"
    )  # fmt: skip
    lines.append(
        ("Last evaluation" + (f" on `{named}`" if named else ""))
        + f"; {what}: last evaluation minus the first (step 0 when present); "
        "mean ± std over seeds (ddof=1); – : not logged by these runs."
    )
    fallback = [f"{r['label']} ({r['train_fallback']} of {r['seeds']})" for r in rows if r["train_fallback"]]
    if fallback:
        lines.append(
            "† no evaluation after step 0 in some runs: their last (and first) train records stand in: "
            + ", ".join(fallback)
            + "."
        )
    return "\n".join(lines)


# -- the plots ---------------------------------------------------------------------------------------------------


def _series(
    group: Group, kind: str, key: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(steps, mean, min, max) over the group's seeds at every step where at least one seed logged ``key``."""
    by_step: dict[int, list[float]] = {}
    # kind "eval/<set>": that evaluation set's metrics (data.eval_sets), logged as eval/<set>/<key>
    name = f"{kind.removeprefix('eval/')}/{key}" if kind.startswith("eval/") else key
    for run in group.runs:
        for step, rec in (run.train if kind == "train" else run.eval).items():
            if name in rec and math.isfinite(rec[name]):
                by_step.setdefault(step, []).append(rec[name])
    if not by_step:
        return None
    steps = sorted(by_step)
    vals = [np.asarray(by_step[s]) for s in steps]
    return (
        np.asarray(steps),
        np.asarray([v.mean() for v in vals]),
        np.asarray([v.min() for v in vals]),
        np.asarray([v.max() for v in vals]),
    )


def _draw(
    ax: Any, groups: Sequence[Group], kind: str, key: str, colors: list[Any], dashed: bool = False
) -> bool:
    drawn = False
    for g, color in zip(groups, colors, strict=True):
        s = _series(g, kind, key)
        if s is None:
            continue
        steps, mean, lo, hi = s
        style: dict[str, Any] = {"marker": "o", "ms": 3} if dashed or len(steps) <= 12 else {}
        if dashed:
            style["ls"] = "--"
        ax.plot(steps, mean, color=color, label=g.label, lw=1.5, **style)
        if len(g.runs) > 1:
            ax.fill_between(steps, lo, hi, color=color, alpha=0.2, lw=0)
        drawn = True
    return drawn


def _plot_name(kind: str, key: str) -> str:
    return f"{kind.replace('/', '_')}_{key.replace('/', '_')}.png"


def eval_set_names(groups: Sequence[Group]) -> list[str]:
    """The ``data.eval_sets`` names of the runs (and ``heldout``, the hash split beside them), in order."""
    names = [
        k.split(".")[2] for g in groups for r in g.runs for k in r.config if k.startswith("data.eval_sets.")
    ]
    return list(dict.fromkeys([*names, "heldout"] if names else []))


def _colors(n: int) -> list[Any]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _wrapped(label: str, width: int) -> str:
    return "\n".join(textwrap.wrap(label, width, break_long_words=True, break_on_hyphens=False)) or label


def _legend_below(fig: Any, handles: list[Any], *, fontsize: float = 8) -> float:
    """A figure legend along the bottom edge, as many columns as fit (at most 4), labels wrapped at spaces to fit
    the figure's width; returns its height in inches (the caller leaves that much room below the axes)."""
    from matplotlib.lines import Line2D

    renderer = fig.canvas.get_renderer()
    room = fig.bbox.width - 0.2 * fig.dpi  # a tenth of an inch each side
    labels = [str(h.get_label()) for h in handles]
    probe = fig.text(0, 0, "x" * 40, fontsize=fontsize)
    char = probe.get_window_extent(renderer).width / 40
    probe.remove()
    handle_room = 4.5 * fontsize * fig.dpi / 72  # the line sample and the gaps around it, in pixels
    longest = max(len(label) for label in labels)
    for ncol in range(min(4, len(labels)), 0, -1):
        width = int((room / ncol - handle_room) / char)
        if longest <= width or ncol == 1:
            break
    for _ in range(8):  # the estimate is per average character: narrow it until the legend fits
        items = [
            Line2D([], [], color=h.get_color(), lw=h.get_linewidth(), ls=h.get_linestyle(), marker=h.get_marker(),
                   ms=h.get_markersize(), label=_wrapped(label, max(8, width)))
            for h, label in zip(handles, labels, strict=True)
        ]  # fmt: skip
        legend = fig.legend(
            handles=items, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, fontsize=fontsize,
            frameon=False, borderaxespad=0.3,
        )  # fmt: skip
        box = legend.get_window_extent(renderer)
        if box.width <= room or width <= 8:
            return float(box.height / fig.dpi) + 0.05
        legend.remove()
        width = int(width * room / box.width) - 1
    return float(box.height / fig.dpi) + 0.05


def write_grid(
    rows: dict[str, Sequence[Group]], keys: Sequence[str], path: str | Path, *, kind: str = "eval"
) -> Path:
    """One figure: a row of panels per entry of ``rows`` (e.g. a model size: its arms), a column per quantity of
    ``keys`` (``QUANTITIES`` names); each arm's mean over seeds as a line, min..max as a band. The same arm label
    has the same colour in every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(g.label for groups in rows.values() for g in groups))
    colour = dict(zip(labels, _colors(len(labels)), strict=True))
    fig, axes = plt.subplots(
        len(rows), len(keys), figsize=(4.2 * len(keys), 3.2 * len(rows)), dpi=80, squeeze=False
    )
    for r, (name, groups) in enumerate(rows.items()):
        for c, key in enumerate(keys):
            ax = axes[r][c]
            _draw(ax, groups, kind, key, [colour[g.label] for g in groups])
            ax.set_title(f"{name}: {QUANTITIES.get(key, key)}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colour[label], lw=1.5, label=label) for label in labels]
    below = _legend_below(fig, handles)
    fig.tight_layout(rect=(0, below / fig.get_size_inches()[1], 1, 1))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def write_plots(groups: Sequence[Group], out_dir: Path) -> dict[str, Path]:
    """One PNG per (train | eval | eval/<set>, quantity) that some run logged, and ``overview.png`` with a panel per quantity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _colors(len(groups))
    paths: dict[str, Path] = {}
    # One figure cleared per quantity, with fixed margins: tight_layout on each would double the time.
    # Short labels: the legend inside the axes; long ones (or many arms): below them, on a taller figure.
    fig, ax = plt.subplots(figsize=(6, 4), dpi=90)
    below = 0.0
    if len(groups) > 6 or max(len(g.label) for g in groups) > 32:
        for g, c in zip(groups, colors, strict=True):
            ax.plot([], [], color=c, lw=1.5, label=g.label)
        below = _legend_below(fig, ax.get_lines())
        ax.clear()
        fig.set_size_inches(6, 4 + below)
    height = 4 + below
    fig.subplots_adjust(left=0.16, right=0.97, bottom=(0.48 + below) / height, top=1 - 0.32 / height)
    for kind in ("train", "eval", *(f"eval/{n}" for n in eval_set_names(groups))):
        for key, title in QUANTITIES.items():
            ax.clear()
            if _draw(ax, groups, kind, key, colors):
                ax.set_title(f"{kind}: {title}")
                ax.set_xlabel("step")
                ax.set_ylabel(key)
                ax.grid(alpha=0.3)
                if not below:
                    ax.legend(fontsize=8)
                name = _plot_name(kind, key)
                fig.savefig(out_dir / name, dpi=90)
                paths[name.removesuffix(".png")] = out_dir / name
    plt.close(fig)

    # Overview: train as solid lines, eval dashed with markers, one colour per arm.
    present = [
        k for k in QUANTITIES if any(_series(g, kind, k) for g in groups for kind in ("train", "eval"))
    ]
    ncols = min(4, max(1, len(present)))
    nrows = max(1, math.ceil(len(present) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False, dpi=90)
    for ax, key in zip(axes.flat, present, strict=False):
        _draw(ax, groups, "train", key, colors)
        _draw(ax, groups, "eval", key, colors, dashed=True)
        ax.set_title(QUANTITIES[key], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, lw=2, label=g.label) for g, c in zip(groups, colors, strict=True)]
    handles += [
        Line2D([], [], color="grey", lw=1.5, label="train (mean, band: min..max over seeds)"),
        Line2D([], [], color="grey", lw=1.5, ls="--", marker="o", ms=3, label="eval"),
    ]
    below = _legend_below(fig, handles)
    width, height = fig.get_size_inches()
    fig.set_size_inches(width, height + below)  # the panels keep their size; the legend gets its own strip
    fig.tight_layout(rect=(0, below / (height + below), 1, 1))
    fig.savefig(out_dir / "overview.png", dpi=90)
    plt.close(fig)
    paths["overview"] = out_dir / "overview.png"
    return paths


def summary_tables(groups: Sequence[Group], columns: Sequence[tuple[str, str]] = SQUEEZE_COLUMNS) -> str:
    """The table; with ``data.eval_sets``, one table per evaluation set, each under its name."""
    names = eval_set_names(groups)
    if not names:
        return format_table(summary_rows(groups), columns)
    return "\n\n".join(
        f"### Evaluation set `{n}`\n\n" + format_table(summary_rows(groups, n), columns) for n in names
    )


def write_report(
    groups: Sequence[Group], out_dir: str | Path, columns: Sequence[tuple[str, str]] = SQUEEZE_COLUMNS
) -> dict[str, Path]:
    """``summary.md`` (of ``columns``), ``summary.json`` (every column) and the plots in ``out_dir``; returns
    name -> path (``table``, ``json``, ...)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"table": out / "summary.md", "json": out / "summary.json"}
    paths["table"].write_text(summary_tables(groups, columns) + "\n")
    arms = [{"label": g.label, "config": {k: _show(v) for k, v in g.config.items()}} for g in groups]
    sets = {name: summary_rows(groups, name) for name in eval_set_names(groups)}
    data: dict[str, Any] = {"rows": summary_rows(groups), "arms": arms} | (
        {"eval_sets": sets} if sets else {}
    )
    paths["json"].write_text(json.dumps(data, indent=1) + "\n")
    paths.update(write_plots(groups, out))
    return paths
