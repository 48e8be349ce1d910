"""Mixture of experts (Mixtral, Qwen3-MoE) with expert parallelism.

Conversion round trips and logits are checked against transformers' own models; training at EP 2 (with ZeRO 1 and
2, pipeline and data parallelism, packing) against EP 1 on one process, step by step; a run from a tiny Hugging
Face Qwen3-MoE folder at EP 2 starts at ln 2; the refusals name what cannot run.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from convert_helpers import TOKENS, hf_logits, mcore_logits_worker, train_worker
from distributed import run_distributed
from test_training import BASE, COMPARED, _train_worker

from gatedpo_mega.cli import main
from gatedpo_mega.config import load_config
from gatedpo_mega.convert import (
    hf_model_config,
    hf_to_mcore,
    hf_to_mcore_state,
    mcore_to_hf,
    mcore_to_hf_state,
)
from gatedpo_mega.errors import ConfigError
from gatedpo_mega.megatron.parallel import validate_layout

MOE_FAMILIES = ("mixtral", "qwen3_moe")
MOE = [
    "model.num_experts=4",
    "model.moe_ffn_hidden_size=32",
    "model.moe_router_topk=2",
    "model.moe_aux_loss_coef=0.01",
]
ROUTING = ("moe/aux_loss", "moe/load_max", "moe/load_min")


def moe_hf_config(kind: str, **overrides):
    """Four experts of width 32, top 2; Qwen3-MoE with q/k norms, heads 32 wide and without renormalising its top 2
    (``norm_topk_prob=false``), Mixtral renormalising them."""
    from transformers import MixtralConfig, Qwen3MoeConfig

    common = dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
        num_experts_per_tok=2, bos_token_id=1, eos_token_id=2, num_hidden_layers=2,
    )  # fmt: skip
    if kind == "mixtral":
        return MixtralConfig(**{**common, "vocab_size": 200, "intermediate_size": 32, "num_local_experts": 4,
                                "sliding_window": None, **overrides})  # fmt: skip
    return Qwen3MoeConfig(**{**common, "vocab_size": 150, "intermediate_size": 96, "moe_intermediate_size": 32,
                             "num_experts": 4, "head_dim": 32, "norm_topk_prob": False, **overrides})  # fmt: skip


def make_moe_folder(kind: str, root: Path, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_hf_config(kind, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
            if "gate" in name and p.ndim == 2 and p.shape[0] == 4:  # the router: distinct enough to route
                p.mul_(20.0)
    path = root / kind
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    return path


def hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-hf")
    return {kind: make_moe_folder(kind, root) for kind in MOE_FAMILIES}


# ------------------------------------------------------------------------------------------ conversion


@pytest.mark.parametrize("kind", MOE_FAMILIES)
def test_hf_to_mcore_and_back_is_bit_identical_with_every_expert(kind, moe_dirs, tmp_path):
    cfg, _ = hf_model_config(json.loads((moe_dirs[kind] / "config.json").read_text()))
    assert (cfg.num_experts, cfg.moe_router_topk, cfg.moe_ffn_hidden_size) == (4, 2, 32)
    assert cfg.moe_norm_topk_prob == (kind == "mixtral") and cfg.qk_norm == (kind == "qwen3_moe")
    out = hf_to_mcore(moe_dirs[kind], tmp_path / "mcore", tensor=1, pipeline=2)
    back = mcore_to_hf(out, tmp_path / "hf")
    original, again = hf_weights(moe_dirs[kind]), hf_weights(back)
    assert original.keys() == again.keys()
    assert sum(".experts." in k for k in original) == 2 * 4 * 3  # 2 layers x 4 experts x gate/up/down
    for k in original:
        assert torch.equal(original[k], again[k]), k
    config = json.loads((back / "config.json").read_text())
    assert config["model_type"] == kind


def test_expert_parallel_ranks_hold_their_experts_and_give_them_back(moe_dirs):
    cfg, vocab = hf_model_config(json.loads((moe_dirs["qwen3_moe"] / "config.json").read_text()))
    hf = hf_weights(moe_dirs["qwen3_moe"])
    ranks = [hf_to_mcore_state(hf, cfg, vocab_size=vocab, expert=2, ep_rank=r) for r in range(2)]
    fc1 = "decoder.layers.1.mlp.experts.local_experts.{}.linear_fc1.weight"
    assert (
        fc1.format(2) not in ranks[0] and fc1.format(2) not in ranks[1]
    )  # two experts a rank, numbered 0, 1
    gate, up = (
        hf["model.layers.1.mlp.experts.3.gate_proj.weight"],
        hf["model.layers.1.mlp.experts.3.up_proj.weight"],
    )
    assert torch.equal(ranks[1][fc1.format(1)], torch.cat([gate, up]))  # rank 1's second expert is expert 3
    whole = hf_to_mcore_state(hf, cfg, vocab_size=vocab)
    for k, v in ranks[0].items():  # everything else is the same on both ranks
        if ".experts." not in k:
            assert torch.equal(v, ranks[1][k]) and torch.equal(v, whole[k]), k
    back = mcore_to_hf_state({(0, 0): whole}, cfg, vocab_size=vocab)
    assert all(torch.equal(back[k], hf[k]) for k in hf)


@pytest.mark.multiprocess
def test_logits_equal_transformers_for_both_families(moe_dirs, tmp_path):
    folders = [str(hf_to_mcore(moe_dirs[k], tmp_path / k, tensor=1, pipeline=1)) for k in MOE_FAMILIES]
    out = tmp_path / "logits.pt"
    run_distributed(mcore_logits_worker, 1, folders, str(out), 1, 1)
    ours = torch.load(out)
    for kind, folder in zip(MOE_FAMILIES, folders, strict=True):
        theirs = hf_logits(moe_dirs[kind], TOKENS)
        assert ours[folder].shape == theirs.shape
        assert (ours[folder] - theirs).abs().max() < 1e-5, kind


# ------------------------------------------------------------------------------------------ the balancing loss


def _balancing_loss_worker(rank, world):
    """The last layer's router gradient with the balancing loss on minus without it, against the float64 Switch
    loss over the real tokens of the router's own input, times the coefficient and the 1/micro-batches factor."""
    from gatedpo_mega.data.batch import PreferenceBatch
    from gatedpo_mega.megatron.backend import model_forward
    from gatedpo_mega.megatron.experts import set_aux_loss_scale
    from gatedpo_mega.megatron.model import StageInfo, build_model
    from gatedpo_mega.megatron.parallel import initialize_layout

    coef, scale, vocab = 0.01, 0.25, 64
    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64", *MOE, "model.fused_logprobs=false",
                             f"model.moe_aux_loss_coef={coef}"])  # fmt: skip
    lay = initialize_layout(1, 1)
    stage = StageInfo(pre_process=True, post_process=True, layer_offset=0, tp_rank=0, tp_size=1)
    model = build_model(
        cfg.model, vocab_size=vocab, stage=stage, pipeline=1, seed=0, tp_group=lay.tp_group
    ).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (2, 12), generator=g)
    labels = torch.full((2, 12), -100)
    labels[0, 3:11], labels[1, 3:6] = ids[0, 4:12], ids[1, 4:7]  # row 1: 7 real tokens, then 5 of padding
    batch = PreferenceBatch(ids, labels, torch.arange(1))
    weights = torch.randn(2, 12, vocab, generator=g)
    router = model.decoder.layers[-1].mlp.router
    seen = {}
    router.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].detach()))

    def router_grad(c):
        router.config.moe_aux_loss_coeff = c
        model.zero_grad()
        set_aux_loss_scale(scale, torch.device("cpu"))
        (model_forward(model, batch) * weights).sum().backward()
        return router.weight.grad.double()

    measured = router_grad(coef) - router_grad(0.0)
    x = seen["x"].double().reshape(-1, 32)  # [S, B, H] -> tokens in S-major order
    real = batch.token_mask.T.reshape(-1)
    assert int(real.sum()) == 12 + 7
    w = router.weight.detach().double().requires_grad_()
    scores = torch.softmax(x @ w.T, dim=-1)[real]
    chosen = torch.zeros_like(scores).scatter(1, scores.topk(2, dim=1).indices, 1.0)
    f, p = chosen.sum(0) / (len(scores) * 2), scores.mean(0)
    switch = 4 * (f * p).sum()
    (expected,) = torch.autograd.grad(switch, w)
    assert measured.abs().max() > 1e-6  # the loss moved the router
    # float32 gradients with and without it differ by ~1e-4 of their size: the difference carries ~1e-5 error
    error = (measured - coef * scale * expected).abs().max() / (coef * scale * expected).abs().max()
    assert error < 1e-3, float(error)


@pytest.mark.multiprocess
def test_the_balancing_loss_gradient_is_the_float64_switch_loss_over_real_tokens():
    run_distributed(_balancing_loss_worker, 1)


# ------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("moe-cache")


def run(world, extra, cache, tmp_path, name):
    out = tmp_path / f"{name}.json"
    overrides = [*BASE, *MOE, f"data.cache_dir={cache}", f"train.output_dir={tmp_path / name}", *extra]
    run_distributed(_train_worker, world, overrides, str(out))
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def moe_baseline(cache, tmp_path_factory):
    return run(1, [], cache, tmp_path_factory.mktemp("moe-base"), "ep1")


def _same(a, b, rel=2e-5):
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        for k in (*COMPARED, *ROUTING):
            assert ra[k] == pytest.approx(rb[k], rel=rel, abs=1e-6), (ra["step"], k)


def test_the_moe_baseline_starts_at_ln2_routes_and_its_balancing_loss_moves_the_gradient(
    moe_baseline, cache, tmp_path
):
    assert moe_baseline[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert moe_baseline[0]["moe/aux_loss"] >= 1.0  # E * sum f P is 1 when perfectly balanced, more otherwise
    assert moe_baseline[0]["moe/load_max"] > 1.0 > moe_baseline[0]["moe/load_min"] >= 0.0
    off = run(1, ["model.moe_aux_loss_coef=0"], cache, tmp_path, "no-aux")
    assert off[0]["loss"] == moe_baseline[0]["loss"]  # not part of the logged loss ...
    assert off[0]["grad_norm"] != pytest.approx(
        moe_baseline[0]["grad_norm"], rel=1e-5
    )  # ... but of the gradient


@pytest.mark.parametrize(
    ("world", "extra"),
    [
        (
            2,
            ["parallel.expert=2", "parallel.zero_stage=2", "data.packing=true"],
        ),  # padding left out of routing
        # the schedule drives it (ZeRO 1); recomputation: the load-balancing loss and the routing counted in backward
        (4, ["parallel.expert=2", "parallel.pipeline=2", "model.recompute=full"]),
        (4, ["parallel.expert=2", "parallel.zero_stage=2", "train.reference=live"]),  # EP 2 x expert-DP 2
    ],
    ids=[
        "ep2-zero2-packed",
        "ep2-pp2-recompute",
        "ep2-dp2-zero2-live",
    ],  # EP 2 x ZeRO 1 at PP 1: the resume test below
)
@pytest.mark.slow
def test_expert_parallel_layouts_match_ep1(world, extra, moe_baseline, cache, tmp_path):
    _same(run(world, extra, cache, tmp_path, "run"), moe_baseline)


@pytest.mark.slow
def test_an_ep2_checkpoint_resumes_exactly_and_exports_every_expert(moe_baseline, cache, tmp_path):
    """EP 2 x ZeRO 1, checkpoints at steps 2 and 3: resumed from step 2, step 3 is the uninterrupted EP 1 run's; the
    export of step 3 (each EP rank's experts from its own file) equals the export of EP 1's (fp32 masters)."""
    ep2 = ["parallel.expert=2", "train.save_every=2"]
    _same(run(2, ep2, cache, tmp_path, "ep2"), moe_baseline)
    step3 = tmp_path / "ep2" / "checkpoints" / "step-00000003"
    exported = tmp_path / "ep2-hf"
    assert main(["convert", "zero-to-hf", "--src", str(step3), "--dst", str(exported)]) == 0
    shutil.rmtree(step3)
    resumed = run(2, [*ep2, "train.resume=true"], cache, tmp_path, "ep2")
    assert [r["step"] for r in resumed] == [3]
    _same(resumed, moe_baseline[2:])
    base_ckpt = next(Path(tmp_path).parent.glob("moe-base*/ep1/checkpoints/step-00000003"))
    assert main(["convert", "zero-to-hf", "--src", str(base_ckpt), "--dst", str(tmp_path / "ep1-hf")]) == 0
    mine, theirs = hf_weights(exported), hf_weights(tmp_path / "ep1-hf")
    assert mine.keys() == theirs.keys() and sum(".experts." in k for k in mine) == 4 * 4 * 3
    # Adam's normalised update (3e-3 a step here) turns float32 summation-order differences in near-zero
    # gradients into ~1e-5 (measured: 2e-5 on the embedding, 3e-6 on the experts); a wrong or stale expert is off
    # by a whole update or its initial draw.
    worst = {k: float((mine[k] - theirs[k]).abs().max()) for k in mine}
    assert max(worst.values()) < 1e-4, max(worst.items(), key=lambda kv: kv[1])


@pytest.mark.slow
def test_gate_dpo_from_a_qwen3_moe_folder_at_ep2_starts_at_ln2(tmp_path):
    folder = make_moe_folder("qwen3_moe", tmp_path, vocab_size=512)  # covers the built-in tokenizer
    run_dir = tmp_path / "run"
    overrides = [
        f"model.init_from={folder}", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=96", "model.head_dim=32", "model.qk_norm=true",
        "model.num_experts=4", "model.moe_ffn_hidden_size=32", "model.moe_norm_topk_prob=false",
        "model.norm_epsilon=1e-6", "parallel.expert=2", "train.max_steps=2", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.lr=1e-2", "train.warmup_steps=0", "data.builtin_pairs=16",
        "data.max_length=48", "data.max_prompt_length=32", "data.eval_fraction=0",
        f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={run_dir}",
    ]  # fmt: skip
    run_distributed(train_worker, 2, overrides)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] != rows[0]["loss"]
    meta = json.loads((run_dir / "checkpoints" / "step-00000002" / "meta.json").read_text())
    assert (meta["model"]["num_experts"], meta["hf_config"]["model_type"]) == (4, "qwen3_moe")


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["parallel.expert=2"], "parallel.expert=2 splits a mixture of experts: model.num_experts is 0"),
        ([*MOE, "parallel.expert=8"], "parallel.expert=8 does not divide model.num_experts=4"),
        ([*MOE, "parallel.expert=2", "parallel.zero_stage=3"], "DeepSpeed's stage 3 refuses MoE parameters"),
        (
            [*MOE, "parallel.expert=2", "parallel.zero_stage=0"],
            "without ZeRO DeepSpeed saves one rank's experts",
        ),
        ([*MOE, "parallel.tensor=2"], "only under sequence parallelism"),
        ([*MOE, "parallel.context=2"], "with context parallelism is not supported"),
        ([*MOE, "model.lora.rank=4"], "LoRA adapts dense layers only"),
        (["model.num_experts=4"], "the experts' width is set exactly when there are experts"),
        (
            ["model.num_experts=4", "model.moe_ffn_hidden_size=8", "model.moe_router_topk=5"],
            "more than model.num_experts",
        ),
    ],
)
def test_what_cannot_run_is_refused_in_one_line(extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, extra)


def test_expert_parallelism_must_divide_the_data_parallel_ranks():
    cfg = load_config(None, [*MOE, "parallel.expert=4", "parallel.pipeline=2"])
    with pytest.raises(ConfigError, match=r"parallel.expert=4 does not divide the data-parallel size 2"):
        validate_layout(cfg, 4)
    assert validate_layout(cfg, 8) == 4
