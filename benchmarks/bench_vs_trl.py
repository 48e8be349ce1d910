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

Real tokens are the non-padding ones (prompt + response of every chosen and rejected row; on the TRL side the
``attention_mask`` sum of each policy forward, checked equal to gatedpo's per step); padded tokens as above.

Rows (``--rows``): ``padded`` (gatedpo, ``gate.shape=none``: plain DPO), ``gated`` (gatedpo, the ``sigmoid`` gate),
``packed`` (gatedpo, ``gate.shape=none``, ``data.packing=true``), ``trl-precompute`` (TRL ``DPOTrainer``,
sigmoid, reference log-probs precomputed, no gradient checkpointing, padded to a multiple of 8: the like-for-like
row) and ``trl-default`` (``DPOConfig``'s defaults: a reference model forward per step, gradient checkpointing, no
padding to a multiple). Defaults: ``padded,gated,trl-precompute`` for ``--data builtin`` (the small table),
``padded,packed,trl-default`` for ``--data hh``. Ratios: real tokens/s of the row over TRL's, and the row's peak
RSS over TRL's (below 1: the row uses less memory), against ``trl-default`` when it runs, else ``trl-precompute``.

LoRA rows (``--lora``, i.e. ``--rows lora,lora-packed,trl-lora``; ratios of ``lora`` and ``lora-packed`` against
``trl-lora``; ``lora-packed`` is ``lora`` with ``data.packing=true``): ``lora`` is gatedpo
with ``model.lora`` rank 16, alpha 32, dropout 0, all-linear (the 7 Hugging Face linears q/k/v/o/gate/up/down),
``gate.shape=none``, the base frozen and its reference the policy with its adapters off (``train.reference=live``,
what ``auto`` gives with LoRA: a forward per step, no copy, no precompute; ``--reference`` does not apply);
``trl-lora`` is ``DPOTrainer`` on the same ``LlamaForCausalLM`` with ``peft_config=peft.LoraConfig(r=16,
lora_alpha=32, lora_dropout=0.0, target_modules=[the 7], task_type="CAUSAL_LM")`` and ``ref_model=None`` (its
reference: the adapter-disabled policy, a forward per step), ``precompute_ref_log_probs=False``, no gradient
checkpointing, padded to a multiple of 8. Both: ``B`` zero at the start (loss ln 2 at step 1), 1,196,032 trainable
parameters for ``--model 20m`` (checked on the TRL side), the same lr, schedule, clipping and batches as every row.

``--data hh`` trains on the HH-RLHF sample (``../shared/data/hh-rlhf``) with an 8,000-piece SentencePiece tokenizer
trained on it (into ``--tokenizer-dir`` when missing); ``--model 20m`` is a Llama shape of 31.8M parameters with that
vocabulary (hidden 512, 8 layers, 8 heads in 4 key/value groups, SwiGLU 1408, untied); ``--max-length N`` sets
``data.max_length`` (prompts up to 3N/4). ``--reference`` is gatedpo's ``train.reference``: ``precomputed`` by
default for the builtin data, ``live`` (a reference forward per step, as TRL's default) for ``--data hh``.

Common set-up: ``configs/quickstart.yaml``'s model (4 layers, hidden 64, 4 heads in 2 key/value groups, SwiGLU 176,
fp32, untied embeddings, the built-in tokenizer's 512-token vocabulary) unless ``--model 20m``, 1 process, TP 1 x
PP 1 (ZeRO-1 on one rank), 16 pairs per step (micro-batch 2 x 8 accumulation by default), beta 0.1, AdamW lr 2e-3,
betas (0.9, 0.95), no weight decay, 4 warm-up steps then cosine to 2e-4 (gatedpo's ``lr_lambda`` on both sides),
gradient clipping 1.0. TRL gets the very token ids of gatedpo's data pipeline (``prompt_ids``/``chosen_ids``/
``rejected_ids``, BOS and EOS already in place; its own tokenization is bypassed), in gatedpo's loader order,
sampled sequentially (``trl-precompute``: padded to a multiple of 8 as gatedpo pads, so each optimizer step of both
sees the same pairs in the same micro-batches with the same padded shapes; ``trl-default``: the same pairs and
micro-batches, padded to the longest row). In the small table both precompute the reference log-probs of all
training pairs before step 1 (TRL: ``precompute_ref_log_probs``), so neither keeps a reference model nor runs one
during the timed steps. Initial weights differ (megatron-core's seeded init vs ``transformers``' init): losses agree
at step 1 (ln 2) and only roughly afterwards.

Run (CPU):

    source .venv/bin/activate
    export DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=$PWD/.venv/torch_extensions
    pip install -c constraints/cpu-py311.txt trl==1.16.0   # benchmark only; without it the gatedpo rows run
    python benchmarks/bench_vs_trl.py --steps 20 --repeats 2 [--threads 1] [--micro-batch 2] [--out DIR]
    python benchmarks/bench_vs_trl.py --data hh --model 20m --max-length 512 --steps 20 --repeats 2
    python benchmarks/bench_vs_trl.py --lora [--data hh --model 20m --max-length 512] ...   # LoRA rows
    python benchmarks/bench_vs_trl.py --moe [--data hh --model 20m --max-length 512] ...    # mixture-of-experts rows

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
QUICKSTART_FFN = 176  # configs/quickstart.yaml's SwiGLU width (the small model)
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test-2000.jsonl.gz"
HH_VOCAB = 8000
# Llama shapes (untied embeddings, SwiGLU, RMSNorm, rotary). small: configs/quickstart.yaml's own shape.
MODELS: dict[str, dict[str, int]] = {
    "small": {},
    "20m": {
        "num_layers": 8,
        "hidden_size": 512,
        "num_attention_heads": 8,
        "num_query_groups": 4,
        "ffn_hidden_size": 1408,
    },
}
# Rows: (trainer, gatedpo gate, gatedpo packing, LoRA). trl-default: DPOTrainer's defaults (a reference model
# forward per step, gradient checkpointing, no padding to a multiple); trl-precompute: the like-for-like row of the
# small table (reference log-probs precomputed, no gradient checkpointing, padded to a multiple of 8 as gatedpo
# pads). lora / trl-lora: LoRA (LORA below) on the frozen model, the reference the policy with its adapters off
# (a forward per step, no copy, no precompute), no gradient checkpointing, padded to a multiple of 8.
ROWS: dict[str, tuple[str, str, bool, bool]] = {
    "padded": ("gatedpo", "none", False, False),
    "gated": ("gatedpo", "sigmoid", False, False),
    "packed": ("gatedpo", "none", True, False),
    "lora": ("gatedpo", "none", False, True),
    "lora-packed": ("gatedpo", "none", True, True),
    "trl-precompute": ("trl", "none", False, False),
    "trl-default": ("trl", "none", False, False),
    "trl-lora": ("trl", "none", False, True),
    "moe": ("gatedpo", "none", False, False),
    "moe-packed": ("gatedpo", "none", True, False),
    "trl-moe": ("trl", "none", False, False),
}
DEFAULT_ROWS = {"builtin": "padded,gated,trl-precompute", "hh": "padded,packed,trl-default"}
LORA_ROWS = "lora,lora-packed,trl-lora"  # --lora
# The LoRA rows' adapters: gatedpo's model.lora and peft's LoraConfig (r, lora_alpha, lora_dropout, target_modules).
LORA = {"rank": 16, "alpha": 32, "dropout": 0.0}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # all-linear
# --moe: the model's MLPs become MOE_EXPERTS experts of a quarter of its SwiGLU width, top 2 (a Mixtral of the same
# shape on the TRL side), the load-balancing loss at Mixtral's 0.001 on both sides; the reference precomputed.
MOE_ROWS = "moe,moe-packed,trl-moe"
MOE_EXPERTS, MOE_TOPK, MOE_AUX = 8, 2, 0.001


def is_moe(row: str) -> bool:
    return row in MOE_ROWS.split(",")


IMPORTS = {
    "gatedpo": "import deepspeed, megatron.core, gatedpo_mega.training.loop, gatedpo_mega.training.data",
    "trl": "import transformers, datasets, accelerate, trl; from trl import DPOConfig, DPOTrainer",
}


def overrides(args: argparse.Namespace, row: str = "padded") -> list[str]:
    """The gatedpo config of one row (also what the TRL worker reads its settings from)."""
    out = Path(args.out)
    _, gate, packing, lora = ROWS[row]
    ov = [
        "parallel.tensor=1",
        "parallel.pipeline=1",
        f"train.max_steps={args.steps}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={PAIRS_PER_STEP}",
        f"train.output_dir={out / f'gatedpo-{row}'}",
        # LoRA rows: the policy with its adapters off, a forward per step (train.reference=auto with LoRA)
        # the moe rows: precomputed on both sides (their TRL row precomputes)
        f"train.reference={'live' if lora else 'precomputed' if is_moe(row) else args.reference}",
        f"data.cache_dir={out / 'cache'}",
        f"data.packing={str(packing).lower()}",
        "objective.name=dpo",
        "objective.beta=0.1",
        f"gate.shape={gate}",
        "gate.signal=absolute",  # the gated row's gate as docs/benchmarks.md states it: p < 1e-4
        "gate.tau=1e-4",
    ]
    ov += [f"model.{k}={v}" for k, v in MODELS[args.model].items()]
    if lora:
        ov += [f"model.lora.{k}={v}" for k, v in LORA.items()]
        ov.append("model.lora.target_modules=[all-linear]")
    if is_moe(row):
        width = (MODELS[args.model].get("ffn_hidden_size") or QUICKSTART_FFN) // 4
        ov += [f"model.num_experts={MOE_EXPERTS}", f"model.moe_ffn_hidden_size={width}",
               f"model.moe_router_topk={MOE_TOPK}", f"model.moe_aux_loss_coef={MOE_AUX}"]  # fmt: skip
    if args.recompute:
        ov.append("model.recompute=full")
    if args.data == "hh":
        ov += [
            f"data.source={HH}",
            "data.format=hh",
            f"data.tokenizer={args.tokenizer_dir}",
        ]
    if args.max_length:
        # configs/data_hh.yaml's proportions: prompts up to 3/4 of a row (longer ones keep their end)
        ov += [f"data.max_length={args.max_length}", f"data.max_prompt_length={args.max_length * 3 // 4}"]
        ov.append(f"model.max_position_embeddings={max(args.max_length, 256)}")
    return ov


def parameter_count(m: Any, vocab: int) -> int:
    """Parameters of the Llama-shaped model ``m`` (a ``ModelConfig``): untied embeddings, no biases, RMSNorm."""
    h, head_dim = m.hidden_size, m.hidden_size // m.num_attention_heads
    kv = m.num_query_groups * head_dim
    attention = h * h + 2 * h * kv + h * h  # q, k, v, o
    mlp = 3 * h * m.ffn_hidden_size  # gate, up, down (SwiGLU)
    layer = attention + mlp + 2 * h  # two RMSNorm weights
    return vocab * h * (1 if m.tie_embeddings else 2) + m.num_layers * layer + h  # + the final norm


def lora_parameter_count(m: Any, rank: int) -> int:
    """LoRA parameters of all seven linears of every layer (``A`` [rank, in] + ``B`` [out, rank] each)."""
    h, f = m.hidden_size, m.ffn_hidden_size
    kv = m.num_query_groups * (h // m.num_attention_heads)
    in_out = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]  # q k v o gate up down
    return m.num_layers * sum(rank * (i + o) for i, o in in_out)


def _version(package: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def step_tokens(args: argparse.Namespace, data: Any, cfg: Any) -> list[dict[str, int]]:
    """Real (non-padding) and padded input tokens of each optimizer step, from gatedpo's loader: the same pairs
    and micro-batches on every row. Real: prompt + response of every chosen and rejected row (what TRL's
    ``attention_mask`` sums to); padded: rows x padded length per micro-batch (gatedpo's ``tokens_per_second``)."""
    from gatedpo_mega.data import PreferenceLoader

    t = cfg.train
    loader = PreferenceLoader(
        data.train, global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size, dp_rank=0,
        dp_size=1, seed=t.seed, pad_to_multiple=cfg.data.pad_to_multiple, pad_id=data.tokenizer.pad_id,
    )  # fmt: skip
    if t.max_steps > loader.steps_per_epoch:
        raise SystemExit(f"--steps {t.max_steps} is more than one epoch ({loader.steps_per_epoch} steps)")
    out = []
    for _ in range(t.max_steps):
        batches = next(loader)
        real = sum(
            2 * len(data.train[int(i)].prompt)
            + len(data.train[int(i)].chosen)
            + len(data.train[int(i)].rejected)
            for b in batches
            for i in b.pair_ids
        )
        out.append({"real": real, "padded": sum(b.input_ids.numel() for b in batches)})
    return out


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
    """``steps``: ``{"step", "seconds", "tokens", "real_tokens", "loss"}`` per optimizer step (tokens: padded)."""
    timed = [s for s in steps if s["step"] > warmup]
    seconds = sum(s["seconds"] for s in timed)
    return {
        "steps": len(steps),
        "timed_steps": len(timed),
        "median_step_s": statistics.median(s["seconds"] for s in timed),
        "tokens_per_s": sum(s["tokens"] for s in timed) / seconds,
        "tokens_per_step": statistics.mean(s["tokens"] for s in timed),
        "real_tokens_per_s": sum(s["real_tokens"] for s in timed) / seconds,
        "real_tokens_per_step": statistics.mean(s["real_tokens"] for s in timed),
        "real_tokens_each_step": [s["real_tokens"] for s in steps],
        "step_s_total": sum(s["seconds"] for s in steps),
        "loss_first": steps[0]["loss"],
        "loss_last": steps[-1]["loss"],
    }


# ---------------------------------------------------------------------------------------------------------------
# gatedpo


def method_name(args: argparse.Namespace, row: str) -> str:
    trainer, gate, packing, lora = ROWS[row]
    adapters = f"LoRA r{LORA['rank']} a{LORA['alpha']:g} all-linear"
    experts = f"{MOE_EXPERTS} experts top {MOE_TOPK}"
    if trainer == "trl" and is_moe(row):
        return f"TRL DPOTrainer, Mixtral {experts} (sigmoid; ref precomputed; aux {MOE_AUX:g})"
    if is_moe(row):
        return f"gatedpo DPO {'packed' if packing else 'padded'} {experts} (ref precomputed; aux {MOE_AUX:g})"
    if trainer == "trl":
        if lora:
            return f"TRL DPOTrainer + peft {adapters} (sigmoid; ref adapters off)"
        if row == "trl-default":
            return "TRL DPOTrainer defaults (sigmoid; ref model per step, grad ckpt)"
        return "TRL DPOTrainer (sigmoid; ref precomputed)"
    layout = "packed" if packing else "padded"
    recompute = "; recompute full" if args.recompute else ""
    if lora:
        return f"gatedpo DPO {layout} {adapters} (gate {gate}; ref adapters off{recompute})"
    return f"gatedpo DPO {layout} (gate {gate}; ref {args.reference}{recompute})"


def run_gatedpo(
    args: argparse.Namespace, row: str, env: dict[str, str], tokens: list[dict[str, int]]
) -> dict[str, Any]:
    out = Path(args.out)
    for f in (out / "cache" / "pairs").glob("*/reference-*.pt"):  # every run computes its reference pass
        f.unlink()
    shutil.rmtree(out / f"gatedpo-{row}", ignore_errors=True)  # metrics.jsonl is appended to, not replaced
    cmd = [sys.executable, "-m", "gatedpo_mega.cli", "train", "--config", str(CONFIG), "--nproc", "1"]
    code, wall, rss = run_measured([*cmd, *overrides(args, row)], out / f"gatedpo-{row}.log", env)
    if code != 0:
        raise SystemExit(f"gatedpo ({row}) exited with {code}; see {out / f'gatedpo-{row}.log'}")
    records = [
        json.loads(line) for line in (out / f"gatedpo-{row}" / "metrics.jsonl").read_text().splitlines()
    ]
    records = [r for r in records if r["step"] > 0 and "step_seconds" in r]
    steps = []
    for r in records:
        # tokens_per_second counts the tokens the model ran on (a packed row has no padding between documents);
        # real_tokens_per_second the prompt and response tokens, which must be the loader's for the same pairs.
        padded = r["tokens_per_second"] * r["step_seconds"]
        real = r["real_tokens_per_second"] * r["step_seconds"]
        if round(real) != tokens[r["step"] - 1]["real"]:
            raise SystemExit(f"gatedpo ({row}) step {r['step']}: {real:.0f} real tokens, the loader has "
                             f"{tokens[r['step'] - 1]['real']}: not the pairs this benchmark expects")  # fmt: skip
        steps.append(
            {
                "step": r["step"],
                "seconds": r["step_seconds"],
                "tokens": padded,
                "real_tokens": real,
                "loss": r["loss"],
            }
        )
    res = summarize(steps, args.warmup)
    res.update(
        row=row,
        method=method_name(args, row),
        wall_s=wall,
        startup_s=wall - res["step_s_total"],
        peak_rss_mib=rss,
        peak_rss_mib_metrics=records[-1].get("memory/peak_mib_max_rank"),
        padding_fraction_logged=[r["padding_fraction"] for r in records if "padding_fraction" in r] or None,
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
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, TrainerCallback

    from gatedpo_mega.config import load_config
    from gatedpo_mega.data import PreferenceLoader, load_preference_data
    from gatedpo_mega.deepspeed.engine import lr_lambda  # torch and math only

    row = args.trl_row
    default, lora = row == "trl-default", ROWS[row][3]
    cfg = load_config(CONFIG, overrides(args, row))
    t, m = cfg.train, cfg.model
    data = load_preference_data(cfg.data, seed=t.seed)
    tok = data.tokenizer
    hf_tok = hf_tokenizer(tok.path)
    assert (hf_tok.pad_token_id, hf_tok.eos_token_id, len(hf_tok)) == (tok.pad_id, tok.eos_id, tok.vocab_size)

    # gatedpo's loader order: step k's pairs sorted by length, consecutive micro-batches. The untouched pairs
    # follow, so that the reference precompute (trl-precompute) covers every training pair, as gatedpo's reference
    # pass does.
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

    shape: dict[str, Any] = dict(
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
        attention_dropout=0.0,
        initializer_range=m.init_std,
        pad_token_id=tok.pad_id,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        attn_implementation="sdpa",
    )
    if is_moe(row):  # Mixtral: every MLP a mixture of experts, the top k renormalised, as gatedpo's moe rows
        shape |= dict(intermediate_size=m.moe_ffn_hidden_size, num_local_experts=m.num_experts,
                      num_experts_per_tok=m.moe_router_topk, router_aux_loss_coef=m.moe_aux_loss_coef,
                      output_router_logits=True, sliding_window=None)  # fmt: skip
        model = MixtralForCausalLM(MixtralConfig(**shape)).to(torch.float32)
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape, attention_bias=m.qkv_bias)).to(torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    peft_kwargs: dict[str, Any] = {}
    if lora:
        # peft wraps the model inside DPOTrainer; with ref_model=None the reference is the policy with its adapters
        # disabled (no copy), computed in every step (no precompute) as gatedpo's live LoRA reference is.
        import peft

        lc = cfg.model.lora
        assert lc.target_modules == LORA_TARGETS, lc.target_modules
        peft_kwargs["peft_config"] = peft.LoraConfig(
            r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
            task_type="CAUSAL_LM",
        )  # fmt: skip
        ref_kwargs: dict[str, Any] = {
            "precompute_ref_log_probs": False,
            "gradient_checkpointing": False,
            "pad_to_multiple_of": cfg.data.pad_to_multiple,
            "max_length": None,
        }
    elif not default:
        ref_kwargs = {
            "precompute_ref_log_probs": True,
            "precompute_ref_batch_size": t.reference_batch_size,
            "gradient_checkpointing": False,
            "pad_to_multiple_of": cfg.data.pad_to_multiple,
            "max_length": None,
        }
    else:
        # DPOConfig's defaults: no precompute, so DPOTrainer builds its reference model itself, from the policy's
        # ``_name_or_path``; a model made from a config has none, so the initial weights are saved and the policy
        # points at them (the reference then holds the very initial weights). Gradient checkpointing (default on),
        # max_length 1024 and pad_to_multiple_of "auto" (no padding to a multiple off Neuron) stay as they are.
        init = Path(args.out) / "trl-initial-weights"
        model.save_pretrained(init)
        model.config._name_or_path = str(init)
        ref_kwargs = {}

    class PreTokenizedDPOTrainer(trl.DPOTrainer):
        """The dataset already holds gatedpo's token ids: skip TRL's prompt extraction, EOS and tokenization."""

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            return dataset

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            """gatedpo's own schedule (``lr_lambda``: step ``k`` runs at ``(k + 1) / warmup``, then cosine to
            ``min_lr``). ``transformers``' ``cosine_with_min_lr`` warms up from 0, one step behind (lr 0 at step 1)."""
            if self.lr_scheduler is None:
                ratio = t.min_lr / t.lr
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer,
                    lambda s: lr_lambda(s, warmup=t.warmup_steps, total=t.max_steps, ratio=ratio),
                )
            return self.lr_scheduler

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.active, self.tokens, self.t0 = False, 0, 0.0
            self.steps: list[dict[str, Any]] = []

        def count(self, module: Any, a: Any, kw: dict[str, Any]) -> None:
            """The policy's forwards only: the hook is on the policy, not on TRL's reference model, and the
            reference forward of the policy with its adapters disabled (trl-lora) runs under ``no_grad``."""
            if self.active and torch.is_grad_enabled():
                ids = kw["input_ids"] if "input_ids" in kw else a[0]
                mask = kw.get("attention_mask")
                self.tokens += ids.numel()
                self.real += int(mask.sum()) if mask is not None else ids.numel()

        def on_step_begin(self, *a: Any, **kw: Any) -> None:
            self.active, self.tokens, self.real, self.t0 = True, 0, 0, time.perf_counter()

        def on_step_end(self, args: Any, state: Any, *a: Any, **kw: Any) -> None:
            seconds = time.perf_counter() - self.t0
            self.active = False
            self.steps.append(
                {
                    "step": state.global_step,
                    "seconds": seconds,
                    "tokens": self.tokens,
                    "real_tokens": self.real,
                }
            )

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs and self.steps:
                self.steps[-1]["loss"] = logs["loss"]

    timer = StepTimer()
    model.register_forward_pre_hook(timer.count, with_kwargs=True)
    out = Path(args.out) / row
    config = trl.DPOConfig(
        output_dir=str(out), per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.global_batch_size // t.micro_batch_size, max_steps=t.max_steps,
        learning_rate=t.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": t.min_lr},
        warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, adam_beta1=t.adam_betas[0],
        adam_beta2=t.adam_betas[1], adam_epsilon=t.adam_eps, max_grad_norm=t.grad_clip, optim="adamw_torch",
        beta=cfg.objective.beta, loss_type=["sigmoid"], train_sampling_strategy="sequential",
        dataloader_num_workers=0, report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True,
        use_cpu=True, seed=t.seed, bf16=False, fp16=False, **ref_kwargs,
    )  # fmt: skip
    trainer = PreTokenizedDPOTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=hf_tok, callbacks=[timer],
        **peft_kwargs,
    )  # fmt: skip
    assert trainer.ref_model is None if not default else trainer.ref_model is not None
    expected = "MixtralForCausalLM" if is_moe(row) else "LlamaForCausalLM"
    assert lora == (type(trainer.model).__name__ != expected), type(trainer.model)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    import resource

    applied = {
        k: getattr(trainer.args, k)
        for k in ("precompute_ref_log_probs", "gradient_checkpointing", "pad_to_multiple_of", "max_length",
                  "padding_free", "bf16", "disable_dropout", "optim", "use_liger_kernel", "activation_offloading")
    }  # fmt: skip
    applied["reference_model"] = trainer.ref_model is not None
    applied["model_class"] = type(trainer.model).__name__
    Path(args.trl_worker).write_text(
        json.dumps(
            {
                "steps": timer.steps,
                "parameters": parameters,
                "trainable_parameters": trainable,
                "settings": {
                    k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v)
                    for k, v in applied.items()
                },
                "peak_rss_mib_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "torch_threads": torch.get_num_threads(),
                "versions": {
                    "trl": trl.__version__,
                    "transformers": transformers.__version__,
                    "peft": _version("peft"),
                },
            }
        )
    )


def run_trl(
    args: argparse.Namespace, row: str, env: dict[str, str], tokens: list[dict[str, int]]
) -> dict[str, Any]:
    out = Path(args.out)
    result_file = out / f"{row}-result.json"
    cmd = [sys.executable, __file__, "--trl-worker", str(result_file), "--trl-row", row, *sys.argv[1:]]
    code, wall, rss = run_measured(cmd, out / f"{row}.log", env)
    if code != 0:
        raise SystemExit(f"TRL ({row}) exited with {code}; see {out / f'{row}.log'}")
    worker = json.loads(result_file.read_text())
    res = summarize(worker["steps"], args.warmup)
    expected = [t["real"] for t in tokens]
    res.update(
        row=row,
        method=method_name(args, row),
        wall_s=wall,
        startup_s=wall - res["step_s_total"],
        peak_rss_mib=rss,
        versions=worker["versions"],
        torch_threads=worker["torch_threads"],
        parameters=worker["parameters"],
        trainable_parameters=worker["trainable_parameters"],
        settings=worker["settings"],
        real_tokens_match_gatedpo=res["real_tokens_each_step"] == expected,
    )
    return res


# ---------------------------------------------------------------------------------------------------------------
# Orchestration and the table


def ratio_refs(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """Each row's TRL row for the ratios: ``trl-lora`` for the LoRA rows; for the others ``trl-default`` when it
    ran, else ``trl-precompute`` (None: no TRL counterpart ran)."""
    trl = {r["row"]: r for r in rows if ROWS[r["row"]][0] == "trl"}
    full = trl.get("trl-default") or trl.get("trl-precompute")
    return {
        r["row"]: trl.get("trl-moe")
        if is_moe(r["row"])
        else trl.get("trl-lora")
        if ROWS[r["row"]][3]
        else full
        for r in rows
    }


def table(rows: list[dict[str, Any]], refs: dict[str, dict[str, Any] | None]) -> str:
    head = (
        "| method | steps (timed) | median step s | real tokens/step | padded tokens/step | real tokens/s | "
        "padded tokens/s | peak RSS MiB | wall s | before step 1 s | real tokens/s ratio vs TRL | "
        "peak memory ratio this/TRL |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        ref = refs[r["row"]]
        ratio_t = f"{r['real_tokens_per_s'] / ref['real_tokens_per_s']:.2f}" if ref else "n/a"
        ratio_m = f"{r['peak_rss_mib'] / ref['peak_rss_mib']:.2f}" if ref else "n/a"
        lines.append(
            f"| {r['method']} | {r['steps']} ({r['timed_steps']}) | {r['median_step_s']:.3f} | "
            f"{r['real_tokens_per_step']:.0f} | {r['tokens_per_step']:.0f} | {r['real_tokens_per_s']:.0f} | "
            f"{r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} | {r['wall_s']:.1f} | {r['startup_s']:.1f} | "
            f"{ratio_t} | {ratio_m} |"
        )
    return "\n".join(lines)


def ensure_tokenizer(args: argparse.Namespace, env: dict[str, str]) -> None:
    """Train the HH SentencePiece tokenizer (``--vocab-size 8000``) into ``--tokenizer-dir`` when it is missing."""
    model = Path(args.tokenizer_dir) / "tokenizer.model"
    if model.is_file():
        print(f"tokenizer: {model} (reused)", flush=True)
        return
    print(
        f"tokenizer: {model} missing; training a {HH_VOCAB}-piece SentencePiece model on {HH.name}",
        flush=True,
    )
    cmd = [
        sys.executable, "-m", "gatedpo_mega.cli", "data", "train-tokenizer", "--config",
        str(ROOT / "configs" / "data_hh.yaml"), "--vocab-size", str(HH_VOCAB), "--output", str(args.tokenizer_dir),
        f"data.source={HH}", f"data.cache_dir={Path(args.out) / 'cache'}",
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env)
    if r.returncode != 0 or not model.is_file():
        raise SystemExit(f"tokenizer training failed (exit {r.returncode}): {' '.join(cmd)}")


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
    p.add_argument(
        "--data", choices=("builtin", "hh"), default="builtin",
        help=f"builtin: the generated quick-start pairs; hh: the HH-RLHF sample ({HH}) with an 8k tokenizer",
    )  # fmt: skip
    p.add_argument(
        "--model", choices=tuple(MODELS), default="small",
        help="small: configs/quickstart.yaml's ~0.3M shape; 20m: hidden 512, 8 layers, 8 heads / 4 KV groups, "
        "SwiGLU 1408 (~32M parameters with the 8k vocabulary)",
    )  # fmt: skip
    p.add_argument(
        "--max-length", type=int, default=0,
        help="data.max_length (prompt + response tokens per row; prompts up to 3/4 of it); 0: the config's (96)",
    )  # fmt: skip
    p.add_argument(
        "--rows", help=f"comma-separated rows out of {', '.join(ROWS)} (default: {DEFAULT_ROWS['builtin']} for "
        f"--data builtin, {DEFAULT_ROWS['hh']} for --data hh); TRL's ratios are against trl-default when it runs "
        "(the LoRA rows': against trl-lora)",
    )  # fmt: skip
    p.add_argument(
        "--lora", action="store_true",
        help=f"the LoRA rows, --rows {LORA_ROWS}: rank {LORA['rank']}, alpha {LORA['alpha']}, dropout "
        f"{LORA['dropout']:g}, all-linear, the reference the policy with its adapters off (--reference does not apply)",
    )  # fmt: skip
    p.add_argument(
        "--moe", action="store_true",
        help=f"the mixture-of-experts rows, --rows {MOE_ROWS}: {MOE_EXPERTS} experts of a quarter of the SwiGLU "
        f"width, top {MOE_TOPK}, load-balancing loss {MOE_AUX:g}; TRL trains a Mixtral of that shape",
    )  # fmt: skip
    p.add_argument(
        "--reference", choices=("precomputed", "live"),
        help="gatedpo's train.reference (default: precomputed for --data builtin; live, a reference forward per "
        "step as TRL's default does, for --data hh)",
    )  # fmt: skip
    p.add_argument(
        "--tokenizer-dir", default=str(ROOT / "outputs" / "tokenizers" / f"hh-{HH_VOCAB}"),
        help="the HH tokenizer (trained there when missing)",
    )  # fmt: skip
    p.add_argument("--no-gated", action="store_true", help="skip the gated gatedpo row")
    p.add_argument("--no-trl", action="store_true", help="skip the TRL rows")
    p.add_argument(
        "--recompute",
        action="store_true",
        help="gatedpo rows with model.recompute=full (activation recomputation)",
    )
    p.add_argument("--trl-worker", help=argparse.SUPPRESS)
    p.add_argument("--trl-row", help=argparse.SUPPRESS)
    args = p.parse_args()
    if PAIRS_PER_STEP % args.micro_batch or args.steps <= args.warmup:
        p.error(f"--micro-batch must divide {PAIRS_PER_STEP} and --steps must exceed --warmup")
    args.reference = args.reference or ("live" if args.data == "hh" else "precomputed")
    if ((args.lora or args.moe) and args.rows) or (args.lora and args.moe):
        p.error(f"--lora is --rows {LORA_ROWS}, --moe is --rows {MOE_ROWS}: give one of the three")
    chosen = LORA_ROWS if args.lora else MOE_ROWS if args.moe else DEFAULT_ROWS[args.data]
    rows_wanted = [r for r in (args.rows or chosen).split(",") if r]
    if unknown := [r for r in rows_wanted if r not in ROWS]:
        p.error(f"--rows: unknown {', '.join(unknown)} (choose from {', '.join(ROWS)})")
    if args.no_gated:
        rows_wanted = [r for r in rows_wanted if r != "gated"]
    if args.no_trl:
        rows_wanted = [r for r in rows_wanted if ROWS[r][0] != "trl"]
    if args.data == "hh" and not HH.is_file():
        p.error(f"--data hh: the HH-RLHF sample is not at {HH}")
    if args.max_length and args.max_length > 1024 and "trl-default" in rows_wanted:
        print(
            "note: TRL's default max_length is 1024; longer rows are cut on the trl-default side", flush=True
        )
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
    if args.data == "hh":
        ensure_tokenizer(args, env)
    # Tokenize once here (tokenizer training and the pairs cache stay out of every timed process).
    from gatedpo_mega.config import load_config
    from gatedpo_mega.data import load_preference_data

    cfg = load_config(CONFIG, overrides(args))
    data = load_preference_data(cfg.data, seed=cfg.train.seed)
    tokens = step_tokens(args, data, cfg)
    vocab = cfg.model.vocab_size or data.tokenizer.vocab_size
    n_params = parameter_count(cfg.model, vocab)
    n_lora = lora_parameter_count(cfg.model, LORA["rank"])
    m = cfg.model
    print(
        f"model {args.model}: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads in "
        f"{m.num_query_groups} KV groups, SwiGLU {m.ffn_hidden_size}, vocabulary {vocab}, untied: "
        f"{n_params:,} parameters ({n_params / 1e6:.1f}M)"
        + (f"; LoRA rank {LORA['rank']} on all 7 linears: {n_lora:,} trainable" if any(
            ROWS[r][3] for r in rows_wanted) else ""),
        flush=True,
    )  # fmt: skip
    real, padded = sum(t["real"] for t in tokens), sum(t["padded"] for t in tokens)
    print(
        f"data {args.data}: {len(data.train)} training pairs, max_length {cfg.data.max_length} (prompt "
        f"{cfg.data.max_prompt_length}); steps 1-{args.steps}: {real / len(tokens):.0f} real of "
        f"{padded / len(tokens):.0f} padded tokens per step (padding {1 - real / padded:.1%})",
        flush=True,
    )

    try:
        trl_version: str | None = md.version("trl")
    except md.PackageNotFoundError:
        trl_version = None
        print("TRL not installed: pip install trl (the gatedpo rows still run)", flush=True)
    installed_trl = trl_version or "not installed"
    if not trl_version:
        rows_wanted = [r for r in rows_wanted if ROWS[r][0] != "trl"]
    if not rows_wanted:
        p.error("no rows to run")

    # Round-robin repeats; each row keeps its fastest run (other load on the host only ever slows a run down).
    runs: dict[str, list[dict[str, Any]]] = {}
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for row in rows_wanted:
            run = run_trl if ROWS[row][0] == "trl" else run_gatedpo
            print(f"running {row} ...", flush=True)
            runs.setdefault(row, []).append(run(args, row, env, tokens))
        load.append(os.getloadavg()[0])
    rows = []
    for group in runs.values():
        best = max(group, key=lambda r: r["real_tokens_per_s"])
        best["tokens_per_s_all_runs"] = [round(r["real_tokens_per_s"]) for r in group]
        best["peak_rss_mib"] = max(r["peak_rss_mib"] for r in group)
        rows.append(best)
    trl_rows = {r["row"]: r for r in rows if ROWS[r["row"]][0] == "trl"}
    refs = ratio_refs(rows)
    ref = next((r for r in refs.values() if r), None)
    imports = {s: import_rss(s, env) for s in IMPORTS if s == "gatedpo" or ref}

    versions = {k: md.version(k) for k in ("torch", "transformers", "deepspeed", "megatron-core")}
    if any(ROWS[r][3] for r in rows_wanted):
        versions["peft"] = _version("peft") or "not installed"
    versions["trl"] = installed_trl if trl_rows else f"{installed_trl} (not run)"
    print()
    print(table(rows, refs))
    print()
    accumulation = PAIRS_PER_STEP // args.micro_batch
    print(
        f"{PAIRS_PER_STEP} pairs/step = micro-batch {args.micro_batch} x {accumulation} accumulation; steps "
        f"1-{args.warmup} left out of median and tokens/s; 1 process, {os.cpu_count()} CPUs on the host, torch "
        f"threads {args.threads or 'default'} (TRL reports {ref['torch_threads'] if ref else 'n/a'})"
    )
    against = sorted({r["method"] for r in refs.values() if r})
    print(f"ratios against: {'; '.join(against) or 'n/a'} (LoRA rows against the LoRA TRL row); model "
          f"{args.model} ({n_params:,} parameters)")  # fmt: skip
    print(f"1-minute load average before / after each round: {', '.join(f'{x:.1f}' for x in load)}")
    for r in rows:
        print(f"{r['method']}: real tokens/s of each run {r['tokens_per_s_all_runs']}")
    for r in rows:
        print(f"{r['method']}: loss step 1 {r['loss_first']:.4f}, step {r['steps']} {r['loss_last']:.4f}")
    for r in trl_rows.values():
        print(
            f"{r['method']}: {r['parameters']:,} parameters ({r['trainable_parameters']:,} trainable); real tokens "
            f"per step equal gatedpo's: {r['real_tokens_match_gatedpo']}; settings {r['settings']}"
        )
        if ROWS[r["row"]][3] and r["trainable_parameters"] != n_lora:
            print(f"WARNING: {r['row']} trains {r['trainable_parameters']:,} parameters, LoRA rank "
                  f"{LORA['rank']} on the 7 linears is {n_lora:,}")  # fmt: skip
    for r in rows:
        if r.get("peak_rss_mib_metrics") is not None:
            print(
                f"{r['method']}: metrics.jsonl memory/peak_mib_max_rank (last step) {r['peak_rss_mib_metrics']:.0f}"
            )
    print("RSS of the imports alone (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in imports.items() if v))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    setup = {
        "data": args.data, "model": args.model, "parameters": n_params, "max_length": cfg.data.max_length,
        "max_prompt_length": cfg.data.max_prompt_length, "reference": args.reference, "rows": rows_wanted,
        "lora": {**LORA, "target_modules": LORA_TARGETS, "parameters": n_lora},
        "steps": args.steps, "warmup": args.warmup, "micro_batch": args.micro_batch, "threads": args.threads,
        "step_tokens": tokens,
    }  # fmt: skip
    (out / "results.json").write_text(
        json.dumps(
            {
                "setup": setup,
                "rows": rows,
                "import_rss_mib": imports,
                "versions": versions,
                "load_average": load,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
