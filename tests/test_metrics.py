"""Metrics: token-weighted and pair-weighted reductions over micro-batches and data-parallel ranks."""

import math

import pytest
import torch
from distributed import run_distributed

from gatedpo_mega.metrics import ResponseStats, metric_sums, reduce_metric_sums

BETA = 0.2


def _batch(seed: int, b: int = 6, t: int = 9):
    gen = torch.Generator().manual_seed(seed)

    def stats():
        logp = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 8
        logp_max = torch.maximum(logp, -torch.rand(b, t, generator=gen, dtype=torch.float64))
        entropy = torch.rand(b, t, generator=gen, dtype=torch.float64) * 3
        lengths = torch.randint(1, t + 1, (b,), generator=gen)
        mask = torch.arange(t)[None, :] < lengths[:, None]
        return ResponseStats(logp, logp_max, entropy, mask)

    chosen, rejected = stats(), stats()
    gate = torch.rand(b, t, generator=gen, dtype=torch.float64)
    ref_c = torch.randn(b, generator=gen, dtype=torch.float64) * 3 - 20
    ref_r = torch.randn(b, generator=gen, dtype=torch.float64) * 3 - 20
    return dict(chosen=chosen, rejected=rejected, gate=gate, ref_c=ref_c, ref_r=ref_r)


def _sums(d, sl=slice(None)):
    def cut(s):
        return ResponseStats(s.logp[sl], s.logp_max[sl], s.entropy[sl], s.mask[sl])

    c, r = cut(d["chosen"]), cut(d["rejected"])
    pc = (c.logp * c.mask).sum(-1)
    pr = (r.logp * r.mask).sum(-1)
    loss = -torch.nn.functional.logsigmoid(BETA * ((pc - d["ref_c"][sl]) - (pr - d["ref_r"][sl])))
    return metric_sums(
        beta=BETA,
        loss=loss,
        policy_chosen=pc,
        policy_rejected=pr,
        ref_chosen=d["ref_c"][sl],
        ref_rejected=d["ref_r"][sl],
        chosen=c,
        rejected=r,
        gate=d["gate"][sl],
    )


def _expected(d):
    """The metrics written out directly over the whole batch."""
    c, r, g = d["chosen"], d["rejected"], d["gate"]
    pc, pr = (c.logp * c.mask).sum(-1), (r.logp * r.mask).sum(-1)
    dw, dl = pc - d["ref_c"], pr - d["ref_r"]
    rm, cm = r.mask.double(), c.mask.double()

    def tok(x, m):
        return float((x * m).sum() / m.sum())

    return {
        "loss": float((-torch.nn.functional.logsigmoid(BETA * (dw - dl))).mean()),
        "rewards/chosen": float(BETA * dw.mean()),
        "rewards/margins": float(BETA * (dw - dl).mean()),
        "rewards/accuracies": float((dw > dl).double().mean()),
        "logps/rejected": float(pr.mean()),
        "logps/chosen_delta_per_token": float(dw.sum() / cm.sum()),
        "gate/mean": tok(g, rm),
        "gate/frac_attenuated": tok((g < 0.5).double(), rm),
        "squeeze/top1_rejected": tok(r.logp_max.exp(), rm),
        "squeeze/entropy_chosen": tok(c.entropy, cm),
    }


def test_micro_batches_reduce_to_the_whole_batch():
    d = _batch(0)
    whole = reduce_metric_sums([_sums(d)])
    split = reduce_metric_sums([_sums(d, slice(0, 1)), _sums(d, slice(1, 4)), _sums(d, slice(4, 6))])
    expected = _expected(d)
    for k, v in expected.items():
        assert whole[k] == pytest.approx(v, rel=1e-12), k
        assert split[k] == pytest.approx(v, rel=1e-12), k
    assert whole.keys() == split.keys()
    # A plain mean of per-micro-batch means would be wrong for token-weighted metrics: the test can see that.
    naive = (
        sum(reduce_metric_sums([_sums(d, s)])["gate/mean"] for s in (slice(0, 1), slice(1, 4), slice(4, 6)))
        / 3
    )
    assert not math.isclose(naive, expected["gate/mean"], rel_tol=1e-6)


def _dp_case(rank, world):
    import torch.distributed as dist

    d = _batch(0)
    half = slice(0, 2) if rank == 0 else slice(2, 6)  # uneven shards: the weights must carry the difference
    got = reduce_metric_sums([_sums(d, half)], dist.new_group([0, 1]))
    for k, v in _expected(d).items():
        assert got[k] == pytest.approx(v, rel=1e-12), k


@pytest.mark.multiprocess
def test_data_parallel_reduction_equals_single_process():
    run_distributed(_dp_case, 2)


def test_metrics_hold_the_design_keys():
    got = reduce_metric_sums([_sums(_batch(1))])
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "gate/mean",
        "gate/frac_attenuated",
        "squeeze/top1_rejected",
        "squeeze/entropy_rejected",
    ):
        assert key in got and math.isfinite(got[key])


def test_the_progress_bar_names_the_method_or_the_run():
    from gatedpo_mega.config import load_config
    from gatedpo_mega.training.metrics_log import progress_label

    def label(*overrides: str) -> str:
        return progress_label(load_config(None, list(overrides)))

    assert label() == "gate-dpo"  # the default gate on DPO
    assert label("objective.name=ipo", "gate.shape=psigmoid", "gate.signal=seq") == "gate-ipo"
    assert (
        label("gate.shape=none") == "dpo"
        and label("objective.name=dpo_shift", "gate.shape=none") == "dpo_shift"
    )
    assert label("objective.name=sft", "gate.shape=none") == "sft"
    assert label("objective.name=sft_extended", "gate.shape=none") == "sft_extended"
    assert label("train.run_name=small/sft/dpo+seq/seed1") == "small/sft/dpo+seq/seed1"
