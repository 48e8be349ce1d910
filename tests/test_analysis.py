"""``gatedpo analyze``: synthetic run folders with known numbers in, grouping, table and plots out."""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gatedpo_mega.analysis import (
    QUANTITIES,
    format_table,
    group_runs,
    load_run,
    summary_rows,
    write_report,
)
from gatedpo_mega.errors import UserError

STEPS = 20
EVAL_EVERY = 10


def _config(objective: str, shape: str, seed: int, out: Path, tau: float = 1e-4) -> dict[str, Any]:
    return {
        "objective": {"name": objective, "beta": 0.1},
        "gate": {"shape": shape, "granularity": "token", "signal": "logp", "tau": tau, "temperature": 1.0},
        "train": {"seed": seed, "output_dir": str(out), "max_steps": STEPS, "eval_every": EVAL_EVERY},
        "model": {"hidden_size": 64, "num_layers": 2},
        "parallel": {"tensor": 1, "pipeline": 1},
        "data": {"source": "builtin"},
    }


def _metrics(a: float, preference: bool = True) -> dict[str, float]:
    """Metrics that are affine in ``a`` (a per-run constant times the step) so the test knows every number."""
    m = {
        "loss": 0.69 - a,
        "logps/chosen": -50.0 + a,
        "logps/rejected": -60.0 - a,
        "tokens/chosen": 30.0,
        "tokens/rejected": 32.0,
        "gate/mean": 1.0 - 0.5 * a,
        "gate/frac_attenuated": 0.1 * a,
        "squeeze/top1_rejected": 0.3 + a,
        "squeeze/entropy_rejected": 2.0 - 2 * a,
        "squeeze/top1_chosen": 0.4 + 0.5 * a,
        "squeeze/entropy_chosen": 1.5 - a,
    }
    if preference:
        m |= {
            "rewards/chosen": a,
            "rewards/rejected": -a,
            "rewards/margins": 2 * a,
            "rewards/accuracies": min(1.0, 0.5 + a),
            "logps/chosen_delta_per_token": -0.1 * a,
            "logps/rejected_delta_per_token": -3.0 * a,
        }
    return m


def _write_run(
    root: Path, name: str, objective: str, shape: str, seed: int, rate: float, preference: bool = True
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(_config(objective, shape, seed, run), sort_keys=False))
    lines = [{"step": 0, **{f"eval/{k}": v for k, v in _metrics(0.0, preference).items()}}]
    for step in range(1, STEPS + 1):
        row: dict[str, Any] = {"step": step, **_metrics(rate * step, preference)}
        row |= {"grad_norm": 1.0, "lr": 1e-3, "tokens_per_second": 100.0, "step_seconds": 0.1}
        if step % EVAL_EVERY == 0:
            row |= {f"eval/{k}": v for k, v in _metrics(rate * step * 0.9, preference).items()}
        lines.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


# Two arms x two seeds; each run's rate sets its numbers.
RATES = {
    ("dpo", "none", 1): 0.010,
    ("dpo", "none", 2): 0.014,
    ("dpo", "sigmoid", 1): 0.004,
    ("dpo", "sigmoid", 2): 0.007,
}


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for (obj, shape, seed), rate in RATES.items():
        _write_run(root, f"{obj}-{shape}-s{seed}", obj, shape, seed, rate)
    _write_run(root, "sft-s1", "sft", "none", 1, 0.01, preference=False)
    return root


def _all_runs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def test_load_run_splits_train_and_eval(runs_root: Path) -> None:
    run = load_run(runs_root / "dpo-none-s1")
    assert run.seed == 1 and run.config["gate.tau"] == 1e-4
    assert sorted(run.eval) == [0, 10, 20]
    assert sorted(run.train) == list(range(1, STEPS + 1))
    assert run.eval[0]["rewards/accuracies"] == 0.5 and "loss" not in run.train.get(0, {})
    assert "eval/loss" not in run.train[10] and run.eval[10]["loss"] == pytest.approx(0.69 - 0.01 * 10 * 0.9)


def test_grouping_and_labels(runs_root: Path) -> None:
    groups = group_runs([load_run(p) for p in _all_runs(runs_root)])
    labels = {g.label: sorted(r.seed for r in g.runs) for g in groups}
    assert labels == {"dpo gate=none": [1, 2], "dpo gate=sigmoid": [1, 2], "sft gate=none": [1]}

    # A key that differs between arms joins the default label; --label-by names exactly its keys.
    extra = runs_root / "tau"
    run = _write_run(extra, "dpo-sig-tau", "dpo", "sigmoid", 3, 0.01)
    cfg = _config("dpo", "sigmoid", 3, run, tau=1e-3)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    runs = [load_run(p) for p in [*_all_runs(runs_root)[:4], run]]
    assert [g.label for g in group_runs(runs)] == [
        "dpo gate=none",  # without a gate its other fields say nothing
        "dpo gate=sigmoid gate.tau=0.0001",
        "dpo gate=sigmoid gate.tau=0.001",
    ]
    assert [g.label for g in group_runs(runs, label_by=["gate.shape", "gate.tau"])] == [
        "gate=none",
        "gate=sigmoid gate.tau=0.0001",
        "gate=sigmoid gate.tau=0.001",
    ]
    with pytest.raises(UserError, match=r"gate\.nope"):
        group_runs(runs, label_by=["gate.nope"])


def _expected(shape: str) -> dict[str, tuple[float, float]]:
    """(mean, std) over the two seeds of an arm, from the same formulas the runs were written with."""
    last = {
        s: RATES[("dpo", shape, s)] * STEPS * 0.9 for s in (1, 2)
    }  # the last eval row's ``a``; step 0 has a=0
    tail = math.ceil(0.1 * STEPS)
    frac = {
        s: statistics.mean(0.1 * RATES[("dpo", shape, s)] * k for k in range(STEPS - tail + 1, STEPS + 1))
        for s in (1, 2)
    }
    per_seed = {
        "accuracy": {s: min(1.0, 0.5 + a) for s, a in last.items()},
        "chosen_delta_per_token": {s: -0.1 * a for s, a in last.items()},
        "rejected_delta_per_token": {s: -3.0 * a for s, a in last.items()},
        "d_top1_rejected": {s: a for s, a in last.items()},
        "d_entropy_rejected": {s: -2 * a for s, a in last.items()},
        "d_top1_chosen": {s: 0.5 * a for s, a in last.items()},
        "d_entropy_chosen": {s: -a for s, a in last.items()},
        "frac_attenuated": frac,
    }
    return {k: (statistics.mean(v.values()), statistics.stdev(v.values())) for k, v in per_seed.items()}


def test_summary_rows_mean_and_std(runs_root: Path) -> None:
    rows = summary_rows(group_runs([load_run(p) for p in _all_runs(runs_root)]))
    by_label = {r["label"]: r for r in rows}
    for shape in ("none", "sigmoid"):
        row = by_label[f"dpo gate={shape}"]
        assert row["seeds"] == 2 and row["train_fallback"] == 0
        for col, (mean, std) in _expected(shape).items():
            assert row[col]["mean"] == pytest.approx(mean, rel=1e-9, abs=1e-12), col
            assert row[col]["std"] == pytest.approx(std, rel=1e-9, abs=1e-12), col

    sft = by_label["sft gate=none"]  # one seed: a value and no std; no preference metrics: no cell
    assert sft["seeds"] == 1 and sft["accuracy"] is None and sft["chosen_delta_per_token"] is None
    assert sft["d_top1_rejected"]["std"] is None
    assert sft["d_top1_rejected"]["mean"] == pytest.approx(0.01 * STEPS * 0.9)

    table = format_table(rows)
    assert table.count("\n| ") == 3 and "| sft gate=none | 1 | – | – | – |" in table
    m, s = _expected("none")["d_top1_rejected"]
    assert f"{m:+.4g} ± {s:.4g}" in table
    assert "†" not in table


def test_train_rows_stand_in_without_eval(tmp_path: Path) -> None:
    run = _write_run(tmp_path, "noeval", "dpo", "none", 1, 0.01)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in rows if r["step"] > 0]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (row,) = summary_rows(group_runs([load_run(run)]))
    assert row["train_fallback"] == 1
    assert row["d_top1_rejected"]["mean"] == pytest.approx(0.01 * (STEPS - 1))
    assert "† no evaluation after step 0" in format_table([row])


def _is_png(p: Path) -> bool:
    return p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_files(runs_root: Path, tmp_path: Path) -> None:
    groups = group_runs([load_run(p) for p in _all_runs(runs_root)])
    out = tmp_path / "report"
    paths = write_report(groups, out)
    for kind in ("train", "eval"):
        for key in QUANTITIES:
            png = out / f"{kind}_{key.replace('/', '_')}.png"
            assert png.exists() and _is_png(png), png
    assert _is_png(out / "overview.png") and paths["overview"] == out / "overview.png"
    assert (out / "summary.md").read_text().startswith("| arm | seeds |")
    data = json.loads((out / "summary.json").read_text())
    assert [r["label"] for r in data["rows"]] == [g.label for g in groups]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gatedpo_mega.cli", "analyze", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli(runs_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    dirs = [str(p) for p in _all_runs(runs_root) if p.name != "sft-s1"]
    res = _cli(*dirs, "--out", str(out), "--label-by", "objective.name,gate.shape", "--columns", "change")
    assert res.returncode == 0, res.stderr
    assert "| dpo gate=sigmoid | 2 |" in res.stdout and "wrote" in res.stdout
    assert (
        "| arm | seeds | eval acc. | Δ chosen | Δ rejected | margin | Δ others | Δ chosen / tok |"
        in res.stdout
    )
    assert _is_png(out / "overview.png") and (out / "summary.json").exists()


def test_cli_malformed_line(runs_root: Path, tmp_path: Path) -> None:
    bad = runs_root / "dpo-none-s2" / "metrics.jsonl"
    lines = bad.read_text().splitlines()
    lines[4] = lines[4][:-7]  # a truncated record on line 5
    bad.write_text("\n".join(lines) + "\n")
    res = _cli(str(runs_root / "dpo-none-s1"), str(bad.parent), "--out", str(tmp_path / "x"))
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gatedpo: error: ") and f"{bad}:5:" in err[0], res.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: (d / "config.yaml").unlink(), "config.yaml: missing"),
        (lambda d: (d / "metrics.jsonl").write_text('{"step": 1, "loss": "x"}\n'), "metrics.jsonl:1: 'loss'"),
        (lambda d: (d / "metrics.jsonl").write_text('{"loss": 1.0}\n'), "metrics.jsonl:1: 'step'"),
        (lambda d: (d / "metrics.jsonl").write_text("[1, 2]\n"), "metrics.jsonl:1: expected a JSON object"),
        (lambda d: (d / "config.yaml").write_text("a: [1\n"), "config.yaml:2: not valid YAML"),
    ],
)
def test_load_run_errors(tmp_path: Path, mutate: Any, message: str) -> None:
    run = _write_run(tmp_path, "r", "dpo", "none", 1, 0.01)
    mutate(run)
    with pytest.raises(UserError, match=re.escape(message)):
        load_run(run)
