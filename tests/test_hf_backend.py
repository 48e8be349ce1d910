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
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from gatedpo_mega.config import load_config
    from gatedpo_mega.data.pipeline import resolve_tokenizer

    # A Llama whose vocabulary covers the built-in tokenizer's (its size is read from the data).
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=128)  # fmt: skip
    folder = tmp_path / "llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    hf = ["model.backend=transformers", f"model.init_from={folder}"]
    mcore = [f"model.init_from={folder}", "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
             "model.num_query_groups=2", "model.ffn_hidden_size=64", "model.norm_epsilon=1e-6"]  # fmt: skip
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
