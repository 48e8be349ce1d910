"""The planner's context-parallel terms (``gatedpo plan`` with ``parallel.context`` > 1): per-token activations
divided by CP beside each layer's keys and values gathered over the whole row, ZeRO's partitions over DP x CP, the
step-time model's CP traffic, the layout search over CP, and the refusals. Arithmetic only: no model is built."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from gatedpo_mega.config import Config, load_config
from gatedpo_mega.errors import ConfigError
from gatedpo_mega.planner import (
    DTYPE_BYTES,
    NVLINK_BYTES_PER_S,
    GiB,
    adapter_activation_bytes,
    context_gather_bytes,
    feasible,
    format_candidates,
    format_plan,
    plan_json,
    plan_memory,
    row_length,
    rows_tokens,
    stage_parameters,
    step_seconds,
)

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 128256
LONG = ("data.max_length=32768", "model.max_position_embeddings=32768")


def _cfg(*overrides: str) -> Config:
    """Llama-3-8B's shape (32 layers, 4096 wide, 32 heads in 8 key/value groups of 128 channels, bf16)."""
    return load_config(ROOT / "configs/llama3-8b.yaml", list(overrides))


def _at(cfg: Config, **parallel: int) -> Config:
    return replace(cfg, parallel=replace(cfg.parallel, **parallel))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gatedpo_mega.cli", "plan", *args], capture_output=True, text=True, cwd=ROOT
    )


def _parts(plan, stage: int) -> dict[str, int]:
    r = plan.ranks[stage]
    return {p.name: p.bytes for p in (*r.parts, *r.backward)}


def _gathered_kv(tp: int, tokens: int) -> int:
    """One layer's k and v for ``tokens`` tokens of whole rows on one tensor rank: 8 groups x 128 channels, bf16."""
    return 2 * (8 * 128 // tp) * tokens * 2


@pytest.mark.parametrize(
    ("parallel", "overrides"),
    [
        ({"tensor": 1, "pipeline": 1, "zero_stage": 2}, ()),
        ({"tensor": 2, "pipeline": 2, "zero_stage": 1}, ("model.fused_logprobs=false",)),
        ({"tensor": 1, "pipeline": 1, "zero_stage": 2}, ("model.lora.rank=16",)),
    ],
)
def test_activations_at_cp2_are_the_per_token_terms_halved_beside_the_gathered_keys_and_values(
    parallel, overrides
):
    one = _at(_cfg(*LONG, *overrides), **parallel)
    two = _at(one, context=2)
    world = 8
    p1 = plan_memory(one, world=world, vocab_size=VOCAB)
    p2 = plan_memory(two, world=world, vocab_size=VOCAB)
    assert p2.dp * 2 == p1.dp
    tokens = rows_tokens(one)  # whole rows: 2 x 32768
    assert rows_tokens(two) == tokens == 65536
    tp, pp = parallel["tensor"], parallel["pipeline"]
    layers = 32 // pp
    for stage in range(pp):
        a1, a2 = _parts(p1, stage), _parts(p2, stage)
        flight = pp - stage  # 1F1B: the same micro-batches in flight at both sizes
        kv = layers * flight * _gathered_kv(tp, tokens)  # CP 1: a rank's own k and v are the whole rows'
        per_token = a1["activations"] - kv
        assert a2["activations"] == per_token // 2 + kv, stage
        if one.model.lora.enabled:  # the rank-r intermediates per token, A's concatenation once a layer
            assert a2["activations: LoRA adapters"] == layers * adapter_activation_bytes(one, tokens // 2)
            assert a2["activations: LoRA adapters"] < a1["activations: LoRA adapters"]
        last = stage == pp - 1
        if last and not one.model.fused_logprobs:  # the whole [tokens, V/TP] logits, a rank's share of them
            assert a2["output layer + log-probs"] * 2 == a1["output layer + log-probs"]
        # the loss's 3 float32 statistics a token of the whole rows, gathered over CP on the last stage
        assert a2.get("loss: gathered over CP", 0) == (3 * 4 * tokens if last else 0)
        assert "loss: gathered over CP" not in a1
    assert p2.per_rank_peak_bytes < p1.per_rank_peak_bytes


def test_recompute_keeps_a_ranks_layer_inputs_and_one_layer_with_the_gathered_keys_and_values():
    one = _cfg(*LONG, "model.recompute=full")
    four = _at(one, context=4)
    a1 = _parts(plan_memory(one, world=8, vocab_size=VOCAB), 0)
    a4 = _parts(plan_memory(four, world=8, vocab_size=VOCAB), 0)
    tokens = rows_tokens(one)
    kv = _gathered_kv(1, tokens)
    assert a4["activations"] == (a1["activations"] - kv) // 4 + kv


def test_rows_are_padded_to_a_multiple_of_twice_the_context_size():
    cfg = _cfg("data.max_length=2050")
    assert row_length(cfg) == 2050
    assert row_length(_at(cfg, context=4)) == 2056  # 257 chunks of 8
    assert row_length(_at(cfg, context=2)) == 2052
    assert rows_tokens(_at(cfg, context=4)) == 2 * 2056


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_zero_partitions_model_states_over_data_times_context_parallel_ranks(zero):
    """Mixed precision Adam's 2 + 2 + 12 bytes a parameter, partitioned by ZeRO stage over DP x CP = 16 ranks:
    the same model states as DP 16 at CP 1, half those of DP 8 at CP 1."""
    cfg = _cfg("parallel.zero_stage=" + str(zero))
    n = stage_parameters(cfg, VOCAB, 0)
    states = ("weights", "gradients", "optimizer: fp32 master weights", "optimizer: Adam moments")

    def model_states(c: Config, world: int) -> float:
        r = plan_memory(c, world=world, vocab_size=VOCAB).busiest
        return sum(p.bytes for p in (*r.parts, *r.step) if p.name in states) / n

    cp2 = model_states(_at(cfg, context=2), 16)  # DP 8 x CP 2
    expected = {1: 2 + 2 + 12 / 16, 2: 2 + (2 + 12) / 16, 3: (2 + 2 + 12) / 16}[zero]
    assert cp2 == pytest.approx(expected, rel=1e-4)
    assert cp2 == pytest.approx(model_states(cfg, 16), rel=1e-6)  # DP 16
    assert cp2 < model_states(cfg, 8)  # DP 8 alone partitions over 8


def test_the_step_time_counts_the_gradient_traffic_over_dp_x_cp_and_the_kv_gathers():
    cfg = _cfg(*LONG, "parallel.zero_stage=2")
    wb = DTYPE_BYTES["bf16"]
    # ZeRO-3 adds half the gradients' traffic again for the parameter gathers: over the 2 CP ranks at DP 1, none at
    # CP 1 DP 1
    p = stage_parameters(cfg, VOCAB, 0)
    cp2, cp2_z3 = _at(cfg, context=2), _at(cfg, context=2, zero_stage=3)
    extra = step_seconds(cp2_z3, 1, VOCAB) - step_seconds(cp2, 1, VOCAB)
    assert extra == pytest.approx(0.5 * 2 * p * wb * (1 / 2) / NVLINK_BYTES_PER_S, rel=1e-6)
    assert step_seconds(_at(cfg, zero_stage=3), 1, VOCAB) == pytest.approx(step_seconds(cfg, 1, VOCAB))
    # k and v of the whole rows gathered forward and reduce-scattered backward in every layer: (CP - 1)/CP each
    for cp in (1, 2, 4, 8):
        moved = 2 * 32 * _gathered_kv(1, rows_tokens(cfg)) * (cp - 1) / cp
        assert context_gather_bytes(_at(cfg, context=cp)) == pytest.approx(moved)


def test_the_layout_search_at_32k_tokens_finds_context_parallel_layouts_of_8_gpus():
    cfg = _cfg(*LONG)
    found = feasible(cfg, 8, VOCAB, 80 * GiB)
    assert found and all(c.peak_bytes <= 80 * GiB for c in found)
    assert all(c.tensor * c.pipeline * c.context * c.dp == 8 for c in found)
    assert all(cfg.train.global_batch_size % (c.micro_batch_size * c.dp) == 0 for c in found)
    assert [c.step_time for c in found] == sorted(c.step_time for c in found)
    # a 32k row's activations do not fit one rank without CP (288 GiB at DP 8); every layout that fits splits rows
    assert all(c.context > 1 for c in found)
    assert {c.context for c in found} >= {2, 4, 8}
    table = format_candidates(found, 8, 80 * GiB).splitlines()
    assert table[1] == "| TP | PP | CP | DP | ZeRO | micro-batch | peak GiB | relative step time |"
    c = found[0]
    assert table[3].startswith(f"| {c.tensor} | {c.pipeline} | {c.context} | {c.dp} | {c.zero_stage} |")
    # at 2,048 tokens CP 1 layouts stay, and CP 1's are all still there
    short = feasible(_cfg(), 8, VOCAB, 80 * GiB)
    assert any(c.context == 1 for c in short) and any(c.context > 1 for c in short)


def test_the_report_line_and_json_name_the_context_size():
    cfg = _at(_cfg(*LONG), context=4)
    plan = plan_memory(cfg, world=8, vocab_size=VOCAB)
    head = format_plan(plan).splitlines()[0]
    assert "TP 1 x CP 4 x PP 1 x DP 2, ZeRO 2" in head and "32768 tokens (8192 a rank over CP 4)" in head
    assert "CP" not in format_plan(plan_memory(_cfg(*LONG), world=8, vocab_size=VOCAB)).splitlines()[0]
    assert plan_json(plan)["layout"] == {
        "tensor": 1, "pipeline": 1, "context": 4, "data": 2, "zero_stage": 2, "micro_batch_size": 1,
    }  # fmt: skip
    proc = _cli("--config", "configs/llama3-8b.yaml", "--gpus", "8", "--gpu-memory", "80", "--json", *LONG)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["layout"]["context"] == 1 and out["feasible"]
    assert all(f["context"] > 1 for f in out["feasible"])


def test_a_context_size_the_world_does_not_divide_is_refused_in_one_line():
    cfg = _at(_cfg(), tensor=4, context=4)
    message = (
        "world size 8 is not a multiple of parallel.tensor x parallel.pipeline x parallel.context = 4 x 1 x 4"
    )
    with pytest.raises(ConfigError) as e:
        plan_memory(cfg, world=8, vocab_size=VOCAB)
    assert str(e.value) == message
    with pytest.raises(
        ConfigError, match=r"data-parallel size 8 \(world 16 / \(tensor 1 x pipeline 1 x context 2"
    ):
        small = replace(_at(_cfg(), context=2), train=replace(cfg.train, global_batch_size=4))
        plan_memory(small, world=16, vocab_size=VOCAB)
    with pytest.raises(ConfigError, match=r"^model\.num_layers=30 is not divisible by parallel\.pipeline=4$"):
        plan_memory(
            _at(_cfg("model.num_layers=30"), pipeline=4, context=2, zero_stage=1), world=8, vocab_size=VOCAB
        )
    proc = _cli(
        "--config", "configs/llama3-8b.yaml", "--nproc", "8", "parallel.tensor=4", "parallel.context=4"
    )
    assert proc.returncode == 2
    assert proc.stderr == f"gatedpo: error: {message}\n"
