"""Runs that last: an incomplete checkpoint, evaluation, the live reference, SFT then DPO, time-outs."""

import json
import math
import time
from pathlib import Path

import pytest
from distributed import gatedpo, run_distributed

from gatedpo_mega.config import load_config

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

BASE = [
    "model.num_layers=4", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=64", "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=3e-3",
    "train.warmup_steps=1", "train.reference_batch_size=8", "data.builtin_pairs=120", "data.max_length=64",
    "data.max_prompt_length=40", "data.eval_fraction=0.2",
]  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _train_worker(rank, world, overrides, out):
    from gatedpo_mega.training.data import make_run_data
    from gatedpo_mega.training.loop import train

    history = train(load_config(None, overrides), make_run_data)
    if rank == 0:
        Path(out).write_text(json.dumps(history))


def run(world, extra, cache, tmp_path, name):
    out = tmp_path / f"{name}.json"
    overrides = [*BASE, f"data.cache_dir={cache}", f"train.output_dir={tmp_path / name}", *extra]
    run_distributed(_train_worker, world, overrides, str(out))
    return json.loads(out.read_text())


def test_an_incomplete_checkpoint_is_never_resumed_from(cache, tmp_path):
    out = tmp_path / "run"
    args = ["train", *BASE, f"data.cache_dir={cache}", "train.max_steps=2", "train.save_every=1",
            f"train.output_dir={out}"]  # fmt: skip
    assert gatedpo(1, *args).returncode == 0
    # A crash mid-write leaves a .tmp folder (here: step 3 without its meta.json) that must be ignored.
    (out / "checkpoints" / ".tmp-step-00000003" / "deepspeed").mkdir(parents=True)
    r = gatedpo(1, *args, "--resume", "train.max_steps=3", "train.keep_checkpoints=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step-00000002 (step 2)" in r.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]


def test_live_reference_gives_the_precomputed_losses(cache, tmp_path):
    extra = ["train.max_steps=3", "parallel.pipeline=2", "train.eval_every=2"]
    pre = run(2, extra, cache, tmp_path, "pre")
    live = run(2, [*extra, "train.reference=live"], cache, tmp_path, "live")
    assert [r["step"] for r in pre] == [0, 1, 2, 3]
    assert pre[1]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    for a, b in zip(pre, live, strict=True):
        for k in (
            "loss",
            "rewards/margins",
            "rewards/chosen",
            "grad_norm",
            "eval/loss",
            "eval/rewards/margins",
        ):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], k)
    assert "eval/loss" in pre[2] and "eval/loss" in pre[3] and "eval/loss" not in pre[1]


def test_eval_covers_every_held_out_pair_once_at_any_data_parallel_size(cache, tmp_path):
    # 3 eval micro-batches over 2 ranks: one rank runs a filler that must not be counted.
    extra = ["train.max_steps=2", "train.eval_every=1", "train.reference_batch_size=8"]
    one = run(1, extra, cache, tmp_path, "dp1")
    two = run(2, [*extra, "parallel.zero_stage=3"], cache, tmp_path, "dp2")
    # context parallelism, its reference and eval log-probs computed at CP 2 (a cache of its own)
    cp = run(
        2, [*extra, "parallel.context=2", f"data.cache_dir={tmp_path / 'cp-cache'}"], cache, tmp_path, "cp2"
    )
    for a, b in [*zip(one, two, strict=True), *zip(one, cp, strict=True)]:
        for k in (
            "eval/loss",
            "eval/rewards/accuracies",
            "eval/logps/chosen",
            "eval/squeeze/entropy_rejected",
        ):
            assert b[k] == pytest.approx(a[k], rel=2e-5, abs=1e-6), (a["step"], k)
    assert one[0]["eval/loss"] == pytest.approx(math.log(2.0), abs=1e-6)  # step 0: policy = reference
    assert 0 < abs(one[1]["eval/loss"] - math.log(2.0)) < 0.02  # one small step from the reference


def test_sft_extended_then_gate_dpo_from_its_checkpoint(cache, tmp_path):
    sft = run(2, ["objective.name=sft_extended", "gate.shape=none", "train.max_steps=4", "parallel.tensor=2",
                  "train.lr=1e-2"], cache, tmp_path, "sft")  # fmt: skip
    assert sft[-1]["loss"] < sft[0]["loss"]
    assert "rewards/margins" not in sft[0] and "logps/chosen" in sft[0]
    first = sft[0][
        "loss"
    ]  # the mean NLL per token of chosen and rejected: about log(vocab) at initialisation
    assert 2.0 < first < 10.0
    init = f"model.init_from={tmp_path / 'sft'}"
    dpo = run(2, ["train.max_steps=2", "parallel.tensor=2", init], cache, tmp_path, "dpo")
    fresh = run(2, ["train.max_steps=1", "parallel.tensor=2"], cache, tmp_path, "fresh")
    assert dpo[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)  # policy = reference = the SFT model
    assert dpo[0]["logps/chosen"] > fresh[0]["logps/chosen"] + 1.0  # the SFT weights were loaded
    # At another layout the checkpoint is resharded on the way in: the same model, the same first step.
    other = run(1, ["train.max_steps=1", init], cache, tmp_path, "dpo-tp1")
    for k in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
        assert other[0][k] == pytest.approx(dpo[0][k], rel=1e-5), k


def test_sft_refuses_a_gate():
    with pytest.raises(Exception, match=r"objective.name=sft has none, set gate.shape=none"):
        load_config(None, ["objective.name=sft"])


def _hanging_data(cfg, layout):
    from gatedpo_mega.training.data import make_run_data

    data = make_run_data(cfg, layout)
    if layout.rank == 1:
        real = data.steps

        class Stuck:
            num_micro_batches = real.num_micro_batches

            def __init__(self):
                self.calls = 0

            def __next__(self):
                self.calls += 1
                if self.calls == 2:
                    time.sleep(3600)  # a rank that hangs in step 2
                return next(real)

        data.steps = Stuck()
    return data


def test_a_hanging_rank_times_out_and_the_launcher_names_the_failed_rank(cache, tmp_path, capfd):
    from gatedpo_mega.training.launch import launch

    cfg = load_config(None, [*BASE, f"data.cache_dir={cache}", f"train.output_dir={tmp_path}", "train.max_steps=3",
                             "train.collective_timeout_minutes=0.1", "data.eval_fraction=0"])  # fmt: skip
    from gatedpo_mega.data import load_preference_data

    load_preference_data(cfg.data, seed=cfg.train.seed)  # tokenized now: the ranks' start-up stays under 6 s
    t0 = time.monotonic()
    code = launch(cfg, 2, make_data=_hanging_data)
    assert code == 4
    assert time.monotonic() - t0 < 120
    err = capfd.readouterr().err
    assert (
        "gatedpo: error: rank 0: a collective waited longer than train.collective_timeout_minutes=0.1" in err
    )
    assert "gatedpo: rank 0 failed (exit 4); the other ranks were stopped" in err
