"""The main job (``configs/demo.yaml``, run by ``tools/quickstart.sh``): its SFT start point puts the built-in
off-policy rejected tokens below the gate's threshold, so Gate-DPO gates them from its first step while plain DPO
gates nothing; the report compares the two arms and ends with where its outputs are. One process at tensor 1 x
pipeline 1 here (the job itself runs tensor 2 x pipeline 2; layouts agree by tests/test_training.py), and three
preference steps instead of thirty."""

import json
import math
from pathlib import Path

import pytest
import yaml

from gatedpo_mega.data import builtin
from gatedpo_mega.experiments.mass_dynamics import load_spec, run_experiment

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def test_off_policy_pairs_keep_the_pairs_and_hedge_only_the_rejected_response():
    plain, mixed = builtin.generate(200, 0), builtin.generate(200, 0, 0.5)
    assert [(e.prompt, e.chosen) for e in plain] == [(e.prompt, e.chosen) for e in mixed]
    hedged = [m for p, m in zip(plain, mixed, strict=True) if p.rejected != m.rejected]
    assert 70 < len(hedged) < 130  # about half
    assert all(any(m.rejected.startswith(" " + h) for h in builtin.HEDGES) for m in hedged)
    assert not any(e.chosen.startswith(" " + h) for e in mixed for h in builtin.HEDGES)
    assert builtin.generate(200, 0, 0.0) == plain


def test_the_main_job_gates_the_off_policy_tokens_and_reports_both_arms(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the spec names configs/quickstart.yaml as a path from the checkout
    spec_tree = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    base = [
        *spec_tree["base"],
        "parallel.tensor=1",
        "parallel.pipeline=1",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    preference = [*spec_tree["preference"], "train.max_steps=3", "train.eval_every=3"]
    spec = load_spec(
        ROOT / "configs" / "demo.yaml",
        [f"output_dir={tmp_path / 'out'}", "nproc=1", f"base={json.dumps(base)}",
         f"preference={json.dumps(preference)}"],
    )  # fmt: skip
    report = run_experiment(spec)
    out = Path(spec.output_dir)

    def rows(arm: str) -> list[dict]:
        path = out / "tiny" / "sft" / arm / "seed1" / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    dpo, gated = rows("dpo"), rows("gate-dpo")
    assert dpo[1]["step"] == gated[1]["step"] == 1
    assert dpo[1]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert dpo[1]["loss"] == gated[1]["loss"]  # the gate leaves the loss value alone
    assert all(r["gate/frac_attenuated"] == 0.0 for r in dpo[1:])
    # After SFT on the chosen responses, hedge tokens of off-policy rejected responses are below the default gate's
    # p < 0.01 / V (2e-5 at the built-in vocabulary of 512): a few percent of the rejected tokens.
    assert gated[1]["gate/frac_attenuated"] > 0.02
    assert dpo[2]["loss"] != gated[2]["loss"]  # the gradients differed at step one
    table = report.read_text()
    assert "\n| dpo | 1 |" in table and "\n| gate-dpo | 1 |" in table  # the spec's arm names
    assert (out / "report" / "tiny-sft" / "overview.png").read_bytes()[:4] == b"\x89PNG"
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("[demo] the report: ") and str(report) in last
