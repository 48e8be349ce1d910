"""What only a CUDA device shows: the fused ops in bf16 on the GPU against float64, and training steps on CUDA with
the NCCL backend against the same steps on the CPU. Marked ``cuda``: skipped without a device (conftest.py)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import grad_f64, logprobs_f64

from gatedpo_mega.gate import GateConfig
from gatedpo_mega.loss import pair_objective
from gatedpo_mega.objectives import ObjectiveConfig
from gatedpo_mega.ops import fused_token_logprobs
from gatedpo_mega.ops.streaming import fused_preference_loss

pytestmark = pytest.mark.cuda

ROOT = Path(__file__).resolve().parents[1]
BETA = 0.1


def _inputs(rows: int, t: int, h: int, v: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * h**-0.5 * 3
    targets = torch.randint(0, v - 3, (rows, t), generator=g)  # the last 3 rows: vocabulary padding
    targets[:, : t // 3] = -100  # prompt
    return hidden, weight, targets


def test_fused_token_logprobs_bf16_on_cuda_matches_float64():
    hidden, weight, targets = _inputs(4, 96, 64, 1027)
    h = hidden.to("cuda", torch.bfloat16).requires_grad_()
    w = weight.to("cuda", torch.bfloat16).requires_grad_()
    out = fused_token_logprobs(h, w, targets.cuda(), vocab_size=1024, chunk_size=7)
    # The reference from the bf16-rounded inputs: what is compared is the op, not the rounding of its inputs.
    hb, wb = h.detach().double().cpu(), w.detach().double().cpu()
    logits64 = hb @ wb.t()
    for a, b in zip(out, logprobs_f64(logits64, targets, 1024), strict=True):
        torch.testing.assert_close(a.double().cpu(), b, atol=0.1, rtol=0.02)  # bf16 logits: ~3 digits
    up = torch.randn(4, 96, generator=torch.Generator().manual_seed(1))
    (out[0] * up.cuda()).sum().backward()
    dz = grad_f64(logits64, targets, up, 1024)
    torch.testing.assert_close(h.grad.double().cpu(), dz @ wb, atol=0.05, rtol=0.05)
    torch.testing.assert_close(
        w.grad.double().cpu(), dz.reshape(-1, 1027).t() @ hb.reshape(-1, 64), atol=0.05, rtol=0.05
    )


def test_fused_preference_loss_bf16_on_cuda_matches_float64():
    """The three-matmul DPO loss (model.fused_objective) on CUDA in bf16 against the DPO loss of float64 log-probs."""
    pairs, t, v = 2, 80, 515
    hidden, weight, targets = _inputs(2 * pairs, t, 48, v, seed=3)
    ref = torch.randn(pairs, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    objective = pair_objective(ref.cuda(), ObjectiveConfig(name="dpo", beta=BETA), GateConfig(shape="none"))
    h = hidden.to("cuda", torch.bfloat16).requires_grad_()
    w = weight.to("cuda", torch.bfloat16).requires_grad_()
    loss = fused_preference_loss(h, w, targets.cuda(), objective, vocab_size=512, chunk_size=33)[0]
    loss.sum().backward()

    h64 = h.detach().double().cpu().requires_grad_()
    w64 = w.detach().double().cpu().requires_grad_()
    logp = logprobs_f64(h64 @ w64.t(), targets, 512)[0].sum(-1)
    margin = (logp[:pairs] - ref[:, 0]) - (logp[pairs:] - ref[:, 1])
    expected = -torch.nn.functional.logsigmoid(BETA * margin)
    expected.sum().backward()
    torch.testing.assert_close(loss.double().cpu(), expected.detach(), atol=0.02, rtol=0.02)
    torch.testing.assert_close(h.grad.double().cpu(), h64.grad, atol=0.02, rtol=0.05)
    torch.testing.assert_close(w.grad.double().cpu(), w64.grad, atol=0.02, rtol=0.05)


def _train(device: str, variants: list[str]) -> list[dict]:
    """Toy-shape training runs of tools/gpu_check.py's worker (the project's loop, one process, ZeRO 1, bf16) in
    a fresh process: on the GPU, or with CUDA hidden on the CPU."""
    env = dict(os.environ)
    env.update(
        {"DS_ACCELERATOR": "cuda"}
        if device == "cuda"
        else {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    )
    cmd = [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--toy", "--warmup", "1", "--steps", "2"]
    cmd += ["--pairs", "2", "--train-worker", *(f"64:{v}" for v in variants)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_training_steps_on_cuda_with_nccl_match_the_cpu_steps():
    variants = ["unfused", "fused", "fused-objective"]
    gpu, cpu = _train("cuda", variants), _train("cpu", variants)
    for g, c in zip(gpu, cpu, strict=True):
        assert g["backend"] == "nccl" and c["backend"] == "gloo"
        assert g["device"] != "cpu" and c["device"] == "cpu"
        assert len(g["records"]) == len(c["records"]) == 4
        for rg, rc in zip(g["records"], c["records"], strict=True):
            assert rg["step"] == rc["step"]
            # bf16 on both sides, different kernels: the same run to bf16's ~3 digits, drifting a little per step
            assert math.isclose(rg["loss"], rc["loss"], rel_tol=0.05, abs_tol=0.02), (g["variant"], rg, rc)
            assert math.isclose(rg["grad_norm"], rc["grad_norm"], rel_tol=0.05, abs_tol=1e-3), (
                g["variant"],
                rg,
                rc,
            )
        # The step record's peak memory on CUDA is torch.cuda.max_memory_allocated of the run.
        peaks = [r["memory/peak_mib_max_rank"] for r in g["records"]]
        assert all(p > 0 for p in peaks) and peaks == sorted(peaks)
    assert math.isclose(
        gpu[0]["records"][0]["loss"], math.log(2), rel_tol=1e-3
    )  # policy == reference at step 1
