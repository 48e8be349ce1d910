"""Checkpoint conversion: Hugging Face <-> megatron-core at any layout, ZeRO training checkpoints -> Hugging Face.

Tiny random models of each supported family (Llama with GQA, Mistral, Qwen2 with q/k/v bias and tied embeddings;
vocabularies that TP 2 pads): round trips are bit-identical, the megatron-core model reproduces transformers'
logits, and every refusal is one line naming the tensor or file and leaves the destination clean.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from convert_helpers import FAMILIES, hf_logits, make_hf_folder, mcore_logits_worker
from distributed import run_distributed
from safetensors.torch import load_file, save_file

from gatedpo_mega.convert import (
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
