"""tools/gpu_check.sh --cpu: the GPU check's own code at toy shapes on the CPU, so that it keeps running where no GPU
is. Checks that it finishes, prints its table and writes the JSON rows; no time is asserted."""

import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["unfused", "fused", "fused-objective", "lora", "moe"]
OP_METHODS = ["naive-lmhead", "fused-recompute", "fused-stream", "liger-fused-dpo", "matmul-floor"]


def test_gpu_check_cpu_prints_one_table_and_writes_the_json(tmp_path):
    env = dict(os.environ) | {"OUT": str(tmp_path)}
    done = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh"), "--cpu"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    assert (
        out.count("| part | case | time ms | tokens/s | MFU | peak MiB | time vs | memory vs | target |") == 1
    )
    assert "MFU = tokens/s * (6*N + 12*L*H*T)" in out
    assert "| tests | pytest -m cuda |" in out

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "cpu" and report["device"] == "cpu" and report["peak_tflops"] is None
    tests = report["tests"]
    assert tests["exit_code"] == 0 and tests["failed"] == tests["error"] == 0
    assert tests["skipped"] >= 3 and tests["passed"] == 0  # no CUDA here: every CUDA test skips

    train = report["train"]
    assert [(r["T"], r["variant"]) for r in train] == [(t, v) for t in (64, 128) for v in VARIANTS]
    for r in train:
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_mib"] > 0
        assert r["mfu"] is None and r["backend"] == "gloo"
        assert r["tokens_per_step"] == 2 * report["pairs"] * r["T"]
        assert len(r["records"]) == 4  # 1 warm-up, 2 timed, 1 that ends the last timed step

    op = {r["method"]: r for r in report["op"]}
    assert list(op) == OP_METHODS
    for method in OP_METHODS:
        r = op[method]
        if method == "liger-fused-dpo" and "skipped" in r:
            continue  # liger-kernel is not a dependency
        assert r["median_s"] > 0 and r["peak_extra_mib"] >= 0, r

    context = report["context"]
    assert [(r["T"], r["cp"]) for r in context] == [(256, 1), (256, 2)]
    for r in context:
        assert r["seconds"] > 0 and r["peak_mib"] >= 0 and r["kept_mib"] > 0, r
    # what autograd keeps per rank falls with CP (the same deterministic bytes on every run)
    assert context[1]["kept_mib"] < 0.8 * context[0]["kept_mib"]

    rows = report["table"]
    assert len(rows) == 1 + len(train) + len(OP_METHODS) + len(context)
    assert {row["part"] for row in rows} == {"tests", "train", "op", "context"}
    assert all(set(row) == set(rows[0]) for row in rows)
