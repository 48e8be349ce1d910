"""The memory planner (``gatedpo plan``): parameter counts against the models themselves, the refusals training gives,
the layout search, and the predicted peak against the measured one (tools/plan_check.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from convert_helpers import FAMILIES, hf_config
from distributed import run_distributed

from gatedpo_mega.config import Config, ModelConfig, ParallelConfig, load_config
from gatedpo_mega.errors import ConfigError, UserError
from gatedpo_mega.planner import (
    GiB,
    feasible,
    plan_memory,
    smallest_fit,
    stage_parameters,
    total_parameters,
)

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gatedpo_mega.cli", "plan", *args], capture_output=True, text=True, cwd=ROOT
    )


@pytest.mark.parametrize("kind", FAMILIES)
def test_total_parameters_equal_the_hugging_face_model(kind):
    from transformers import AutoModelForCausalLM

    from gatedpo_mega.convert.hf_config import hf_model_config

    hf = hf_config(kind)
    model = AutoModelForCausalLM.from_config(hf)
    mcfg, vocab = hf_model_config(hf.to_dict())
    # transformers counts a tied output layer once, as total_parameters does
    assert total_parameters(Config(model=mcfg), vocab) == sum(p.numel() for p in model.parameters())


def _count_worker(rank: int, world: int, model_fields: dict, tp: int, pp: int, vocab: int, out: str) -> None:
    import torch

    from gatedpo_mega.megatron.backend import stage_info
    from gatedpo_mega.megatron.model import build_model
    from gatedpo_mega.megatron.parallel import initialize_layout

    cfg = Config(model=ModelConfig(**model_fields), parallel=ParallelConfig(tensor=tp, pipeline=pp))
    lay = initialize_layout(tp, pp)
    stage = stage_info(cfg, lay)  # as training builds each rank's stage
    model = build_model(cfg.model, vocab_size=vocab, stage=stage, pipeline=pp, seed=0, tp_group=lay.tp_group)
    counted = sum(p.numel() for p in model.parameters())
    torch.save((lay.pp_rank, counted, stage_parameters(cfg, vocab, lay.pp_rank)), f"{out}.{rank}")


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("fields", "tp", "pp"),
    [
        ({"qkv_bias": True, "tie_embeddings": True}, 2, 1),
        ({"tie_embeddings": True}, 1, 2),  # the last stage's copy of the tied embedding
        ({"qk_norm": True, "head_dim": 32}, 2, 1),
    ],
)
def test_parameters_on_each_rank_equal_the_built_stage(tmp_path, fields, tp, pp):
    import torch

    model_fields = {
        "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
        "ffn_hidden_size": 96, **fields,
    }  # fmt: skip
    out = str(tmp_path / "count")
    run_distributed(_count_worker, tp * pp, model_fields, tp, pp, 300, out)
    for rank in range(tp * pp):
        stage, counted, planned = torch.load(f"{out}.{rank}")
        assert planned == counted, (rank, stage)


def _cfg(*overrides: str) -> Config:
    return load_config(ROOT / "configs/llama2-7b.yaml", list(overrides))


def test_zero_stages_shard_the_optimizer_state_as_the_zero_paper_counts():
    """Model states per GPU (weights, gradients, optimizer; mixed precision Adam: 2 + 2 + 12 bytes a parameter) at
    data-parallel 64 for each stage: the ZeRO paper's Figure 1 arithmetic (Rajbhandari et al., 2020)."""
    cfg = _cfg(
        "parallel.tensor=1", "parallel.pipeline=1", "train.micro_batch_size=1", "train.global_batch_size=64"
    )
    n = stage_parameters(cfg, 32000, 0)
    states = ("weights", "gradients", "optimizer: fp32 master weights", "optimizer: Adam moments")

    def model_states(zero: int) -> float:
        c = replace(cfg, parallel=ParallelConfig(zero_stage=zero))
        r = plan_memory(c, world=64, vocab_size=32000).busiest
        return sum(p.bytes for p in (*r.parts, *r.step) if p.name in states) / n

    assert model_states(1) == pytest.approx(2 + 2 + 12 / 64, rel=1e-3)
    assert model_states(2) == pytest.approx(2 + (2 + 12) / 64, rel=1e-3)
    assert model_states(3) == pytest.approx((2 + 2 + 12) / 64, rel=1e-3)


@pytest.mark.parametrize("gpus", [8, 64])
def test_zero2_model_states_equal_deepspeeds_own_estimate(gpus):
    """DeepSpeed's estimator (bf16 weights, then bf16 and fp32 gradients, fp32 weights and Adam's moments over the
    data-parallel ranks: 2 + 18 / N bytes a parameter) on the same parameter count."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = _cfg(
        "parallel.tensor=1", "parallel.pipeline=1", "parallel.zero_stage=2", "train.global_batch_size=64"
    )
    n = stage_parameters(cfg, 32000, 0)
    r = plan_memory(cfg, world=gpus, vocab_size=32000).busiest
    names = (
        "weights",
        "gradients",
        "gradients: fp32 partition",
        "optimizer: fp32 master weights",
        "optimizer: Adam moments",
    )
    ours = sum(p.bytes for p in (*r.parts, *r.step) if p.name in names)
    _, theirs = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=gpus, cpu_offload=False)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_more_parallelism_and_recompute_need_less_memory():
    base = plan_memory(_cfg(), world=16, vocab_size=32000).per_rank_peak_bytes
    assert plan_memory(_cfg("parallel.tensor=8"), world=16, vocab_size=32000).per_rank_peak_bytes < base
    assert plan_memory(_cfg("model.recompute=full"), world=16, vocab_size=32000).per_rank_peak_bytes < base
    longer = plan_memory(_cfg("data.max_length=4096"), world=16, vocab_size=32000).per_rank_peak_bytes
    assert longer > base
    # where backward is the peak, the unfused output layer's whole logits add to the last stage
    long = ("data.max_length=4096", "model.max_position_embeddings=4096")
    unfused = plan_memory(_cfg(*long, "model.fused_logprobs=false"), world=16, vocab_size=32000)
    assert unfused.ranks[-1].total > plan_memory(_cfg(*long), world=16, vocab_size=32000).ranks[-1].total


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.tensor=8", "model.num_query_groups=4"], "model.num_query_groups=4 is not divisible by parallel.tensor=8"),
        (["parallel.pipeline=4", "model.num_layers=30"], "model.num_layers=30 is not divisible by parallel.pipeline=4"),
        (["parallel.zero_stage=2"], "parallel.zero_stage=2 with parallel.pipeline=2"),
    ],
)  # fmt: skip
def test_a_layout_that_cannot_work_is_refused_as_training_refuses_it(overrides, message):
    proc = _cli("--config", "configs/llama2-7b.yaml", *overrides)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"gatedpo: error: {message}" or (
        proc.stderr.startswith("gatedpo: error: ") and message in proc.stderr and proc.stderr.count("\n") == 1
    ), proc.stderr


def test_the_plan_command_prints_the_parts_and_one_json_object():
    proc = _cli("--config", "configs/llama2-7b.yaml", "--target", "cuda")
    assert proc.returncode == 0, proc.stderr
    assert "busiest rank: pipeline stage " in proc.stdout and "| weights " in proc.stdout
    proc = _cli("--config", "configs/llama2-7b.yaml", "--target", "cuda", "--json")
    out = json.loads(proc.stdout)
    expected = plan_memory(_cfg(), world=8, vocab_size=32000).per_rank_peak_bytes
    assert out["per_rank_peak_bytes"] == expected
    assert out["per_rank_peak_bytes"] == sum(out["parts"].values()) + sum(out["peak_parts"].values())
    assert out["busiest_stage"] == max(out["stages"], key=lambda s: s["peak_bytes"])["stage"]
    assert out["layout"] == {
        "tensor": 4, "pipeline": 2, "context": 1, "data": 1, "zero_stage": 1, "micro_batch_size": 1,
    }  # fmt: skip


def test_the_layout_search_ranks_what_fits_and_names_the_smallest_gpu_count():
    cfg = _cfg()
    found = feasible(cfg, 16, 32000, 80 * GiB)
    assert found and all(c.peak_bytes <= 80 * GiB for c in found)
    assert [c.step_time for c in found] == sorted(c.step_time for c in found)
    assert all(c.tensor * c.pipeline * c.context * c.dp == 16 for c in found)
    assert not any(c.pipeline > 1 and c.zero_stage > 1 for c in found)  # as ParallelConfig refuses
    assert not feasible(cfg, 2, 32000, 24 * GiB)
    need = smallest_fit(cfg, 2, 32000, 24 * GiB)
    assert need is not None and feasible(cfg, need, 32000, 24 * GiB)
    assert not any(feasible(cfg, n, 32000, 24 * GiB) for n in (4, *range(8, need, 8)))  # none smaller fits
    proc = _cli("--config", "configs/llama2-7b.yaml", "--gpus", "2", "--gpu-memory", "24")
    assert proc.returncode == 1
    assert proc.stderr == (
        "gatedpo: error: this model does not fit any layout on 2 GPUs of 24 GiB; the smallest GPU count that fits "
        f"is {need}\n"
    )


def test_bad_arguments_are_one_line():
    proc = _cli("--config", "configs/llama2-7b.yaml", "--gpus", "8")
    assert proc.returncode == 2 and proc.stderr.startswith(
        "gatedpo: error: --gpus and --gpu-memory go together"
    )
    with pytest.raises(ConfigError):
        plan_memory(_cfg(), world=12, vocab_size=32000)
    hf = Config(model=ModelConfig(backend="transformers", init_from="HF_DIR"))
    with pytest.raises(UserError, match=r"model\.backend=transformers is not planned"):
        plan_memory(hf, world=1, vocab_size=32000)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_predicted_peak_is_within_15_percent_of_the_measured_one(tmp_path):
    """3 of tools/plan_check.py's 3 shapes x 3 layouts of 2 CPU processes: every shape, every layout kind (TP, PP
    with the unfused output layer, data-parallel under ZeRO 3), fp32 and bf16, the fused objective; each trains 2
    steps. (The script runs all 9, and a LoRA case, for docs/planning.md; tests/test_planner_lora.py and
    tests/test_planner_context.py check the LoRA and context-parallel terms without training.)"""
    out = tmp_path / "rows.json"
    picked = ["wide-fp32/DP2-Z3", "deep-bf16/PP2-Z0-unfused", "vocab-32k/TP2-Z1-fused-objective"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools/plan_check.py"), "--json", str(out), "--out", str(tmp_path / "runs"),
         "--only", *picked],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert out.exists(), proc.stdout + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["case"] for r in rows] == picked
    bad = [r for r in rows if abs(r["error"]) > 0.15]
    assert not bad, proc.stdout
    assert proc.returncode == 0, proc.stdout
