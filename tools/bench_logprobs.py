"""Benchmark per-token log-probs with gradient: naive ``log_softmax().gather()`` vs ``token_logprobs``.

For each (vocab V, dtype, method) it measures, at N tokens, the median wall time of one forward+backward of
``loss = (logp_target * w).sum()`` into logits that require grad, and the peak resident memory above the inputs
(logits, targets, w) during those iterations. Methods:

    naive      torch.log_softmax(logits, -1).gather(-1, targets[:, None]), in the input dtype
    unchunked  token_logprobs(..., chunk_size=N)
    chunked    token_logprobs(...) with the default chunk size
    inplace    token_logprobs(..., inplace_backward=True), default chunk size

Every measurement runs in a fresh subprocess so its peak memory is clean. Peak memory is the larger of a
background thread sampling the RSS every ~2 ms and the kernel's ``ru_maxrss`` high-water mark (each minus the
RSS measured after the inputs were created). Nothing is asserted; the issue's target (at V=128256: peak extra
memory >= 4x lower than naive, time <= 1.2x naive) is only reported. CPU only. Run:

    DS_ACCELERATOR=cpu python tools/bench_logprobs.py --out /tmp/bench.json
    python tools/bench_logprobs.py --vocab 32000 --dtype bf16 --methods naive chunked --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

METHODS = ("naive", "unchunked", "chunked", "inplace")
DTYPES = ("fp32", "bf16")
MIB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:  # same counter as VmRSS in /proc/self/status, cheaper to parse
        return int(f.read().split()[1]) * PAGE


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class PeakSampler(threading.Thread):
    def __init__(self, period: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.period, self.peak, self.stop = period, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.period)


def worker(method: str, vocab: int, dtype_name: str, tokens: int, repeats: int, threads: int) -> dict:
    import torch

    from gatedpo_mega.ops import token_logprobs

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]

    def step(logits: torch.Tensor, targets: torch.Tensor, w: torch.Tensor) -> float:
        if method == "naive":
            logp = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
        else:
            chunk = len(targets) if method == "unchunked" else None
            logp = token_logprobs(logits, targets, chunk_size=chunk, inplace_backward=method == "inplace")[0]
        loss = (logp * w).sum()
        loss.backward()
        return loss.item()

    # A tiny call first, so one-time set-up (kernels, autograd and OpenMP threads) is not counted below.
    step(torch.randn(8, 64, dtype=dtype, requires_grad=True), torch.randint(64, (8,)), torch.randn(8))
    gen = torch.Generator().manual_seed(0)
    # Created directly in the target dtype: an fp32 tensor cast down would leave a spurious ru_maxrss peak.
    logits = torch.randn(tokens, vocab, dtype=dtype, generator=gen).requires_grad_()
    targets = torch.randint(vocab, (tokens,), generator=gen)
    w = torch.randn(tokens, generator=gen)

    base_rss, base_max = rss(), maxrss()
    sampler = PeakSampler()
    sampler.start()
    times, losses = [], []
    for i in range(repeats + 1):  # iteration 0 is the warm-up
        logits.grad = None
        if method == "inplace" and i:  # the previous backward overwrote the logits with their gradient
            with torch.no_grad():
                logits.normal_(generator=gen.manual_seed(0))
        t0 = time.perf_counter()
        losses.append(step(logits, targets, w))
        times.append(time.perf_counter() - t0)
    sampler.stop.set()
    sampler.join()
    end_max = maxrss()
    # ru_maxrss only says something if the iterations pushed it past the mark already set before them.
    ru_extra = end_max - base_rss if end_max > base_max else 0
    return {
        "method": method,
        "vocab": vocab,
        "dtype": dtype_name,
        "tokens": tokens,
        "threads": threads,
        "times_s": times[1:],
        "median_s": statistics.median(times[1:]),
        "peak_extra_mib": max(sampler.peak - base_rss, ru_extra, 0) / MIB,
        "sampled_extra_mib": (sampler.peak - base_rss) / MIB,
        "ru_maxrss_extra_mib": ru_extra / MIB,
        "baseline_rss_mib": base_rss / MIB,
        "baseline_hwm_slack_mib": (base_max - base_rss) / MIB,
        "input_mib": logits.nelement() * logits.element_size() / MIB,
        "loss": losses[0],
    }


def table(results: list[dict]) -> str:
    naive = {(r["vocab"], r["dtype"]): r for r in results if r["method"] == "naive"}
    lines = [
        "| V | dtype | method | median fwd+bwd (s) | peak extra (MiB) | time / naive | naive mem / mem |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        ref = naive.get((r["vocab"], r["dtype"]))
        t_ratio = f"{r['median_s'] / ref['median_s']:.2f}x" if ref else "-"
        m_ratio = f"{ref['peak_extra_mib'] / max(r['peak_extra_mib'], 1e-9):.1f}x" if ref else "-"
        lines.append(
            f"| {r['vocab']} | {r['dtype']} | {r['method']} | {r['median_s']:.3f} | "
            f"{r['peak_extra_mib']:.0f} | {t_ratio} | {m_ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    p.add_argument("--dtype", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--tokens", type=int, default=4096, help="N = B*T tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed iterations after one warm-up")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each worker")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--worker", nargs=3, metavar=("METHOD", "V", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        method, vocab, dtype = args.worker
        print(json.dumps(worker(method, int(vocab), dtype, args.tokens, args.repeats, args.threads)))
        return

    results = []
    for vocab in args.vocab:
        for dtype in args.dtype:
            for method in args.methods:
                cmd = [sys.executable, __file__, "--worker", method, str(vocab), dtype]
                cmd += ["--tokens", str(args.tokens), "--repeats", str(args.repeats)]
                cmd += ["--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode:
                    sys.exit(f"worker {method} V={vocab} {dtype} failed:\n{proc.stderr}")
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                r = results[-1]
                line = f"{method} V={vocab} {dtype}: {r['median_s']:.3f} s, {r['peak_extra_mib']:.0f} MiB"
                print(line, file=sys.stderr, flush=True)
    print(f"\nN={args.tokens} tokens, {args.threads} threads, median of {args.repeats}\n")
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
