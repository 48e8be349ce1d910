"""Peak memory and time of one forward+backward of a megatron-core GPTModel, SDPA core attention against
megatron-core's local attention, as the row length grows.

A 4-layer Llama-shaped model (hidden 256, 8 heads in 4 key/value groups, SwiGLU 704, vocabulary 512, fp32, the
fused output layer) on one row of T tokens, TP 1, one process. Each (attention, T) runs in a fresh subprocess: one
warm-up step, then the median wall time of ``--repeats`` forward+backward steps; memory is the peak resident set
size above the RSS measured after the model and its inputs were built, over all steps (activations, attention
and gradients).
Nothing is asserted. CPU:

    DS_ACCELERATOR=cpu python tools/bench_attention.py --lengths 512 1024 2048 4096 8192
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODEL = [
    "model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=8", "model.num_query_groups=4",
    "model.ffn_hidden_size=704",
]  # fmt: skip
VOCAB = 512


def worker(attention: str, length: int, repeats: int) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    from gatedpo_mega.config import load_config
    from gatedpo_mega.data.batch import PreferenceBatch
    from gatedpo_mega.megatron.backend import model_forward
    from gatedpo_mega.megatron.model import StageInfo, build_model
    from gatedpo_mega.megatron.parallel import initialize_layout

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("BENCH_PORT", "29533"), RANK="0")
    os.environ.update(WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = load_config(
        None, [*MODEL, f"model.attention={attention}", f"model.max_position_embeddings={length}"]
    )
    lay = initialize_layout(1, 1)
    stage = StageInfo(pre_process=True, post_process=True, layer_offset=0, tp_rank=0, tp_size=1)
    model = build_model(cfg.model, vocab_size=VOCAB, stage=stage, pipeline=1, seed=0, tp_group=lay.tp_group)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, length), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    batch = PreferenceBatch(ids, labels, torch.zeros(0, dtype=torch.long))

    def step() -> None:
        out = model_forward(model, batch)
        out[..., 0].sum().backward()
        model.zero_grad(set_to_none=True)

    base = _rss_mib()  # the model, its inputs, the imports
    step()  # warm-up: kernels, allocator
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dist.destroy_process_group()
    return {"seconds": statistics.median(times), "peak_mib": max(0.0, peak - base)}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--attention", nargs="+", default=["local", "sdpa"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--worker", nargs=2, metavar=("ATTENTION", "T"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.repeats)))
        return
    rows = []
    for t in args.lengths:
        for attention in args.attention:
            cmd = [sys.executable, __file__, "--worker", attention, str(t), "--repeats", str(args.repeats)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                reason = (done.stderr.strip().splitlines() or ["failed"])[-1]
                rows.append({"T": t, "attention": attention, "error": reason[:120]})
            else:
                rows.append(
                    {"T": t, "attention": attention, **json.loads(done.stdout.strip().splitlines()[-1])}
                )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("| T | local s | sdpa s | time sdpa/local | local MiB | sdpa MiB | memory sdpa/local |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for t in args.lengths:
        by = {r["attention"]: r for r in rows if r["T"] == t and "error" not in r}
        loc, sd = by.get("local"), by.get("sdpa")
        cells = [
            f"{loc['seconds']:.3f}" if loc else "-",
            f"{sd['seconds']:.3f}" if sd else "-",
            f"{sd['seconds'] / loc['seconds']:.2f}x" if loc and sd else "-",
            f"{loc['peak_mib']:.0f}" if loc else "-",
            f"{sd['peak_mib']:.0f}" if sd else "-",
            f"{sd['peak_mib'] / max(loc['peak_mib'], 1e-9):.2f}x" if loc and sd else "-",
        ]
        print(f"| {t} | " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
