"""SDPA core attention and packed micro-batches: the same numbers as megatron-core's local attention and as
padded rows, at every layout; no attention across the documents of a packed row."""

import pytest
import torch
from test_training import run

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

# Everything the step record holds about the pairs and the update (the gate and squeeze statistics included).
COMPARED = (
    "loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
    "gate/mean", "gate/frac_attenuated", "squeeze/top1_rejected", "squeeze/entropy_rejected",
)  # fmt: skip


def _same(a, b, rel=1e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert set(ra) == set(rb), ra["step"]
        for k in [k for k in ra if k in COMPARED or k.startswith("eval/")]:  # the step-0 row: eval only
            assert ra[k] == pytest.approx(rb[k], rel=rel, abs=1e-6), (ra["step"], k)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def padded(cache, tmp_path_factory):
    """The unpacked TP 1 x PP 1 run with SDPA attention (the default)."""
    return run(1, [], cache, tmp_path_factory.mktemp("padded"), "padded")


@pytest.mark.parametrize(
    ("world", "layout"),
    [(1, []), (2, ["parallel.tensor=2"]), (2, ["parallel.pipeline=2"])],
    ids=["tp1", "tp2", "pp2"],
)
def test_sdpa_equals_megatron_local_attention(world, layout, padded, cache, tmp_path):
    local = run(world, ["model.attention=local", *layout], cache, tmp_path, "local")
    _same(local, padded)


@pytest.mark.parametrize(
    ("world", "layout"),
    [
        (1, []),
        (2, ["parallel.tensor=2"]),
        (2, ["parallel.pipeline=2"]),
        (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
        (2, ["parallel.zero_stage=1"]),
        (2, ["parallel.zero_stage=2"]),
        (2, ["parallel.zero_stage=3"]),
    ],
    ids=["tp1", "tp2", "pp2", "tp2pp2", "dp2-zero1", "dp2-zero2", "dp2-zero3"],
)
def test_packed_equals_padded_at_every_layout(world, layout, padded, cache, tmp_path):
    _same(run(world, ["data.packing=true", *layout], cache, tmp_path, "packed"), padded)


# Each composes packing with other paths: the padded run at TP 1 with the same options is the reference.
COMPOSED = {
    "unfused-sequence-gate-ipo": (
        2, ["parallel.tensor=2"],
        ["model.fused_logprobs=false", "gate.granularity=sequence", "gate.shape=sigmoid", "gate.signal=absolute", "gate.tau=0.02",
         "objective.name=ipo", "objective.average_logps=true"],
    ),
    "fused-objective-cal-dpo-nll": (
        4, ["parallel.tensor=2", "parallel.pipeline=2"],
        ["model.fused_objective=true", "objective.name=cal_dpo", "objective.nll_weight=0.5", "gate.signal=absolute", "gate.tau=0.02"],
    ),
    "hinge-pp2": (2, ["parallel.pipeline=2"], ["objective.name=hinge", "gate.signal=absolute", "gate.tau=0.02"]),
    "sft-extended-dp2-zero2": (
        2, ["parallel.zero_stage=2"], ["objective.name=sft_extended", "gate.shape=none"],
    ),
    "live-reference-eval": (
        2, ["parallel.zero_stage=3"],
        ["train.reference=live", "data.eval_fraction=0.2", "train.eval_every=2", "train.micro_batch_size=1"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(COMPOSED))
def test_packing_composes_with_output_layer_modes_gates_objectives_and_references(name, cache, tmp_path):
    world, layout, options = COMPOSED[name]
    want = run(1, options, cache, tmp_path, "padded")
    got = run(world, ["data.packing=true", *layout, *options], cache, tmp_path, "packed")
    if "eval" in name:
        assert any("eval/loss" in r for r in want)
    _same(got, want)


def test_packed_run_resumes_exactly(cache, tmp_path):
    """Checkpoints every step; the last is removed and the run resumed: step 3 again, to the last digit."""
    import shutil

    from gatedpo_mega.formats import step_dir

    opts = ["data.packing=true", "train.save_every=1", "train.eval_every=0"]
    whole = run(1, opts, cache, tmp_path, "resume")
    shutil.rmtree(step_dir(tmp_path / "resume", 3))
    again = run(1, [*opts, "train.resume=true"], cache, tmp_path, "resume")
    timing = ("tokens_per_second", "real_tokens_per_second", "step_seconds", "memory/peak_mib_max_rank")
    assert [r["step"] for r in again] == [3]
    assert {k: v for k, v in again[0].items() if k not in timing} == {
        k: v for k, v in whole[-1].items() if k not in timing
    }


def test_no_attention_across_documents_of_a_packed_row():
    """Changing every token of one document changes no other document's log-probs, to the bit."""
    from distributed import run_distributed

    run_distributed(_leak_worker, 1)


def _leak_worker(rank, world):
    from gatedpo_mega.config import load_config
    from gatedpo_mega.data.batch import PreferenceBatch, pack
    from gatedpo_mega.loss import LossContext, response_stats
    from gatedpo_mega.megatron.backend import model_forward
    from gatedpo_mega.megatron.model import StageInfo, build_model
    from gatedpo_mega.megatron.parallel import initialize_layout

    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64"])
    lay = initialize_layout(1, 1)
    stage = StageInfo(pre_process=True, post_process=True, layer_offset=0, tp_rank=0, tp_size=1)
    vocab = 50
    model = build_model(
        cfg.model, vocab_size=vocab, stage=stage, pipeline=1, seed=0, tp_group=lay.tp_group
    ).eval()
    g = torch.Generator().manual_seed(0)
    lengths = [9, 14, 6, 11, 12, 7]  # 3 pairs: chosen rows, then rejected rows
    ids = torch.zeros(6, 16, dtype=torch.long)
    labels = torch.full((6, 16), -100)
    for j, n in enumerate(lengths):
        ids[j, :n] = torch.randint(1, vocab, (n,), generator=g)
        labels[j, 2 : n - 1] = ids[j, 3:n]

    def logps(tokens):
        batch = pack(PreferenceBatch(tokens, labels, torch.arange(3)), lengths, pad_to_multiple=8, pad_id=0)
        ctx = LossContext(objective=cfg.objective, gate=cfg.gate, tp_group=None, vocab_size=vocab,
                          reference=None, ref_tokens=None, fused=True)  # fmt: skip
        with torch.no_grad():
            chosen, rejected, _ = response_stats(model_forward(model, batch), batch, ctx)
        return torch.cat([chosen.logp, rejected.logp])

    before = logps(ids)
    changed = ids.clone()
    changed[3, : lengths[3]] = torch.randint(1, vocab, (lengths[3],), generator=g)
    after = logps(changed)
    for j in range(6):
        if j == 3:
            assert not torch.equal(before[j], after[j])
        else:
            assert torch.equal(before[j], after[j]), j
