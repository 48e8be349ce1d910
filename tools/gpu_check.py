"""The GPU check: the CUDA-marked tests, a training-step benchmark of a Llama-3.2-1B-shaped model and the output-layer
op against its baselines, as one table (and JSON). Run by ``tools/gpu_check.sh``, which installs what the GPU image
lacks first; ``--cpu`` runs the same code at toy shapes (CI), where the CUDA tests skip and MFU stays blank.

(a) ``pytest -m cuda``: the tests that need a CUDA device.

(b) Training step, the project's own loop (``gatedpo_mega.training.launch``): one process, world size 1, ZeRO 1,
bf16, DPO against precomputed reference log-probs, synthetic pairs of fixed length T (a quarter prompt, the rest
response, no padding), ``--pairs`` pairs per step in one micro-batch. Variants: ``unfused`` (logits, then log-probs:
``model.fused_logprobs=false``), ``fused`` (the default fused output layer, four matmuls) and ``fused-objective``
(``model.fused_objective=true``, three matmuls) and ``lora`` (LoRA rank 16 on all seven linears, the base frozen, the
live adapters-off reference: forward 2N, backward 2N without weight gradients, reference forward 2N, so the MFU
formula's 6N still counts its work) and ``moe`` (8 experts of a quarter of the SwiGLU width in every layer, top 2,
megatron-core's MoE layer at EP 1: N counts the two experts a token passes through and the router). Each (T, variant) runs in a fresh process; the step time is the
median of the wall times between the starts of consecutive timed steps (the device synchronised at each start),
after ``--warmup`` steps. Peak memory is the step record's ``memory/peak_mib_max_rank``
(``torch.cuda.max_memory_allocated``; on CPU the process's peak RSS).

    MFU = tokens/s x (6 N + 12 L H T) / peak bf16 dense FLOP/s

N: the parameters of the matmuls (decoder layers and the output layer; the input embedding lookup does no matmul),
L layers, H hidden size, T tokens per row: PaLM's count (appendix B), the attention term without the causal halving.
The peak comes from the device name (H100 SXM and H200: 989 TFLOP/s; unknown: no MFU) or ``--peak-tflops``.

(c) Output-layer op at V, N tokens, hidden H, bf16 (``tools/bench_logprobs.py``'s part B functions): naive logits +
log_softmax, the fused ops, Liger's fused linear DPO loss and the three-matmul floor; time of one forward+backward
(median) and the peak memory above the inputs (``max_memory_allocated``; on CPU bench_logprobs' RSS measure).

(d) Context parallelism (``tools/bench_context.py``'s cells): one Gate-DPO forward+backward of a pair of T-token rows
at CP 1 and CP 2, 4 layers of the model above in bf16 at T 16,384 (toy: its narrow fp32 model at T 256), the CP ranks
on the one GPU, joined by gloo (NCCL refuses two ranks on one device; the key/value exchange goes through host
memory, so the time is not a cluster's). Per rank: ``torch.cuda.max_memory_allocated`` above the model and inputs,
and what autograd keeps for backward; the CP row against the CP 1 row.

No target is asserted: the issue's targets are a column of the table. The exit code is 1 when a CUDA test failed or a row
could not run (after the table and the JSON are written).

    python tools/gpu_check.py [--cpu] [--out gpu_check.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))  # bench_logprobs, imported for its part-B functions

# Llama-3.2-1B: hidden 2048, 16 layers, 32 heads in 8 key/value groups, SwiGLU 8192, vocabulary 128,256, tied
# embeddings, rotary base 500,000.
GPU_MODEL = {"num_layers": 16, "hidden_size": 2048, "num_attention_heads": 32, "num_query_groups": 8,
             "ffn_hidden_size": 8192, "vocab_size": 128256, "rotary_base": 500000.0, "tie_embeddings": True}  # fmt: skip
CPU_MODEL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
             "ffn_hidden_size": 176, "vocab_size": 512, "rotary_base": 500000.0, "tie_embeddings": True}  # fmt: skip
VARIANTS = {
    "unfused": ["model.fused_logprobs=false"],
    "fused": ["model.fused_logprobs=true"],
    "fused-objective": ["model.fused_logprobs=true", "model.fused_objective=true"],
    # LoRA rank 16 on every linear, the base frozen, the reference the policy with its adapters off (live)
    "lora": [
        "model.fused_logprobs=true",
        "model.lora.rank=16",
        "model.lora.alpha=32",
        "train.reference=live",
    ],
    # a mixture of experts in place of every MLP: MOE_EXPERTS experts of a quarter of the SwiGLU width, top 2
    # (twice the dense MLP's parameters, half its FLOPs a token), megatron-core's MoE layer on one GPU (EP 1)
    "moe": ["model.fused_logprobs=true", "model.moe_router_topk=2"],
}
MOE_EXPERTS, MOE_TOPK, MOE_WIDTH_DIVISOR = 8, 2, 4
# (d): the GPU cells' model (config overrides) and vocabulary; toy cells use bench_context's own narrow model
CONTEXT_GPU_MODEL = [
    "model.num_layers=4", "model.hidden_size=2048", "model.num_attention_heads=32", "model.num_query_groups=8",
    "model.ffn_hidden_size=8192", "model.dtype=bf16",
]  # fmt: skip
CONTEXT_GPU_VOCAB = 128256
CONTEXT_LENGTHS = {"gpu": [16384], "toy": [256]}
CONTEXT_CP = (1, 2)
OP_METHODS = ("naive-lmhead", "fused-recompute", "fused-stream", "liger-fused-dpo", "matmul-floor")
# bf16 dense tensor-core peaks (NVIDIA's data sheets, without sparsity), by a piece of torch's device name.
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0))
FLOP_FORMULA = "MFU = tokens/s * (6*N + 12*L*H*T) / peak bf16 dense FLOP/s (N: matmul parameters, embedding lookup excluded)"
DEFAULTS = {"pairs": 2, "warmup": 3, "steps": 5, "op_tokens": 8192, "op_hidden": 2048, "op_vocab": 128256,
            "op_pairs": 2, "warmup_op": 2, "repeats_op": 5}  # fmt: skip
# Toy shapes: the whole --cpu check in about a minute and a half on 2 busy cores.
TOY_DEFAULTS = DEFAULTS | {"pairs": 1, "warmup": 1, "steps": 2, "op_tokens": 256, "op_hidden": 64,
                           "op_vocab": 2048, "warmup_op": 1, "repeats_op": 2}  # fmt: skip
TARGETS = {
    "mfu": "MFU >= 40% (T 4096)",
    "step": "time <= 1.03x unfused",
    "op": "mem <= 0.15x naive and <= liger",
}


# ---------------------------------------------------------------------------------------------------------------
# (b) training step


STEP_STARTS: list[
    float
] = []  # perf_counter at the start of each step, the device synchronised (in the worker)
BACKEND: list[str] = []  # the process group's backend, as the run saw it


class SyntheticSteps:
    """The same micro-batch every step, timing each step's start (a ``StepSource``)."""

    num_micro_batches = 1

    def __init__(self, batch: Any) -> None:
        self.batch = batch

    def __next__(self) -> list[Any]:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        STEP_STARTS.append(time.perf_counter())
        return [self.batch]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def synthetic_pairs(pairs: int, length: int, vocab: int) -> Any:
    """``pairs`` pairs as ``2 * pairs`` rows of ``length`` tokens: a shared prompt of a quarter of the row, then a
    response (chosen rows first), no padding."""
    import torch

    from gatedpo_mega.data.batch import PreferenceBatch
    from gatedpo_mega.ops import IGNORE_INDEX

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2 * pairs, length), generator=g)
    prompt = length // 4
    ids[pairs:, :prompt] = ids[:pairs, :prompt]
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, prompt - 1 : -1] = ids[:, prompt:]
    return PreferenceBatch(ids, labels, torch.arange(pairs))


def synthetic_data(cfg: Any, layout: Any) -> Any:
    """``make_data`` for ``launch``: ``cfg.train.micro_batch_size`` synthetic pairs of ``data.max_length`` tokens."""
    import torch.distributed as dist

    from gatedpo_mega.training.data import RunData

    BACKEND[:] = [str(dist.get_backend())]
    batch = synthetic_pairs(cfg.train.micro_batch_size, cfg.data.max_length, cfg.model.vocab_size)
    return RunData(
        steps=SyntheticSteps(batch), reference_batches=[batch], num_pairs=batch.pairs,
        vocab_size=cfg.model.vocab_size, reference_file=None,
    )  # fmt: skip


def train_overrides(
    model: dict[str, Any], seq: int, variant: str, args: argparse.Namespace, out: str
) -> list[str]:
    shape = [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in model.items()]
    return [
        *shape, "model.dtype=bf16", f"model.max_position_embeddings={seq}",
        f"data.max_length={seq}", f"data.max_prompt_length={seq // 4}", "parallel.tensor=1", "parallel.pipeline=1", "parallel.zero_stage=1",
        "objective.name=dpo", "gate.shape=none", "train.reference=precomputed",
        f"train.micro_batch_size={args.pairs}", f"train.global_batch_size={args.pairs}",
        f"train.max_steps={args.warmup + args.steps + 1}", "train.save_final=false", "train.report_to=none",
        f"train.output_dir={out}", *VARIANTS[variant], *moe_shape(model, variant),
    ]  # fmt: skip


def moe_shape(model: dict[str, Any], variant: str) -> list[str]:
    """The ``moe`` variant's experts, sized from the model's SwiGLU width."""
    if variant != "moe":
        return []
    return [
        f"model.num_experts={MOE_EXPERTS}",
        f"model.moe_ffn_hidden_size={model['ffn_hidden_size'] // MOE_WIDTH_DIVISOR}",
    ]


def train_worker(seq: int, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """One (T, variant) in this process; the last step only ends the last timed one."""
    import torch

    from gatedpo_mega.config import load_config
    from gatedpo_mega.training.launch import launch

    model = CPU_MODEL if args.toy else GPU_MODEL
    STEP_STARTS.clear()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as out:
        cfg = load_config(None, train_overrides(model, seq, variant, args, out))
        code = launch(cfg, 1, make_data=synthetic_data, quiet=True)
        if code:
            raise SystemExit(f"training ({variant}, T {seq}) exited with {code}")
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps = [b - a for a, b in itertools.pairwise(STEP_STARTS)][args.warmup :]
    return {
        "step_s": statistics.median(steps),
        "steps_s": steps,
        "tokens_per_step": 2 * args.pairs * seq,
        "peak_mib": max(r["memory/peak_mib_max_rank"] for r in records),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "backend": BACKEND[0],
        "records": records,
    }


def matmul_params(model: dict[str, Any], variant: str = "") -> int:
    """N of the FLOP count: each layer's q, k, v, o and SwiGLU projections (with experts: the top k a token
    passes through, and the router), and the output layer."""
    h, layers, heads, groups = (
        model[k] for k in ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups")
    )
    head_dim = h // heads
    mlp = 3 * h * model["ffn_hidden_size"]
    if variant == "moe":
        mlp = MOE_TOPK * 3 * h * (model["ffn_hidden_size"] // MOE_WIDTH_DIVISOR) + h * MOE_EXPERTS
    per_layer = 2 * h * heads * head_dim + 2 * h * groups * head_dim + mlp
    return layers * per_layer + model["vocab_size"] * h


def flops_per_token(model: dict[str, Any], seq: int, variant: str = "") -> float:
    return 6.0 * matmul_params(model, variant) + 12.0 * model["num_layers"] * model["hidden_size"] * seq


def peak_tflops(device: str, given: float | None) -> float | None:
    if given:
        return given
    return next((peak for name, peak in PEAK_TFLOPS if name in device), None)


# ---------------------------------------------------------------------------------------------------------------
# (c) the output-layer op


def op_worker_cuda(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every method in this process, one after another, each measured from a clean peak."""
    import torch
    from bench_logprobs import Skipped

    n, h, v = args.op_tokens, args.op_hidden, args.op_vocab
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for method in OP_METHODS:
        meta = {"method": method, "vocab": v, "tokens": n, "hidden": h, "dtype": "bf16"}
        hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        weight = (
            torch.randn(v, h, device="cuda", dtype=torch.bfloat16, generator=gen) * h**-0.5
        ).requires_grad_()
        targets = torch.randint(v, (n,), device="cuda", generator=gen)
        try:
            step = op_step(method, 2 * args.op_pairs, hidden, weight, targets)
            results.append(meta | cuda_measure(step, hidden, weight, args.warmup_op, args.repeats_op))
        except Skipped as e:
            results.append(meta | {"skipped": str(e)})
        except Exception as e:  # one method failing (out of memory, a peer library's error) leaves the others
            results.append(meta | {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]})
        step = hidden = weight = targets = None  # the next method's peak starts from nothing of this one's
        torch.cuda.empty_cache()
    return results


def op_step(method: str, rows: int, hidden: Any, weight: Any, targets: Any) -> Any:
    """``step() -> loss`` of one forward+backward: bench_logprobs' part-B step, or its three-matmul floor (here on
    the GPU: bench_logprobs builds that one inside its CPU worker)."""
    import torch
    from bench_logprobs import lmhead_step

    if method != "matmul-floor":
        fn = lmhead_step(method, rows)
        return lambda: fn(hidden, weight, targets)
    # A preallocated G [N, V] (counted with the inputs): logits = h W^T, grad_h = G W, grad_W = G^T h.
    grad_logits = torch.randn(hidden.shape[0], weight.shape[0], device=hidden.device, dtype=hidden.dtype)
    h, w = hidden.detach(), weight.detach()

    def floor() -> float:
        logits = h @ w.t()
        grad_h, grad_w = grad_logits @ w, grad_logits.t() @ h
        return float(logits[0, 0] + grad_h[0, 0] + grad_w[0, 0])

    return floor


def cuda_measure(step: Any, hidden: Any, weight: Any, warmup: int, repeats: int) -> dict[str, Any]:
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()  # the inputs (and the floor's G)
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(warmup + repeats):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(step())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(times[warmup:]),
        "times_s": times[warmup:],
        "peak_extra_mib": (torch.cuda.max_memory_allocated() - base) / 2**20,
        "loss": losses[0],
    }


def op_rows_cpu(args: argparse.Namespace) -> list[dict[str, Any]]:
    """bench_logprobs' own workers (a fresh process each, RSS measure), at the toy shape."""
    import bench_logprobs

    ns = argparse.Namespace(
        tokens=args.op_tokens, repeats=args.repeats_op, warmup=args.warmup_op, hidden=args.op_hidden,
        pairs=args.op_pairs, threads=2,
    )  # fmt: skip
    return [bench_logprobs.launch(m, args.op_vocab, "bf16", ns) for m in OP_METHODS]


# ---------------------------------------------------------------------------------------------------------------
# the parent: (a), (b), (c), one table


def context_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """(d): bench_context's cells, CP 1 then CP 2, each in fresh processes."""
    import bench_context

    overrides = bench_context.MODEL if args.toy else CONTEXT_GPU_MODEL
    vocab = bench_context.VOCAB if args.toy else CONTEXT_GPU_VOCAB
    rows = []
    for t in CONTEXT_LENGTHS["toy" if args.toy else "gpu"]:
        for cp in CONTEXT_CP:
            cell = bench_context.run_cell(
                t, cp, max(1, args.steps // 2), device="cpu" if args.cpu else "cuda", overrides=overrides,
                vocab=vocab,
            )  # fmt: skip
            rows.append({"T": t, "cp": cp, **cell})
            print(f"context T {t} CP {cp}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    return rows


def run_tests(args: argparse.Namespace) -> dict[str, Any]:
    """``pytest -m cuda``; the counts from its summary line."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"]
    cmd += [f"--basetemp={tempfile.mkdtemp(prefix='gpu_check_pt_')}"]
    t0 = time.perf_counter()
    env = dict(os.environ) | ({"CUDA_VISIBLE_DEVICES": ""} if args.cpu else {})
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error", "deselected")}
    for num, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", done.stdout):
        counts["error" if word.startswith("error") else word] = int(num)
    print(done.stdout[-3000:], file=sys.stderr, flush=True)
    return {"exit_code": done.returncode, "wall_s": wall, **counts}


def sub(args: argparse.Namespace, *worker: str) -> Any:
    """One worker of this script in a fresh process; its last stdout line is JSON."""
    cmd = [sys.executable, __file__, *worker]
    for key in DEFAULTS:  # every size and count as resolved here
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += ["--cpu"] if args.cpu else ["--toy"] if args.toy else []
    env = dict(os.environ)
    # --cpu: on the CPU even where a GPU is there; DeepSpeed's accelerator follows what torch sees.
    env.update(
        {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"} if args.cpu else {"DS_ACCELERATOR": "cuda"}
    )
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode:
        reason = (done.stderr.strip().splitlines() or ["failed"])[-1]
        print(done.stderr[-4000:], file=sys.stderr, flush=True)
        return {"error": reason[:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(report: dict[str, Any]) -> list[dict[str, str]]:
    cols = ("part", "case", "time ms", "tokens/s", "MFU", "peak MiB", "time vs", "memory vs", "target")
    rows: list[dict[str, str]] = []

    def add(**cells: str) -> None:
        rows.append({c: cells.get(c.replace(" ", "_").replace("/", "_per_"), "") for c in cols})

    t = report["tests"]
    result = f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped, {t['error']} errors"
    add(
        part="tests",
        case="pytest -m cuda",
        time_vs=f"{result} ({t['wall_s']:.0f} s)",
        target="all pass (GPU)",
    )
    for r in report["train"]:
        case = f"T {r['T']} {r['variant']}"
        if "error" in r:
            add(part="train", case=case, time_vs=f"error: {r['error']}")
            continue
        unfused = next((u for u in report["train"] if u["T"] == r["T"] and u["variant"] == "unfused"), None)
        ratio = r["step_s"] / unfused["step_s"] if unfused and "step_s" in unfused else None
        target = TARGETS["step"] if r["variant"] != "unfused" else ""
        if r["T"] == 4096 and r["variant"] != "unfused":
            target = f"{TARGETS['mfu']}; {target}"
        add(part="train", case=case, time_ms=fmt(r["step_s"] * 1e3, ".1f"),
            tokens_per_s=fmt(r["tokens_per_s"], ".0f"), MFU=fmt(r["mfu"] and 100 * r["mfu"], ".1f") + ("%" if r["mfu"] else ""),
            peak_MiB=fmt(r["peak_mib"], ".0f"), time_vs=f"{ratio:.3f}x unfused" if ratio and r["variant"] != "unfused" else "",
            target=target)  # fmt: skip
    ops = {r["method"]: r for r in report["op"] if "median_s" in r}
    naive, floor, liger = ops.get("naive-lmhead"), ops.get("matmul-floor"), ops.get("liger-fused-dpo")
    for r in report["op"]:
        shape = f"V {r['vocab']} N {r['tokens']} H {r['hidden']}"
        if "median_s" not in r:
            add(part="op", case=f"{shape} {r['method']}", time_vs=r.get("skipped") or r.get("error", ""))
            continue
        t_vs = [
            f"{r['median_s'] / x['median_s']:.2f}x {name}"
            for name, x in (("floor", floor), ("naive", naive))
            if x and x is not r
        ]
        m_vs = [
            f"{r['peak_extra_mib'] / max(x['peak_extra_mib'], 1e-9):.2f}x {name}"
            for name, x in (("naive", naive), ("liger", liger))
            if x and x is not r
        ]
        fused = r["method"].startswith("fused")
        add(part="op", case=f"{shape} {r['method']}", time_ms=fmt(r["median_s"] * 1e3, ".2f"),
            tokens_per_s=fmt(r["tokens"] / r["median_s"], ".0f"), peak_MiB=fmt(r["peak_extra_mib"], ".0f"),
            time_vs=", ".join(t_vs), memory_vs=", ".join(m_vs) if r["method"] != "matmul-floor" else "(holds G [N, V])",
            target=TARGETS["op"] if fused else "")  # fmt: skip
    for r in report.get("context", []):
        case = f"T {r['T']} CP {r['cp']}"
        if "error" in r:
            add(part="context", case=case, time_vs=f"error: {r['error']}")
            continue
        one = next(
            (o for o in report["context"] if o["T"] == r["T"] and o["cp"] == 1 and "seconds" in o), None
        )
        time_vs, memory_vs = "", f"kept {r['kept_mib']:.0f} MiB"
        if one is not None and r["cp"] != 1:
            time_vs = f"{r['seconds'] / one['seconds']:.2f}x CP 1 (shared device)"
            memory_vs = f"{r['peak_mib'] / max(one['peak_mib'], 1e-9):.2f}x CP 1; " + memory_vs
            memory_vs += f" ({r['kept_mib'] / max(one['kept_mib'], 1e-9):.2f}x)"
        add(part="context", case=case, time_ms=fmt(r["seconds"] * 1e3, ".1f"),
            tokens_per_s=fmt(2 * r["T"] / r["seconds"], ".0f"), peak_MiB=fmt(r["peak_mib"], ".0f"),
            time_vs=time_vs, memory_vs=memory_vs,
            target="memory per rank toward 1/CP" if r["cp"] != 1 else "")  # fmt: skip
    return rows


def markdown(rows: list[dict[str, str]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "megatron-core", "deepspeed", "transformers", "triton", "liger-kernel"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "-"
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="toy shapes on the CPU, no GPU needed (CI)")
    p.add_argument("--toy", action="store_true", help="toy shapes on the GPU (what the CUDA tests run)")
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument("--lengths", type=int, nargs="+", help="T of (b); default 2048 4096 (--cpu: 64 128)")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(VARIANTS),
        default=["unfused", "fused", "fused-objective", "lora", "moe"],
    )
    p.add_argument("--pairs", type=int, help="pairs per step, 2 x pairs rows of T (default 2; toy 1)")
    p.add_argument("--warmup", type=int, help="untimed training steps first (default 3; toy 1)")
    p.add_argument("--steps", type=int, help="timed training steps (default 5; toy 2)")
    p.add_argument("--op-tokens", type=int, help="(c): N (default 8192; toy 256)")
    p.add_argument("--op-hidden", type=int, help="(c): H (default 2048; toy 64)")
    p.add_argument("--op-vocab", type=int, help="(c): V (default 128256; toy 2048)")
    p.add_argument("--op-pairs", type=int, help="(c): rows of N / (2 x pairs) tokens (default 2)")
    p.add_argument("--warmup-op", type=int, help="(c): untimed iterations first (default 2; toy 1)")
    p.add_argument("--repeats-op", type=int, help="(c): timed iterations (default 5; toy 2)")
    p.add_argument("--peak-tflops", type=float, help="the device's bf16 dense peak (default: from its name)")
    p.add_argument("--skip", nargs="+", choices=("tests", "train", "op", "context"), default=[])
    p.add_argument("--train-worker", nargs="+", metavar="T:VARIANT", help=argparse.SUPPRESS)
    p.add_argument("--op-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.toy = args.toy or args.cpu
    for key, value in (TOY_DEFAULTS if args.toy else DEFAULTS).items():  # what was not given
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.train_worker:
        runs = [spec.split(":") for spec in args.train_worker]
        print(json.dumps([{"T": int(t), "variant": v, **train_worker(int(t), v, args)} for t, v in runs]))
        return
    if args.op_worker:
        print(json.dumps(op_worker_cuda(args)))
        return

    import torch

    mode = "cpu" if args.cpu else "gpu-toy" if args.toy else "gpu"
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; run with --cpu for the toy-shape check")
    device = torch.cuda.get_device_name() if not args.cpu else "cpu"
    model = CPU_MODEL if args.toy else GPU_MODEL
    peak = None if args.toy else peak_tflops(device, args.peak_tflops)
    lengths = args.lengths or ([64, 128] if args.toy else [2048, 4096])
    report: dict[str, Any] = {
        "mode": mode, "device": device, "versions": versions(), "flop_formula": FLOP_FORMULA,
        "peak_tflops": peak, "model": model, "matmul_params": matmul_params(model), "pairs": args.pairs,
        "targets": TARGETS, "tests": {"exit_code": None, "wall_s": 0.0, "passed": 0, "failed": 0, "skipped": 0, "error": 0},
        "train": [], "op": [], "context": [],
    }  # fmt: skip
    t0 = time.perf_counter()
    part_s = report["part_s"] = {}
    if "tests" not in args.skip:
        report["tests"] = run_tests(args)
        part_s["tests"] = time.perf_counter() - t0
    if "train" not in args.skip:
        specs = [f"{seq}:{variant}" for seq in lengths for variant in args.variants]
        # On the GPU a fresh process each, for a clean peak memory; on CPU (peak RSS, toy shapes) one for all,
        # which saves the imports.
        for group in [specs] if args.cpu else [[s] for s in specs]:
            done = sub(args, "--train-worker", *group)
            for spec, r in zip(group, done if isinstance(done, list) else [done] * len(group), strict=True):
                seq, variant = int(spec.split(":")[0]), spec.split(":")[1]
                r = {"T": seq, "variant": variant, **r}
                if "step_s" in r:
                    r["tokens_per_s"] = r["tokens_per_step"] / r["step_s"]
                    r["mfu"] = (
                        r["tokens_per_s"] * flops_per_token(model, seq, variant) / (peak * 1e12)
                        if peak
                        else None
                    )
                report["train"].append(r)
                shown = {k: x for k, x in r.items() if k != "records"}
                print(f"train T {seq} {variant}: {json.dumps(shown)}", file=sys.stderr, flush=True)
        part_s["train"] = time.perf_counter() - t0 - sum(part_s.values())
    if "op" not in args.skip:
        report["op"] = op_rows_cpu(args) if args.cpu else sub(args, "--op-worker")
        if isinstance(report["op"], dict):  # the worker failed as a whole
            report["op"] = [{"method": "all", "vocab": args.op_vocab, "tokens": args.op_tokens,
                             "hidden": args.op_hidden, **report["op"]}]  # fmt: skip
        part_s["op"] = time.perf_counter() - t0 - sum(part_s.values())
    if "context" not in args.skip:
        report["context"] = context_rows(args)
        part_s["context"] = time.perf_counter() - t0 - sum(part_s.values())
    report["wall_s"] = time.perf_counter() - t0
    report["table"] = table(report)
    versions_line = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    print(f"\ngpu_check ({mode}): {device}; {versions_line}")
    print(f"model: {model} ({report['matmul_params'] / 1e6:.1f}M matmul parameters), {args.pairs} pairs per step, "
          f"ZeRO 1, bf16; peak {fmt(peak, 'g') or '-'} TFLOP/s")  # fmt: skip
    print(FLOP_FORMULA)
    print(
        "peak MiB: train, the run's peak (torch.cuda.max_memory_allocated; on CPU the peak RSS); op, the peak above "
        "the inputs\n"
    )
    print(markdown(report["table"]))
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in part_s.items())
    print(f"\n({report['wall_s']:.0f} s: {parts}; the targets are reported, not asserted)")
    out = args.out or (os.environ.get("OUT") and str(Path(os.environ["OUT"]) / "gpu_check.json"))
    if out:
        Path(out).write_text(json.dumps(report, indent=1))
        print(f"JSON: {out}")
    failed = [r for r in report["train"] + report["op"] + report["context"] if "error" in r]
    if failed or report["tests"]["exit_code"] not in (None, 0):
        # The table is out; a failed test or a row that could not run still fails the check.
        sys.exit(f"gpu_check: {len(failed)} rows failed; pytest -m cuda exit {report['tests']['exit_code']}")


if __name__ == "__main__":
    main()
