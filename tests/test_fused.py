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
