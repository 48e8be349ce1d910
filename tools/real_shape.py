"""A Qwen2.5-0.5B-shaped model end to end on a CPU host: Hugging Face folder -> megatron-core at tensor 2 -> Gate-DPO
in bf16 at tensor 2 on 2 processes -> Hugging Face folder again, whose logits in transformers must be the trained
megatron-core model's.

    python tools/real_shape.py --out outputs/real_shape                # the real shape: 24 layers, vocabulary 151,936
    python tools/real_shape.py --out /tmp/rs --layers 2 --hidden 224 --ffn 608 --vocab 12000   # tests/test_real_shape.py

1. A Qwen2.5-0.5B-shaped model with random weights (seeded; no download: built from ``Qwen2Config``; q/k/v biases
   and norm weights moved off their initial zeros and ones so that the logits depend on them), saved in bf16, the
   dtype Qwen2.5-0.5B ships in, by ``save_pretrained`` (safetensors).
2. ``gatedpo convert hf-to-mcore --tensor 2``.
3. ``gatedpo train --config configs/qwen2.5-0.5b-hh.yaml --nproc 2`` from that folder: Gate-DPO (hard gate) in
   bf16, ZeRO 1, on the HH-RLHF sample with an 8,000-piece SentencePiece tokenizer trained on it.
4. ``gatedpo convert zero-to-hf`` of the last checkpoint (the fp32 master weights, written in the model's bf16) and
   ``gatedpo convert mcore-to-hf`` of its module weights (the bf16 weights the model ran with).
5. Logits on a few HH rows: the trained model in megatron-core at its layout (tensor 2, two processes; weights read
   from DeepSpeed's files by ``load_state_dict``, not through the converter: tests/convert_helpers.py, as
   tests/test_convert.py does), in bf16 and in fp32, against ``AutoModelForCausalLM.from_pretrained`` of the export,
   in its own dtype (bf16) and in fp32.

Checks (each a row of the table; the exit code is 1 when one fails): loss at step 1 = ln 2 (the policy is the
reference), the steps ran with finite losses, the weights moved, the export's weights are the module weights bit
for bit, the fp32 logits agree to fp32 rounding and the bf16 logits to bf16 rounding (tolerances: ``TOLERANCES``).
Times and memory are measured, never asserted. Writes ``OUT/real_shape.json`` and the folders of every stage.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The checkout this script belongs to (here and in every subprocess), its test helpers and bench_convert.
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tools")]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from bench_convert import measure  # noqa: E402

HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test-2000.jsonl.gz"
CONFIG = ROOT / "configs" / "qwen2.5-0.5b-hh.yaml"
TENSOR = 2
STEP_KEYS = ("step", "loss", "grad_norm", "step_seconds", "tokens_per_second", "memory/peak_mib_max_rank",
             "gate/frac_attenuated")  # fmt: skip
ROWS, ROW_TOKENS = 4, 128  # HH rows for the logits check: the first chosen transcripts this long, cut to it

# Qwen2.5-0.5B's config.json, minus its special-token ids (the run's tokenizer is another one).
QWEN25_05B = dict(
    num_hidden_layers=24, hidden_size=896, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
    vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
    max_position_embeddings=32768, max_window_layers=24, use_sliding_window=False, hidden_act="silu",
    initializer_range=0.02,
)  # fmt: skip

# Logits tolerances: max |transformers - megatron-core| over the largest |logit| of megatron-core's.
# fp32: both libraries compute in fp32 from the same (bf16) weights; only the order of fp32 operations differs
# (tensor-parallel partial sums, kernels). Measured 1.8e-6 at the full shape (24 layers), 7.6e-7 at 2 x 224.
# bf16: each library rounds every activation to bf16 (unit roundoff 2**-8 = 0.0039) in its own order, and the
# rounding grows with depth: measured 0.024 at the full shape, where each library's own bf16 logits differ from its
# fp32 ones by 0.020 (megatron-core) and 0.018 (transformers) (``bf16_vs_fp32`` in the JSON); 0.008 at 2 x 224.
# 2**-4 (16 unit roundoffs) is 2.6x the full shape's gap; a wrong tensor (a bias, a norm, a swapped q/k/v group)
# moves the logits by O(1).
TOLERANCES = {"fp32": 1e-5, "bf16": 2.0**-4}
LN2_TOLERANCE = 1e-3  # bf16: the step-1 loss as tests/test_training.py checks it


# ------------------------------------------------------------------------------------------------------ the stages


def make_hf_folder(dst: Path, shape: dict[str, Any], seed: int) -> int:
    """The random model, saved in bf16; returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**shape))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight", "layernorm.weight")):
                p.add_(torch.randn_like(p) * 0.1)  # not the zeros and ones a fresh model has
    model.to(torch.bfloat16).save_pretrained(dst, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def hh_rows(tokenizer_dir: Path) -> list[list[int]]:
    """The first ``ROWS`` chosen HH transcripts of at least ``ROW_TOKENS`` tokens (BOS first), cut to it, by the
    export's own tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = []
    with gzip.open(HH, "rt") as f:
        for line in f:
            ids = tok(json.loads(line)["chosen"])["input_ids"]
            if len(ids) >= ROW_TOKENS:
                rows.append(ids[:ROW_TOKENS])
            if len(rows) == ROWS:
                return rows
    raise SystemExit(f"real_shape: fewer than {ROWS} HH transcripts of {ROW_TOKENS} tokens")


def compare(ours: Any, ref: Any) -> dict[str, float]:
    """Logits against reference logits (megatron-core's, or the same library's fp32 ones)."""
    diff = (ours - ref).abs()
    scale = ref.abs().max().item()
    return {
        "max_abs_diff": diff.max().item(),
        "max_abs_logit": scale,
        "rel_max": diff.max().item() / scale,  # the measure the tolerance applies to
        "rel_l2": ((ours - ref).norm() / ref.norm()).item(),
        "top1_agree": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
    }


def hf_weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def weights_report(initial: Path, exported: Path, module: Path) -> dict[str, Any]:
    """Do the export's weights equal the module weights bit for bit, and how many moved from the initial ones?"""
    import torch

    a, b, c = hf_weights(initial), hf_weights(exported), hf_weights(module)
    moved = sum(int((b[k] != a[k]).sum()) for k in b if k in a)
    return {
        "export_equals_module": sorted(b) == sorted(c) and all(torch.equal(b[k], c[k]) for k in b),
        "export_dtype": str(next(iter(b.values())).dtype).removeprefix("torch."),
        "elements_moved": moved,
        "elements": sum(v.numel() for v in b.values()),
    }


def megatron_logits(ckpt: Path, rows: list[list[int]], out: Path) -> dict[str, Any]:
    """The trained model at its layout in bf16 and fp32, on ``TENSOR`` gloo processes (one core each)."""
    import torch
    from convert_helpers import trained_logits_worker
    from distributed import run_distributed

    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // TENSOR))
    try:
        run_distributed(trained_logits_worker, TENSOR, str(ckpt), str(out), rows, ("bf16", "fp32"))
    finally:
        if before is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = before
    return dict(torch.load(out))


# ---------------------------------------------------------------------------------------------------------- main


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gatedpo_mega.cli", *args]


class Chain:
    """The stages' folders under ``out``, and each stage's command, time and peak memory as it runs."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.initial, self.mcore, self.run, self.export, self.module = (
            out / n for n in ("hf", "mcore", "run", "hf_export", "hf_module")
        )
        self.stages: dict[str, dict[str, float]] = {}
        self.commands: list[str] = []
        self.plan: dict[str, Any] = {}

    def command(self, name: str, *args: str) -> None:
        """``gatedpo ARGS`` in a child process: its wall time and peak RSS (of its process tree)."""
        self.commands.append("gatedpo " + " ".join(args))
        rss, wall, rc = measure(_cli(*args))
        self.stages[name] = {"wall_s": round(wall, 1), "peak_rss_gib": round(rss, 2)}
        if rc:
            raise SystemExit(f"real_shape: {name} failed (exit {rc}): gatedpo {' '.join(args)}")

    def timed(self, name: str, t0: float) -> None:
        self.stages[name] = {"wall_s": round(time.perf_counter() - t0, 1)}


def run_chain(c: Chain, shape: dict[str, Any], seed: int) -> tuple[int, Path]:
    """Steps 1-4; returns the parameter count and the final training checkpoint."""
    from gatedpo_mega.formats import latest_checkpoint

    t0 = time.perf_counter()
    n_params = make_hf_folder(c.initial, shape, seed)
    c.timed("make the HF folder (transformers, bf16)", t0)
    print(f"real_shape: {c.initial}: {n_params:,} parameters", flush=True)
    c.command("hf-to-mcore --tensor 2", "convert", "hf-to-mcore", "--src", str(c.initial), "--dst", str(c.mcore),
              "--tensor", str(TENSOR))  # fmt: skip
    overrides = [
        f"model.init_from={c.mcore}", f"train.output_dir={c.run}", f"parallel.tensor={TENSOR}",
        f"data.tokenizer={c.out / 'tokenizers' / 'hh-8000'}", f"data.cache_dir={c.out / 'cache'}",
    ]  # fmt: skip
    # The planner's prediction for the same run, beside what the run measures.
    plan = subprocess.run(
        _cli("plan", "--config", str(CONFIG.relative_to(ROOT)), "--nproc", str(TENSOR), "--target", "cpu", "--json",
             *overrides),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if plan.returncode:
        raise SystemExit(f"real_shape: gatedpo plan failed: {plan.stderr.strip()[-500:]}")
    c.plan = json.loads(plan.stdout)
    c.command("train: 3 Gate-DPO steps, bf16, TP 2, 2 processes",
              "train", "--config", str(CONFIG.relative_to(ROOT)), "--nproc", str(TENSOR), *overrides)  # fmt: skip
    ckpt = latest_checkpoint(c.run)
    if ckpt is None:
        raise SystemExit(f"real_shape: no checkpoint in {c.run}")
    c.command("zero-to-hf (fp32 masters -> bf16)", "convert", "zero-to-hf", "--src", str(ckpt), "--dst",
              str(c.export))  # fmt: skip
    c.command(
        "mcore-to-hf (module weights)", "convert", "mcore-to-hf", "--src", str(ckpt), "--dst", str(c.module)
    )
    return n_params, ckpt


def logits_report(c: Chain, ckpt: Path) -> dict[str, Any]:
    """Step 5: transformers against megatron-core in fp32 and in bf16, and each library's bf16 against its fp32."""
    import torch
    from convert_helpers import hf_logits

    t0 = time.perf_counter()
    tokens = hh_rows(c.export)
    mc = megatron_logits(ckpt, tokens, c.out / "megatron_logits.pt")
    c.timed("logits: megatron-core TP 2, bf16 + fp32", t0)
    t0 = time.perf_counter()
    hf = {
        d: hf_logits(c.export, tokens, dtype=dt)
        for d, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32))
    }
    c.timed("logits: transformers, bf16 + fp32", t0)
    return {
        "rows": [len(tokens), ROW_TOKENS],
        "transformers_vs_megatron": {d: compare(hf[d], mc[d]) for d in ("fp32", "bf16")},
        "bf16_vs_fp32": {"megatron-core": compare(mc["bf16"], mc["fp32"]),
                         "transformers": compare(hf["bf16"], hf["fp32"])},
    }  # fmt: skip


def judge(
    steps: list[dict[str, Any]], weights: dict[str, Any], logits: dict[str, Any], dtype: Any
) -> dict[str, bool]:
    losses = [r["loss"] for r in steps]
    gap = logits["transformers_vs_megatron"]
    return {
        "3 steps ran, losses finite": [r["step"] for r in steps] == [1, 2, 3] and all(map(math.isfinite, losses)),
        f"step-1 loss = ln 2 within {LN2_TOLERANCE:g}": abs(losses[0] - math.log(2.0)) <= LN2_TOLERANCE,
        "the weights moved": weights["elements_moved"] > 0 and losses[-1] != losses[0],
        "exported weights = module weights (bit for bit)": weights["export_equals_module"],
        f"export is bf16 (config.json dtype {dtype})": weights["export_dtype"] == "bfloat16" and dtype == "bfloat16",
        **{f"{d} logits: max |diff| <= {TOLERANCES[d]:.3g} x max |logit|": gap[d]["rel_max"] <= TOLERANCES[d]
           for d in ("fp32", "bf16")},
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="work folder (replaced); 11 GB at the full shape")
    ap.add_argument("--layers", type=int, default=QWEN25_05B["num_hidden_layers"])
    ap.add_argument(
        "--hidden", type=int, default=QWEN25_05B["hidden_size"], help="a multiple of the 14 heads"
    )
    ap.add_argument("--ffn", type=int, default=QWEN25_05B["intermediate_size"])
    ap.add_argument(
        "--vocab", type=int, default=QWEN25_05B["vocab_size"], help="at least the tokenizer's 8,000"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="where the numbers go (default OUT/real_shape.json)")
    a = ap.parse_args()
    if not HH.is_file():
        print(f"real_shape: the HH-RLHF sample is not at {HH}", file=sys.stderr)
        return 2
    out = Path(a.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.chdir(ROOT)  # the config's data.source is relative to the project root
    shape = {**QWEN25_05B, "num_hidden_layers": a.layers, "hidden_size": a.hidden, "intermediate_size": a.ffn,
             "vocab_size": a.vocab}  # fmt: skip
    chain = Chain(out)
    n_params, ckpt = run_chain(chain, shape, a.seed)
    steps = [json.loads(line) for line in (chain.run / "metrics.jsonl").read_text().splitlines()]
    steps = [{k: r.get(k) for k in STEP_KEYS} for r in steps if r["step"] > 0]
    logits = logits_report(chain, ckpt)
    weights = weights_report(chain.initial, chain.export, chain.module)
    dtype = json.loads((chain.export / "config.json").read_text()).get("dtype")
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "host": f"{platform.node()}, {os.cpu_count()} CPUs",
        "shape": shape, "parameters": n_params, "tensor": TENSOR, "processes": TENSOR, "steps": steps,
        "step_seconds": [r["step_seconds"] for r in steps],
        "peak_mib_max_rank": max(r["memory/peak_mib_max_rank"] for r in steps),
        "planned_peak_mib": round(chain.plan["per_rank_peak_bytes"] / 2**20, 1),
        "planned_parts_mib": {k: round(v / 2**20, 1) for k, v in {**chain.plan["parts"], **chain.plan["peak_parts"]}.items()},
        "step1_loss_minus_ln2": steps[0]["loss"] - math.log(2.0), "stages": chain.stages, "logits": logits,
        "tolerances": TOLERANCES, "weights": weights, "checks": judge(steps, weights, logits, dtype),
        "commands": chain.commands,
    }  # fmt: skip
    path = Path(a.json) if a.json else out / "real_shape.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_summary(result)
    print(f"real_shape: {path}")
    return 0 if all(result["checks"].values()) else 1


def print_summary(r: dict[str, Any]) -> None:
    s = r["shape"]
    print(
        f"\n{s['num_hidden_layers']} layers x {s['hidden_size']} hidden, FFN {s['intermediate_size']}, vocabulary "
        f"{s['vocab_size']:,}: {r['parameters']:,} parameters; TP {r['tensor']} on {r['processes']} processes\n"
    )
    print("| stage | wall s | peak RSS GiB |\n|---|---|---|")
    for name, v in r["stages"].items():
        rss = f"{v['peak_rss_gib']:.2f}" if "peak_rss_gib" in v else "-"
        print(f"| {name} | {v['wall_s']:.1f} | {rss} |")
    print("\n| step | loss | grad norm | step s | peak MiB (max rank) |\n|---|---|---|---|---|")
    for x in r["steps"]:
        print(
            f"| {x['step']} | {x['loss']:.6f} | {x['grad_norm']:.4g} | {x['step_seconds']:.1f} | "
            f"{x['memory/peak_mib_max_rank']:.0f} |"
        )
    measured, planned = r["peak_mib_max_rank"], r["planned_peak_mib"]
    print(
        f"\npeak memory of the busiest rank: measured {measured:,.0f} MiB, gatedpo plan {planned:,.0f} MiB "
        f"({100 * (planned - measured) / measured:+.1f}%)"
    )
    print(
        "\n| logits | max abs diff | max abs logit | rel max | rel L2 | top-1 agree |\n|---|---|---|---|---|---|"
    )
    lg = r["logits"]
    pairs = [(f"transformers vs megatron-core, {d}", v) for d, v in lg["transformers_vs_megatron"].items()]
    pairs += [(f"{lib}: bf16 vs fp32", v) for lib, v in lg["bf16_vs_fp32"].items()]
    for name, v in pairs:
        print(
            f"| {name} | {v['max_abs_diff']:.3g} | {v['max_abs_logit']:.3g} | {v['rel_max']:.3g} | "
            f"{v['rel_l2']:.3g} | {v['top1_agree']:.3f} |"
        )
    print("\n| check | result |\n|---|---|")
    for name, ok in r["checks"].items():
        print(f"| {name} | {'ok' if ok else 'FAILED'} |")


if __name__ == "__main__":
    sys.exit(main())
