"""Checkpoint conversion: Hugging Face <-> megatron-core at any layout, ZeRO training checkpoints -> Hugging Face.

Tiny random models of each supported family (Llama with GQA, Mistral, Qwen2 with q/k/v bias and tied embeddings,
Qwen3 with q/k norms and heads wider than hidden / heads; vocabularies that TP 2 pads): round trips are bit-identical, the megatron-core model reproduces transformers'
logits, and every refusal is one line naming the tensor or file and leaves the destination clean.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from convert_helpers import (
    FAMILIES,
    hf_logits,
    make_hf_folder,
    mcore_logits_worker,
    train_worker,
    trained_logits_worker,
    zero_checkpoint_worker,
)
from distributed import run_distributed
from safetensors.torch import load_file, save_file

from gatedpo_mega.cli import main
from gatedpo_mega.convert import (
    ConvertError,
    hf_model_config,
    hf_to_mcore,
    hf_to_mcore_state,
    local_shapes,
    mcore_to_hf,
    mcore_to_hf_state,
    read_mcore_meta,
    reshard,
)
from gatedpo_mega.convert.folders import parse_size, plan_shards
from gatedpo_mega.convert.safetensors_io import SafetensorsReader, SafetensorsWriter
from gatedpo_mega.formats import DTYPES


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: make_hf_folder(kind, root) for kind in FAMILIES}


@pytest.fixture(scope="module")
def mcore_dirs(hf_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("mcore")
    return {k: hf_to_mcore(p, root / k, tensor=2, pipeline=2) for k, p in hf_dirs.items()}


def hf_weights(path: Path) -> dict[str, torch.Tensor]:
    index = (
        json.loads((path / "model.safetensors.index.json").read_text())
        if (path / "model.safetensors.index.json").exists()
        else None
    )
    files = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(path / f))
    return out


def assert_loads_cleanly(path: Path) -> None:
    """transformers loads the folder with no missing, unexpected or mis-shaped weights."""
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("kind", FAMILIES)
def test_hf_to_mcore_tp2_pp2_and_back_is_bit_identical(kind, hf_dirs, mcore_dirs, tmp_path):
    meta = read_mcore_meta(mcore_dirs[kind])
    assert (meta["tensor"], meta["pipeline"], meta["dtype"]) == (2, 2, "fp32")
    assert meta["padded_vocab_size"] > meta["vocab_size"]  # TP padding exercised
    assert (mcore_dirs[kind] / "tokenizer" / "tokenizer_config.json").exists()
    back = mcore_to_hf(mcore_dirs[kind], tmp_path / "hf", max_shard_size="40KB")
    assert len(list(back.glob("model-*.safetensors"))) > 1  # sharded by size
    assert_bit_identical(hf_weights(back), hf_weights(hf_dirs[kind]))
    assert (back / "tokenizer_config.json").exists() and (back / "generation_config.json").exists()
    assert_loads_cleanly(back)
    config = json.loads((back / "config.json").read_text())
    assert config["model_type"] == kind and config["vocab_size"] == meta["vocab_size"]


def test_padded_vocabulary_rows_are_zero(mcore_dirs):
    meta = read_mcore_meta(mcore_dirs["llama"])
    with SafetensorsReader(mcore_dirs["llama"] / "tp01_pp00.safetensors") as r:
        emb = r.read("embedding.word_embeddings.weight")  # rows 64..127 of 128; vocabulary 100
    assert emb.shape[0] == meta["padded_vocab_size"] // 2
    assert torch.all(emb[meta["vocab_size"] - emb.shape[0] :] == 0)
    assert torch.any(emb[: meta["vocab_size"] - emb.shape[0]] != 0)


@pytest.mark.parametrize(("tensor", "pipeline"), [(1, 1), (1, 2), (2, 1)])
def test_reshard_then_back_is_bit_identical(tensor, pipeline, hf_dirs, mcore_dirs, tmp_path):
    out = reshard(mcore_dirs["mistral"], tmp_path / "re", tensor=tensor, pipeline=pipeline)
    meta = read_mcore_meta(out)
    assert (meta["tensor"], meta["pipeline"]) == (tensor, pipeline)
    back = mcore_to_hf(out, tmp_path / "hf")
    assert_bit_identical(hf_weights(back), hf_weights(hf_dirs["mistral"]))


def test_pure_functions_round_trip_and_local_shapes(hf_dirs):
    cfg, vocab = hf_model_config(json.loads((hf_dirs["qwen2"] / "config.json").read_text()))
    hf = hf_weights(hf_dirs["qwen2"])
    ranks = {
        (t, p): hf_to_mcore_state(hf, cfg, vocab_size=vocab, tensor=2, pipeline=2, tp_rank=t, pp_rank=p)
        for t in range(2)
        for p in range(2)
    }
    for (_, p), state in ranks.items():
        shapes = local_shapes(cfg, vocab, tensor=2, pipeline=2, pp_rank=p)
        assert {k: tuple(v.shape) for k, v in state.items()} == shapes
    assert "output_layer.weight" in ranks[(0, 1)]  # tied at PP 2: the last stage holds its copy
    assert_bit_identical(mcore_to_hf_state(ranks, cfg, vocab_size=vocab, tensor=2, pipeline=2), hf)
    lazy = mcore_to_hf_state(lambda t, p: ranks[(t, p)], cfg, vocab_size=vocab, tensor=2, pipeline=2)
    assert_bit_identical(lazy, hf)


def test_bf16_dtype_is_kept(hf_dirs, tmp_path):
    src = tmp_path / "bf16"
    shutil.copytree(hf_dirs["llama"], src)
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(src / "model.safetensors").items()}
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    m = hf_to_mcore(src, tmp_path / "m", tensor=2, pipeline=1)
    assert read_mcore_meta(m)["dtype"] == "bf16"
    back = mcore_to_hf(m, tmp_path / "back")
    assert_bit_identical(hf_weights(back), weights)
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"


def test_streaming_writer_output_is_a_safetensors_file(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(2).bfloat16(),
    }
    w = SafetensorsWriter(
        tmp_path / "x.safetensors", {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    )
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    assert_bit_identical(load_file(tmp_path / "x.safetensors"), tensors)
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30 and parse_size("123") == 123
    assert plan_shards({"a": 5, "b": 5, "c": 20, "d": 1}, 10) == [["a", "b"], ["c"], ["d"]]


# ------------------------------------------------------------------------------- logits vs transformers


@pytest.mark.multiprocess
def test_mcore_model_at_tp2_pp2_reproduces_transformers_logits(hf_dirs, mcore_dirs, tmp_path):
    out = tmp_path / "logits.pt"
    folders = [str(mcore_dirs[k]) for k in FAMILIES]
    run_distributed(mcore_logits_worker, 4, folders, str(out), 2, 2)
    got = torch.load(out)
    for kind in FAMILIES:
        ref = hf_logits(hf_dirs[kind])
        torch.testing.assert_close(got[str(mcore_dirs[kind])], ref, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- refusals


def variant(src: Path, dst: Path, *, config=None, weights=None) -> Path:
    """A copy of the folder ``src`` with its config.json updated and/or its weights edited."""
    shutil.copytree(src, dst)
    if config is not None:
        c = json.loads((dst / "config.json").read_text())
        c.update(config)
        (dst / "config.json").write_text(json.dumps(c))
    if weights is not None:
        w = load_file(dst / "model.safetensors")
        weights(w)
        save_file(w, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def refused(capsys, argv: list[str], match: str) -> str:
    """The CLI exits 2 with exactly one line, ``gatedpo: error: ...`` containing ``match``."""
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gatedpo")]
    assert len(err) == 1 and err[0].startswith("gatedpo: error: "), err
    assert match in err[0], err[0]
    return err[0]


def _drop(name):
    return lambda w: w.pop(name)


def _add(name, shape):
    return lambda w: w.__setitem__(name, torch.zeros(shape))


def _reshape(name, shape):
    return lambda w: w.__setitem__(name, torch.zeros(shape))


HF_CASES = {
    "model_type": ({"model_type": "gpt_neox"}, None, "model_type 'gpt_neox' is not supported"),
    "rope_scaling": (
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, None, "rope scaling 'llama3'",
    ),
    "sliding_window": ({"model_type": "mistral", "sliding_window": 64}, None, "sliding-window attention (sliding_window=64)"),
    "o_proj_bias": ({"attention_bias": True}, None, "o_proj"),
    "activation": ({"hidden_act": "gelu"}, None, "hidden_act 'gelu'"),
    "missing": (None, _drop("model.layers.1.mlp.up_proj.weight"), "tensor model.layers.1.mlp.up_proj.weight is missing"),
    "extra": (None, _add("model.layers.0.self_attn.o_proj.bias", (64,)), "unexpected tensor model.layers.0.self_attn.o_proj.bias"),
    "shape": (None, _reshape("model.layers.0.self_attn.k_proj.weight", (64, 64)), "tensor model.layers.0.self_attn.k_proj.weight has shape [64, 64], expected [32, 64]"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_to_mcore_refusals_are_one_line_and_leave_no_destination(case, hf_dirs, tmp_path, capsys):
    config, weights, match = HF_CASES[case]
    src = variant(hf_dirs["llama"], tmp_path / "src", config=config, weights=weights)
    dst = tmp_path / "out" / "dst"
    refused(capsys, ["convert", "hf-to-mcore", "--src", str(src), "--dst", str(dst), "--tensor", "2"], match)
    assert (not dst.exists() and not (tmp_path / "out").exists()) or not any((tmp_path / "out").iterdir())


def test_layout_that_does_not_divide_the_model_is_refused(hf_dirs, tmp_path, capsys):
    dst = tmp_path / "dst"
    argv = ["convert", "hf-to-mcore", "--src", str(hf_dirs["llama"]), "--dst", str(dst)]
    refused(capsys, [*argv, "--tensor", "3"], "num_attention_heads=4 is not divisible by --tensor 3")
    refused(capsys, [*argv, "--pipeline", "3"], "num_layers=2 is not divisible by --pipeline 3")
    assert not dst.exists()


def test_missing_and_extra_shard_files(hf_dirs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dirs["mistral"])
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    dst = str(tmp_path / "dst")
    stray = sharded / "model-99999-of-99999.safetensors"
    shutil.copyfile(shards[0], stray)
    refused(
        capsys,
        ["convert", "hf-to-mcore", "--src", str(sharded), "--dst", dst],
        f"{stray}: shard file not listed",
    )
    stray.unlink()
    shards[1].rename(tmp_path / "elsewhere.safetensors")
    refused(
        capsys,
        ["convert", "hf-to-mcore", "--src", str(sharded), "--dst", dst],
        f"{shards[1]}: shard file listed",
    )
    assert not Path(dst).exists()


def test_mcore_folder_refusals(mcore_dirs, tmp_path, capsys):
    def broken(edit):
        d = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        shutil.copytree(mcore_dirs["llama"], d)
        edit(d)
        return d

    dst = str(tmp_path / "dst")
    d = broken(lambda d: (d / "tp01_pp01.safetensors").unlink())
    refused(
        capsys,
        ["convert", "mcore-to-hf", "--src", str(d), "--dst", dst],
        "tp01_pp01.safetensors: rank file is missing",
    )
    d = broken(lambda d: shutil.copyfile(d / "tp00_pp00.safetensors", d / "tp02_pp00.safetensors"))
    refused(
        capsys,
        ["convert", "reshard", "--src", str(d), "--dst", dst],
        "tp02_pp00.safetensors: unexpected rank file",
    )

    def extra_tensor(d):
        w = load_file(d / "tp00_pp01.safetensors")
        w["decoder.layers.0.mlp.linear_fc1.bias"] = torch.zeros(96)
        save_file(w, d / "tp00_pp01.safetensors")

    d = broken(extra_tensor)
    refused(
        capsys,
        ["convert", "mcore-to-hf", "--src", str(d), "--dst", dst],
        "unexpected tensor decoder.layers.0.mlp.linear_fc1.bias",
    )
    d = broken(lambda d: (d / "gatedpo_mcore.json").unlink())
    refused(capsys, ["convert", "mcore-to-hf", "--src", str(d), "--dst", dst], "not a training checkpoint")
    assert not Path(dst).exists()


def test_load_mcore_weights_refuses_another_layout_or_model(mcore_dirs):
    from dataclasses import replace

    from gatedpo_mega.convert import LayoutMismatchError, load_mcore_weights
    from gatedpo_mega.convert.hf_config import model_config_from_dict

    folder = mcore_dirs["llama"]
    meta = read_mcore_meta(folder)
    cfg = model_config_from_dict(meta["model"], "meta")
    model = torch.nn.Linear(1, 1)
    kw = dict(vocab_size=meta["vocab_size"], tp_rank=0, pp_rank=0)
    with pytest.raises(
        LayoutMismatchError,
        match=r"tensor 2 x pipeline 2, this run is tensor 1 x pipeline 2: gatedpo convert reshard",
    ):
        load_mcore_weights(model, folder, cfg=cfg, tp=1, pp=2, **kw)
    with pytest.raises(
        LayoutMismatchError, match=r"model.ffn_hidden_size is 96 in the checkpoint, 128 in this run"
    ):
        load_mcore_weights(model, folder, cfg=replace(cfg, ffn_hidden_size=128), tp=2, pp=2, **kw)
    with pytest.raises(LayoutMismatchError, match=r"vocabulary size is 100 in the checkpoint, 101"):
        load_mcore_weights(model, folder, cfg=cfg, tp=2, pp=2, **{**kw, "vocab_size": 101})
    with pytest.raises(ConvertError, match=r"tp00_pp00.safetensors: tensor weight is missing"):
        load_mcore_weights(model, folder, cfg=cfg, tp=2, pp=2, **kw)  # a model that is not this one


def test_existing_destination_needs_force_and_a_failure_leaves_it_untouched(
    hf_dirs, tmp_path, capsys, monkeypatch
):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    argv = ["convert", "hf-to-mcore", "--src", str(hf_dirs["qwen2"]), "--dst", str(dst), "--tensor", "2"]
    refused(capsys, argv, "exists and is not empty (pass --force to replace it)")
    from gatedpo_mega.convert.folders import HFFolder

    real = HFFolder.__getitem__

    def failing(self, name):
        if name == "model.norm.weight":  # late: the first rank files are already written
            raise ConvertError(f"{self.root}: tensor {name} is unreadable")
        return real(self, name)

    monkeypatch.setattr(HFFolder, "__getitem__", failing)
    refused(capsys, [*argv, "--force"], "tensor model.norm.weight is unreadable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # no temporary folder left
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    monkeypatch.setattr(HFFolder, "__getitem__", real)
    assert main([*argv, "--force"]) == 0
    assert (dst / "gatedpo_mcore.json").exists() and not (dst / "keep.txt").exists()
    refused(capsys, ["convert", "reshard", "--src", str(dst), "--dst", str(dst / "x")], "overlaps the source")


# --------------------------------------------------------------------------- DeepSpeed training checkpoints


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("kind", "tp", "pp", "world", "zero", "dtype"),
    [("qwen2", 2, 2, 4, 1, "fp32"), ("llama", 1, 1, 2, 3, "fp32"), ("mistral", 2, 1, 2, 1, "bf16")],
    ids=["zero1-tp2pp2", "zero3-dp2", "zero1-bf16-tp2"],  # bf16 at ZeRO 1: DeepSpeed's BF16_Optimizer files
)
def test_zero_checkpoint_to_hf_gives_the_weights_back(
    kind, tp, pp, world, zero, dtype, hf_dirs, tmp_path, capsys
):
    mcore = hf_to_mcore(hf_dirs[kind], tmp_path / "mcore", tensor=tp, pipeline=pp, dtype=dtype)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000000"
    run_distributed(zero_checkpoint_worker, world, str(mcore), str(ckpt), tp, pp, zero)
    out = tmp_path / "hf"
    assert main(["convert", "zero-to-hf", "--src", str(tmp_path / "run"), "--dst", str(out)]) == 0  # latest
    assert f"ZeRO {zero}, fp32 master weights" in capsys.readouterr().out
    original = {k: v.to(DTYPES[dtype]) for k, v in hf_weights(hf_dirs[kind]).items()}
    assert_bit_identical(hf_weights(out), original)
    assert_loads_cleanly(out)
    if dtype == "fp32":
        assert torch.equal(hf_logits(out), hf_logits(hf_dirs[kind]))
    if zero < 3:
        module = mcore_to_hf(ckpt, tmp_path / "module")
        assert_bit_identical(hf_weights(module), original)
    tmp = ckpt.with_name(".tmp-step-00000001")
    shutil.copytree(ckpt, tmp)
    refused(
        capsys,
        ["convert", "zero-to-hf", "--src", str(tmp), "--dst", str(tmp_path / "x")],
        "incomplete checkpoint",
    )
    lost = "mp_rank_00_model_states.pt" if zero < 3 else "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    (ckpt / "deepspeed" / "state" / lost).rename(tmp_path / "moved.pt")
    argv = ["convert", "zero-to-hf", "--src", str(ckpt), "--dst", str(tmp_path / "x")]
    refused(capsys, argv, f"{lost}: file is missing")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_model_without_an_hf_config_gets_a_llama_or_qwen2_config(kind, hf_dirs, mcore_dirs, tmp_path):
    """A model trained from scratch has no config.json to restore: Llama, or Qwen2 for a q/k/v bias, or Qwen3 for
    q/k norms."""
    src = tmp_path / "m"
    shutil.copytree(mcore_dirs[kind], src)
    meta = json.loads((src / "gatedpo_mcore.json").read_text())
    (src / "gatedpo_mcore.json").write_text(json.dumps({**meta, "hf_config": None}))
    out = mcore_to_hf(src, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == kind
    assert_loads_cleanly(out)
    torch.testing.assert_close(hf_logits(out), hf_logits(hf_dirs[kind]), rtol=0, atol=1e-6)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_trained_model_exported_by_zero_to_hf_reproduces_its_logits_in_transformers(tmp_path, capsys):
    """Two Gate-DPO steps at TP 2 (ZeRO 1; PP 2 files are covered above) with a checkpoint at the end; the export
    loads in transformers and gives the logits of the trained megatron-core model (weights read from DeepSpeed's
    own files, not through the converter)."""
    pytest.importorskip("gatedpo_mega.training.checkpoint", reason="needs the training checkpoint writer")
    run = tmp_path / "run"
    overrides = [
        "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=96", "model.tie_embeddings=true", "parallel.tensor=2", "parallel.pipeline=1",
        "parallel.zero_stage=1", "train.max_steps=2", "train.micro_batch_size=2", "train.global_batch_size=4",
        "train.lr=1e-2", "train.warmup_steps=0", "train.save_every=2", "data.builtin_pairs=32", "data.max_length=48",
        "data.max_prompt_length=32", "data.eval_fraction=0", f"data.cache_dir={tmp_path / 'cache'}",
        f"train.output_dir={run}",
    ]  # fmt: skip
    run_distributed(train_worker, 2, overrides)
    ckpt = run / "checkpoints" / "step-00000002"
    assert (ckpt / "meta.json").exists()
    logits = tmp_path / "trained.pt"
    run_distributed(trained_logits_worker, 2, str(ckpt), str(logits))
    out = tmp_path / "hf"
    assert main(["convert", "zero-to-hf", "--src", str(run), "--dst", str(out)]) == 0
    assert_loads_cleanly(out)
    torch.testing.assert_close(hf_logits(out), torch.load(logits)["fp32"], rtol=0, atol=1e-5)
    module = mcore_to_hf(ckpt, tmp_path / "module")  # fp32 training: the module weights are the masters
    assert_bit_identical(hf_weights(module), hf_weights(out))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_gate_dpo_trains_from_a_qwen3_folder_at_tp2(tmp_path):
    """``model.init_from`` a Qwen3 folder at TP 2: the run's shape fields (head_dim, qk_norm) are accepted, step one
    is ln 2 (the policy is the reference) and every loss is finite; the checkpoint keeps the Qwen3 config."""
    folder = make_hf_folder("qwen3", tmp_path, vocab_size=512)  # covers the built-in tokenizer's vocabulary
    run = tmp_path / "run"
    overrides = [
        f"model.init_from={folder}", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.ffn_hidden_size=96", "model.head_dim=32", "model.qk_norm=true",
        "model.tie_embeddings=true", "model.norm_epsilon=1e-6", "parallel.tensor=2", "train.max_steps=3",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.lr=1e-2", "train.warmup_steps=0",
        "data.builtin_pairs=32", "data.max_length=48", "data.max_prompt_length=32", "data.eval_fraction=0",
        f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={run}",
    ]  # fmt: skip
    run_distributed(train_worker, 2, overrides)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)
    assert rows[-1]["loss"] != rows[0]["loss"]  # the weights moved
    meta = json.loads((run / "checkpoints" / "step-00000003" / "meta.json").read_text())
    assert (meta["model"]["head_dim"], meta["model"]["qk_norm"]) == (32, True)
    assert meta["hf_config"]["model_type"] == "qwen3"
