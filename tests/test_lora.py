"""LoRA on megatron-core: the adapters' numbers at every layout, the frozen base, the reference for free, resume.

The model-level checks run in one process on a model built as a run builds it; the layout checks compare short
runs' metrics and final adapters (gathered from their checkpoints) with tensor 1 x pipeline 1 on one process.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from distributed import run_distributed

from gatedpo_mega.config import load_config

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

LORA = ["model.lora.rank=4", "model.lora.alpha=8", "train.lr=2e-2"]
BASE = [
    "model.num_layers=4", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=64", "train.max_steps=3", "train.micro_batch_size=2", "train.global_batch_size=8",
    "train.warmup_steps=1", "train.reference_batch_size=8", "data.builtin_pairs=96", "data.max_length=64",
    "data.max_prompt_length=40", "data.eval_fraction=0", "train.report_to=none", *LORA,
]  # fmt: skip
COMPARED = ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected", "gate/mean")


def _train_worker(rank, world, overrides, out):
    from gatedpo_mega.training.data import make_run_data
    from gatedpo_mega.training.loop import train

    history = train(load_config(None, overrides), make_run_data)
    if rank == 0:
        Path(out).write_text(json.dumps(history))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def run(world, extra, cache, out_dir):
    out = out_dir / "history.json"
    overrides = [*BASE, f"data.cache_dir={cache}", f"train.output_dir={out_dir}", *extra]
    run_distributed(_train_worker, world, overrides, str(out))
    return json.loads(out.read_text())


def final_adapters(run_dir: Path) -> dict[str, torch.Tensor]:
    """The last checkpoint's adapters, whole (gathered over TP, global layer names), from its fp32 master weights
    (every ZeRO stage's partitions, ``TrainCheckpoint``)."""
    from gatedpo_mega.convert.lora_checkpoint import adapter_tensor
    from gatedpo_mega.convert.train_checkpoint import TrainCheckpoint
    from gatedpo_mega.megatron.lora import adapter_factors

    ckpt = TrainCheckpoint(sorted((run_dir / "checkpoints").glob("step-*"))[-1])
    out = {f.name: adapter_tensor(ckpt, f) for f in adapter_factors(ckpt.cfg, range(ckpt.cfg.num_layers))}
    ckpt.release()
    return out


def replicated_factors_agree(run_dir: Path) -> int:
    """Each factor TP replicates (A of linear_qkv/linear_fc1, B of linear_proj/linear_fc2) is the same tensor on
    every TP rank of the last checkpoint's module states (ZeRO 0-2): none is trained apart per rank. Returns how
    many were compared."""
    from gatedpo_mega.megatron.lora import ADAPTER

    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    meta = json.loads((ckpt / "meta.json").read_text())
    tp, pp = meta["layout"]["tensor"], meta["layout"]["pipeline"]
    seen = 0
    for p in range(pp):
        states = [
            torch.load(
                ckpt / "deepspeed" / "state" / f"mp_rank_{p * tp + t:02d}_model_states.pt", weights_only=False
            )
            for t in range(tp)
        ]
        for name, x in states[0]["module"].items():
            m = ADAPTER.match(name)
            column = m is not None and m.group(2) in ("self_attention.linear_qkv", "mlp.linear_fc1")
            if m is not None and (m.group(3) == "A") == column:
                for other in states[1:]:
                    assert torch.equal(other["module"][name], x), name
                seen += 1
    return seen


@pytest.fixture(scope="module")
def baseline(cache, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora") / "tp1"
    return d, run(1, ["train.save_every=1"], cache, d)


def _same(a, b, rel=2e-5):
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        for k in COMPARED:
            assert ra[k] == pytest.approx(rb[k], rel=rel, abs=1e-6), (ra["step"], k)


def test_lora_run_starts_at_ln2_trains_and_saves_only_adapters(baseline):
    d, history = baseline
    assert history[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert history[-1]["loss"] < history[0]["loss"] - 1e-3  # the adapters train
    adapters = final_adapters(d)
    # 4 layers x 7 linears x (A, B); each B moved away from zero
    assert len(adapters) == 4 * 7 * 2
    assert all(x.abs().max() > 0 for n, x in adapters.items() if ".lora.B." in n)
    ckpt = d / "checkpoints" / "step-00000003"
    states = torch.load(
        ckpt / "deepspeed/state/mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )
    weights = {k for k, v in states["module"].items() if not k.endswith("_extra_state")}
    assert weights == set(adapters)  # the base is not copied into the checkpoint
    # The optimizer holds exactly the adapters: its parameter list, and its fp32 masters' total size
    (shapes,) = states["param_shapes"]
    assert set(shapes) == set(adapters)
    optim = torch.load(ckpt / "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    flat = optim["optimizer_state_dict"]["single_partition_of_fp32_groups"]
    assert sum(t.numel() for t in flat) == sum(x.numel() for x in adapters.values())
    assert json.loads((ckpt / "meta.json").read_text())["model"]["lora"]["rank"] == 4


@pytest.mark.parametrize(
    ("world", "extra"),
    [
        (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
        (4, ["parallel.pipeline=2", "parallel.zero_stage=1"]),  # PP 2 x DP 2
        (4, ["parallel.tensor=2", "parallel.zero_stage=2"]),  # TP 2 x DP 2
        (2, ["parallel.zero_stage=3"]),
        # a frozen embedding: recomputed layers still pass gradients to their adapters
        (2, ["parallel.tensor=2", "model.recompute=full", "data.packing=true"]),
        # context parallelism: the adapters' checkpoint is read from ZeRO's data x context partitions
        (2, ["parallel.context=2", "data.packing=true"]),
    ],
    ids=["tp2pp2", "pp2-dp2-zero1", "tp2-dp2-zero2", "dp2-zero3", "tp2-recompute-packed", "cp2-packed"],
)
def test_lora_layouts_match_tp1(world, extra, baseline, cache, tmp_path):
    d, history = baseline
    _same(run(world, extra, cache, tmp_path), history)
    if "parallel.tensor=2" in extra:
        assert replicated_factors_agree(tmp_path) == 4 * 7  # 4 layers x 7 linears, one replicated factor each
    mine, ref = final_adapters(tmp_path), final_adapters(d)
    assert set(mine) == set(ref)
    for name in ref:
        # Adam's first updates are ~lr x sign(gradient): a gradient at rounding level moves by up to 1e-5 here
        # (values ~0.05-0.2); a TP reduction missing or doubled moves whole tensors by ~lr = 2e-2.
        torch.testing.assert_close(mine[name], ref[name], rtol=1e-3, atol=1e-4)


def test_adapters_off_reference_equals_precomputed_and_resume_is_exact(baseline, cache, tmp_path):
    d, history = baseline
    assert load_config(None, BASE).train.reference == "live"  # the default with LoRA: the adapters-off policy
    # A precomputed reference (the initial model: the base, as B = 0) gives the same run.
    _same(run(1, ["train.reference=precomputed"], cache, tmp_path / "pre"), history, rel=1e-6)
    # Resume from step 2's checkpoint (adapters and their optimizer state, the base built again): step 3 exactly.
    resumed = tmp_path / "resumed"
    shutil.copytree(
        d, resumed, ignore=shutil.ignore_patterns("step-00000003", "metrics.jsonl", "history.json")
    )
    again = run(1, ["train.resume=true"], cache, resumed)
    assert [r["step"] for r in again] == [3]
    for k in COMPARED:
        assert again[0][k] == history[2][k], k


@pytest.mark.parametrize(
    ("world", "extra", "change"),
    [
        (2, ["parallel.tensor=2"], "tensor 1 -> 2"),
        (2, ["parallel.zero_stage=3"], "data 1 -> 2, zero_stage 1 -> 3"),
    ],
    ids=["tp2", "dp2-zero3"],
)
def test_lora_checkpoint_resumes_at_another_layout(world, extra, change, baseline, cache, tmp_path):
    from distributed import gatedpo

    d, history = baseline
    resumed = tmp_path / "resumed"
    shutil.copytree(
        d, resumed, ignore=shutil.ignore_patterns("step-00000003", "metrics.jsonl", "history.json")
    )
    args = [*BASE, f"data.cache_dir={cache}", f"train.output_dir={resumed}", "train.resume=true", *extra]
    done = gatedpo(world, "train", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LoRA rank 4 alpha 8 on q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj" in done.stdout
    assert f"at another layout ({change}): model and optimizer state resharded" in done.stdout
    (row,) = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 3
    for k in COMPARED:
        assert row[k] == pytest.approx(history[2][k], rel=2e-5, abs=1e-6), k


def _model_worker(rank, world, overrides, out):
    """A LoRA model built as a run builds it, and the same model without adapters."""
    from gatedpo_mega.megatron.backend import MegatronBackend
    from gatedpo_mega.megatron.lora import adapters
    from gatedpo_mega.megatron.parallel import initialize_layout

    cfg = load_config(None, overrides)
    layout = initialize_layout(cfg.parallel.tensor, cfg.parallel.pipeline)
    model = MegatronBackend(cfg).build(layout, 500, torch.device("cpu"))
    plain = MegatronBackend(load_config(None, [*overrides, "model.lora.rank=0"])).build(layout, 500, "cpu")
    ids = torch.randint(0, 500, (3, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(24)[None].expand_as(ids)

    def logits(m):
        return m(ids, positions, attention_mask=None)

    r = {"trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad)}
    with torch.no_grad():
        base = logits(plain)
        r["b0_equal"] = torch.equal(logits(model), base)
        for n, p in model.named_parameters():
            if ".lora.B." in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(n)))
        on = logits(model)
        with adapters(model, "off"):
            r["off_equal"] = torch.equal(logits(model), base)
        r["on_differs"] = (on - base).abs().max().item() > 1e-3
        r["back_on"] = torch.equal(logits(model), on)
    logits(model).pow(2).mean().backward()
    r["base_grads"] = [n for n, p in model.named_parameters() if ".lora." not in n and p.grad is not None]
    r["adapter_grads"] = [n for n, p in model.named_parameters() if ".lora." in n and p.grad is None]
    if rank == 0:
        Path(out).write_text(json.dumps(r))


@pytest.mark.parametrize("targets", ["all-linear", "q_proj,v_proj,down_proj"])
def test_lora_model_b0_is_the_base_bitwise_adapters_off_is_the_base_and_the_base_is_frozen(targets, tmp_path):
    out = tmp_path / "r.json"
    overrides = [
        *BASE,
        "model.fused_logprobs=false",
        "parallel.tensor=2",
        f"model.lora.target_modules={targets}",
    ]
    run_distributed(_model_worker, 2, overrides, str(out))
    r = json.loads(out.read_text())
    names = targets.split(",") if targets != "all-linear" else None
    per_layer = 14 if names is None else 2 * len(names)
    assert len(r["trainable"]) == 4 * per_layer
    assert all(".lora." in n for n in r["trainable"])
    if names is not None:
        assert {n.rsplit(".", 1)[1] for n in r["trainable"]} == set(names)
    assert r["b0_equal"] and r["off_equal"] and r["on_differs"] and r["back_on"]
    assert r["base_grads"] == [] and r["adapter_grads"] == []
