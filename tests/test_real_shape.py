"""``tools/real_shape.py`` at a reduced size: the whole chain of the Qwen2.5-0.5B-shaped run (Hugging Face folder in
bf16 -> ``hf-to-mcore`` at tensor 2 -> 3 Gate-DPO steps in bf16 at tensor 2 on 2 processes, HH-RLHF sample and
its 8,000-piece tokenizer -> ``zero-to-hf`` -> transformers' logits equal the trained megatron-core model's), with
2 layers, 224 hidden (the 14 heads in 2 key/value groups kept, 16 channels each), FFN 608 and a vocabulary of
12,000 (padded for tensor 2, larger than the tokenizer's)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
HH = SHARED_DATA / "hh-rlhf" / "harmless-base-test-2000.jsonl.gz"
SMALL = ["--layers", "2", "--hidden", "224", "--ffn", "608", "--vocab", "12000"]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.skipif(not HH.is_file(), reason=f"shared HH-RLHF sample not found at {HH}")
def test_reduced_real_shape_chain(tmp_path: Path) -> None:
    out = tmp_path / "rs"
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "real_shape.py"), "--out", str(out), *SMALL],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    res = json.loads((out / "real_shape.json").read_text())
    assert res["shape"]["num_hidden_layers"] == 2 and res["shape"]["vocab_size"] == 12000
    assert all(res["checks"].values()), res["checks"]
    # The same checks, from the numbers themselves.
    steps = res["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert steps[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-3)  # policy = reference, bf16
    assert all(math.isfinite(s["loss"]) for s in steps) and steps[-1]["loss"] != steps[0]["loss"]
    # The default gate (p < 0.01 / V) leaves a random model's rejected tokens alone at this vocabulary, where a fixed
    # p < 1e-4 would close on most of them (1 / 12,000 = 8.3e-5).
    assert steps[0]["gate/frac_attenuated"] < 0.01
    assert res["weights"]["export_equals_module"] and res["weights"]["export_dtype"] == "bfloat16"
    moved = res["weights"]["elements_moved"] / res["weights"]["elements"]
    assert moved > 0.1  # the export is the trained model, not the initial one
    logits = res["logits"]["transformers_vs_megatron"]
    assert logits["fp32"]["rel_max"] <= 1e-5  # same weights, both in fp32: fp32 rounding only
    assert logits["bf16"]["rel_max"] <= 2.0**-4  # bf16 compute on both sides
    assert logits["bf16"]["top1_agree"] >= 0.9
    assert res["logits"]["rows"] == [4, 128] and res["peak_mib_max_rank"] > 0
    config = json.loads((out / "hf_export" / "config.json").read_text())
    assert (config["model_type"], config["vocab_size"], config["dtype"]) == ("qwen2", 12000, "bfloat16")
    meta = json.loads((out / "mcore" / "gatedpo_mcore.json").read_text())
    assert (meta["tensor"], meta["padded_vocab_size"]) == (2, 12032)
