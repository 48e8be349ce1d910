"""Objectives against float64 formulas written here independently."""

import math

import pytest
import torch

from gatedpo_mega.objectives import OBJECTIVES, preference_loss, sequence_logps


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _reference(name, pc, pr, rc, rr, beta, eps=0.0, lam=1.0):
    dw, dl = pc - rc, pr - rr
    h = dw - dl
    if name == "dpo_shift":  # the logit (log pi_w - lam log pi_l) - (log ref_w - lam log ref_l)
        return -_logsig(beta * ((pc - lam * pr) - (rc - lam * rr)))
    if name == "dpo":
        return -(1 - eps) * _logsig(beta * h) - eps * _logsig(-beta * h)
    if name == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if name == "cal_dpo":
        return -_logsig(h) + 0.5 * ((dw - 1 / (2 * beta)) ** 2 + (dl + 1 / (2 * beta)) ** 2)
    if name == "hinge":
        return max(0.0, 1 - beta * h)
    raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
def test_objectives_match_reference(name, beta):
    gen = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (torch.randn(16, generator=gen, dtype=torch.float64) * 20 - 50 for _ in range(4))
    got = preference_loss(pc, pr, rc, rr, objective=name, beta=beta)
    want = [_reference(name, *(float(t[i]) for t in (pc, pr, rc, rr)), beta) for i in range(16)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("lam", [0.5, 0.9, 1.0])
def test_dpo_shift_scales_the_rejected_log_ratio_and_is_dpo_at_one(lam):
    gen = torch.Generator().manual_seed(4)
    pc, pr, rc, rr = (torch.randn(16, generator=gen, dtype=torch.float64) * 20 - 50 for _ in range(4))
    got = preference_loss(pc, pr, rc, rr, objective="dpo_shift", beta=0.2, shift=lam)
    want = [
        _reference("dpo_shift", *(float(t[i]) for t in (pc, pr, rc, rr)), 0.2, lam=lam) for i in range(16)
    ]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-12, rtol=1e-12)
    if lam == 1.0:
        assert torch.equal(got, preference_loss(pc, pr, rc, rr, objective="dpo", beta=0.2))


def test_dpo_shift_lambda_schedule_is_linear_over_the_run():
    from gatedpo_mega.objectives import ObjectiveConfig

    fixed = ObjectiveConfig(name="dpo_shift", shift_lambda=0.8)
    assert [fixed.shift_at(s, 5) for s in (1, 3, 5)] == [0.8, 0.8, 0.8]
    ramp = ObjectiveConfig(name="dpo_shift", shift_lambda=0.5, shift_lambda_end=1.0)
    assert [ramp.shift_at(s, 5) for s in (1, 2, 3, 4, 5)] == pytest.approx([0.5, 0.625, 0.75, 0.875, 1.0])
    assert ObjectiveConfig(name="dpo").shift_at(3, 5) == 1.0  # every other objective: lambda 1
    with pytest.raises(ValueError, match=r"objective.shift_lambda=0.0 must be in \(0, 1\]"):
        ObjectiveConfig(name="dpo_shift", shift_lambda=0.0)
    with pytest.raises(ValueError, match=r"shift_lambda_end applies to objective\.name=dpo_shift only"):
        ObjectiveConfig(name="dpo", shift_lambda_end=0.9)


def test_label_smoothing_is_conservative_dpo():
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-10.0, -12.0, -11.0, -11.5))
    got = preference_loss(pc, pr, rc, rr, objective="dpo", beta=0.3, label_smoothing=0.2)
    assert float(got) == pytest.approx(_reference("dpo", -10, -12, -11, -11.5, 0.3, eps=0.2), abs=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_policy_equal_to_reference(beta):
    x = torch.tensor([-30.0, -5.0, -100.0], dtype=torch.float64)
    y = torch.tensor([-20.0, -9.0, -1.0], dtype=torch.float64)
    expect = {
        "dpo": math.log(2.0),
        "ipo": 1.0 / (4.0 * beta**2),
        "cal_dpo": math.log(2.0) + 1.0 / (4.0 * beta**2),
        "hinge": 1.0,
        "dpo_shift": math.log(2.0),
    }
    for name, value in expect.items():
        got = preference_loss(x, y, x, y, objective=name, beta=beta)
        torch.testing.assert_close(got, torch.full_like(got, value), atol=1e-12, rtol=0)


def test_nll_term_is_added_with_its_weight():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.5))
    base = preference_loss(pc, pr, rc, rr, objective="ipo", beta=0.5)
    nll = torch.tensor([2.5])
    got = preference_loss(pc, pr, rc, rr, objective="ipo", beta=0.5, chosen_nll=nll, nll_weight=0.4)
    assert torch.equal(got, base + 0.4 * nll)
    with pytest.raises(ValueError, match="chosen_nll"):
        preference_loss(pc, pr, rc, rr, objective="ipo", beta=0.5, nll_weight=0.4)


def test_sequence_logps_sum_and_mean_over_the_mask():
    tok = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert torch.equal(sequence_logps(tok, mask), torch.tensor([-3.0, -11.0]))
    assert torch.equal(sequence_logps(tok, mask, average=True), torch.tensor([-1.5, -5.5]))


def test_unknown_objective_names_the_allowed_ones():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match=r"objective.name='kto' is not one of dpo, ipo, cal_dpo, hinge"):
        preference_loss(x, x, x, x, objective="kto", beta=0.1)
