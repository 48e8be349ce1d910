"""token_logprobs over a tensor-parallel gloo group against the unsharded float64 reference."""

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from reference import grad_f64, logprobs_f64

from gatedpo_mega.gate import GateConfig, gate_values
from gatedpo_mega.ops import copy_to_group, reduce_from_group, token_logprobs

pytestmark = pytest.mark.multiprocess


def _forbid_megatron_global_state():
    """Make every function of megatron.core.parallel_state raise: the op must never read global state."""
    from megatron.core import parallel_state

    def forbidden(*_a, **_k):
        raise AssertionError("token_logprobs read megatron.core.parallel_state")

    for name in dir(parallel_state):
        if name.startswith(("get_", "is_", "model_parallel_is_initialized")) and callable(
            getattr(parallel_state, name)
        ):
            setattr(parallel_state, name, forbidden)


def _tp_case(rank, world, tp, padded_vocab, vocab, dtype, chunk):
    _forbid_megatron_global_state()
    # Groups of ``tp`` consecutive ranks: with world > tp the op runs inside a sub-group, never the world.
    groups = [dist.new_group(list(range(s, s + tp))) for s in range(0, world, tp)]
    group = groups[rank // tp]
    tp_rank = rank % tp
    gen = torch.Generator().manual_seed(1234)
    full = torch.randn(3, 8, padded_vocab, generator=gen, dtype=torch.float64) * 4
    targets = torch.randint(0, vocab, (3, 8), generator=gen)
    width = padded_vocab // tp
    # Targets on every shard boundary, the first and last true ids, and ignored positions.
    edges = [i * width + d for i in range(1, tp) for d in (-1, 0) if i * width + d < vocab]
    targets.view(-1)[: len(edges) + 3] = torch.tensor([*edges, 0, vocab - 1, -100])
    weight = torch.randn(3, 8, generator=gen)

    shard = full[..., tp_rank * width : (tp_rank + 1) * width].to(dtype).clone().requires_grad_()
    out = token_logprobs(shard, targets, tp_group=group, vocab_size=vocab, chunk_size=chunk)
    (out[0] * weight).sum().backward()

    ref_in = full.to(dtype).double()  # the same rounded values, unsharded
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    for got, want in zip(out, logprobs_f64(ref_in, targets, vocab), strict=True):
        torch.testing.assert_close(got.double(), want, **tol)
    ref_grad = grad_f64(ref_in, targets, weight, vocab)[..., tp_rank * width : (tp_rank + 1) * width]
    torch.testing.assert_close(shard.grad.double(), ref_grad, **tol)

    # Every rank of the group holds bit-identical statistics, hence bit-identical gates.
    g = gate_values(out[0].detach(), out[1], targets != -100, GateConfig(signal="absolute", tau=0.05))
    mine = torch.stack([*out, g]).detach().float()
    gathered = [torch.empty_like(mine) for _ in range(tp)]
    dist.all_gather(gathered, mine, group=group)
    for other in gathered:
        assert torch.equal(other, mine)


@pytest.mark.parametrize(
    ("world", "tp", "padded_vocab", "vocab", "dtype", "chunk"),
    [
        (2, 2, 64, 64, torch.float32, None),
        (2, 2, 64, 57, torch.float64, 5),
        (4, 4, 64, 57, torch.float32, 7),
        (4, 4, 64, 45, torch.float64, 3),  # the last shard is entirely padding
        (4, 2, 32, 30, torch.float32, 4),  # two TP groups of two inside a world of four
    ],
)
def test_tensor_parallel_matches_unsharded_float64(world, tp, padded_vocab, vocab, dtype, chunk):
    run_distributed(_tp_case, world, tp, padded_vocab, vocab, dtype, chunk)


def _collectives_case(rank, world):
    group = dist.new_group(list(range(world)))
    x = torch.full((3,), float(rank + 1), requires_grad=True)
    y = reduce_from_group(x, group)
    assert torch.equal(y.detach(), torch.full((3,), float(sum(range(1, world + 1)))))
    (y * 2).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0)), "reduce_from_group backward must be the identity"
    x2 = torch.ones(3, requires_grad=True)
    z = copy_to_group(x2, group)
    assert torch.equal(z.detach(), x2.detach())
    (z * (rank + 1)).sum().backward()
    assert torch.equal(x2.grad, torch.full((3,), float(sum(range(1, world + 1))))), (
        "copy_to_group sums in backward"
    )


def test_collectives_have_the_conjugate_backward():
    run_distributed(_collectives_case, 2)
