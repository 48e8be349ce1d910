"""The planner's mixture-of-experts terms (``gatedpo plan`` with ``model.num_experts`` > 0): parameters counted from
``families.layer_tensors`` with each rank holding E / EP experts, ZeRO partitioning the experts over DP / EP ranks,
the routed activations, the step-time model's expert FLOPs and all-to-all, and the layout search over EP.
Arithmetic only: no model is built. Expected numbers are computed here from the shapes, not read off the planner."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import gatedpo_mega.planner as planner
from gatedpo_mega.config import Config, load_config
from gatedpo_mega.families import expert_index, layer_tensors
from gatedpo_mega.megatron.parallel import validate_layout
from gatedpo_mega.planner import (
    NVLINK_BYTES_PER_S,
    GiB,
    active_parameters,
    candidates,
    expert_exchange_bytes,
    feasible,
    format_candidates,
    format_plan,
    layer_activation_bytes,
    micro_batches,
    plan_json,
    plan_memory,
    smallest_fit,
    stage_parameters,
    step_seconds,
    total_parameters,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/qwen3-30b-a3b.yaml"
VOCAB = 151936
# Qwen3-30B-A3B: 48 layers, h 2048, 32 heads x 128 (q 4096) in 4 groups (kv 512), 128 experts of 768, top 8
L, H, Q, KV, E, F, K = 48, 2048, 4096, 512, 128, 768, 8
EXPERT = 3 * H * F  # gate, up [F, H] and down [H, F]
DENSE = (Q + 2 * KV) * H + H * Q + 2 * 128 + 2 * H + E * H  # qkv, o_proj, q/k norms, 2 norms, router


def _cfg(*overrides: str) -> Config:
    return load_config(CONFIG, list(overrides))


def _at(cfg: Config, **parallel: int) -> Config:
    return replace(cfg, parallel=replace(cfg.parallel, **parallel))


def _parts(plan) -> dict[str, int]:
    r = plan.busiest
    return {p.name: p.bytes for p in (*r.parts, *r.backward, *r.step)}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gatedpo_mega.cli", "plan", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_parameters_are_the_sum_over_layer_tensors_and_qwen3_30b_a3b_is_30_5b_with_3_3b_active():
    cfg = _cfg()
    tensors = layer_tensors(cfg.model)
    experts = [t for t in tensors if expert_index(t.mcore) is not None]
    assert len(experts) == 2 * E and {expert_index(t.mcore) for t in experts} == set(range(E))
    per_layer = sum(math.prod(t.shape) for t in tensors)
    assert per_layer == DENSE + E * EXPERT
    embeddings = 2 * VOCAB * H  # untied
    assert total_parameters(cfg, VOCAB) == L * per_layer + H + embeddings == 30_532_122_624
    assert active_parameters(cfg, VOCAB) == L * (DENSE + K * EXPERT) + H + embeddings == 3_353_032_704
    # the same count at any EP: each of the EP ranks holds its E / EP experts (PP 1: one stage holds all layers)
    for ep in (1, 2, 8):
        on_rank = stage_parameters(_at(cfg, expert=ep), VOCAB, 0)
        assert on_rank == L * (DENSE + E // ep * EXPERT) + H + embeddings + (-VOCAB % 128) * H * 2
    # a dense model's count is untouched: Qwen3's dense MLP in place of the experts
    dense = _cfg("model.num_experts=0", "model.moe_ffn_hidden_size=0", "parallel.expert=1")
    assert total_parameters(dense, VOCAB) == active_parameters(dense, VOCAB)
    assert total_parameters(dense, VOCAB) == L * (DENSE - E * H + 3 * H * 6144) + H + embeddings


@pytest.mark.parametrize("zero", [1, 2])
def test_a_ranks_expert_bytes_fall_as_1_over_ep_and_zero_partitions_them_over_dp_over_ep(zero):
    cfg = _at(_cfg(), zero_stage=zero)
    dense = L * DENSE + H + 2 * VOCAB * H  # (151,936 is a multiple of 128: no padding)
    experts_total = L * E * EXPERT
    weights = {}
    for ep in (1, 2, 4, 8):
        plan = plan_memory(_at(cfg, expert=ep), world=8, vocab_size=VOCAB)  # DP 8
        parts = _parts(plan)
        held = experts_total // ep
        weights[ep] = parts["weights"]
        assert parts["weights"] == 2 * (dense + held)
        edp = 8 // ep  # the expert-data-parallel group
        part = math.ceil(dense / 8) + math.ceil(held / edp)
        assert parts["optimizer: fp32 master weights"] == 4 * part
        assert parts["optimizer: Adam moments"] == 8 * part
        assert parts["gradients"] == (2 * part if zero == 2 else 2 * (dense + held))
        # DeepSpeed steps the experts as their own group at EP > 1: the fp32 partition is the larger group's
        group = max(math.ceil(dense / 8), math.ceil(held / edp)) if ep > 1 else part
        assert parts["gradients: fp32 partition"] == 4 * group
        assert parts["optimizer step temporaries"] == 4 * group  # cuda: foreach sqrt(v) of the group
    expert_bytes = {ep: weights[ep] - 2 * dense for ep in weights}
    assert expert_bytes == {ep: 2 * experts_total // ep for ep in (1, 2, 4, 8)}


def test_moe_activations_replace_the_dense_mlps_with_k_routed_copies():
    cfg = _cfg()
    tokens = 2 * 2048  # a pair of 2,048-token rows
    b = 2
    attention = 3 * H + 3 * Q  # two norms' inputs, q/k/v's input, o_proj's input, q, attention's output
    router = H * b + E * (2 * b + 4 + 1)  # its input; logits and probs, the fp32 softmax, the routing map
    routed = K * (H + 2 * F + F + F) * b  # dispatched input, fc1 out, SwiGLU out, x probability (fc2's input)
    kv = 2 * KV * tokens * b
    assert layer_activation_bytes(cfg, tokens) == (attention * b + router + routed) * tokens + kv
    parts = _parts(plan_memory(cfg, world=8, vocab_size=VOCAB))
    assert parts["activations"] == L * layer_activation_bytes(cfg, tokens)
    assert parts["MoE: token exchange buffers"] == 2 * tokens * K * H * b
    # the experts' intermediates grow with k; the dense model has no such term
    assert layer_activation_bytes(_cfg("model.moe_router_topk=2"), tokens) < layer_activation_bytes(
        cfg, tokens
    )
    dense = _cfg("model.num_experts=0", "model.moe_ffn_hidden_size=0", "parallel.expert=1")
    assert "MoE: token exchange buffers" not in _parts(plan_memory(dense, world=8, vocab_size=VOCAB))


def test_the_step_time_counts_k_experts_flops_and_an_all_to_all_that_is_zero_at_ep1(monkeypatch):
    cfg = _cfg()
    tokens = 2 * 2048
    assert expert_exchange_bytes(_at(cfg, expert=1)) == 0
    for ep in (2, 4, 8):
        # dispatch and combine, forward and backward: 4 exchanges of tokens x k x h a layer, (EP - 1)/EP leaving
        moved = 4 * L * tokens * K * H * 2 * (ep - 1) / ep
        assert expert_exchange_bytes(_at(cfg, expert=ep)) == pytest.approx(moved)
    dense = _cfg("model.num_experts=0", "model.moe_ffn_hidden_size=0", "parallel.expert=1")
    assert expert_exchange_bytes(dense) == 0
    # the step time carries it over NVLink (EP 8 fits a node) once per micro-batch
    ep8 = _at(cfg, expert=8)
    with_a2a = step_seconds(ep8, 8, VOCAB)
    monkeypatch.setattr(planner, "expert_exchange_bytes", lambda c: 0.0)
    without = step_seconds(ep8, 8, VOCAB)
    monkeypatch.undo()
    per_step = expert_exchange_bytes(ep8) / NVLINK_BYTES_PER_S * micro_batches(ep8, 8)
    assert with_a2a - without == pytest.approx(per_step) and per_step > 0
    # FLOPs are k experts' a token, not all E: 6 x 2 x (8 - 2) more experts' parameters a token at top-8 than top-2
    top2 = _cfg("model.moe_router_topk=2", "parallel.expert=8")
    more = 6 * L * (K - 2) * EXPERT * tokens / planner.ACHIEVED_FLOPS
    extra_a2a = (expert_exchange_bytes(ep8) - expert_exchange_bytes(top2)) / NVLINK_BYTES_PER_S
    assert step_seconds(ep8, 8, VOCAB) - step_seconds(top2, 8, VOCAB) == pytest.approx(
        (more + extra_a2a) * micro_batches(ep8, 8)
    )


def test_the_search_plans_only_layouts_the_config_accepts():
    cfg = _cfg()
    found = list(candidates(cfg, 8, VOCAB))
    assert found
    assert {c.expert for c in found} == {1, 2, 4, 8}
    assert all(c.tensor == 1 and c.context == 1 for c in found)  # MoE refuses TP and CP
    assert all(
        c.zero_stage in (1, 2) for c in found if c.expert > 1
    )  # DeepSpeed's MoE partitions at ZeRO 1/2
    assert {c.zero_stage for c in found if c.expert == 1} == {
        0,
        1,
        2,
        3,
    }  # EP 1: experts are plain parameters
    assert not any(c.pipeline > 1 and c.zero_stage > 1 for c in found)
    for c in found:
        assert c.pipeline * c.dp == 8 and c.dp % c.expert == 0 and E % c.expert == 0
        built = load_config(
            CONFIG,
            [
                f"parallel.tensor={c.tensor}", f"parallel.pipeline={c.pipeline}", f"parallel.context={c.context}",
                f"parallel.expert={c.expert}", f"parallel.zero_stage={c.zero_stage}",
                f"train.micro_batch_size={c.micro_batch_size}",
            ],
        )  # fmt: skip
        assert validate_layout(built, 8) == c.dp
        assert plan_memory(built, world=8, vocab_size=VOCAB).per_rank_peak_bytes == c.peak_bytes
    # a dense model is searched at EP 1 only
    dense = _cfg("model.num_experts=0", "model.moe_ffn_hidden_size=0", "parallel.expert=1")
    assert {c.expert for c in candidates(dense, 4, VOCAB)} == {1}


def test_qwen3_30b_a3b_fits_8_h200s_not_8_gpus_of_80_gib_and_16_of_them():
    """Full-parameter AdamW holds 16 bytes a parameter, 61 GB of 30.5B over 8 ranks however they are split, and
    the step adds the fp32 gradient partition and foreach AdamW's temporary of the larger optimizer group (the
    experts: 2 x 14.5 GB at EP 8): 86.5 GiB at the config's EP 8 x ZeRO-2, 86.0 at the least."""
    cfg = _cfg()
    assert not feasible(cfg, 8, VOCAB, 80 * GiB)
    least = min(c.peak_bytes for c in candidates(cfg, 8, VOCAB))
    assert 80 * GiB < least < 87 * GiB
    assert smallest_fit(cfg, 8, VOCAB, 80 * GiB) == 16
    sixteen = feasible(cfg, 16, VOCAB, 80 * GiB)
    assert sixteen and all(c.peak_bytes <= 80 * GiB for c in sixteen)
    assert all(c.expert > 1 for c in sixteen[:4])
    h200 = feasible(cfg, 8, VOCAB, 131 * GiB)  # 141 GB
    mine = plan_memory(cfg, world=8, vocab_size=VOCAB)
    assert (1, 1, 8, 8, 2, 1, mine.per_rank_peak_bytes) in {
        (c.tensor, c.pipeline, c.expert, c.dp, c.zero_stage, c.micro_batch_size, c.peak_bytes) for c in h200
    }
    table = format_candidates(h200, 8, 131 * GiB).splitlines()
    assert table[1] == "| TP | PP | CP | EP | DP | ZeRO | micro-batch | peak GiB | relative step time |"
    c = h200[0]
    assert table[3].startswith(f"| 1 | {c.pipeline} | 1 | {c.expert} | {c.dp} | {c.zero_stage} |")


def test_the_report_and_json_name_the_experts():
    cfg = _cfg()
    plan = plan_memory(cfg, world=8, vocab_size=VOCAB)
    head = format_plan(plan).splitlines()[0]
    assert "30.5B parameters (3.35B active: 8 of 128 experts a token)" in head
    assert "TP 1 x PP 1 x DP 8 (EP 8: experts over 8 of the DP ranks), ZeRO 2" in head
    out = plan_json(plan)
    assert out["layout"]["expert"] == 8 and out["active_parameters"] == 3_353_032_704
    proc = _cli("--config", "configs/qwen3-30b-a3b.yaml", "--gpus", "8", "--gpu-memory", "80", "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["smallest_gpu_count"] == 16
    assert proc.stderr.endswith("the smallest GPU count that fits is 16\n")
