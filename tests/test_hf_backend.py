"""The transformers backend: a Hugging Face causal LM and the same weights in megatron-core give the same loss and
gradients; trained under ZeRO it matches the megatron-core path and is saved as a folder transformers loads."""

import json
from pathlib import Path

import pytest
import torch
from convert_helpers import make_hf_folder
from distributed import run_distributed

from gatedpo_mega.config import load_config

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def _batch(vocab: int):
    from gatedpo_mega.data.batch import PreferenceBatch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (4, 12), generator=g)  # 2 pairs: chosen rows, then rejected rows
    labels = torch.full_like(ids, -100)
    labels[:, 4:11] = ids[:, 5:12]
    labels[1, 9:] = -100  # rows of different lengths
    return PreferenceBatch(ids, labels, torch.tensor([0, 1]))


def _ctx(cfg, vocab, tp_group):
    from gatedpo_mega.loss import LossContext

    ref = torch.tensor([[-30.0, -31.0], [-28.0, -35.0]], dtype=torch.float64)
    return LossContext(
        objective=cfg.objective, gate=cfg.gate, tp_group=tp_group, vocab_size=vocab, reference=ref,
        ref_tokens=torch.full((2, 2), 7), fused=cfg.model.fused_logprobs,
    )  # fmt: skip


def _equivalence_worker(rank, world, folder, fused, out):
    import torch.distributed as dist

    from gatedpo_mega.convert import hf_model_config, hf_to_mcore_state, mcore_to_hf_state
    from gatedpo_mega.convert.folders import HFFolder
    from gatedpo_mega.hf.model import hf_forward, load_hf_model
    from gatedpo_mega.loss import preference_loss_func
    from gatedpo_mega.megatron.backend import model_forward
    from gatedpo_mega.megatron.model import StageInfo, build_model
    from gatedpo_mega.megatron.parallel import initialize_layout

    cfg = load_config(
        None, [f"model.fused_logprobs={fused}", "gate.signal=absolute", "gate.tau=0.01"]
    )  # closes here
    hf_cfg = json.loads((Path(folder) / "config.json").read_text())
    mcfg, vocab = hf_model_config(hf_cfg)
    mcfg.fused_logprobs = fused
    batch = _batch(vocab)

    hf = load_hf_model(folder, dtype="fp32", fused=fused)
    hf_loss, hf_aux = preference_loss_func(batch, _ctx(cfg, vocab, None), hf_forward(hf, batch.input_ids,
                                                                                             batch.labels))  # fmt: skip
    hf_loss.backward()
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}

    lay = initialize_layout(world, 1)
    stage = StageInfo(pre_process=True, post_process=True, layer_offset=0, tp_rank=lay.tp_rank, tp_size=world)
    model = build_model(mcfg, vocab_size=vocab, stage=stage, pipeline=1, seed=0, tp_group=lay.tp_group)
    local = hf_to_mcore_state(HFFolder(folder), mcfg, vocab_size=vocab, tensor=world, tp_rank=lay.tp_rank)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(local[n])
    loss, aux = preference_loss_func(batch, _ctx(cfg, vocab, lay.tp_group), model_forward(model, batch))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    every = [None] * world
    dist.all_gather_object(every, grads)
    mapped = mcore_to_hf_state({(t, 0): every[t] for t in range(world)}, mcfg, vocab_size=vocab, tensor=world)
    if rank == 0:
        hf_grads["lm_head.weight"] = hf_grads.get("lm_head.weight", hf_grads["model.embed_tokens.weight"])
        torch.save({"hf": (hf_loss.detach(), hf_grads, hf_aux), "mcore": (loss.detach(), mapped, aux)}, out)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize(("kind", "world"), [("llama", 1), ("llama", 2), ("qwen2", 2)])
def test_transformers_model_and_megatron_core_give_the_same_loss_and_gradients(tmp_path, kind, world, fused):
    folder = make_hf_folder(kind, tmp_path)
    out = tmp_path / "out.pt"
    run_distributed(_equivalence_worker, world, str(folder), fused, str(out))
    res = torch.load(out, weights_only=False)
    (hf_loss, hf_grads, hf_aux), (loss, grads, aux) = res["hf"], res["mcore"]
    frac = float(hf_aux["sums"]["gate/frac_attenuated"][0])
    assert frac > 0  # the gate is part of what is compared
    assert float(aux["sums"]["gate/frac_attenuated"][0]) == frac
    assert loss.item() == pytest.approx(hf_loss.item(), rel=1e-6)
    for name, g in grads.items():
        ref = hf_grads[name]
        assert g.shape == ref.shape, name
        assert torch.allclose(g, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item()), name


BASE = [
    "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=3e-3", "train.warmup_steps=1",
    "train.reference_batch_size=8", "data.builtin_pairs=96", "data.max_length=64", "data.max_prompt_length=40",
    "data.eval_fraction=0", "train.max_steps=3", "model.dtype=fp32",
]  # fmt: skip


# The tiny Llama's shape, written for the megatron backend (which refuses a written field that disagrees with it)
MCORE_SHAPE = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
               "model.ffn_hidden_size=64", "model.norm_epsilon=1e-6"]  # fmt: skip


def _train_worker(rank, world, overrides, out):
    from gatedpo_mega.training.data import make_run_data
    from gatedpo_mega.training.loop import train

    history = train(load_config(None, overrides), make_run_data)
    if rank == 0:
        Path(out).write_text(json.dumps(history))


def _run(world, extra, tmp_path, name):
    out = tmp_path / f"{name}.json"
    overrides = [*BASE, f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={tmp_path / name}", *extra]
    run_distributed(_train_worker, world, overrides, str(out))
    return json.loads(out.read_text())


def test_transformers_backend_trains_under_zero_like_megatron_core_and_saves_a_loadable_folder(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gatedpo_mega.config import load_config
    from gatedpo_mega.data.pipeline import resolve_tokenizer

    folder = _tiny_llama(tmp_path / "llama")
    hf = ["model.backend=transformers", f"model.init_from={folder}"]
    mcore = [f"model.init_from={folder}", *MCORE_SHAPE]
    zero1 = _run(1, [*hf, "parallel.zero_stage=1"], tmp_path, "hf-zero1")
    zero3 = _run(2, [*hf, "parallel.zero_stage=3"], tmp_path, "hf-zero3")
    tp2 = _run(2, [*mcore, "parallel.tensor=2"], tmp_path, "mcore-tp2")
    for a, b, c in zip(zero1, zero3, tp2, strict=True):
        for k in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
            assert c[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    meta = json.loads((tmp_path / "mcore-tp2" / "checkpoints" / "step-00000003" / "meta.json").read_text())
    assert meta["hf_config"] == json.loads((folder / "config.json").read_text())  # kept for the export
    cfg = load_config(None, [*BASE, f"data.cache_dir={tmp_path / 'cache'}"])
    trained = resolve_tokenizer(cfg.data, cfg.train.seed)
    for name in ("hf-zero1", "hf-zero3"):
        saved, info = AutoModelForCausalLM.from_pretrained(tmp_path / name / "hf", output_loading_info=True)
        assert not any(info.values()), info  # no missing, unexpected or mismatched weights
        initial = AutoModelForCausalLM.from_pretrained(folder)
        moved = [n for n, p in saved.named_parameters() if not torch.equal(p, initial.get_parameter(n))]
        assert len(moved) == len(list(initial.parameters()))  # every tensor was trained and saved
        # The tokenizer training encoded with (the built-in one; the Llama folder has none) is saved with it.
        text = "\n\nHuman: What is 12 plus 30?\n\nAssistant: 12 plus 30 is 42."
        ids = AutoTokenizer.from_pretrained(tmp_path / name / "hf")(text, add_special_tokens=False)[
            "input_ids"
        ]
        assert ids == trained.encode(text)


# LoRA through PEFT (model.lora on the transformers backend)

# data.max_train_pairs=8: every step trains on the same 8 pairs, so the loss falls from one step to the next
LORA = ["model.lora.rank=4", "model.lora.alpha=8", "train.lr=2e-2", "data.max_train_pairs=8"]
COMPARED = ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected")


def _tiny_llama(folder):
    """A Llama whose vocabulary covers the built-in tokenizer's (its size is read from the data)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=128)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def _same(a, b, rel):
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b, strict=True):
        for k in COMPARED:
            assert rb[k] == pytest.approx(ra[k], rel=rel, abs=1e-6), (ra["step"], k)


def _policy_logps(model, ids, labels):
    from gatedpo_mega.hf.model import hf_forward

    with torch.no_grad():
        stats = hf_forward(model, ids, labels)
    return stats[..., 0]  # each token's log-prob (the fused head's first statistic)


def test_transformers_backend_lora_trains_adapters_only_equal_at_dp2_and_saves_a_peft_folder(tmp_path):
    import math

    from peft import PeftModel

    from gatedpo_mega.hf.lora import DEFAULT
    from gatedpo_mega.hf.model import load_hf_model

    folder = _tiny_llama(tmp_path / "llama")
    hf = ["model.backend=transformers", f"model.init_from={folder}", *LORA]
    dp1 = _run(1, hf, tmp_path, "dp1")  # ZeRO 1, the live reference: the policy with its adapters off
    assert load_config(None, [*BASE, *hf]).train.reference == "live"
    assert dp1[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)  # B = 0: the policy is the reference
    assert dp1[-1]["loss"] < dp1[0]["loss"] - 1e-3  # the adapters train
    _same(dp1, _run(2, [*hf, "parallel.zero_stage=2"], tmp_path, "dp2-zero2"), rel=2e-5)
    # A precomputed reference (the initial policy: the base, B = 0), at DP 2 under ZeRO 3: the same run.
    precomputed = ["parallel.zero_stage=3", "train.reference=precomputed"]
    _same(dp1, _run(2, [*hf, *precomputed], tmp_path, "zero3"), rel=2e-5)
    # The megatron backend draws the same adapters from the same seed: the same LoRA run.
    _same(dp1, _run(1, [f"model.init_from={folder}", *MCORE_SHAPE, *LORA], tmp_path, "mcore"), rel=1e-4)

    # The checkpoint and the optimizer hold the adapters only: 2 layers x 7 linears x (A, B).
    ckpt = tmp_path / "dp1" / "checkpoints" / "step-00000003" / "deepspeed" / "state"
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    adapters = states["module"]
    assert len(adapters) == 2 * 7 * 2
    assert all(f".lora_A.{DEFAULT}." in n or f".lora_B.{DEFAULT}." in n for n in adapters)
    (shapes,) = states["param_shapes"]
    assert set(shapes) == set(adapters)
    optim = torch.load(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    flat = optim["optimizer_state_dict"]["single_partition_of_fp32_groups"]
    assert sum(t.numel() for t in flat) == sum(x.numel() for x in adapters.values())

    # The PEFT folder loads on the base and gives the trained policy's log-probs: that of the checkpoint's adapters,
    # and that of the merged Hugging Face folder beside it.
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (4, 24), generator=g)
    labels = ids.roll(-1, dims=1)
    trained = load_hf_model(folder, dtype="fp32", fused=True)
    trained = PeftModel.from_pretrained(trained, tmp_path / "dp1" / "hf-adapter")
    assert all(".lora_" in n for n, p in trained.named_parameters() if p.requires_grad)
    loaded = _policy_logps(trained, ids, labels)
    with torch.no_grad():
        params = dict(trained.named_parameters())
        assert all(x.abs().max() > 0 for n, x in adapters.items() if ".lora_B." in n)  # B moved from zero
        for n, x in adapters.items():
            params[n].copy_(x)
    assert torch.equal(_policy_logps(trained, ids, labels), loaded)
    merged = _policy_logps(load_hf_model(tmp_path / "dp1" / "hf", dtype="fp32", fused=True), ids, labels)
    torch.testing.assert_close(merged, loaded, rtol=0, atol=1e-5)
    base = _policy_logps(load_hf_model(folder, dtype="fp32", fused=True), ids, labels)
    assert (loaded - base).abs().max() > 1e-3
    # Saved under ZeRO 3 (gathered): the same trained adapters, to the runs' agreement.
    zero3 = PeftModel.from_pretrained(
        load_hf_model(folder, dtype="fp32", fused=True), tmp_path / "zero3" / "hf-adapter"
    )
    torch.testing.assert_close(_policy_logps(zero3, ids, labels), loaded, rtol=0, atol=1e-4)


def test_transformers_lora_model_adapters_off_initial_and_init_adapter_checks(tmp_path):
    """In one process, a model as the backend builds it: B = 0 is the base to the bit, ``adapters`` off is the base
    and ``initial`` the starting adapter of model.init_adapter, the trainable parameters unchanged afterwards; an
    adapter whose rank or targets disagree with model.lora is refused in one line."""
    from gatedpo_mega.errors import UserError
    from gatedpo_mega.hf.backend import TransformersBackend
    from gatedpo_mega.hf.lora import save_adapter_folder
    from gatedpo_mega.hf.model import load_hf_model

    folder = _tiny_llama(tmp_path / "llama")
    overrides = ["model.backend=transformers", f"model.init_from={folder}", "model.lora.rank=4",
                 "model.lora.target_modules=[q_proj,v_proj,down_proj]"]  # fmt: skip

    def build(*extra):
        backend = TransformersBackend(load_config(None, [*overrides, *extra]))
        return backend, backend.build(None, 512, torch.device("cpu"))

    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, dims=1)
    base = _policy_logps(load_hf_model(folder, dtype="fp32", fused=True), ids, labels)
    backend, model = build()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert len(trainable) == 2 * 3 * 2 and all(".lora_" in n for n in trainable)
    assert torch.equal(_policy_logps(model, ids, labels), base)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(n)))
    start = _policy_logps(model, ids, labels)
    assert (start - base).abs().max() > 1e-3
    with backend.adapters(model, "off"):
        assert torch.equal(_policy_logps(model, ids, labels), base)
    save_adapter_folder(model, tmp_path / "adapter")

    backend, model = build(f"model.init_adapter={tmp_path / 'adapter'}")
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == trainable
    assert torch.equal(_policy_logps(model, ids, labels), start)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    moved = _policy_logps(model, ids, labels)
    assert (moved - start).abs().max() > 1e-3
    model.train()
    with backend.adapters(model, "initial"):
        assert torch.equal(_policy_logps(model, ids, labels), start)
    with backend.adapters(model, "off"):
        assert torch.equal(_policy_logps(model, ids, labels), base)
    assert model.training
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == trainable
    assert torch.equal(_policy_logps(model, ids, labels), moved)

    with pytest.raises(UserError, match=r"model\.lora\.rank 4 \(adapter_config\.json r\) vs 8 \(config\)"):
        build(f"model.init_adapter={tmp_path / 'adapter'}", "model.lora.rank=8")
    with pytest.raises(
        UserError,
        match=r"target_modules q_proj,v_proj,down_proj \(adapter_config.json target_modules\) vs q_proj \(config\)",
    ):
        build(f"model.init_adapter={tmp_path / 'adapter'}", "model.lora.target_modules=[q_proj]")
