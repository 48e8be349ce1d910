"""``tools/faults.py --quick``: every injected fault (kills, damaged checkpoints, a full disk, corrupted data, hostile
config values, non-finite training) ends in one clear line or a correct result, never in a traceback or a wrong
result. A fault whose handling regresses makes this fail, naming the case."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def test_quick_fault_injection_ends_in_no_traceback_or_wrong_result(tmp_path):
    report = tmp_path / "faults.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "faults.py"), "--quick", "--json", str(report),
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=1800,
    )  # fmt: skip
    assert report.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(report.read_text())["rows"]
    assert {r["key"] for r in rows} == {
        "kills", "damage", "damage_strict", "fsize", "tmpfs", "data_error", "data_skip", "config", "config_train",
        "nonfinite",
    }  # fmt: skip
    assert all(r["cases"] or r["not_run"] for r in rows if r["key"] != "config_train"), rows
    failures = {
        r["title"]: [(c["name"], c["detail"], c["stderr_tail"][-1000:]) for c in r["failures"]]
        for r in rows
        if r["counts"]["failure"]
    }
    assert not failures, json.dumps(failures, indent=1)
    assert proc.returncode == 0, proc.stdout[-3000:]
