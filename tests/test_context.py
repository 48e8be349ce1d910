"""Context parallelism: each row's tokens zigzag-split over CP ranks, attention over gathered keys and values.

The attention is checked against one rank's causal SDPA in float64 (outputs and the gradients of q, k and v: the
backward of the key/value gather reduce-scatters SDPA's strided gradients); training runs at CP 2 against the
CP 1 baseline of ``test_training.py`` (the same config), combined with TP, PP, DP x ZeRO 2 and packing.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from distributed import run_distributed

from gatedpo_mega.config import load_config
from gatedpo_mega.errors import ConfigError
from gatedpo_mega.megatron.context import context_shard, local_positions, rank_positions

pytestmark = [pytest.mark.multiprocess]


def test_zigzag_positions_cover_each_row_once_and_balance_the_causal_work():
    for cp in (1, 2, 4):
        n = 8 * cp
        parts = [local_positions(n, cp, r) for r in range(cp)]
        assert sorted(torch.cat(parts).tolist()) == list(range(n))
        work = [int((p + 1).sum()) for p in parts]  # keys each rank's queries attend to
        assert len(set(work)) == 1
    assert local_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert rank_positions((0, 4, 12), 2, 0).tolist() == [0, 3, 4, 5, 10, 11]
    with pytest.raises(ValueError, match="6 tokens cannot be split into 4 equal chunks"):
        local_positions(6, 2, 0)


def test_short_rows_and_packed_documents_are_padded_to_whole_chunks():
    from gatedpo_mega.data.batch import PreferenceBatch, pack

    ids = torch.arange(1, 13).reshape(2, 6)
    labels = torch.full_like(ids, -100)
    labels[:, 1:4] = ids[:, 2:5]
    batch = PreferenceBatch(ids, labels, torch.tensor([0]))
    packed = pack(batch, [3, 5], pad_to_multiple=8, pad_id=0, document_multiple=4).packing
    assert packed.bounds == (0, 4, 12, 16)  # 3 -> 4, 5 -> 8, then the padding tail to a multiple of 8
    assert packed.input_ids[0, :4].tolist() == [1, 2, 3, 0] and packed.input_ids[0, 4:9].tolist() == [
        7,
        8,
        9,
        10,
        11,
    ]
    expected = batch.labels.clone()  # each row's first n tokens come back; the rest reads as padding (0)
    expected[0, 3:], expected[1, 5:] = 0, 0
    assert packed.rows(packed.targets[0]).equal(expected)
    with pytest.raises(ValueError, match="pad_to_multiple=6 is not a multiple of 4"):
        pack(batch, [3, 5], pad_to_multiple=6, pad_id=0, document_multiple=4)


def test_a_shard_gathers_back_to_the_whole_row_on_one_process():
    bounds = (0, 8, 16)
    x = torch.arange(16.0)[None]
    parts = [context_shard(None, 2, r, bounds).local(x) for r in range(2)]
    shard = context_shard(None, 2, 0, bounds)
    # what the gather would give: the ranks' tokens back to back, then the natural order
    assert torch.cat(parts, 1).index_select(1, shard.order).equal(x)


def test_the_cpu_prefix_causal_kernel_equals_sdpa_with_the_lower_right_mask_in_float64():
    """The CPU path (two mask-free kernel calls merged by log-sum-exp) against the GPU path's causal_lower_right
    (materialised by torch on a CPU), grouped-query, forward and the gradients of q, k and v."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    from gatedpo_mega.megatron.attention import PrefixCausal

    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, h, n, 8, generator=g, dtype=torch.float64) for h, n in ((4, 6), (2, 15), (2, 15))
    )
    grad = torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64)
    results = []
    for run in ("prefix", "sdpa"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if run == "prefix":
            out = PrefixCausal.apply(*leaves, 0.3)
        else:
            out = F.scaled_dot_product_attention(
                *leaves, attn_mask=causal_lower_right(6, 15), scale=0.3, enable_gqa=True
            )
        out.backward(grad)
        results.append([out.detach(), *(t.grad for t in leaves)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _attention_worker(rank, world, out):
    import torch.distributed as dist

    from gatedpo_mega.megatron.attention import SDPAttention

    torch.manual_seed(0)
    heads, groups, d = 4, 2, 8
    pg = types.SimpleNamespace(cp=dist.new_group(list(range(world))))

    def attention(cp):
        config = types.SimpleNamespace(kv_channels=d, attention_dropout=0.0, context_parallel_size=cp)
        return SDPAttention(config, 1, None, "self", pg_collection=pg)

    cp_attn, one = attention(world), attention(1)
    results = {}
    for layout, bounds in (("bshd", (0, 16)), ("thd", (0, 8, 24, 32))):
        n = bounds[-1]
        b = 2 if layout == "bshd" else 1
        q = torch.randn(n, b, heads, d, dtype=torch.float64)
        k = torch.randn(n, b, groups, d, dtype=torch.float64)
        v = torch.randn(n, b, groups, d, dtype=torch.float64)
        gout = torch.randn(n, b, heads * d, dtype=torch.float64)
        packed = None
        if layout == "thd":
            q, k, v, gout = q[:, 0], k[:, 0], v[:, 0], gout[:, 0]
            packed = types.SimpleNamespace(qkv_format="thd", host_bounds=bounds)
        whole = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = one.forward(*whole, None, packed_seq_params=packed)
        ref.backward(gout)
        shard = context_shard(pg.cp, world, rank, bounds)
        local = [shard.local(t, 0).clone().requires_grad_() for t in (q, k, v)]
        got = cp_attn.forward(*local, None, packed_seq_params=packed)
        got.backward(shard.local(gout, 0))
        results[layout] = {
            "out": (got - shard.local(ref.detach(), 0)).abs().max().item(),
            **{
                f"grad_{name}": (t.grad - shard.local(w.grad, 0)).abs().max().item()
                for name, t, w in zip("qkv", local, whole, strict=True)
            },
        }
    Path(out, f"{rank}.json").write_text(json.dumps(results))


@pytest.mark.parametrize("world", [2, 4])
def test_attention_and_its_gradients_equal_one_rank_in_float64(world, tmp_path):
    run_distributed(_attention_worker, world, str(tmp_path))
    for rank in range(world):
        results = json.loads(Path(tmp_path, f"{rank}.json").read_text())
        for layout, errors in results.items():
            for name, err in errors.items():
                assert err < 1e-12, (rank, layout, name, err)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["parallel.context=2", "model.attention=local"],
            "model.attention=local: that attention core sees only",
        ),
        (
            ["parallel.context=2", "model.fused_objective=true"],
            "model.fused_objective=true: the fused objective",
        ),
        (
            ["parallel.context=2", "model.backend=transformers", "model.init_from=/x"],
            "model.backend=transformers: context parallelism",
        ),
        (["parallel.context=3"], "parallel.context"),
    ],
)
def test_what_context_parallelism_cannot_run_is_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
