"""The squeeze demonstration: the directions measured across seeds (see docs and `gatedpo squeeze`)."""

import pytest
import torch

from gatedpo_mega.cli import main
from gatedpo_mega.gate import GateConfig
from gatedpo_mega.squeeze import SqueezeConfig, run_squeeze

GATES = ("sigmoid", "hard", "power")


@pytest.fixture(scope="module")
def rows():
    cfg = SqueezeConfig(rejected_probs=[0.2, 1e-6], seeds=32, steps=200, shapes=["none", *GATES])
    out = run_squeeze(cfg, GateConfig(signal="absolute", tau=1e-4))
    return {(r["rejected_prob"], r["shape"]): r for r in out}


def _v(row, key):
    return torch.tensor(row[key]["values"])


def test_plain_dpo_concentrates_mass_when_the_rejected_label_is_very_unlikely(rows):
    dpo = rows[(1e-6, "none")]
    top1, ent = _v(dpo, "top1_rejected_ctx"), _v(dpo, "entropy_rejected_ctx")
    assert top1.mean() > 0.05 and (top1 > 0).float().mean() >= 0.75
    assert ent.mean() < -0.1 and (ent < 0).float().mean() >= 0.75


@pytest.mark.parametrize("shape", GATES)
def test_the_gate_reduces_that_concentration_and_keeps_more_chosen_mass(rows, shape):
    dpo, gated = rows[(1e-6, "none")], rows[(1e-6, shape)]
    d_top1 = _v(gated, "top1_rejected_ctx") - _v(dpo, "top1_rejected_ctx")
    assert d_top1.mean() < -0.05 and (d_top1 < 0).float().mean() >= 0.8
    assert (_v(gated, "entropy_rejected_ctx") - _v(dpo, "entropy_rejected_ctx")).mean() > 0.1
    assert (_v(gated, "p_chosen") - _v(dpo, "p_chosen")).mean() > 0.05


@pytest.mark.parametrize("shape", GATES)
def test_in_the_ordinary_regime_the_gate_changes_little(rows, shape):
    dpo, gated = rows[(0.2, "none")], rows[(0.2, shape)]
    for key in ("top1_rejected_ctx", "entropy_rejected_ctx", "p_chosen", "top1_other_chosen_ctx"):
        assert (_v(gated, key) - _v(dpo, key)).abs().max() < 0.01, key


def test_cli_writes_table_plot_and_json(tmp_path, capsys):
    out = tmp_path / "sq"
    rc = main(
        [
            "squeeze",
            f"squeeze.output_dir={out}",
            "squeeze.seeds=2",
            "squeeze.steps=3",
            "squeeze.rejected_probs=[0.1]",
            "squeeze.shapes=[none, hard]",
        ]
    )
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {"config.yaml", "squeeze.json", "squeeze.md", "squeeze.png"}
    assert "| 1e-01 | hard |" in (out / "squeeze.md").read_text()
