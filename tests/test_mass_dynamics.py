"""The mass-dynamics pipeline end to end, scaled down: tokenizer, extended SFT, arms x seeds, sweep, TP check,
report; and a second invocation that finds every run done."""

from pathlib import Path

import pytest
import yaml

from gatedpo_mega.experiments.mass_dynamics import load_spec, pick_default, run_experiment

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

HH = (
    Path(__file__).resolve().parents[1]
    / ".."
    / "shared"
    / "data"
    / "hh-rlhf"
    / "harmless-base-test-2000.jsonl.gz"
)


def _spec(tmp_path: Path, source: str) -> Path:
    tiny = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
            "model.ffn_hidden_size=64"]  # fmt: skip
    spec = {
        "output_dir": str(tmp_path / "md"),
        "tokenizer_vocab_size": 400,
        "seeds": [1, 2],
        "base": [
            f"data.source={source}",
            "data.max_length=48",
            "data.max_prompt_length=24",
            "data.eval_fraction=0.05",
            "train.micro_batch_size=4",
            "train.global_batch_size=8",
            "train.reference_batch_size=32",
            "train.eval_every=2",
            "train.eval_max_pairs=32",
            "train.warmup_steps=1",
            "model.max_position_embeddings=64",
            *([] if source == "builtin" else ["data.format=hh"]),
        ],
        "sft": ["objective.name=sft_extended", "gate.shape=none", "train.max_steps=2", "train.lr=3e-3"],
        "preference": ["train.max_steps=3", "train.lr=1e-3"],
        "arms": {"dpo": ["gate.shape=none"], "dpo+gate": ["gate.shape=sigmoid", "gate.tau=1e-2"]},
        "sizes": {"tiny": tiny},
        "sweep": {"hard": ["gate.shape=hard", "gate.tau=1e-2"]},
        "tensor_parallel_check": True,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_scaled_down_experiment_runs_end_to_end_and_tp2_rows_equal_tp1(tmp_path, capsys):
    source = str(HH) if HH.exists() else "builtin"  # the HH sample when present, else the built-in data
    spec = load_spec(_spec(tmp_path, source))
    report = run_experiment(spec)
    text = report.read_text()
    for section in ("## Arms, model size `tiny`", "## Gate sweep", "## Tensor parallelism"):
        assert section in text, section
    assert "Pick: **" in text or "no pick" in text
    out = Path(spec.output_dir)
    assert (out / "report" / "tiny" / "summary.md").exists()
    assert (out / "report" / "tiny" / "overview.png").read_bytes()[:4] == b"\x89PNG"
    import json

    tp1, tp2 = json.loads((out / "report" / "tp_check.json").read_text())
    for key in ("accuracy", "chosen_delta_per_token", "rejected_delta_per_token", "d_top1_rejected",
                "d_entropy_chosen", "frac_attenuated"):  # fmt: skip
        assert tp2[key]["mean"] == pytest.approx(tp1[key]["mean"], rel=1e-4, abs=1e-6), key
    capsys.readouterr()
    run_experiment(spec)  # again: every run is found done
    assert "train " not in capsys.readouterr().out.replace("done already", "")


def test_a_bad_spec_is_refused_with_its_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("arms: {dpo: []}\nsizes: {s: []}\nseed: [1]\n")
    with pytest.raises(Exception, match="unknown key 'seed'"):
        load_spec(path)


def _row(label, acc, chosen, top1, chosen_std=None):
    def stat(v, std=None):
        return {"mean": v, "std": std, "n": 3, "values": [v] * 3}

    return {"label": label, "accuracy": stat(acc), "chosen_delta_per_token": stat(chosen, chosen_std),
            "d_top1_rejected": stat(top1), "d_entropy_rejected": stat(0.0)}  # fmt: skip


def test_the_sweep_rule_keeps_accuracy_and_chosen_likelihood_then_least_squeezing():
    rows = [
        _row("gate=none", 0.60, -0.20, +0.03, chosen_std=0.02),
        _row("gate=a", 0.56, -0.10, 0.000),  # accuracy below 0.60 - 0.03: out
        _row("gate=b", 0.59, -0.23, 0.001),  # chosen below -0.20 - 0.02: out
        _row("gate=c", 0.58, -0.21, -0.010),
        _row("gate=d", 0.62, -0.15, +0.020),
    ]
    text = pick_default(rows)
    assert "Pick: **gate=c**" in text and "2 of 4 gates are eligible" in text
    assert "no pick" in pick_default([_row("gate=sigmoid", 0.5, 0.0, 0.0)])
