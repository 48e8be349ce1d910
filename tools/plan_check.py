"""The memory planner against measurement: each case trains 2 steps on 2 local CPU processes and compares the peak
resident memory of the busiest rank (``memory/peak_mib_max_rank`` in metrics.jsonl) with ``gatedpo plan``'s
``per_rank_peak_bytes`` for the same config.

    python tools/plan_check.py [--size ci|large] [--only NAME ...] [--json FILE] [--out DIR]

Prints one row per case (predicted, measured, error) and exits 1 when a case is off by more than 15%.
``--size ci`` (3 shapes x 3 layouts, 50-80M parameters: a rank's tensors are 1-3x the process baseline, and one
LoRA case: the frozen base, rank-16 adapters, the live reference) is what the README's figure comes from;
tests/test_planner.py runs 6 of its cases (each shape at two layouts, each layout kind on two shapes);
``large`` doubles the width.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOLERANCE = 0.15

# Three shapes: wide and shallow in fp32; deep and narrow in bf16; a large vocabulary (output layer and log-prob
# temporaries) with small layers.
SHAPES = {
    "wide-fp32": {
        "model.num_layers": 6, "model.hidden_size": 1024, "model.num_attention_heads": 16,
        "model.num_query_groups": 16, "model.ffn_hidden_size": 2816,
    },
    "deep-bf16": {
        "model.num_layers": 12, "model.hidden_size": 768, "model.num_attention_heads": 12,
        "model.num_query_groups": 4, "model.ffn_hidden_size": 2048, "model.dtype": "bf16",
    },
    "vocab-32k": {
        "model.num_layers": 2, "model.hidden_size": 768, "model.num_attention_heads": 12,
        "model.num_query_groups": 12, "model.ffn_hidden_size": 2048, "model.vocab_size": 32000,
    },
}  # fmt: skip
# Three layouts of 2 ranks per shape: tensor-parallel, pipeline-parallel with the unfused output layer, and
# data-parallel under a sharding ZeRO stage; and LoRA once (the base frozen, only the adapters stepped, the live
# reference the policy with its adapters off).
LAYOUTS = {
    "wide-fp32": [
        {"parallel.tensor": 2, "parallel.zero_stage": 1},
        {"parallel.pipeline": 2, "parallel.zero_stage": 1, "model.fused_logprobs": False},
        {"parallel.zero_stage": 3},
        {"parallel.zero_stage": 2, "model.lora.rank": 16},
    ],
    "deep-bf16": [
        {"parallel.tensor": 2, "parallel.zero_stage": 1},
        {"parallel.pipeline": 2, "parallel.zero_stage": 0, "model.fused_logprobs": False},
        {"parallel.zero_stage": 2},
    ],
    "vocab-32k": [
        {"parallel.tensor": 2, "parallel.zero_stage": 1, "model.fused_objective": True},
        {"parallel.pipeline": 2, "parallel.zero_stage": 1, "model.fused_logprobs": False},
        {"parallel.zero_stage": 2},
    ],
}
COMMON = {
    "train.max_steps": 2, "train.micro_batch_size": 2, "train.global_batch_size": 8, "train.warmup_steps": 0,
    "train.save_final": False, "train.report_to": "none", "train.reference_batch_size": 8,
    "data.source": "builtin", "data.builtin_pairs": 16, "data.max_length": 64, "data.max_prompt_length": 32,
    "data.eval_fraction": 0,
}  # fmt: skip


def _label(layout: dict[str, object]) -> str:
    parts = []
    if layout.get("parallel.tensor"):
        parts.append("TP2")
    if layout.get("parallel.pipeline"):
        parts.append("PP2")
    if not parts:
        parts.append("DP2")
    parts.append(f"Z{layout['parallel.zero_stage']}")
    if layout.get("model.fused_logprobs") is False:
        parts.append("unfused")
    if layout.get("model.fused_objective"):
        parts.append("fused-objective")
    if layout.get("model.lora.rank"):
        parts.append(f"lora{layout['model.lora.rank']}")
    return "-".join(parts)


def cases(size: str) -> list[tuple[str, list[str]]]:
    out = []
    for shape, fields in SHAPES.items():
        if size == "large":
            fields = {**fields, "model.hidden_size": 2 * int(fields["model.hidden_size"])}
            fields["model.ffn_hidden_size"] = 2 * int(fields["model.ffn_hidden_size"])
        for layout in LAYOUTS[shape]:
            merged = {**COMMON, **fields, **layout}
            out.append((f"{shape}/{_label(layout)}", [f"{k}={_yaml(v)}" for k, v in merged.items()]))
    return out


def _yaml(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _plan(args: list[str]) -> tuple[int, str, str]:
    """``gatedpo plan ARGS`` in this process (it reads the config alone: no process to start); the exit code and
    what it printed."""
    from gatedpo_mega.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["plan", *args])
    return code, out.getvalue(), err.getvalue()


def run_case(name: str, overrides: list[str], root: Path) -> dict[str, object]:
    out = root / name.replace("/", "_")
    common = [*overrides, f"train.output_dir={out}", f"data.cache_dir={root / 'cache'}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    code, plan, said = _plan(["--nproc", "2", "--target", "cpu", "--json", *common])
    if code:
        raise SystemExit(f"plan_check: {name}: gatedpo plan failed: {said.strip()[-500:]}")
    predicted = json.loads(plan)["per_rank_peak_bytes"] / 2**20
    t0 = time.monotonic()
    train = subprocess.run(
        [sys.executable, "-m", "gatedpo_mega.cli", "train", "--nproc", "2", *common],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    if train.returncode:
        raise SystemExit(f"plan_check: {name}: training failed: {train.stderr.strip()[-1500:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    measured = max(r["memory/peak_mib_max_rank"] for r in rows if "memory/peak_mib_max_rank" in r)
    return {
        "case": name, "predicted_mib": round(predicted, 1), "measured_mib": round(measured, 1),
        "error": round((predicted - measured) / measured, 4), "seconds": round(time.monotonic() - t0, 1),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("ci", "large"), default="ci")
    parser.add_argument("--only", nargs="*", help="case names (or prefixes) to run")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--out", type=Path, help="run folders here (default: a temporary folder)")
    args = parser.parse_args()
    selected = [c for c in cases(args.size) if not args.only or any(c[0].startswith(o) for o in args.only)]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        rows = []
        print("| case | predicted MiB | measured MiB | error | run s |\n|---|---|---|---|---|", flush=True)
        for name, overrides in selected:
            row = run_case(name, overrides, root)
            rows.append(row)
            print(
                f"| {name} | {row['predicted_mib']:,.0f} | {row['measured_mib']:,.0f} | "
                f"{100 * float(row['error']):+.1f}% | {row['seconds']} |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    worst = max(abs(float(r["error"])) for r in rows)
    print(f"worst error {100 * worst:.1f}% (tolerance {100 * TOLERANCE:.0f}%)")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
