"""fused_token_logprobs against token_logprobs on the materialised logits, and against float64."""

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from reference import grad_f64, logprobs_f64

from gatedpo_mega.ops import fused_token_logprobs, token_logprobs


def _inputs(n_tok=(3, 7), h=16, v=40, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*n_tok, h, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    return hidden, weight, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("vocab", "chunk"), [(40, None), (33, 4), (40, 1)])
def test_matches_token_logprobs_on_materialised_logits(dtype, vocab, chunk):
    hidden, weight, g = _inputs(dtype=dtype)
    targets = torch.randint(0, vocab, (3, 7), generator=g)
    targets[0, :3] = -100
    w = torch.randn(3, 7, generator=g, dtype=dtype)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused = fused_token_logprobs(h1, w1, targets, vocab_size=vocab, chunk_size=chunk)
    (fused[0] * w).sum().backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    plain = token_logprobs(h2 @ w2.t(), targets, vocab_size=vocab, chunk_size=chunk)
    (plain[0] * w).sum().backward()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(h1.grad, h2.grad, **tol)
    torch.testing.assert_close(w1.grad, w2.grad, **tol)
    assert torch.all(w1.grad[vocab:] == 0)


def test_float64_gradcheck():
    hidden, weight, g = _inputs(n_tok=(2, 3), h=5, v=9, dtype=torch.float64)
    targets = torch.randint(0, 8, (2, 3), generator=g)
    targets[1, 0] = -100
    assert torch.autograd.gradcheck(
        lambda h, w: fused_token_logprobs(h, w, targets, vocab_size=8, chunk_size=2)[0],
        (hidden.requires_grad_(), weight.requires_grad_()),
    )


def test_bf16_against_float64_reference():
    hidden, weight, g = _inputs(n_tok=(4, 8), h=32, v=256, dtype=torch.bfloat16)
    targets = torch.randint(0, 256, (4, 8), generator=g)
    h, wt = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_token_logprobs(h, wt, targets, chunk_size=5)
    assert out[0].dtype == torch.float32
    logits64 = hidden.double() @ weight.double().t()
    for a, b in zip(out, logprobs_f64(logits64, targets, 256), strict=True):
        torch.testing.assert_close(a.double(), b, atol=0.1, rtol=0.02)  # bf16 logits: ~3 significant digits
    up = torch.randn(4, 8, generator=g)
    (out[0] * up).sum().backward()
    assert h.grad.dtype == torch.bfloat16 and wt.grad.dtype == torch.bfloat16
    dz = grad_f64(logits64, targets, up, 256)
    torch.testing.assert_close(h.grad.double(), dz @ weight.double(), atol=0.05, rtol=0.05)
    torch.testing.assert_close(
        wt.grad.double(), dz.reshape(-1, 256).t() @ hidden.double().reshape(-1, 32), atol=0.05, rtol=0.05
    )


def _tp_case(rank, world, vocab, dtype):
    group = dist.new_group(list(range(world)))
    hidden, weight, g = _inputs(h=12, v=48, dtype=dtype, seed=5)
    targets = torch.randint(0, vocab, (3, 7), generator=g)
    targets.view(-1)[:4] = torch.tensor([11, 12, 23, 24])  # shard boundaries at 12, 24, 36
    targets[2, 6] = -100
    up = torch.randn(3, 7, generator=g, dtype=dtype)
    width = 48 // world
    shard = weight[rank * width : (rank + 1) * width].clone().requires_grad_()
    h = hidden.clone().requires_grad_()
    out = fused_token_logprobs(h, shard, targets, tp_group=group, vocab_size=vocab, chunk_size=4)
    (out[0] * up).sum().backward()
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = token_logprobs(h_ref @ w_ref.t(), targets, vocab_size=vocab)
    (ref[0] * up).sum().backward()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(h.grad, h_ref.grad, **tol)  # all-reduced over the shards
    torch.testing.assert_close(shard.grad, w_ref.grad[rank * width : (rank + 1) * width], **tol)


@pytest.mark.multiprocess
@pytest.mark.parametrize(("world", "vocab", "dtype"), [(2, 48, torch.float32), (4, 41, torch.float64)])
def test_tensor_parallel_matches_unsharded(world, vocab, dtype):
    run_distributed(_tp_case, world, vocab, dtype)


# --- the fused-objective mode -------------------------------------------------------------------------------


def _dpo_loss_fn(labels, ref, gate):
    """A gated DPO + NLL per-pair loss over [2k, T] statistics: the training hook's math, written for the test."""
    from gatedpo_mega.gate import apply_gate, gate_values
    from gatedpo_mega.objectives import preference_loss, sequence_logps

    b = labels.shape[0] // 2
    mask = labels != -100

    def fn(logp, logp_max, entropy, pairs):
        k = pairs.stop - pairs.start
        mc, mr = mask[pairs], mask[b + pairs.start : b + pairs.stop]
        rejected = logp[k:]
        if gate is not None:
            rejected = apply_gate(rejected, gate_values(rejected, logp_max[k:], mr, gate))
        pc, pr = sequence_logps(logp[:k], mc), sequence_logps(rejected, mr)
        nll = -sequence_logps(logp[:k], mc, average=True)
        return preference_loss(
            pc, pr, ref[pairs, 0], ref[pairs, 1], objective="dpo", beta=0.5, chosen_nll=nll, nll_weight=0.3
        )

    return fn


def _pair_case(b=3, t=6, h=12, v=40, vocab=37, dtype=torch.float64, seed=2):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * b, t, h, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * 0.8).to(dtype)
    labels = torch.randint(0, vocab, (2 * b, t), generator=g)
    labels[:, :2] = -100  # prompt positions
    labels[1, -1] = -100
    ref = torch.randn(b, 2, generator=g, dtype=dtype) - 20
    return hidden, weight, labels, ref


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("pairs_per_chunk", [1, 2, 5])
def test_fused_pair_loss_matches_the_unfused_objective(gated, pairs_per_chunk):
    from gatedpo_mega.gate import GateConfig
    from gatedpo_mega.ops import fused_pair_loss

    hidden, weight, labels, ref = _pair_case()
    gate = GateConfig(signal="absolute", tau=0.05, temperature=0.5) if gated else None
    fn = _dpo_loss_fn(labels, ref, gate)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, logp, logp_max, entropy = fused_pair_loss(
        h1, w1, labels, fn, vocab_size=37, pairs_per_chunk=pairs_per_chunk
    )
    (loss.mean() * 0.7).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    stats = token_logprobs(h2 @ w2.t(), labels, vocab_size=37)
    ref_loss = fn(*stats, slice(0, 3))
    (ref_loss.mean() * 0.7).backward()
    tol = dict(atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(loss, ref_loss.detach(), **tol)
    for a, b_ in zip((logp, logp_max, entropy), stats, strict=True):
        torch.testing.assert_close(a, b_.detach(), **tol)
    torch.testing.assert_close(h1.grad, h2.grad, **tol)
    torch.testing.assert_close(w1.grad, w2.grad, **tol)


def test_fused_pair_loss_refuses_unequal_pair_weights():
    from gatedpo_mega.ops import fused_pair_loss

    hidden, weight, labels, ref = _pair_case()
    loss, *_ = fused_pair_loss(
        hidden.requires_grad_(), weight, labels, _dpo_loss_fn(labels, ref, None), vocab_size=37
    )
    with pytest.raises(RuntimeError, match="equal weights"):
        (loss * torch.tensor([1.0, 2.0, 3.0], dtype=loss.dtype)).sum().backward()


def _pair_tp_case(rank, world, dtype):
    from gatedpo_mega.gate import GateConfig
    from gatedpo_mega.ops import fused_pair_loss

    group = dist.new_group(list(range(world)))
    hidden, weight, labels, ref = _pair_case(v=40, vocab=38, dtype=dtype)
    fn = _dpo_loss_fn(labels, ref, GateConfig(signal="absolute", tau=0.05))
    width = 40 // world
    shard = weight[rank * width : (rank + 1) * width].clone().requires_grad_()
    h = hidden.clone().requires_grad_()
    loss, *_ = fused_pair_loss(h, shard, labels, fn, tp_group=group, vocab_size=38, pairs_per_chunk=2)
    loss.mean().backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_loss = fn(*token_logprobs(h2 @ w2.t(), labels, vocab_size=38), slice(0, 3))
    ref_loss.mean().backward()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-11, rtol=1e-10)
    torch.testing.assert_close(loss, ref_loss.detach(), **tol)
    torch.testing.assert_close(h.grad, h2.grad, **tol)
    torch.testing.assert_close(shard.grad, w2.grad[rank * width : (rank + 1) * width], **tol)


@pytest.mark.multiprocess
@pytest.mark.parametrize(("world", "dtype"), [(2, torch.float64), (4, torch.float32)])
def test_fused_pair_loss_tensor_parallel(world, dtype):
    run_distributed(_pair_tp_case, world, dtype)
