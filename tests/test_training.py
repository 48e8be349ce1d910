"""Gate-DPO training on megatron-core + DeepSpeed: the same numbers at every layout.

Short deterministic runs on the built-in data, compared step by step (loss, gradient norm, metrics) with
tensor 1 x pipeline 1 on one process.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed import run_distributed

from gatedpo_mega.config import load_config
from gatedpo_mega.data.batch import PreferenceBatch
from gatedpo_mega.loss import LossContext, NonFiniteLossError, preference_loss_func
from gatedpo_mega.training.step import check_losses

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

BASE = [
    "model.num_layers=4", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=64", "train.max_steps=3", "train.micro_batch_size=2", "train.global_batch_size=8",
    "train.lr=3e-3", "train.warmup_steps=1", "train.reference_batch_size=8", "data.builtin_pairs=96",
    "data.max_length=64", "data.max_prompt_length=40", "data.eval_fraction=0",
]  # fmt: skip
# Accuracy is left out: at step one every margin is ~1e-8 and its sign is rounding noise.
COMPARED = ("loss", "grad_norm", "rewards/margins", "logps/chosen", "gate/mean", "squeeze/entropy_rejected")


def _train_worker(rank, world, overrides, out):
    from gatedpo_mega.training.data import make_run_data
    from gatedpo_mega.training.loop import train

    history = train(load_config(None, overrides), make_run_data)
    if rank == 0:
        Path(out).write_text(json.dumps(history))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def run(world, extra, cache, tmp_path, name):
    out = tmp_path / f"{name}.json"
    overrides = [*BASE, f"data.cache_dir={cache}", f"train.output_dir={tmp_path / name}", *extra]
    run_distributed(_train_worker, world, overrides, str(out))
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def baseline(cache, tmp_path_factory):
    return run(1, [], cache, tmp_path_factory.mktemp("base"), "tp1pp1")


def _same(a, b, rel=2e-5):
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        for k in COMPARED:
            assert ra[k] == pytest.approx(rb[k], rel=rel, abs=1e-6), (ra["step"], k)


def test_step_one_is_ln2_and_metrics_file_has_the_design_keys(baseline, tmp_path_factory):
    assert baseline[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert baseline[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert baseline[-1]["loss"] != baseline[0]["loss"]  # it trains
    out = next(Path(tmp_path_factory.getbasetemp()).glob("base*/tp1pp1/metrics.jsonl"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("step", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "gate/mean", "gate/frac_attenuated", "squeeze/top1_rejected",
                "squeeze/entropy_rejected", "tokens_per_second"):  # fmt: skip
        assert key in rows[0], key


@pytest.mark.parametrize(
    ("world", "extra"),
    [
        (2, ["parallel.tensor=2"]),
        (2, ["parallel.pipeline=2"]),
        (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
        (2, ["parallel.zero_stage=1"]),
        (2, ["parallel.zero_stage=2"]),
        (2, ["parallel.zero_stage=3"]),
        (1, ["train.micro_batch_size=1"]),  # 1 pair x 8 accumulation steps
        (2, ["train.micro_batch_size=4", "parallel.zero_stage=2"]),  # 4 pairs x 1 step x DP 2
        (1, ["model.fused_logprobs=false"]),  # materialised logits + token_logprobs
        (2, ["model.fused_logprobs=false", "parallel.tensor=2"]),
        (1, ["model.fused_objective=true"]),  # the loss inside the output layer, three matmuls
        (4, ["model.fused_objective=true", "parallel.tensor=2", "parallel.pipeline=2"]),
        (2, ["model.fused_objective=true", "parallel.zero_stage=2"]),
        (4, ["model.recompute=full", "parallel.tensor=2", "parallel.pipeline=2"]),  # activation recomputation
        (2, ["model.recompute=full", "parallel.zero_stage=3", "data.packing=true"]),
        (
            2,
            ["parallel.context=2", "train.reference=live", "parallel.zero_stage=3"],
        ),  # context parallelism (test_context.py: attention)
        (4, ["parallel.context=2", "parallel.tensor=2", "model.fused_logprobs=false"]),
        (
            4,
            ["parallel.context=2", "parallel.pipeline=2", "data.packing=true"],
        ),  # packed CP 2 = unpacked CP 1
        (4, ["parallel.context=2", "parallel.zero_stage=2"]),  # DP 2 x CP 2: DeepSpeed sums over CP
    ],
    ids=[
        "tp2",
        "pp2",
        "tp2pp2",
        "dp2-zero1",
        "dp2-zero2",
        "dp2-zero3",
        "mbs1-acc8",
        "mbs4-dp2-zero2",
        "unfused",
        "unfused-tp2",
        "fused-objective",
        "fused-objective-tp2pp2",
        "fused-objective-dp2-zero2",
        "recompute-tp2pp2",
        "recompute-packed-dp2-zero3",
        "cp2-live-zero3",
        "cp2-tp2-unfused",
        "cp2-pp2-packed",
        "cp2-dp2-zero2",
    ],
)
def test_layouts_match_tp1_pp1(world, extra, baseline, cache, tmp_path):
    _same(run(world, extra, cache, tmp_path, "run"), baseline)


def test_the_published_gate_and_dpo_shift_are_the_same_at_tp2_pp2_packed_and_cp2(cache, tmp_path):
    """One sigmoid in probability per rejected response (q10: a quantile of its token probabilities) on DPO-Shift
    with lambda moving over the run: every layout computes the per-response statistic from whole rows, so the
    numbers are TP 1 x PP 1's."""
    published = ["objective.name=dpo_shift", "objective.shift_lambda=0.7", "objective.shift_lambda_end=1.0",
                 "gate.shape=psigmoid", "gate.signal=q10", "gate.tau=0.002", "gate.slope=500"]  # fmt: skip
    base = run(1, published, cache, tmp_path, "published")
    assert base[0]["loss"] == pytest.approx(
        math.log(2.0), abs=1e-6
    )  # policy = reference: lambda does not matter
    assert 0.05 < base[0]["gate/mean"] < 0.95  # the gate is partly closed: the case tests it
    _same(
        run(4, [*published, "parallel.tensor=2", "parallel.pipeline=2"], cache, tmp_path, "published-tp2pp2"),
        base,
    )
    _same(
        run(
            2, [*published, "data.packing=true", "parallel.zero_stage=2"], cache, tmp_path, "published-packed"
        ),
        base,
    )
    # context parallelism: the quantile of each rejected response from the statistics gathered over CP
    _same(
        run(2, [*published, "data.packing=true", "parallel.context=2"], cache, tmp_path, "published-cp2"),
        base,
    )
    plain = run(1, ["objective.name=dpo_shift", "objective.shift_lambda=0.7", "objective.shift_lambda_end=1.0",
                    "gate.shape=none"], cache, tmp_path, "shift")  # fmt: skip
    assert plain[0]["loss"] == base[0]["loss"] and plain[-1]["loss"] != base[-1]["loss"]  # the gradient moved


def test_tied_embeddings_across_pipeline_and_tensor_parallel(cache, tmp_path):
    tied = ["model.tie_embeddings=true"]
    base = run(1, tied, cache, tmp_path, "tied")
    _same(run(2, [*tied, "parallel.pipeline=2"], cache, tmp_path, "tied-pp2"), base)
    _same(run(2, [*tied, "parallel.tensor=2"], cache, tmp_path, "tied-tp2"), base)


def test_bf16_runs_agree_across_layouts_within_bf16_rounding(cache, tmp_path):
    bf16 = ["model.dtype=bf16"]
    base = run(1, bf16, cache, tmp_path, "bf16")
    # the reference is the policy to the bit (every copy of the model is cast to bf16, norms included), precomputed
    # or live (a second model built beside the one DeepSpeed trains)
    assert base[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-7)
    live = run(2, [*bf16, "train.reference=live", "parallel.tensor=2"], cache, tmp_path, "bf16-live")
    assert live[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-7)
    other = run(4, [*bf16, "parallel.tensor=2", "parallel.pipeline=2"], cache, tmp_path, "bf16-tp2pp2")
    for a, b in zip(base, other, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-3), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-2), a["step"]  # bf16: ~3 digits


def test_gate_that_never_closes_is_plain_dpo_to_the_bit(cache, tmp_path):
    plain = run(1, ["gate.shape=none"], cache, tmp_path, "plain")
    # tau = 1e-30: sigmoid((log p + 69) / 0.1) is exactly 1.0 in float32 for every token here.
    open_gate = run(
        1,
        ["gate.shape=sigmoid", "gate.signal=absolute", "gate.tau=1e-30", "gate.temperature=0.1"],
        cache,
        tmp_path,
        "open",
    )
    for a, b in zip(plain, open_gate, strict=True):
        for k in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/margins"):
            assert a[k] == b[k], (a["step"], k)
    assert open_gate[0]["gate/mean"] == 1.0
    closing = run(1, ["gate.shape=hard", "gate.signal=absolute", "gate.tau=0.02"], cache, tmp_path, "closing")
    assert closing[0]["loss"] == plain[0]["loss"]  # the value never changes ...
    assert closing[0]["gate/frac_attenuated"] > 0.05  # ... the gradient does
    assert closing[-1]["loss"] != plain[-1]["loss"]


def test_non_finite_loss_names_step_and_micro_batch():
    b = PreferenceBatch(
        torch.tensor([[1, 2, 3], [1, 2, 4]]), torch.tensor([[2, 3, -100], [2, 4, -100]]), torch.tensor([0])
    )
    ctx = LossContext(
        objective=load_config().objective, gate=load_config().gate, tp_group=None, vocab_size=8,
        reference=torch.zeros(1, 2, dtype=torch.float64), ref_tokens=torch.ones(1, 2, dtype=torch.long), step=7,
        micro_batch=3,
    )  # fmt: skip
    logits = torch.zeros(2, 3, 8)
    logits[0, 0, 0] = float("nan")
    loss, _ = preference_loss_func(b, ctx, logits)  # recorded, not read: the hook never waits for the device
    assert math.isnan(float(loss)) and len(ctx.losses) == 1
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 7, micro-batch 3 \(pairs \[0\]\)"):
        check_losses(ctx, torch.device("cpu"))
    assert ctx.losses == []
    check_losses(ctx, torch.device("cpu"))  # nothing recorded since: nothing to stop


def _loss_check_worker(rank, world, out):
    ctx = LossContext(
        objective=load_config().objective, gate=load_config().gate, tp_group=None, vocab_size=8,
        reference=None, ref_tokens=None, step=5,
    )  # fmt: skip
    for mb in range(3):  # rank 1's third micro-batch is the bad one; rank 0's are all finite
        value = float("inf") if (rank, mb) == (1, 2) else 0.5
        ctx.losses.append((mb, torch.tensor(value), torch.tensor([10 * rank + mb])))
    try:
        check_losses(ctx, torch.device("cpu"))
        Path(out, f"rank{rank}").write_text("no error")
    except NonFiniteLossError as e:
        Path(out, f"rank{rank}").write_text(str(e))


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_the_same_line(tmp_path):
    run_distributed(_loss_check_worker, 2, str(tmp_path))
    said = {(tmp_path / f"rank{r}").read_text() for r in range(2)}
    assert said == {"loss is inf at step 5, micro-batch 2 (pairs [12])"}


def test_bad_layout_is_refused_before_any_process_starts():
    out = subprocess.run(
        [sys.executable, "-m", "gatedpo_mega.cli", "train", "--nproc", "3", "parallel.tensor=2"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "gatedpo: error: world size 3 is not a multiple of parallel.tensor x parallel.pipeline = 2 x 1"
    )


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "gatedpo_mega.cli", *args], capture_output=True, text=True, cwd=cwd
    )


def test_cli_runs_local_processes_and_writes_its_outputs(cache, tmp_path):
    out = tmp_path / "cli"
    r = _cli("train", "--config", "configs/quickstart.yaml", "--nproc", "2", "parallel.pipeline=1",
             *BASE, "train.max_steps=2", f"data.cache_dir={cache}", f"train.output_dir={out}")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert (out / "config.yaml").read_text().count("tensor: 2") == 1


def test_a_failing_rank_stops_the_run_with_one_line(tmp_path):
    r = _cli("train", "--nproc", "2", *BASE, f"data.source={tmp_path / 'missing.jsonl'}",
             f"data.cache_dir={tmp_path}", f"train.output_dir={tmp_path / 'out'}")  # fmt: skip
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("gatedpo: error:")]
    assert len(errors) == 1 and "missing.jsonl" in errors[0], r.stderr[-2000:]
