"""``fused_preference_loss`` (three matmuls, one token chunk of logits) against the loss hook on materialised
logits (``preference_loss_func``: token_logprobs, gate, objective), in float64 and at TP 2."""

import pytest
import torch
from distributed import run_distributed

from gatedpo_mega.config import load_config
from gatedpo_mega.data.batch import PreferenceBatch
from gatedpo_mega.loss import LossContext, pair_objective, preference_loss_func
from gatedpo_mega.ops.streaming import fused_preference_loss

B, T, H, V = 3, 11, 16, 37


def _inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.7
    targets = torch.randint(0, V, (2 * B, T), generator=g)
    targets[:, :3] = -100  # prompt
    targets[1, 8:] = -100  # rows of different lengths
    targets[B + 2, 5:] = -100
    ref = torch.randn(B, 2, generator=g, dtype=torch.float64) * 3 - 20
    return hidden, weight, targets, ref


def _reference(hidden, weight, targets, ref, cfg):
    """The training hook on materialised logits; returns the mean loss, both gradients and the per-pair losses."""
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    counts = (targets != -100).sum(-1)
    ctx = LossContext(
        objective=cfg.objective, gate=cfg.gate, tp_group=None, vocab_size=V, reference=ref,
        ref_tokens=torch.stack([counts[:B], counts[B:]], 1), shift=cfg.objective.shift_at(1, 1),
    )  # fmt: skip
    batch = PreferenceBatch(torch.zeros_like(targets), targets, torch.arange(B))
    loss, _ = preference_loss_func(batch, ctx, h @ w.t())
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _streaming_reference(ref, targets, cfg):
    if not cfg.objective.average_logps:
        return ref
    counts = (targets != -100).sum(-1).to(ref.dtype)
    return ref / torch.stack([counts[:B], counts[B:]], 1)


CASES = {
    "dpo-no-gate": ["gate.shape=none"],
    "dpo-hard": ["gate.shape=hard", "gate.signal=absolute", "gate.tau=0.02"],
    "dpo-sigmoid": ["gate.shape=sigmoid", "gate.signal=absolute", "gate.tau=0.02", "gate.temperature=0.5"],
    "dpo-sequence-gate": [
        "gate.shape=sigmoid",
        "gate.granularity=sequence",
        "gate.signal=absolute",
        "gate.tau=0.05",
    ],
    "dpo-relative-smoothing": ["gate.signal=relative", "gate.tau=0.05", "objective.label_smoothing=0.1"],
    "ipo-average": [
        "objective.name=ipo",
        "objective.average_logps=true",
        "gate.signal=absolute",
        "gate.tau=0.02",
    ],
    "cal_dpo-nll": [
        "objective.name=cal_dpo",
        "objective.nll_weight=0.5",
        "gate.signal=absolute",
        "gate.tau=0.02",
    ],
    "hinge-nll-sum": ["objective.name=hinge", "objective.nll_weight=0.2", "objective.nll_average=false"],
    # the published gate: one sigmoid in probability per rejected response
    "dpo-psigmoid-seq": ["gate.shape=psigmoid", "gate.signal=seq", "gate.tau=0.02", "gate.slope=50"],
    "dpo_shift-psigmoid-q10": [
        "objective.name=dpo_shift",
        "objective.shift_lambda=0.7",
        "gate.shape=psigmoid",
        "gate.signal=q10",
        "gate.tau=0.01",
        "gate.slope=80",
    ],
}


@pytest.mark.parametrize("chunk", [4, 1000], ids=["chunked", "one-chunk"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_loss_hook_on_materialised_logits_in_float64(case, chunk):
    cfg = load_config(None, ["objective.beta=0.5", *CASES[case]])
    hidden, weight, targets, ref = _inputs()
    want_loss, want_h, want_w = _reference(hidden, weight, targets, ref, cfg)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    losses, logp, _, _ = fused_preference_loss(
        h, w, targets,
        pair_objective(
            _streaming_reference(ref, targets, cfg), cfg.objective, cfg.gate, vocab_size=V,
            shift=cfg.objective.shift_at(1, 1),
        ),
        chunk_size=chunk,
    )  # fmt: skip
    loss = losses.mean()
    loss.backward()
    torch.testing.assert_close(loss.detach(), want_loss, rtol=1e-12, atol=1e-12)
    # The gate is float32 by design (gate_values): its last bit may differ with the order of the float64 sums.
    tol = {"rtol": 1e-10, "atol": 1e-12} if "shape=none" in CASES[case][0] else {"rtol": 1e-6, "atol": 1e-9}
    torch.testing.assert_close(h.grad, want_h, **tol)
    torch.testing.assert_close(w.grad, want_w, **tol)
    full = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(logp, full.masked_fill(targets == -100, 0.0))


def test_the_gate_changes_gradients_not_the_loss():
    hidden, weight, targets, ref = _inputs()
    outs = []
    for extra in (["gate.shape=none"], ["gate.shape=hard", "gate.signal=absolute", "gate.tau=0.05"]):
        cfg = load_config(None, extra)
        w = weight.clone().requires_grad_(True)
        losses, *_ = fused_preference_loss(
            hidden, w, targets, pair_objective(ref, cfg.objective, cfg.gate, vocab_size=V)
        )
        losses.sum().backward()
        outs.append((losses.detach(), w.grad))
    assert torch.equal(outs[0][0], outs[1][0])
    assert not torch.allclose(outs[0][1], outs[1][1])


def test_float32_matches_float64_and_unequal_pair_weights_are_refused():
    cfg = load_config(None, ["gate.signal=absolute", "gate.tau=0.02"])
    hidden, weight, targets, ref = _inputs()
    _, want_h, want_w = _reference(hidden, weight, targets, ref, cfg)
    h = hidden.float().requires_grad_(True)
    w = weight.float().requires_grad_(True)
    losses, *_ = fused_preference_loss(
        h, w, targets, pair_objective(ref, cfg.objective, cfg.gate, vocab_size=V), chunk_size=3
    )
    losses.mean().backward()
    torch.testing.assert_close(h.grad.double(), want_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), want_w, rtol=1e-4, atol=1e-6)
    losses, *_ = fused_preference_loss(hidden, weight.requires_grad_(True), targets, pair_objective(ref, cfg.objective, cfg.gate, vocab_size=V))  # fmt: skip
    with pytest.raises(RuntimeError, match="equal weights"):
        (losses * torch.tensor([1.0, 2.0, 1.0], dtype=losses.dtype)).sum().backward()


def _tp_worker(rank, world, out):
    import torch.distributed as dist

    cfg = load_config(None, ["gate.signal=absolute", "gate.tau=0.02", "objective.name=cal_dpo"])
    hidden, weight, targets, ref = _inputs()
    shard = weight.shape[0] // world + 1  # 19 rows per rank: the last rank's shard is padded
    padded = torch.cat([weight, torch.zeros(shard * world - V, H, dtype=weight.dtype)])
    w = padded[rank * shard : (rank + 1) * shard].clone().requires_grad_(True)
    h = hidden.clone().requires_grad_(True)
    losses, *_ = fused_preference_loss(h, w, targets, pair_objective(ref, cfg.objective, cfg.gate, vocab_size=V),
                                       tp_group=dist.group.WORLD, vocab_size=V, chunk_size=4)  # fmt: skip
    losses.mean().backward()
    parts = [torch.zeros_like(w.grad) for _ in range(world)]
    dist.all_gather(parts, w.grad)
    if rank == 0:
        torch.save({"loss": losses.mean().detach(), "h": h.grad, "w": torch.cat(parts)[:V]}, out)


@pytest.mark.multiprocess
def test_tensor_parallel_2_matches_one_process(tmp_path):
    cfg = load_config(None, ["gate.signal=absolute", "gate.tau=0.02", "objective.name=cal_dpo"])
    hidden, weight, targets, ref = _inputs()
    want_loss, want_h, want_w = _reference(hidden, weight, targets, ref, cfg)
    run_distributed(_tp_worker, 2, str(tmp_path / "tp.pt"))
    got = torch.load(tmp_path / "tp.pt")
    torch.testing.assert_close(got["loss"], want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["h"], want_h, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got["w"], want_w, rtol=1e-6, atol=1e-9)
