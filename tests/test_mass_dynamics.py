"""The mass-dynamics pipeline end to end, scaled down: tokenizer, extended SFT, arms x seeds, sweep, TP check,
report; and a second invocation that finds every run done."""

import math
from pathlib import Path

import pytest

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


ROOT = Path(__file__).resolve().parents[1]


def _spec(tmp_path: Path, source: str):
    """configs/gate_vs_field.yaml scaled down: a tiny model, 3 preference steps, 1 seed, four of its arms (plain
    DPO, the seq gate, DPO-Shift with the q10 gate, the SFT control), a second start, two sweep points."""
    spec = load_spec(ROOT / "configs" / "gate_vs_field.yaml", [f"output_dir={tmp_path / 'md'}"])
    spec.tokenizer_vocab_size = 400
    spec.seeds = [1]
    spec.base = [
        f"data.source={source}", "data.max_length=48", "data.max_prompt_length=24", "data.eval_fraction=0.05", "train.micro_batch_size=4", "train.global_batch_size=8",
        "train.reference_batch_size=32", "train.eval_max_pairs=32", "train.warmup_steps=1", "train.report_to=none",
        "model.max_position_embeddings=64", *([] if source == "builtin" else ["data.format=hh"]),
    ]  # fmt: skip
    sft = ["gate.shape=none", "train.max_steps=2", "train.lr=3e-3", "train.eval_every=2"]
    spec.starts = {"sft": ["objective.name=sft", *sft], "ext": ["objective.name=sft_extended", *sft]}
    spec.start_arms = {"ext": ["dpo+seq"]}
    spec.preference = [
        "train.max_steps=3", "train.eval_every=1", "train.lr=1e-3", "data.max_train_pairs=24", "data.probe_pairs=5",
    ]  # fmt: skip
    spec.arms = {a: spec.arms[a] for a in ("dpo", "dpo+seq", "dpo_shift+q10", "sft-continued")}
    spec.sizes = {"tiny": ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
                           "model.num_query_groups=2", "model.ffn_hidden_size=64"]}  # fmt: skip
    spec.sweep = {k: spec.sweep[k] for k in ("seq-0.008", "hard-0.01")}  # seq-0.008 is the dpo+seq arm
    return spec


def test_scaled_down_experiment_runs_end_to_end_and_tp2_rows_equal_tp1(tmp_path, capsys):
    source = str(HH) if HH.exists() else "builtin"  # the HH sample when present, else the built-in data
    spec = _spec(tmp_path, source)
    report = run_experiment(spec)
    text = report.read_text()
    for section in ("## The SFT checkpoints", "## Arms, model size `tiny`, from `sft`",
                    "## Arms, model size `tiny`, from `ext`", "## Gate sweep", "## Tensor parallelism"):  # fmt: skip
        assert section in text, section
    assert "Pick: **" in text or "no pick" in text
    # the spec's names label every row: arms, the sweep point that is an arm (both names), the TP check
    assert "| gate | seeds | eval acc. | Δ chosen | Δ rejected | margin | Δ others |" in text
    for label in ("dpo", "dpo+seq", "dpo_shift+q10", "sft-continued", "dpo+seq = seq-0.008", "hard-0.01",
                  "dpo+seq TP 1", "dpo+seq TP 2"):  # fmt: skip
        assert f"\n| {label} | " in text, label
    out = Path(spec.output_dir)
    assert (out / "report" / "tiny-sft" / "summary.md").exists()
    assert (out / "report" / "tiny-sft" / "overview.png").read_bytes()[:4] == b"\x89PNG"
    # the ext start runs only the arm start_arms names; the sweep point equal to an arm is that arm's run
    assert (
        not (out / "tiny" / "ext" / "dpo").exists() and (out / "tiny" / "ext" / "dpo+seq" / "seed1").is_dir()
    )
    assert not (out / "tiny" / "sweep" / "seq-0.008").exists()
    assert (out / "tiny" / "sweep" / "hard-0.01" / "seed1").is_dir()
    import json

    sft = json.loads((out / "report" / "sft.json").read_text())
    assert set(sft) == {"tiny/sft", "tiny/ext"}
    for row in sft.values():  # an SFT model of the eval text: better than a uniform guess over the vocabulary
        assert (
            1 < row["perplexity"] < 600 and 0 < row["entropy"] < math.log(400) + 0.1 and row["parameters"] > 0
        )
    tp1, tp2 = json.loads((out / "report" / "tp_check.json").read_text())
    for key in ("accuracy", "chosen_delta_per_token", "rejected_delta_per_token", "d_top1_rejected",
                "d_entropy_chosen", "frac_attenuated", "d_chosen", "d_rejected", "margin", "d_others",
                "d_others_per_token"):  # fmt: skip
        assert tp2[key]["mean"] == pytest.approx(tp1[key]["mean"], rel=1e-4, abs=1e-6), key
    # Δ chosen / rejected / others: last evaluation minus the first, of the logged sums, recomputed here
    run = out / "tiny" / "sft" / "dpo_shift+q10" / "seed1"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/logps/chosen" in r]
    assert [r["step"] for r in evals] == [0, 1, 2, 3] and all("eval/probe/logps/chosen" in r for r in evals)
    mine = json.loads((out / "report" / "tiny-sft" / "summary.json").read_text())
    row = next(r for r in mine["rows"] if r["label"] == "dpo_shift+q10")
    first, last = evals[0], evals[-1]
    want = last["eval/probe/logps/chosen"] - first["eval/probe/logps/chosen"]
    assert row["d_others"]["values"][0] == pytest.approx(want, rel=1e-12)
    want = (last["eval/logps/chosen"] - first["eval/logps/chosen"]) - (
        last["eval/logps/rejected"] - first["eval/logps/rejected"]
    )
    assert row["margin"]["values"][0] == pytest.approx(want, rel=1e-12)
    # the control arm is SFT: no reference metrics, and still its Δ chosen
    control = next(r for r in mine["rows"] if r["label"] == "sft-continued")
    assert control["chosen_delta_per_token"] is None and control["d_chosen"]["n"] == 1
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
    text = pick_default({"small": small, "large": large}, plain="gate=none")
    assert "Pick: **gate=d**" in text and "2 of 5 gates are eligible at every size" in text
    assert "Pick: **gate=e**" in pick_default(
        {"small": small}, plain="gate=none"
    )  # small alone: e (0.005) beats c (0.010)
    assert "no pick" in pick_default(
        {"small": [_row("gate=none", 0.6, 0.0, 0.0), _row("gate=x", 0.5, 0.0, 0.0)]}, plain="gate=none"
    )
    assert "No plain row (dpo)" in pick_default({"small": [_row("gate=sigmoid", 0.5, 0.0, 0.0)]})


def test_the_chosen_rule_keeps_accuracy_at_every_size_then_the_largest_chosen_change_at_the_worst_size():
    def row(label, acc, d_chosen):
        return {
            **_row(label, acc, 0.0, 0.0),
            "d_chosen": {"mean": d_chosen, "std": None, "n": 3, "values": []},
        }

    small = [row("dpo", 0.60, -5.0), row("seq-a", 0.57, +1.0), row("seq-b", 0.58, +0.5), row("hard", 0.60, -4.0),
             row("q10 = dpo+q10", 0.62, +2.0)]  # fmt: skip
    large = [row("dpo = none", 0.70, -9.0), row("seq-a", 0.70, +3.0), row("seq-b", 0.69, +0.8),
             row("hard", 0.70, -8.0), row("q10 = dpo+q10", 0.66, +4.0)]  # fmt: skip
    text = pick_default({"small": small, "large": large}, plain="dpo", rule="chosen")
    # q10 is out at large (0.66 < 0.67); seq-a's worst size gives +1.0, seq-b's +0.5, hard's -8.0
    assert "3 of 4 gates are eligible at every size" in text and "Pick: **seq-a**" in text, text
    assert "seq-a (+1), seq-b (+0.5), hard (-8)" in text, text


def test_a_finished_run_stays_itself_when_a_default_it_never_read_changes():
    from gatedpo_mega.config import load_config
    from gatedpo_mega.experiments.mass_dynamics import _same_run

    hard = ["gate.shape=hard", "gate.signal=uniform", "gate.tau=0.01"]
    assert _same_run(
        load_config(None, [*hard, "gate.slope=100", "gate.quantile=0.2"]), load_config(None, hard)
    )
    assert _same_run(
        load_config(None, ["gate.shape=none", "gate.tau=0.5"]), load_config(None, ["gate.shape=none"])
    )
    assert not _same_run(load_config(None, ["gate.slope=100"]), load_config(None, []))  # psigmoid reads slope
    assert not _same_run(
        load_config(None, ["gate.quantile=0.2"]), load_config(None, [])
    )  # q10 reads quantile
    assert not _same_run(load_config(None, [*hard, "gate.tau=0.02"]), load_config(None, hard))
