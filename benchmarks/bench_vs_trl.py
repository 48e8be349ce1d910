"""gatedpo_mega against TRL's ``DPOTrainer``: the same tiny Llama-shaped model, batch and token ids, one table.

What it measures, per trainer, each run in its own process so that peaks are clean:

* median optimizer-step seconds and tokens per second over the steps after the warm-up ones (default: steps 3-20);
  tokens are padded input tokens, rows x padded length summed over the micro-batches of a step (gatedpo's
  ``tokens_per_second`` definition; on the TRL side counted from the ``input_ids`` every policy forward receives);
  tokens/s is the sum of those tokens over the sum of those step times;
* peak resident set size (``ru_maxrss``) of the trainer's process, from ``os.wait4`` on it (and, for gatedpo,
  ``memory/peak_mib_max_rank`` from its ``metrics.jsonl``, which is the same quantity seen from inside);
* total wall time of the process (imports, data, model, reference log-probs, steps) and the part before step 1;
* the resident set size of importing each stack and nothing else, for scale.

The rows: gatedpo with ``gate.shape=none`` (plain DPO: the apples-to-apples row), gatedpo with the quick-start gate
(``sigmoid``), and TRL DPO (``loss_type=sigmoid``). Ratios: tokens/s of the row over TRL's, and TRL's peak RSS over
the row's (above 1: the row uses less memory).

Common set-up: ``configs/quickstart.yaml``'s model (4 layers, hidden 64, 4 heads in 2 key/value groups, SwiGLU 176,
fp32, untied embeddings, the built-in tokenizer's 512-token vocabulary), 1 process, TP 1 x PP 1 (ZeRO-1 on one
rank), 16 pairs per step (micro-batch 2 x 8 accumulation by default), beta 0.1, AdamW lr 2e-3, betas (0.9, 0.95),
no weight decay, 4 warm-up steps then cosine to 2e-4, gradient clipping 1.0. TRL gets the very token ids of
gatedpo's data pipeline (``prompt_ids``/``chosen_ids``/``rejected_ids``, BOS and EOS already in place; its own
tokenization is bypassed), in gatedpo's loader order, sampled sequentially, padded to a multiple of 8 as gatedpo
pads, so each optimizer step of both sees the same pairs in the same micro-batches with the same padded shapes.
Both precompute the reference log-probs of all training pairs before step 1 (TRL: ``precompute_ref_log_probs``),
so neither keeps a reference model nor runs one during the timed steps. Initial weights differ (megatron-core's
seeded init vs ``transformers``' init): losses agree at step 1 (ln 2) and only roughly afterwards.

Run (CPU):

    source .venv/bin/activate
    export DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=$PWD/.venv/torch_extensions
    pip install trl          # benchmark only; without it the gatedpo rows still run
    python benchmarks/bench_vs_trl.py --steps 20 --repeats 2 [--threads 1] [--micro-batch 2] [--out DIR]

``--repeats N`` runs every row N times, round-robin, and keeps each row's fastest run. ``--threads`` (default 1)
sets ``OMP_NUM_THREADS`` for both trainers: on a shared host torch's busy-waiting intra-op threads make step
times swing by more than 10x when the cores are oversubscribed. It prints a table and writes ``results.json``
under ``--out`` (default ``outputs/bench_vs_trl``, emptied first); it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"
PAIRS_PER_STEP = 16

IMPORTS = {
    "gatedpo": "import deepspeed, megatron.core, gatedpo_mega.training.loop, gatedpo_mega.training.data",
    "trl": "import transformers, datasets, accelerate, trl; from trl import DPOConfig, DPOTrainer",
}


def overrides(args: argparse.Namespace, gate: str) -> list[str]:
    """The gatedpo config of one row (also what the TRL worker reads its settings from)."""
    out = Path(args.out)
    return [
        "parallel.tensor=1",
        "parallel.pipeline=1",
        f"train.max_steps={args.steps}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={PAIRS_PER_STEP}",
        f"train.output_dir={out / f'gatedpo-{gate}'}",
        f"data.cache_dir={out / 'cache'}",
        "objective.name=dpo",
        "objective.beta=0.1",
        f"gate.shape={gate}",
    ]


def run_measured(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[int, float, float]:
    """Run ``cmd`` to the end with its output in ``log``; returns (exit code, wall seconds, peak RSS MiB)."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024


def import_rss(stack: str, env: dict[str, str]) -> float | None:
    code = f"{IMPORTS[stack]}\nimport resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    return int(r.stdout.split()[-1]) / 1024 if r.returncode == 0 else None


def summarize(steps: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """``steps``: ``{"step", "seconds", "tokens", "loss"}`` per optimizer step."""
    timed = [s for s in steps if s["step"] > warmup]
    seconds = sum(s["seconds"] for s in timed)
    return {
        "steps": len(steps),
        "timed_steps": len(timed),
        "median_step_s": statistics.median(s["seconds"] for s in timed),
        "tokens_per_s": sum(s["tokens"] for s in timed) / seconds,
        "tokens_per_step": statistics.mean(s["tokens"] for s in timed),
        "step_s_total": sum(s["seconds"] for s in steps),
        "loss_first": steps[0]["loss"],
        "loss_last": steps[-1]["loss"],
    }


# ---------------------------------------------------------------------------------------------------------------
# gatedpo


def run_gatedpo(args: argparse.Namespace, gate: str, env: dict[str, str]) -> dict[str, Any]:
    out = Path(args.out)
    for f in (out / "cache" / "pairs").glob("*/reference-*.pt"):  # every run computes its reference pass
        f.unlink()
    shutil.rmtree(out / f"gatedpo-{gate}", ignore_errors=True)  # metrics.jsonl is appended to, not replaced
    cmd = [sys.executable, "-m", "gatedpo_mega.cli", "train", "--config", str(CONFIG), "--nproc", "1"]
    code, wall, rss = run_measured([*cmd, *overrides(args, gate)], out / f"gatedpo-{gate}.log", env)
    if code != 0:
        raise SystemExit(f"gatedpo ({gate}) exited with {code}; see {out / f'gatedpo-{gate}.log'}")
    records = [
        json.loads(line) for line in (out / f"gatedpo-{gate}" / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [
        {
            "step": r["step"],
            "seconds": r["step_seconds"],
            "tokens": r["tokens_per_second"] * r["step_seconds"],
            "loss": r["loss"],
        }
        for r in records
    ]
    res = summarize(steps, args.warmup)
    res.update(
        method=f"gatedpo DPO (gate {gate})",
        wall_s=wall,
        startup_s=wall - res["step_s_total"],
        peak_rss_mib=rss,
        peak_rss_mib_metrics=records[-1].get("memory/peak_mib_max_rank"),
    )
    return res


# ---------------------------------------------------------------------------------------------------------------
# TRL (runs in its own process: ``--trl-worker``)


def hf_tokenizer(model_file: str) -> Any:
    """The built-in SentencePiece model as a ``transformers`` fast tokenizer (same pieces, scores and ids)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=model_file)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tk = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=True))
    # gatedpo's model: identity normalisation, no dummy prefix, whitespace kept.
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=sp.id_to_piece(sp.bos_id()),
        eos_token=sp.id_to_piece(sp.eos_id()),
        pad_token=sp.id_to_piece(sp.pad_id()),
        unk_token=sp.id_to_piece(sp.unk_id()),
    )


def trl_worker(args: argparse.Namespace) -> None:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

    from gatedpo_mega.config import load_config
    from gatedpo_mega.data import PreferenceLoader, load_preference_data

    cfg = load_config(CONFIG, overrides(args, "none"))
    t, m = cfg.train, cfg.model
    data = load_preference_data(cfg.data, seed=t.seed)
    tok = data.tokenizer
    hf_tok = hf_tokenizer(tok.path)
    assert (hf_tok.pad_token_id, hf_tok.eos_token_id, len(hf_tok)) == (tok.pad_id, tok.eos_id, tok.vocab_size)

    # gatedpo's loader order: step k's pairs sorted by length, consecutive micro-batches. The untouched pairs
    # follow, so that the reference precompute covers every training pair, as gatedpo's reference pass does.
    loader = PreferenceLoader(
        data.train, global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size, dp_rank=0,
        dp_size=1, seed=t.seed, pad_to_multiple=cfg.data.pad_to_multiple, pad_id=tok.pad_id,
    )  # fmt: skip
    if t.max_steps > loader.steps_per_epoch:
        raise SystemExit(f"--steps {t.max_steps} is more than one epoch ({loader.steps_per_epoch} steps)")
    order = [i for k in range(t.max_steps) for i in loader.global_batch(0, k)]
    order += sorted(set(range(len(data.train))) - set(order))
    pairs = [data.train[i] for i in order]
    dataset = Dataset.from_dict(
        {
            "prompt_ids": [p.prompt for p in pairs],
            "chosen_ids": [p.chosen for p in pairs],
            "rejected_ids": [p.rejected for p in pairs],
        }
    )

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tok.vocab_size,
            hidden_size=m.hidden_size,
            intermediate_size=m.ffn_hidden_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_query_groups,
            max_position_embeddings=m.max_position_embeddings,
            rms_norm_eps=m.norm_epsilon,
            rope_theta=m.rotary_base,
            tie_word_embeddings=m.tie_embeddings,
            attention_bias=m.qkv_bias,
            attention_dropout=0.0,
            initializer_range=m.init_std,
            pad_token_id=tok.pad_id,
            bos_token_id=tok.bos_id,
            eos_token_id=tok.eos_id,
            attn_implementation="sdpa",
        ),
    ).to(torch.float32)

    class PreTokenizedDPOTrainer(trl.DPOTrainer):
        """The dataset already holds gatedpo's token ids: skip TRL's prompt extraction, EOS and tokenization."""

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            return dataset

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.active, self.tokens, self.t0 = False, 0, 0.0
            self.steps: list[dict[str, Any]] = []

        def count(self, module: Any, a: Any, kw: dict[str, Any]) -> None:
            if self.active:
                self.tokens += kw["input_ids"].numel() if "input_ids" in kw else a[0].numel()

        def on_step_begin(self, *a: Any, **kw: Any) -> None:
            self.active, self.tokens, self.t0 = True, 0, time.perf_counter()

        def on_step_end(self, args: Any, state: Any, *a: Any, **kw: Any) -> None:
            seconds = time.perf_counter() - self.t0
            self.active = False
            self.steps.append({"step": state.global_step, "seconds": seconds, "tokens": self.tokens})

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs and self.steps:
                self.steps[-1]["loss"] = logs["loss"]

    timer = StepTimer()
    model.register_forward_pre_hook(timer.count, with_kwargs=True)
    out = Path(args.out) / "trl"
    config = trl.DPOConfig(
        output_dir=str(out), use_cpu=True, seed=t.seed, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.global_batch_size // t.micro_batch_size, max_steps=t.max_steps,
        learning_rate=t.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": t.min_lr},
        warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, adam_beta1=t.adam_betas[0],
        adam_beta2=t.adam_betas[1], adam_epsilon=t.adam_eps, max_grad_norm=t.grad_clip, optim="adamw_torch",
        beta=cfg.objective.beta, loss_type=["sigmoid"], max_length=None, pad_to_multiple_of=cfg.data.pad_to_multiple,
        precompute_ref_log_probs=True, precompute_ref_batch_size=t.reference_batch_size,
        train_sampling_strategy="sequential", dataloader_num_workers=0, report_to=[], logging_steps=1,
        save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = PreTokenizedDPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=hf_tok, callbacks=[timer]
    )
    trainer.train()
    import resource

    Path(args.trl_worker).write_text(
        json.dumps(
            {
                "steps": timer.steps,
                "peak_rss_mib_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "torch_threads": torch.get_num_threads(),
                "versions": {"trl": trl.__version__, "transformers": transformers.__version__},
            }
        )
    )


def run_trl(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    out = Path(args.out)
    result_file = out / "trl-result.json"
    cmd = [sys.executable, __file__, "--trl-worker", str(result_file), *sys.argv[1:]]
    code, wall, rss = run_measured(cmd, out / "trl.log", env)
    if code != 0:
        raise SystemExit(f"TRL exited with {code}; see {out / 'trl.log'}")
    worker = json.loads(result_file.read_text())
    res = summarize(worker["steps"], args.warmup)
    res.update(
        method="TRL DPOTrainer (sigmoid)",
        wall_s=wall,
        startup_s=wall - res["step_s_total"],
        peak_rss_mib=rss,
        versions=worker["versions"],
        torch_threads=worker["torch_threads"],
    )
    return res


# ---------------------------------------------------------------------------------------------------------------
# Orchestration and the table


def table(rows: list[dict[str, Any]], ref: dict[str, Any] | None) -> str:
    head = (
        "| method | steps (timed) | median step s | tokens/step | tokens/s | peak RSS MiB | wall s | "
        "before step 1 s | tokens/s ratio vs TRL | memory ratio TRL/this |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        ratio_t = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref else "n/a"
        ratio_m = f"{ref['peak_rss_mib'] / r['peak_rss_mib']:.2f}" if ref else "n/a"
        lines.append(
            f"| {r['method']} | {r['steps']} ({r['timed_steps']}) | {r['median_step_s']:.3f} | "
            f"{r['tokens_per_step']:.0f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} | {r['wall_s']:.1f} | "
            f"{r['startup_s']:.1f} | {ratio_t} | {ratio_m} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the step statistics")
    p.add_argument(
        "--micro-batch", type=int, default=2, help=f"pairs per micro-batch ({PAIRS_PER_STEP} per step)"
    )
    p.add_argument(
        "--out", default=str(ROOT / "outputs" / "bench_vs_trl"), help="work folder (emptied first)"
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="runs of each row, round-robin; the fastest is kept"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="OMP_NUM_THREADS for both trainers (0: torch's default)"
    )
    p.add_argument("--no-gated", action="store_true", help="skip the gated gatedpo row")
    p.add_argument("--no-trl", action="store_true", help="skip the TRL row")
    p.add_argument("--trl-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if PAIRS_PER_STEP % args.micro_batch or args.steps <= args.warmup:
        p.error(f"--micro-batch must divide {PAIRS_PER_STEP} and --steps must exceed --warmup")
    if args.trl_worker:
        trl_worker(args)
        return

    import importlib.metadata as md

    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "TQDM_DISABLE": "1"}
    if (
        args.threads
    ):  # torch's intra-op threads in both trainers (busy-waiting threads suffer most on a shared host)
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # Tokenize once here (tokenizer training and the pairs cache stay out of every timed process).
    from gatedpo_mega.config import load_config
    from gatedpo_mega.data import load_preference_data

    cfg = load_config(CONFIG, overrides(args, "none"))
    load_preference_data(cfg.data, seed=cfg.train.seed)

    try:
        trl_version: str | None = md.version("trl")
    except md.PackageNotFoundError:
        trl_version = None
        print("TRL not installed: pip install trl (the gatedpo rows still run)", flush=True)
    installed_trl = trl_version or "not installed"
    if args.no_trl:
        trl_version = None

    # Round-robin repeats; each row keeps its fastest run (other load on the host only ever slows a run down).
    runs: dict[str, list[dict[str, Any]]] = {}
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        runs.setdefault("none", []).append(run_gatedpo(args, "none", env))
        if not args.no_gated:
            runs.setdefault("sigmoid", []).append(run_gatedpo(args, "sigmoid", env))
        if trl_version:
            runs.setdefault("trl", []).append(run_trl(args, env))
        load.append(os.getloadavg()[0])
    rows = []
    for group in runs.values():
        best = max(group, key=lambda r: r["tokens_per_s"])
        best["tokens_per_s_all_runs"] = [round(r["tokens_per_s"]) for r in group]
        best["peak_rss_mib"] = max(r["peak_rss_mib"] for r in group)
        rows.append(best)
    ref = rows[-1] if trl_version else None
    imports = {s: import_rss(s, env) for s in IMPORTS if s == "gatedpo" or ref}

    versions = {k: md.version(k) for k in ("torch", "transformers", "deepspeed", "megatron-core")}
    versions["trl"] = installed_trl if trl_version else f"{installed_trl} (not run)"
    print()
    print(table(rows, ref))
    print()
    accumulation = PAIRS_PER_STEP // args.micro_batch
    print(
        f"{PAIRS_PER_STEP} pairs/step = micro-batch {args.micro_batch} x {accumulation} accumulation; steps"
    )
    print(
        f"1-{args.warmup} left out of median and tokens/s; 1 process, {os.cpu_count()} CPUs on the host, torch"
    )
    print(
        f"threads {args.threads or 'default'} (the TRL process reports {ref['torch_threads'] if ref else 'n/a'})"
    )
    print(f"1-minute load average before / after each round: {', '.join(f'{x:.1f}' for x in load)}")
    for r in rows:
        print(f"{r['method']}: tokens/s of each run {r['tokens_per_s_all_runs']}")
    for r in rows:
        print(f"{r['method']}: loss step 1 {r['loss_first']:.4f}, step {r['steps']} {r['loss_last']:.4f}")
    if rows[0].get("peak_rss_mib_metrics") is not None:
        print(
            f"gatedpo metrics.jsonl memory/peak_mib_max_rank (last step): {rows[0]['peak_rss_mib_metrics']:.0f}"
        )
    print("RSS of the imports alone (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in imports.items() if v))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    (out / "results.json").write_text(
        json.dumps(
            {"rows": rows, "import_rss_mib": imports, "versions": versions, "load_average": load}, indent=2
        )
    )


if __name__ == "__main__":
    main()
