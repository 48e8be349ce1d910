"""Peak memory and time of ``gatedpo convert zero-to-hf`` against DeepSpeed's ``zero_to_fp32`` on one checkpoint.

    python tools/bench_convert.py --out /tmp/bench_convert               # ~1B parameters, bf16, ZeRO 1
    python tools/bench_convert.py --out /tmp/bc --preset small           # a quick check of the script

Step 1 writes a training checkpoint the way a run does (``build_model`` + ``build_engine`` + DeepSpeed's
``save_checkpoint``, then ``meta.json``), on one process: tensor 1 x pipeline 1 x data 1, ZeRO 1, because
``zero_to_fp32`` reads model-parallel rank 0 only. Step 2 runs each converter in its own process and reads the
process's peak resident set (``ru_maxrss`` from ``wait4``, which counts the pages of memory-mapped files it
touched as well as its own memory) and wall time. Both write safetensors shards of at most 2 GB; DeepSpeed's
output is fp32 only, so ``zero-to-hf`` is measured with ``--dtype fp32`` and with the model's bf16. Then the bf16
output goes to tensor 2 x pipeline 2 and back (``hf-to-mcore``, ``mcore-to-hf``). Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PRESETS = {
    # 20 layers x 2048 hidden, 16 heads in 4 key/value groups, SwiGLU 5632, vocabulary 32000 untied: 1.03e9
    "1b": dict(
        num_layers=20, hidden_size=2048, num_attention_heads=16, num_query_groups=4, ffn_hidden_size=5632
    ),
    "small": dict(
        num_layers=4, hidden_size=256, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=704
    ),
}
VOCAB = 32000


def _generate(ckpt: Path, preset: str, dtype: str) -> None:
    """Runs in a child process: one-rank gloo group, the model, the engine, DeepSpeed's checkpoint, meta.json."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from dataclasses import asdict

    import torch.distributed as dist

    from gatedpo_mega.backend import make_backend
    from gatedpo_mega.config import load_config
    from gatedpo_mega.deepspeed.engine import build_engine
    from gatedpo_mega.formats import DEEPSPEED_DIR, DEEPSPEED_TAG, TRAIN_FORMAT, TRAIN_META, TRAIN_VERSION
    from gatedpo_mega.megatron.model import StageInfo, build_model, padded_vocab_size
    from gatedpo_mega.megatron.parallel import initialize_layout

    dist.init_process_group("gloo", rank=0, world_size=1)
    overrides = [f"model.{k}={v}" for k, v in PRESETS[preset].items()]
    overrides += [f"model.dtype={dtype}", "parallel.zero_stage=1", "train.micro_batch_size=1"]
    overrides += ["train.global_batch_size=1"]
    cfg = load_config(None, overrides)
    lay = initialize_layout(1, 1)
    stage = StageInfo(pre_process=True, post_process=True, layer_offset=0, tp_rank=0, tp_size=1)
    model = build_model(cfg.model, vocab_size=VOCAB, stage=stage, pipeline=1, seed=0, tp_group=lay.tp_group)
    n = sum(p.numel() for p in model.parameters())
    engine = build_engine(model, cfg, lay, num_micro_batches=1, engine_driver=make_backend(cfg).engine_driver)
    engine.save_checkpoint(str(ckpt / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)
    padded = padded_vocab_size(VOCAB, cfg.model.make_vocab_size_divisible_by, 1)
    meta = {
        "format": TRAIN_FORMAT, "version": TRAIN_VERSION, "step": 0,
        "layout": {"tensor": 1, "pipeline": 1, "data": 1, "zero_stage": 1}, "model": asdict(cfg.model),
        "vocab_size": VOCAB, "padded_vocab_size": padded, "hf_config": None,
    }  # fmt: skip
    (ckpt / TRAIN_META).write_text(json.dumps(meta))
    print(f"parameters: {n:,}")
    dist.destroy_process_group()


def measure(cmd: list[str]) -> tuple[float, float, int]:
    """(peak RSS in GiB, wall seconds, exit code) of ``cmd`` run as a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 2**20, wall, proc.returncode  # ru_maxrss is in KiB on Linux


def _size(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", required=True, help="work folder (the checkpoint and the outputs; ~15 GB for 1b)"
    )
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="model dtype of the checkpoint")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    from gatedpo_mega.formats import DEEPSPEED_DIR, DEEPSPEED_TAG, TRAIN_META, step_dir

    out = Path(a.out)
    ckpt = step_dir(out / "run", 0)
    if a._child:
        _generate(Path(a._child), a.preset, a.dtype)
        return 0
    rows = []
    if not (ckpt / TRAIN_META).exists():
        shutil.rmtree(ckpt, ignore_errors=True)
        ckpt.mkdir(parents=True)
        gen = [sys.executable, __file__, "--out", str(out), "--preset", a.preset, "--dtype", a.dtype]
        rss, wall, rc = measure([*gen, "--_child", str(ckpt)])
        if rc:
            return rc
        rows.append(("generate the checkpoint (build_model + build_engine + save)", rss, wall, _size(ckpt)))
    if a.generate_only:
        return 0
    ds_state = ckpt / DEEPSPEED_DIR / DEEPSPEED_TAG
    print(
        f"checkpoint {ckpt}: {_size(ckpt):.2f} GiB; files: {', '.join(sorted(p.name for p in ds_state.iterdir()))}"
    )
    conv = [sys.executable, "-m", "gatedpo_mega.cli", "convert"]
    ours = [*conv, "zero-to-hf", "--src", str(ckpt), "--force"]
    deepspeed_cmd = (
        "import sys; from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict as c; "
        "c(sys.argv[1], sys.argv[2], max_shard_size='2GB', safe_serialization=True, tag='state')"
    )
    runs = [
        ("gatedpo convert zero-to-hf --dtype fp32", [*ours, "--dst", str(out / "hf_fp32"), "--dtype", "fp32"],
         out / "hf_fp32"),
        ("gatedpo convert zero-to-hf (bf16, the model's dtype)", [*ours, "--dst", str(out / "hf_bf16")],
         out / "hf_bf16"),
        ("deepspeed zero_to_fp32 (convert_zero_checkpoint_to_fp32_state_dict, safetensors, 2GB shards)",
         [sys.executable, "-c", deepspeed_cmd, str(ckpt / "deepspeed"), str(out / "ds_fp32")], out / "ds_fp32"),
        ("gatedpo convert hf-to-mcore --tensor 2 --pipeline 2 (of the bf16 output)",
         [*conv, "hf-to-mcore", "--src", str(out / "hf_bf16"), "--dst", str(out / "mcore"), "--tensor", "2",
          "--pipeline", "2", "--force"], out / "mcore"),
        ("gatedpo convert mcore-to-hf (of that)",
         [*conv, "mcore-to-hf", "--src", str(out / "mcore"), "--dst", str(out / "hf_back"), "--force"],
         out / "hf_back"),
    ]  # fmt: skip
    for name, cmd, dst in runs:
        shutil.rmtree(dst, ignore_errors=True)
        rss, wall, rc = measure(cmd)
        rows.append(
            (name if rc == 0 else f"{name} (exit {rc})", rss, wall, _size(dst) if dst.exists() else 0.0)
        )
    print("\n| step | peak RSS (GiB) | wall (s) | output (GiB) |\n|---|---|---|---|")
    for name, rss, wall, size in rows:
        print(f"| {name} | {rss:.2f} | {wall:.1f} | {size:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
