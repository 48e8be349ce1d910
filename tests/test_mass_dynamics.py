"""The mass-dynamics pipeline end to end, scaled down: tokenizer, extended SFT, arms x seeds, sweep, TP check,
report; and a second invocation that finds every run done."""

import math
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
        "starts": {
            "sft": ["objective.name=sft", "gate.shape=none", "train.max_steps=2", "train.lr=3e-3"],
            "ext": ["objective.name=sft_extended", "gate.shape=none", "train.max_steps=2", "train.lr=3e-3"],
        },
        "start_arms": {"ext": ["dpo+gate"]},
        "preference": ["train.max_steps=3", "train.lr=1e-3", "data.max_train_pairs=24"],
        "arms": {"dpo": ["gate.shape=none"], "dpo+gate": ["gate.shape=sigmoid", "gate.tau=1e-2"]},
        "sizes": {"tiny": tiny},
        # hard-0.01 is the default gate; sigmoid-0.01 is the dpo+gate arm's config, whose runs it reuses
        "sweep": {
            "hard-0.01": ["gate.shape=hard", "gate.tau=0.01"],
            "sigmoid-0.01": ["gate.shape=sigmoid", "gate.tau=1e-2"],
        },
        "tensor_parallel_check": True,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))  # the first start hosts the sweep
    return path


def test_scaled_down_experiment_runs_end_to_end_and_tp2_rows_equal_tp1(tmp_path, capsys):
    source = str(HH) if HH.exists() else "builtin"  # the HH sample when present, else the built-in data
    spec = load_spec(_spec(tmp_path, source))
    report = run_experiment(spec)
    text = report.read_text()
    for section in ("## The SFT checkpoints", "## Arms, model size `tiny`, from `sft`",
                    "## Arms, model size `tiny`, from `ext`", "## Gate sweep", "## Tensor parallelism"):  # fmt: skip
        assert section in text, section
    assert "Pick: **" in text or "no pick" in text
    out = Path(spec.output_dir)
    assert (out / "report" / "tiny-sft" / "summary.md").exists()
    assert (out / "report" / "tiny-sft" / "overview.png").read_bytes()[:4] == b"\x89PNG"
    # the ext start runs only the arm start_arms names; the sweep point equal to an arm is that arm's run
    assert (
        not (out / "tiny" / "ext" / "dpo").exists() and (out / "tiny" / "ext" / "dpo+gate" / "seed1").is_dir()
    )
    assert not (out / "tiny" / "sweep" / "sigmoid-0.01").exists()
    assert (out / "tiny" / "sweep" / "hard-0.01" / "seed2").is_dir()
    import json

    sft = json.loads((out / "report" / "sft.json").read_text())
    assert set(sft) == {"tiny/sft", "tiny/ext"}
    for row in sft.values():  # an SFT model of the eval text: better than a uniform guess over the vocabulary
        assert (
            1 < row["perplexity"] < 600 and 0 < row["entropy"] < math.log(400) + 0.1 and row["parameters"] > 0
        )
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


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("starts: {sft: []}\narms: {dpo: []}\nsizes: {s: []}\nstart_arms: {ext: [dpo]}\n",
         "start_arms names start 'ext', not one of the starts"),
        ("starts: {sft: []}\narms: {dpo: []}\nsizes: {s: []}\nstart_arms: {sft: [ipo]}\n",
         "start_arms.sft names ipo, not arms"),
        ("arms: {dpo: []}\nsizes: {s: []}\n", "arms, sizes, starts and seeds must not be empty"),
    ],
)  # fmt: skip
def test_start_refusals_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(Exception, match=message):
        load_spec(path)


def _row(label, acc, chosen, top1, chosen_std=None):
    def stat(v, std=None):
        return {"mean": v, "std": std, "n": 3, "values": [v] * 3}

    return {"label": label, "accuracy": stat(acc), "chosen_delta_per_token": stat(chosen, chosen_std),
            "d_top1_rejected": stat(top1), "d_entropy_rejected": stat(0.0)}  # fmt: skip


def test_the_sweep_rule_keeps_accuracy_and_chosen_likelihood_at_every_size_then_least_squeezing():
    small = [
        _row("gate=none", 0.60, -0.20, +0.03, chosen_std=0.02),
        _row("gate=a", 0.56, -0.10, 0.000),  # accuracy below 0.60 - 0.03: out
        _row("gate=b", 0.59, -0.23, 0.001),  # chosen below -0.20 - 0.02: out
        _row("gate=c", 0.58, -0.21, -0.010),
        _row("gate=d", 0.62, -0.15, +0.020),
        _row("gate=e", 0.60, -0.20, +0.005),
    ]
    large = [
        _row("gate=none", 0.70, -0.30, +0.04, chosen_std=0.01),
        _row("gate=a", 0.70, -0.30, 0.000),
        _row("gate=b", 0.70, -0.30, 0.000),
        _row("gate=c", 0.70, -0.30, -0.030),  # its worst size: 0.030
        _row("gate=d", 0.70, -0.30, +0.010),  # its worst size: 0.020
        _row("gate=e", 0.60, -0.30, +0.001),  # accuracy below 0.70 - 0.03 at this size: out
    ]
    text = pick_default({"small": small, "large": large})
    assert "Pick: **gate=d**" in text and "2 of 5 gates are eligible at every size" in text
    assert "Pick: **gate=e**" in pick_default({"small": small})  # small alone: e (0.005) beats c (0.010)
    assert "no pick" in pick_default(
        {"small": [_row("gate=none", 0.6, 0.0, 0.0), _row("gate=x", 0.5, 0.0, 0.0)]}
    )
    assert "no pick" in pick_default({"small": [_row("gate=sigmoid", 0.5, 0.0, 0.0)]})
