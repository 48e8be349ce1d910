"""token_logprobs on one process against the float64 reference."""

import pytest
import torch
from reference import grad_f64, logprobs_f64

from gatedpo_mega.ops import token_logprobs


def _case(b=3, t=7, v=50, vocab=None, dtype=torch.float32, scale=3.0, ignore=True):
    vocab = vocab or v
    logits = (torch.randn(b, t, v, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (b, t))
    if ignore:
        targets[0, :2] = -100
        targets[-1, -1] = -100
    return logits, targets, vocab


@pytest.mark.parametrize("chunk", [None, 1, 5, 1000])
@pytest.mark.parametrize("padded", [False, True])
def test_forward_and_grad_match_float64(chunk, padded):
    logits, targets, vocab = _case(v=64, vocab=57 if padded else None)
    out = token_logprobs(logits, targets, vocab_size=vocab, chunk_size=chunk)
    ref = logprobs_f64(logits.detach(), targets, vocab)
    for got, want in zip(out, ref, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    w = torch.randn(targets.shape)
    (out[0] * w).sum().backward()
    torch.testing.assert_close(
        logits.grad.double(), grad_f64(logits.detach(), targets, w, vocab), atol=1e-6, rtol=1e-5
    )
    if padded:
        assert torch.all(logits.grad[..., vocab:] == 0)


def test_float64_is_exact_and_passes_gradcheck():
    logits, targets, vocab = _case(b=2, t=4, v=13, vocab=11, dtype=torch.float64)
    out = token_logprobs(logits, targets, vocab_size=vocab, chunk_size=3)
    for got, want in zip(out, logprobs_f64(logits.detach(), targets, vocab), strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x: token_logprobs(x, targets, vocab_size=vocab, chunk_size=3)[0],
        (logits.detach().requires_grad_(),),
    )


def test_chunked_equals_unchunked_to_the_bit():
    logits, targets, _ = _case(b=4, t=9, v=40)
    results = []
    for chunk in (36, 7, 1):
        x = logits.detach().clone().requires_grad_()
        out = token_logprobs(x, targets, chunk_size=chunk)
        (out[0] * torch.linspace(-1, 1, 36).view(4, 9)).sum().backward()
        results.append((*out, x.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def test_inplace_backward_gives_the_same_gradient():
    logits, targets, _ = _case(v=30)
    w = torch.randn(targets.shape)
    a = logits.detach().clone().requires_grad_()
    (token_logprobs(a, targets, chunk_size=4)[0] * w).sum().backward()
    base = logits.detach().clone()
    b = base.clone().requires_grad_()
    x = b * 1.0  # an intermediate, as the logits of an output layer are
    (token_logprobs(x, targets, chunk_size=4, inplace_backward=True)[0] * w).sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_bf16_logits_accumulate_in_float32():
    logits, targets, vocab = _case(b=4, t=16, v=512, dtype=torch.bfloat16)
    out = token_logprobs(logits, targets, chunk_size=8)
    ref = logprobs_f64(logits.detach(), targets, vocab)  # reference on the same bf16 values, in float64
    for got, want in zip(out, ref, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    w = torch.randn(targets.shape)
    (out[0] * w).sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(
        logits.grad.double(), grad_f64(logits.detach(), targets, w, vocab), atol=1e-2, rtol=1e-2
    )


def test_ignored_positions_have_zero_output_and_zero_gradient():
    logits, targets, _ = _case(v=20)
    out = token_logprobs(logits, targets)
    ignored = targets == -100
    for t in out:
        assert torch.all(t[ignored] == 0)
    out[0].sum().backward()
    assert torch.all(logits.grad[ignored] == 0)


@pytest.mark.parametrize("magnitude", [1e4, 1e30])
def test_extreme_logits_stay_finite(magnitude):
    logits = torch.randn(2, 5, 16) * magnitude
    logits[0, 0, 3] = float("-inf")
    logits = logits.requires_grad_()
    targets = torch.randint(0, 16, (2, 5))
    targets[0, 0] = 4
    out = token_logprobs(logits, targets, chunk_size=3)
    for t in out[1:]:
        assert torch.isfinite(t).all()
    assert torch.isfinite(out[0]).all()
    out[0].sum().backward()
    assert torch.isfinite(logits.grad).all()
    torch.testing.assert_close(
        out[0].double(), logprobs_f64(logits.detach(), targets, 16)[0], atol=1e-3, rtol=1e-6
    )


def test_targets_outside_the_vocabulary_are_refused():
    logits = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match="target id 9 is outside the vocabulary"):
        token_logprobs(logits, torch.full((2, 3), 9), vocab_size=9)
    with pytest.raises(ValueError, match="target id -3"):
        token_logprobs(logits, torch.full((2, 3), -3))
    with pytest.raises(ValueError, match="do not match"):
        token_logprobs(logits, torch.zeros(2, 4, dtype=torch.long))


def test_only_logp_target_carries_a_gradient():
    logits, targets, _ = _case(v=12)
    logp, logp_max, entropy = token_logprobs(logits, targets)
    assert logp.requires_grad and not logp_max.requires_grad and not entropy.requires_grad
