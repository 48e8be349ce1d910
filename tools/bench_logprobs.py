"""Benchmark per-token log-probs with gradient: memory and time of the log-prob ops against their baselines.

Two parts, each measured at N tokens for every (vocab V, dtype, method): the median wall time of one
forward+backward and the peak resident memory above the inputs during those iterations.

(A) From logits ``[N, V]`` that require grad, ``loss = (logp_target * w).sum()``:

    naive      torch.log_softmax(logits, -1).gather(-1, targets[:, None]), in the input dtype
    unchunked  token_logprobs(..., chunk_size=N)
    chunked    token_logprobs(...) with the default chunk size
    inplace    token_logprobs(..., inplace_backward=True), default chunk size

(B) Through the output layer: ``hidden [N, H]`` and ``weight [V, H]`` both require grad; per-token log-probs of the
targets, reshaped to ``[2B, T]`` (B pairs: chosen rows, then rejected rows), feed the DPO loss
``-logsigmoid(0.1 * (sum chosen logp - sum rejected logp))``, averaged over pairs, then backward:

    naive-lmhead            logits = hidden @ weight.T; log_softmax; gather
    token_logprobs-lmhead   logits = hidden @ weight.T; token_logprobs(..., inplace_backward=True)
    fused-recompute         fused_token_logprobs(hidden, weight, targets)
    fused-objective         fused_pair_loss(hidden [2B, T, H], weight, targets [2B, T], dpo_loss)
    fused-stream            fused_preference_loss(hidden [2B, T, H], weight, targets, reference 0, dpo, no gate):
                            three matmuls, token chunks, two [V, H] accumulators
    trl-selective           logits = hidden @ weight.T; trl.trainer.utils.selective_log_softmax (if installed)
    liger-fused-dpo         liger_kernel's LigerFusedLinearDPOLoss (if installed; needs triton)
    megatron-vpce-tp2       TP=2 over gloo: each rank holds weight[V/2]; megatron-core's
                            vocab_parallel_cross_entropy on [S, B, V/2] logits; logp = -NLL
    fused-recompute-tp2     TP=2 over gloo: fused_token_logprobs on each rank's shard (tp_group = the world)
    matmul-floor            only hidden @ weight.T, G @ weight and G.T @ hidden for a preallocated G [N, V]

TP=2 methods run two worker processes with ``threads // 2`` threads each and report the slower rank's time and the
larger rank's peak memory (per rank; each rank's inputs are hidden and its weight shard).

Every measurement runs in a fresh subprocess so its peak memory is clean. Peak memory is the larger of a
background thread sampling the RSS every ~2 ms and the kernel's ``ru_maxrss`` high-water mark (each minus the
RSS measured after the inputs were created). Nothing is asserted; the issue's targets are only reported:
(A) at V=128256, peak extra memory >= 4x lower than naive at time <= 1.2x naive; (B) at V=128256 fp32, time
<= 1.05x the three-matmul floor, peak extra memory <= 0.10x naive-lmhead, per-rank memory halving from TP 1 to 2.
CPU only. Run:

    DS_ACCELERATOR=cpu python tools/bench_logprobs.py --out /tmp/bench.json
    python tools/bench_logprobs.py --part B --vocab 32000 --dtype bf16 --methods naive-lmhead fused-objective
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

LOGITS_METHODS = ("naive", "unchunked", "chunked", "inplace")
LMHEAD_METHODS = (
    "naive-lmhead",
    "token_logprobs-lmhead",
    "fused-recompute",
    "fused-objective",
    "fused-stream",
    "trl-selective",
    "liger-fused-dpo",
    "megatron-vpce-tp2",
    "fused-recompute-tp2",
    "matmul-floor",
)
PARTS = {"A": LOGITS_METHODS, "B": LMHEAD_METHODS}
TP2_METHODS = ("megatron-vpce-tp2", "fused-recompute-tp2")
DTYPES = ("fp32", "bf16")
BETA = 0.1
MIB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:  # same counter as VmRSS in /proc/self/status, cheaper to parse
        return int(f.read().split()[1]) * PAGE


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def busy_cpu_s() -> float:
    """CPU seconds spent by the whole machine (all processes) since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class PeakSampler(threading.Thread):
    def __init__(self, period: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.period, self.peak, self.stop = period, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.period)


class Skipped(Exception):
    """The method's library is not importable here."""


def measure(
    step: Callable[[], float], reset: Callable[[], None], warmup: int, repeats: int, input_bytes: int
) -> dict:
    """Runs ``reset(); step()`` warmup + repeats times; times ``step`` and samples the memory above the inputs.

    ``step`` returns the loss and may end with ``sync()`` (a barrier) so every rank's time covers the collective.
    """
    base_rss, base_max = rss(), maxrss()
    sampler = PeakSampler()
    sampler.start()
    times, losses, busy0, own0, wall0 = [], [], busy_cpu_s(), sum(os.times()[:2]), time.perf_counter()
    for _ in range(warmup + repeats):
        reset()
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    sampler.stop.set()
    sampler.join()
    # Cores kept busy by other processes while this ran: they share the CPU and skew the times.
    elsewhere = (busy_cpu_s() - busy0 - (sum(os.times()[:2]) - own0)) / (time.perf_counter() - wall0)
    end_max = maxrss()
    # ru_maxrss only says something if the iterations pushed it past the mark already set before them.
    ru_extra = end_max - base_rss if end_max > base_max else 0
    return {
        "times_s": times[warmup:],
        "median_s": statistics.median(times[warmup:]),
        "peak_extra_mib": max(sampler.peak - base_rss, ru_extra, 0) / MIB,
        "sampled_extra_mib": (sampler.peak - base_rss) / MIB,
        "ru_maxrss_extra_mib": ru_extra / MIB,
        "baseline_rss_mib": base_rss / MIB,
        "baseline_hwm_slack_mib": (base_max - base_rss) / MIB,
        "input_mib": input_bytes / MIB,
        "loss": losses[0],
        "cores_busy_elsewhere": max(elsewhere, 0.0),
    }


def logits_worker(method: str, vocab: int, dtype, args: argparse.Namespace) -> dict:
    """Part (A): per-token log-probs from logits that require grad."""
    import torch

    from gatedpo_mega.ops import token_logprobs

    def step_on(logits: torch.Tensor, targets: torch.Tensor, w: torch.Tensor) -> float:
        if method == "naive":
            logp = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
        else:
            chunk = len(targets) if method == "unchunked" else None
            logp = token_logprobs(logits, targets, chunk_size=chunk, inplace_backward=method == "inplace")[0]
        loss = (logp * w).sum()
        loss.backward()
        return loss.item()

    # A tiny call first, so one-time set-up (kernels, autograd and OpenMP threads) is not counted below.
    step_on(torch.randn(8, 64, dtype=dtype, requires_grad=True), torch.randint(64, (8,)), torch.randn(8))
    gen = torch.Generator().manual_seed(0)
    # Created directly in the target dtype: an fp32 tensor cast down would leave a spurious ru_maxrss peak.
    logits = torch.randn(args.tokens, vocab, dtype=dtype, generator=gen).requires_grad_()
    targets = torch.randint(vocab, (args.tokens,), generator=gen)
    w = torch.randn(args.tokens, generator=gen)
    first = [True]

    def reset() -> None:
        logits.grad = None
        if (
            method == "inplace" and not first[0]
        ):  # the previous backward overwrote the logits with their gradient
            with torch.no_grad():
                logits.normal_(generator=gen.manual_seed(0))
        first[0] = False

    input_bytes = logits.nelement() * logits.element_size()
    return measure(lambda: step_on(logits, targets, w), reset, args.warmup, args.repeats, input_bytes)


def dpo_loss(logp):
    """Per-pair DPO loss of ``[2k, T]`` token log-probs whose first k rows are the chosen ones."""
    import torch.nn.functional as F

    k = logp.shape[0] // 2
    return -F.logsigmoid(BETA * (logp[:k].sum(-1) - logp[k:].sum(-1)))


def lmhead_step(method: str, rows: int) -> Callable:
    """Part (B): ``step(hidden, weight, targets) -> loss`` with backward into hidden and weight."""
    import torch

    from gatedpo_mega.ops import fused_pair_loss, fused_token_logprobs, token_logprobs

    def finish(logp: torch.Tensor) -> float:
        loss = dpo_loss(logp.view(rows, -1)).mean()
        loss.backward()
        return loss.item()

    if method == "naive-lmhead":
        return lambda h, w, y: finish(torch.log_softmax(h @ w.t(), -1).gather(-1, y[:, None]).squeeze(-1))
    if method == "token_logprobs-lmhead":
        # The logits are an intermediate the matmul's backward does not need: overwriting them is legal.
        return lambda h, w, y: finish(token_logprobs(h @ w.t(), y, inplace_backward=True)[0])
    if method == "fused-recompute":
        return lambda h, w, y: finish(fused_token_logprobs(h, w, y)[0])
    if method == "fused-objective":

        def fused_objective(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> float:
            loss_fn = lambda logp, _max, _entropy, _pairs: dpo_loss(logp)  # noqa: E731
            loss = fused_pair_loss(h.view(rows, -1, h.shape[-1]), w, y.view(rows, -1), loss_fn)[0].mean()
            loss.backward()
            return loss.item()

        return fused_objective
    if method == "fused-stream":
        from gatedpo_mega.gate import GateConfig
        from gatedpo_mega.loss import pair_objective
        from gatedpo_mega.objectives import ObjectiveConfig
        from gatedpo_mega.ops.streaming import fused_preference_loss

        def fused_stream(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> float:
            ref = torch.zeros(rows // 2, 2, dtype=torch.float64, device=h.device)  # on the inputs' device
            objective = pair_objective(ref, ObjectiveConfig(name="dpo", beta=BETA), GateConfig(shape="none"))
            loss = fused_preference_loss(h.view(rows, -1, h.shape[-1]), w, y.view(rows, -1), objective)[
                0
            ].mean()
            loss.backward()
            return loss.item()

        return fused_stream
    if method == "trl-selective":
        try:
            from trl.trainer.utils import selective_log_softmax
        except ImportError as e:
            raise Skipped("trl not installed: skipped") from e
        # TRL calls it on [B, T, V] logits and loops over the B rows.
        return lambda h, w, y: finish(
            selective_log_softmax((h @ w.t()).view(rows, -1, w.shape[0]), y.view(rows, -1))
        )
    if method == "liger-fused-dpo":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        except ImportError as e:
            raise Skipped("liger-kernel not installed: skipped") from e
        liger = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False)

        def liger_dpo(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> float:  # untested here: no liger
            out = liger(w, h.view(rows, -1, h.shape[-1]), y.view(rows, -1))
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            return loss.item()

        return liger_dpo
    if method == "megatron-vpce-tp2":
        from megatron.core.tensor_parallel import (
            copy_to_tensor_model_parallel_region,
            vocab_parallel_cross_entropy,
        )

        def megatron_vpce(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> float:
            # Megatron's layout: [S, B, H] hidden -> [S, B, V/TP] logits, [S, B] targets.
            h_sbh = copy_to_tensor_model_parallel_region(h.view(rows, -1, h.shape[-1]).transpose(0, 1))
            nll = vocab_parallel_cross_entropy(h_sbh @ w.t(), y.view(rows, -1).t().contiguous())
            return finish(-nll.t())

        return megatron_vpce
    if method == "fused-recompute-tp2":
        import torch.distributed as dist

        return lambda h, w, y: finish(fused_token_logprobs(h, w, y, tp_group=dist.group.WORLD)[0])
    raise ValueError(method)


def lmhead_worker(method: str, vocab: int, dtype, args: argparse.Namespace) -> dict:
    import torch

    rank, world = args.rank, args.world
    sync = lambda: None  # noqa: E731
    if world > 1:
        import torch.distributed as dist

        from gatedpo_mega.megatron.cpu_shim import apply_cpu_shim

        apply_cpu_shim()
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(world, 1)
        sync = dist.barrier

    rows = 2 * args.pairs
    if args.tokens % rows:
        raise SystemExit(f"--tokens {args.tokens} must be a multiple of 2 * --pairs = {rows}")
    step = lmhead_step(method, rows) if method != "matmul-floor" else None

    def inputs(n: int, v: int, h_dim: int, seed: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        hidden = torch.randn(n, h_dim, dtype=dtype, generator=gen).requires_grad_()
        targets = torch.randint(v, (n,), generator=gen)
        # Each rank its own vocabulary shard (values differ from TP 1's; only the sizes matter here).
        w_gen = torch.Generator().manual_seed(seed + 1 + rank)
        weight = torch.randn(v // world, h_dim, dtype=dtype, generator=w_gen).mul_(h_dim**-0.5)
        return hidden, weight.requires_grad_(), targets

    # A tiny call first, so one-time set-up (kernels, autograd and OpenMP threads) is not counted below.
    if step is not None:
        step(*inputs(2 * rows, 64 * world, 16, 1))
    hidden, weight, targets = inputs(args.tokens, vocab, args.hidden, 0)
    input_bytes = sum(t.nelement() * t.element_size() for t in (hidden, weight))
    sync()

    if step is None:  # matmul-floor: the three matmuls of any output layer's forward and backward
        h, w = hidden.detach(), weight.detach()
        grad_logits = torch.randn(args.tokens, weight.shape[0], dtype=dtype)
        input_bytes += grad_logits.nelement() * grad_logits.element_size()

        def floor() -> float:
            logits = h @ w.t()
            grad_h, grad_w = grad_logits @ w, grad_logits.t() @ h
            return float(logits[0, 0] + grad_h[0, 0] + grad_w[0, 0])

        return measure(floor, lambda: None, args.warmup, args.repeats, input_bytes)

    def reset() -> None:
        hidden.grad = weight.grad = None
        sync()  # every rank starts its step together

    def timed_step() -> float:
        loss = step(hidden, weight, targets)
        sync()  # the time of a TP step is the slowest rank's
        return loss

    return measure(timed_step, reset, args.warmup, args.repeats, input_bytes)


def run_worker(args: argparse.Namespace) -> dict:
    import torch

    from gatedpo_mega.formats import DTYPES as TORCH_DTYPES

    method, vocab, dtype_name = args.worker[0], int(args.worker[1]), args.worker[2]
    torch.set_num_threads(args.threads)
    dtype = TORCH_DTYPES[dtype_name]
    meta = {
        "method": method,
        "vocab": vocab,
        "dtype": dtype_name,
        "tokens": args.tokens,
        "threads": args.threads,
    }
    try:
        if method in LOGITS_METHODS:
            return meta | {"part": "A"} | logits_worker(method, vocab, dtype, args)
        meta |= {"part": "B", "hidden": args.hidden, "tp": args.world}
        return meta | lmhead_worker(method, vocab, dtype, args)
    except Skipped as e:
        return meta | {"skipped": str(e)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(method: str, vocab: int, dtype: str, args: argparse.Namespace) -> dict:
    """One measurement: one worker process, or one per rank for the TP=2 methods (merged: slowest, largest)."""
    world = 2 if method in TP2_METHODS else 1
    cmd = [sys.executable, __file__, "--worker", method, str(vocab), dtype, "--tokens", str(args.tokens)]
    cmd += ["--repeats", str(args.repeats), "--warmup", str(args.warmup), "--hidden", str(args.hidden)]
    cmd += [
        "--pairs",
        str(args.pairs),
        "--threads",
        str(max(1, args.threads // world)),
        "--world",
        str(world),
    ]
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [
        subprocess.Popen(
            [*cmd, "--rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for r in range(world)
    ]
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode:
            sys.exit(f"worker {method} V={vocab} {dtype} failed:\n{err}")
    ranks = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    if world == 1:
        return ranks[0]
    merged = dict(ranks[0])
    for key in ("median_s", "peak_extra_mib", "cores_busy_elsewhere"):
        merged[key] = max(r[key] for r in ranks)
    merged["ranks"] = ranks
    return merged


def ratio(a: float, b: float | None, fmt: str) -> str:
    return format(a / b, fmt) + "x" if b else "-"


def table_a(results: list[dict]) -> str:
    naive = {(r["vocab"], r["dtype"]): r for r in results if r["method"] == "naive"}
    lines = [
        "| V | dtype | method | median fwd+bwd (s) | peak extra (MiB) | time / naive | naive mem / mem |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        ref = naive.get((r["vocab"], r["dtype"]))
        lines.append(
            f"| {r['vocab']} | {r['dtype']} | {r['method']} | {r['median_s']:.3f} | {r['peak_extra_mib']:.0f} | "
            f"{ratio(r['median_s'], ref and ref['median_s'], '.2f')} | "
            f"{ratio(ref['peak_extra_mib'], max(r['peak_extra_mib'], 1e-9), '.1f') if ref else '-'} |"
        )
    return "\n".join(lines)


def table_b(results: list[dict]) -> str:
    def by(method: str) -> dict:
        return {(r["vocab"], r["dtype"]): r for r in results if r["method"] == method}

    naive, floor = by("naive-lmhead"), by("matmul-floor")
    lines = [
        "| V | dtype | method | TP | median fwd+bwd (s) | peak extra (MiB) | time / naive | mem / naive "
        "| time / matmul floor |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        key = (r["vocab"], r["dtype"])
        ref, fl = naive.get(key), floor.get(key)
        lines.append(
            f"| {r['vocab']} | {r['dtype']} | {r['method']} | {r['tp']} | {r['median_s']:.3f} | "
            f"{r['peak_extra_mib']:.0f} | {ratio(r['median_s'], ref and ref['median_s'], '.2f')} | "
            f"{ratio(r['peak_extra_mib'], ref and ref['peak_extra_mib'], '.2f')} | "
            f"{ratio(r['median_s'], fl and fl['median_s'], '.2f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", nargs="+", choices=sorted(PARTS), default=sorted(PARTS))
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    p.add_argument("--dtype", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument(
        "--methods", nargs="+", choices=LOGITS_METHODS + LMHEAD_METHODS, help="default: all of --part"
    )
    p.add_argument("--tokens", type=int, default=4096, help="N = B*T tokens")
    p.add_argument("--hidden", type=int, default=1024, help="H, part (B)")
    p.add_argument("--pairs", type=int, default=2, help="B pairs (2B rows of N/2B tokens), part (B)")
    p.add_argument("--repeats", type=int, default=3, help="timed iterations")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed iterations first (peak memory includes them)"
    )
    p.add_argument(
        "--threads", type=int, default=2, help="torch threads per measurement (split over TP ranks)"
    )
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--worker", nargs=3, metavar=("METHOD", "V", "DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        print(json.dumps(run_worker(args)))
        return

    results, skipped = [], []
    for part in args.part:
        for vocab in args.vocab:
            for dtype in args.dtype:
                for method in PARTS[part]:
                    if args.methods and method not in args.methods:
                        continue
                    r = launch(method, vocab, dtype, args)
                    if "skipped" in r:
                        skipped.append(r["skipped"])
                        print(r["skipped"], file=sys.stderr, flush=True)
                        continue
                    results.append(r)
                    line = f"{method} V={vocab} {dtype}: {r['median_s']:.3f} s, {r['peak_extra_mib']:.0f} MiB"
                    print(line, file=sys.stderr, flush=True)
    print(
        f"\nN={args.tokens} tokens, {args.threads} threads, median of {args.repeats} after {args.warmup} warm-up"
    )
    part_a = [r for r in results if r["part"] == "A"]
    part_b = [r for r in results if r["part"] == "B"]
    if part_a:
        print("\n(A) from logits [N, V] that require grad\n")
        print(table_a(part_a))
    if part_b:
        print(
            f"\n(B) through the output layer: hidden [N, {args.hidden}], weight [V, {args.hidden}], DPO loss"
        )
        print(f"over {args.pairs} pairs; TP=2 rows: slowest rank's time, largest rank's peak memory\n")
        print(table_b(part_b))
    for reason in dict.fromkeys(skipped):
        print(f"\n{reason}")
    busy = max((r["cores_busy_elsewhere"] for r in results), default=0.0)
    if busy > 0.25:
        print(f"\nWarning: other processes kept up to {busy:.1f} cores busy during a run; times are skewed.")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
