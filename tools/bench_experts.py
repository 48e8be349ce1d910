"""Memory per rank and step time of a mixture of experts against expert parallelism (EP 1, 2, 4) at one world size.

Every cell is the same run on the same W processes (data parallelism W): Gate-DPO training, ZeRO 1, the built-in
data, on a Mixtral-shaped megatron-core model with many experts (4 layers, hidden 256, 16 experts of SwiGLU 512,
top 2; 25M of its 27M parameters are experts) -- only ``parallel.expert`` changes. At EP 1 every rank holds every
expert (the way without expert parallelism); at EP E a rank holds 16 / E of them and exchanges tokens with the
other E - 1 by all-to-all. Per cell, from the run's ``metrics.jsonl``: the median step time after the first step,
the busiest rank's peak resident memory, and this rank's model state as ZeRO 1 holds it (weights and gradients,
fp32 masters and Adam moments partitioned over the data-parallel ranks, experts' over DP / EP), counted from the
config. The ranks share the host's cores, so on a CPU the time measures the exchange's cost, not a cluster's.
Nothing is asserted. CPU:

    DS_ACCELERATOR=cpu python tools/bench_experts.py --world 4 --ep 1 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODEL = [
    "model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=512", "model.num_experts=16", "model.moe_ffn_hidden_size=512", "model.moe_router_topk=2",
]  # fmt: skip
RUN = [
    "train.max_steps=5", "train.micro_batch_size=2", "train.save_final=false", "train.report_to=none",
    "train.reference=precomputed", "data.builtin_pairs=256", "data.max_length=128", "data.max_prompt_length=64",
    "data.eval_fraction=0", "parallel.zero_stage=1",
]  # fmt: skip


def model_state_mib(world: int, ep: int) -> float:
    """This rank's weights, gradients, fp32 masters and Adam moments at ZeRO 1 (fp32 run: 4 + 4 + (4 + 8) / DP
    bytes a dense parameter; experts 1 / EP of them, their optimizer state over DP / EP)."""
    from gatedpo_mega.config import load_config
    from gatedpo_mega.families import expert_index, layer_tensors

    cfg = load_config(None, MODEL)
    m = cfg.model
    experts = dense = 0
    for t in layer_tensors(m):
        n = 1
        for d in t.shape:
            n *= d
        if expert_index(t.mcore) is not None:
            experts += n * m.num_layers
        else:
            dense += n * m.num_layers
    dense += (
        2 * 512 * m.hidden_size + m.hidden_size
    )  # embedding and output layer (vocabulary 512), final norm
    mine = experts / ep
    return ((dense + mine) * 8 + dense * 12 / world + mine * 12 / (world / ep)) / 2**20


def run_cell(world: int, ep: int, out: Path) -> dict[str, float | str]:
    cmd = [
        sys.executable, "-m", "gatedpo_mega.cli", "train", "--nproc", str(world), *MODEL, *RUN,
        f"train.global_batch_size={2 * world}", f"parallel.expert={ep}", f"train.output_dir={out}",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "step_s": statistics.median(r["step_seconds"] for r in rows[1:]),
        "peak_mib": max(r["memory/peak_mib_max_rank"] for r in rows),
        "state_mib": model_state_mib(world, ep),
        "load_max": rows[-1]["moe/load_max"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_experts_") as tmp:
        for ep in args.ep:
            rows.append({"ep": ep, **run_cell(args.world, ep, Path(tmp) / f"ep{ep}")})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    base = next((r for r in rows if r["ep"] == 1 and "error" not in r), None)

    def ratio(r: dict, key: str) -> str:
        return f"{r[key] / base[key]:.2f}x" if base else "-"

    print(
        f"world {args.world} (data-parallel {args.world}), ZeRO 1, fp32; EP 1 holds every expert on every rank"
    )
    print("| EP | experts a rank | step s | vs EP 1 | peak MiB | vs EP 1 | model state MiB | vs EP 1 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['ep']} | {16 // r['ep']} | {r['error']} ||||||")
            continue
        print(
            f"| {r['ep']} | {16 // r['ep']} | {r['step_s']:.2f} | {ratio(r, 'step_s')} | {r['peak_mib']:.0f} | "
            f"{ratio(r, 'peak_mib')} | {r['state_mib']:.0f} | {ratio(r, 'state_mib')} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
