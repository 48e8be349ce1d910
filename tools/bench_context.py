"""Peak memory per rank and step time against context parallelism (CP 1, 2, 4) as the row length grows.

One Gate-DPO forward+backward (the loss hook included: fused output layer, gathered statistics, the published gate)
of one preference pair, two rows of T tokens, response the second half, on a narrow Llama-shaped megatron-core
``GPTModel`` (2 layers, hidden 128, 4 heads in 2 key/value groups, SwiGLU 352, vocabulary 512, fp32), TP 1,
``parallel.context`` CP over CP processes joined by gloo. Each (T, CP) runs in fresh processes (``torchrun``): one
warm-up step, then the median wall time of ``--repeats`` steps. Per rank, the largest over the CP ranks of:

- ``peak MiB``: the peak resident set size above the RSS after the model and its inputs were built (activations,
  gathered keys and values, gradients, the allocator's slack);
- ``kept MiB``: what autograd keeps for backward (every tensor saved by a forward op, each storage once): the
  activations' exact size, free of allocator noise.

The host's cores are shared by the CP processes (each gets cores / CP threads, at least one), so on a CPU the step
time measures the work each rank does plus the gathers, not a GPU cluster's speed-up. Nothing is asserted. CPU:

    DS_ACCELERATOR=cpu python tools/bench_context.py --lengths 8192 16384 32768 --cp 1 2 4
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
import time
from typing import Any

MODEL = [
    "model.num_layers=2", "model.hidden_size=128", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=352",
]  # fmt: skip
VOCAB = 512


def measure(
    length: int, repeats: int, *, device: str = "cpu", overrides: list[str] = MODEL, vocab: int = VOCAB
) -> dict[str, float]:
    """This rank's numbers on the already initialised default process group (its size is the CP size). On a GPU
    the peak is ``torch.cuda.max_memory_allocated`` above what was allocated before the first step."""
    import torch
    import torch.distributed as dist

    from gatedpo_mega.config import load_config
    from gatedpo_mega.data.batch import PreferenceBatch
    from gatedpo_mega.loss import LossContext, output_request, preference_loss_func
    from gatedpo_mega.megatron.backend import model_forward
    from gatedpo_mega.megatron.model import StageInfo, build_model
    from gatedpo_mega.megatron.parallel import initialize_layout

    cp = dist.get_world_size()
    on = torch.device(device)
    if on.type == "cuda":  # the CP ranks may share one GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        on = torch.device("cuda", torch.cuda.current_device())
    cfg = load_config(None, [*overrides, f"parallel.context={cp}", f"model.max_position_embeddings={length}"])
    lay = initialize_layout(1, 1, context=cp)
    stage = StageInfo(pre_process=True, post_process=True, layer_offset=0, tp_rank=0, tp_size=1)
    model = build_model(
        cfg.model, vocab_size=vocab, stage=stage, pipeline=1, seed=0, tp_group=lay.tp_group, context=cp
    ).to(on)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, length), generator=g)  # one pair: chosen row, rejected row
    labels = torch.full_like(ids, -100)
    half = length // 2
    labels[:, half - 1 : length - 1] = ids[:, half:]
    batch = PreferenceBatch(ids, labels, torch.zeros(1, dtype=torch.long)).to(on)
    ctx = LossContext(
        objective=cfg.objective, gate=cfg.gate, tp_group=lay.tp_group, cp_group=lay.cp_group, vocab_size=vocab,
        reference=torch.full((1, 2), -float(half) * 6.0, dtype=torch.float64, device=on),
        ref_tokens=torch.full((1, 2), half, device=on), fused=True,
    )  # fmt: skip
    cuda = on.type == "cuda"

    def step() -> None:
        request = output_request(ctx, batch)
        loss, _ = preference_loss_func(batch, ctx, model_forward(model, batch, request), request=request)
        loss.backward()
        ctx.losses.clear()
        model.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = (
        torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mib()
    )  # the model, its inputs (the imports)
    kept = kept_for_backward(step)  # also the warm-up
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"seconds": statistics.median(times), "peak_mib": max(0.0, peak - base), "kept_mib": kept / 2**20}


def kept_for_backward(step: Any) -> int:
    """Bytes autograd saves for backward during ``step()``, each storage counted once."""
    import torch

    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(length: int, repeats: int, device: str, overrides: list[str], vocab: int) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")  # also on one GPU shared by the CP ranks (NCCL refuses that)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    mine = measure(length, repeats, device=device, overrides=overrides, vocab=vocab)
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if dist.get_rank() == 0:
        print(json.dumps({k: max(r[k] for r in every) for k in mine}), flush=True)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cell(
    length: int,
    cp: int,
    repeats: int,
    *,
    device: str = "cpu",
    overrides: list[str] = MODEL,
    vocab: int = VOCAB,
    attempts: int = 3,
) -> dict[str, Any]:
    """One (T, CP) in fresh processes; another try when the launch itself failed (a port taken meanwhile)."""
    reason = "failed"
    env = dict(os.environ) | ({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})
    for _ in range(attempts):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cp}", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}", __file__, "--worker", str(length), "--repeats", str(repeats),
            "--device", device, "--vocab", str(vocab), "--override", *overrides,
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        last = (done.stdout.strip().splitlines() or [""])[-1]
        if done.returncode == 0 and last.startswith("{"):
            return dict(json.loads(last))
        errors = [ln for ln in done.stderr.splitlines() if "Error" in ln or "error:" in ln]
        reason = (errors or done.stderr.strip().splitlines() or ["failed"])[-1].strip()[:200]
    return {"error": reason}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (the CP ranks share the GPUs there)")
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--override", nargs="+", default=MODEL, help="the model's config overrides")
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--worker", type=int, metavar="T", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args.worker, args.repeats, args.device, args.override, args.vocab)
        return
    rows = []
    for t in args.lengths:
        for cp in args.cp:
            cell = run_cell(
                t, cp, args.repeats, device=args.device, overrides=args.override, vocab=args.vocab
            )
            rows.append({"T": t, "cp": cp, **cell})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("| T | CP | tokens a rank | step s | time vs CP 1 | peak MiB | vs CP 1 | kept MiB | vs CP 1 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        one = next((o for o in rows if o["T"] == r["T"] and o["cp"] == 1 and "error" not in o), None)
        if "error" in r:
            print(f"| {r['T']} | {r['cp']} | {r['T'] // r['cp']} | {r['error']} |||||")
            continue

        def ratio(key: str, row: dict[str, Any] = r, base: dict[str, Any] | None = one) -> str:
            return f"{row[key] / base[key]:.2f}x" if base and base[key] > 0 else "-"

        print(
            f"| {r['T']} | {r['cp']} | {r['T'] // r['cp']} | {r['seconds']:.2f} | {ratio('seconds')} | "
            f"{r['peak_mib']:.0f} | {ratio('peak_mib')} | {r['kept_mib']:.0f} | {ratio('kept_mib')} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
