"""The gate: values against independent formulas, and its effect on forward values and gradients."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gatedpo_mega.gate import GateConfig, apply_gate, gate_values
from gatedpo_mega.objectives import preference_loss, sequence_logps
from gatedpo_mega.ops import token_logprobs


def _stats(b=4, t=6, v=30, scale=6.0):
    logits = torch.randn(b, t, v, dtype=torch.float64) * scale
    targets = torch.randint(0, v, (b, t))
    logp, logp_max, _ = token_logprobs(logits, targets)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, -2:] = False
    return logp, logp_max, mask


def _reference_gate(s: float, cfg: GateConfig) -> float:
    if cfg.shape == "psigmoid":
        return 1.0 / (1.0 + math.exp(-cfg.slope * (math.exp(s) - cfg.tau)))
    d = s - math.log(cfg.tau)
    if cfg.shape == "sigmoid":
        return 1.0 / (1.0 + math.exp(-d / cfg.temperature))
    if cfg.shape == "hard":
        return 1.0 if d >= 0 else 0.0
    if cfg.shape == "power":
        return min(1.0, math.exp(d)) ** cfg.alpha
    return 1.0


def _quantile(values: list[float], q: float) -> float:
    """The q-quantile of ``values`` by linear interpolation between order statistics (numpy's default)."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


@pytest.mark.parametrize("shape", ["sigmoid", "psigmoid", "hard", "power", "none"])
@pytest.mark.parametrize("signal", ["absolute", "relative", "uniform", "seq", "q10"])
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_gate_values_match_the_formulas(shape, signal, granularity):
    cfg = GateConfig(
        shape=shape, signal=signal, granularity=granularity, tau=0.02, temperature=0.7, alpha=1.5, slope=40.0,
        quantile=0.3,
    )  # fmt: skip
    logp, logp_max, mask = _stats(scale=2.0)  # token probabilities spread around tau
    v = 30  # _stats' vocabulary
    g = gate_values(logp, logp_max, mask, cfg, vocab_size=v)
    for i in range(logp.shape[0]):
        kept = [float(x) for x, m in zip(logp[i], mask[i], strict=True) if m]
        per_response = {
            "seq": sum(kept) / len(kept),  # log of the geometric mean of the token probabilities
            "q10": math.log(_quantile([math.exp(x) for x in kept], 0.3)),
        }
        sig = {"relative": logp[i] - logp_max[i], "uniform": logp[i] + math.log(v), "absolute": logp[i]}.get(
            signal, logp[i]
        )
        seq = float(sig[mask[i]].sum() / mask[i].sum())
        for j in range(logp.shape[1]):
            if not mask[i, j]:
                assert g[i, j] == 1.0
                continue
            if signal in per_response:
                s = per_response[signal]  # one value per response whatever the granularity
            else:
                s = seq if granularity == "sequence" else float(sig[j])
            assert g[i, j].item() == pytest.approx(_reference_gate(s, cfg), abs=1e-6)


def test_the_published_gate_closes_on_unlikely_responses_and_opens_on_likely_ones():
    """sigmoid(slope * (p - tau)) with p the response's geometric-mean token probability: about 1 for a response
    the model finds likely, about 0 for one it finds very unlikely; q10 closes on a response with a few very
    unlikely tokens that the geometric mean averages away."""
    cfg = GateConfig(shape="psigmoid", signal="seq", tau=0.05, slope=200.0)
    likely = torch.log(torch.tensor([[0.5, 0.3, 0.4, 0.6]], dtype=torch.float64))
    unlikely = torch.log(torch.tensor([[1e-3, 1e-4, 1e-2, 1e-3]], dtype=torch.float64))
    mixed = torch.log(
        torch.tensor([[0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 1e-6, 1e-6]], dtype=torch.float64)
    )
    keep = torch.ones(1, 4, dtype=torch.bool)
    assert gate_values(likely, likely, keep, cfg).min() > 0.99
    assert gate_values(unlikely, unlikely, keep, cfg).max() < 1e-3
    keep10 = torch.ones(1, 10, dtype=torch.bool)
    assert gate_values(mixed, mixed, keep10, cfg).min() > 0.5  # geometric mean 0.058: open
    q10 = GateConfig(shape="psigmoid", signal="q10", tau=0.05, slope=200.0)
    assert gate_values(mixed, mixed, keep10, q10).max() < 1e-3  # 10th percentile 1e-6: closed


def test_a_probability_too_small_for_float32_still_gates_by_its_value():
    """q10 works on probabilities: a token log-prob of -200 (p = 1e-87, below float32's range) is kept in float64,
    so the quantile between it and a likelier token is their interpolation, not 0."""
    logp = torch.tensor([[-200.0, -1.0]])
    keep = torch.ones(1, 2, dtype=torch.bool)
    cfg = GateConfig(shape="hard", signal="q10", quantile=0.5, tau=0.1)
    # the median of {1e-87, e^-1}: e^-1 / 2 = 0.18 >= 0.1, so the gate is open
    assert gate_values(logp, logp, keep, cfg).tolist() == [[1.0, 1.0]]


@settings(max_examples=200, deadline=None)
@given(
    logp=st.lists(st.floats(-1e4, 0.0), min_size=1, max_size=8),
    shape=st.sampled_from(["sigmoid", "psigmoid", "hard", "power", "none"]),
    tau=st.floats(1e-30, 1.0, exclude_min=True),
    temperature=st.floats(1e-3, 1e3),
    alpha=st.floats(1e-3, 1e3),
)
def test_gate_values_are_in_unit_interval(logp, shape, tau, temperature, alpha):
    lp = torch.tensor([logp], dtype=torch.float32)
    cfg = GateConfig(shape=shape, tau=tau, temperature=temperature, alpha=alpha, signal="relative")
    g = gate_values(lp, torch.zeros_like(lp), torch.ones_like(lp, dtype=torch.bool), cfg)
    assert torch.all((g >= 0) & (g <= 1)) and torch.isfinite(g).all()


def test_uniform_signal_needs_the_vocabulary_size():
    logp, logp_max, mask = _stats()
    with pytest.raises(ValueError, match="vocabulary size"):
        gate_values(logp, logp_max, mask, GateConfig(signal="uniform"))


@pytest.mark.parametrize(
    ("vocab", "fixed_closed"), [(512, (0.0, 0.0)), (8000, (0.05, 0.6)), (151_936, (1.0, 1.0))]
)
def test_the_uniform_gate_stays_open_on_a_random_model_at_every_vocabulary_size(vocab, fixed_closed):
    """A freshly initialised model gives every token about 1/V. The uniform signal's threshold is a fraction of 1/V,
    so its gate leaves such a model's rejected gradient alone at any vocabulary size, where a fixed probability
    (tau 1e-4) closes on part of them near V = 1e4 and on every one at V = 151,936."""
    torch.manual_seed(0)
    logits = torch.randn(4, 32, vocab) * 0.5  # a random output layer: logits of a few tenths of a nat
    targets = torch.randint(0, vocab, (4, 32))
    logp, logp_max, _ = token_logprobs(logits, targets)
    mask = torch.ones_like(targets, dtype=torch.bool)
    uniform = GateConfig(shape="hard", signal="uniform", tau=0.01)
    default = gate_values(logp, logp_max, mask, uniform, vocab_size=vocab)
    fixed = gate_values(logp, logp_max, mask, GateConfig(signal="absolute", tau=1e-4), vocab_size=vocab)
    assert float((default < 0.5).float().mean()) < 0.01
    assert fixed_closed[0] <= float((fixed < 0.5).float().mean()) <= fixed_closed[1]
    # One distribution, every vocabulary: a token at a thousandth of the uniform probability is gated.
    low = torch.full((1, 1), math.log(1e-3 / vocab))
    assert gate_values(low, low, torch.ones(1, 1, dtype=torch.bool), uniform, vocab_size=vocab).item() == 0.0


def test_the_default_is_the_published_gate_on_q10_as_the_sweep_picked_it():
    """psigmoid on the 10th percentile of each rejected response's token probabilities, tau 2e-4, slope 2e4
    (configs/gate_vs_field.yaml's pick): half open at tau, 0.98 at 2 tau, 0.018 at 0, one value per response."""
    cfg = GateConfig()
    assert (cfg.shape, cfg.signal, cfg.quantile, cfg.tau, cfg.slope) == ("psigmoid", "q10", 0.1, 2e-4, 2e4)
    assert cfg.per_response
    mask = torch.ones(3, 11, dtype=torch.bool)
    logp = torch.full((3, 11), math.log(0.05), dtype=torch.float64)
    for row, q10 in enumerate((2e-4, 4e-4, 1e-12)):
        logp[row, 0] = math.log(
            q10
        )  # the lowest of 11 tokens; the 10th percentile sits at it (index 1.0 of 10)
        logp[row, 1] = math.log(q10)
    g = gate_values(logp, logp.clone(), mask, cfg, vocab_size=512)
    assert torch.equal(g, g[:, :1].expand_as(g))  # every token of a response shares its gate
    want = [1 / (1 + math.exp(-2e4 * (q - 2e-4))) for q in (2e-4, 4e-4, 1e-12)]
    assert g[:, 0].tolist() == pytest.approx(want, rel=1e-6, abs=1e-12)  # float32 gate
    assert g[0, 0].item() == pytest.approx(0.5) and g[1, 0].item() > 0.98 and g[2, 0].item() < 0.019


def test_apply_gate_is_identity_forward_and_scales_the_gradient_exactly():
    x = torch.randn(5, 7, requires_grad=True)
    g = torch.rand(5, 7)
    y = apply_gate(x, g)
    assert torch.equal(y, x)
    upstream = torch.randn(5, 7)
    (gx,) = torch.autograd.grad(y, x, upstream)
    assert torch.equal(gx, upstream * g)


def _dpo_grads(gate: GateConfig | None, seed=0):
    torch.manual_seed(seed)
    b, t, v = 4, 6, 25
    logits_c = (torch.randn(b, t, v) * 5).requires_grad_()
    logits_r = (torch.randn(b, t, v) * 5).requires_grad_()
    tgt_c, tgt_r = torch.randint(0, v, (b, t)), torch.randint(0, v, (b, t))
    mask = torch.ones(b, t, dtype=torch.bool)
    lc, _, _ = token_logprobs(logits_c, tgt_c)
    lr, lr_max, _ = token_logprobs(logits_r, tgt_r)
    g = None
    if gate is not None and gate.enabled:
        g = gate_values(lr, lr_max, mask, gate)
        lr = apply_gate(lr, g)
    ref_c, ref_r = torch.full((b,), -40.0), torch.full((b,), -40.0)
    loss = preference_loss(
        sequence_logps(lc, mask), sequence_logps(lr, mask), ref_c, ref_r, objective="dpo", beta=0.1
    )
    loss.mean().backward()
    return loss.detach(), logits_c.grad, logits_r.grad, g


def test_gate_none_is_plain_dpo_to_the_bit():
    plain = _dpo_grads(None)
    off = _dpo_grads(GateConfig(shape="none"))
    for a, b in zip(plain[:3], off[:3], strict=True):
        assert torch.equal(a, b)


def test_gate_leaves_loss_and_chosen_untouched_and_scales_rejected_by_g():
    plain = _dpo_grads(None)
    gated = _dpo_grads(GateConfig(shape="sigmoid", signal="absolute", tau=0.05, temperature=0.5))
    g = gated[3]
    assert 0 < float((g < 0.5).float().mean()) < 1, "the case must exercise both regimes of the gate"
    assert torch.equal(plain[0], gated[0]), "loss value must be bit-identical"
    assert torch.equal(plain[1], gated[1]), "chosen gradient must be untouched"
    # The gradient reaching each rejected token's logits is g times the ungated one (the op is linear in it).
    torch.testing.assert_close(gated[2], plain[2] * g[..., None], atol=1e-7, rtol=1e-6)
    assert not torch.equal(gated[2], plain[2])


def test_gate_config_refuses_bad_values():
    with pytest.raises(ValueError, match=r"gate.shape='cosine' is not one of"):
        GateConfig(shape="cosine")
    with pytest.raises(ValueError, match=r"gate.tau=0.0 must be in"):
        GateConfig(tau=0.0)
    with pytest.raises(ValueError, match=r"gate.temperature"):
        GateConfig(temperature=-1.0)
    with pytest.raises(ValueError, match=r"gate.slope=0.0 must be > 0"):
        GateConfig(slope=0.0)
    with pytest.raises(ValueError, match=r"gate.quantile=1.5 must be in \[0, 1\]"):
        GateConfig(quantile=1.5)
    with pytest.raises(
        ValueError, match=r"gate.signal='q5' is not one of absolute, relative, uniform, seq, q10"
    ):
        GateConfig(signal="q5")
