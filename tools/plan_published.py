"""The planner's numbers beside published memory figures for 7B-70B models (docs/planning.md keeps the output).

    python tools/plan_published.py

Each row is one published figure: what it measured, its source, and the planner's number for the same setup.
Model states are weights, gradients, fp32 master weights and Adam's moments (what the ZeRO paper and DeepSpeed's
estimators count); a peak adds activations and temporaries. GB below is 10^9 bytes, GiB 2^30, as each source uses.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from gatedpo_mega.config import Config, ParallelConfig, load_config
from gatedpo_mega.planner import GiB, Plan, feasible, plan_memory, smallest_fit, stage_parameters

ROOT = Path(__file__).resolve().parents[1]
# What the ZeRO paper counts (K = 12: fp32 weights and Adam's two moments), and what DeepSpeed's estimators add: the
# fp32 copy of the gradients the optimizer steps on.
PAPER = ("weights", "gradients", "optimizer: fp32 master weights", "optimizer: Adam moments")
DEEPSPEED = (*PAPER, "gradients: fp32 partition")
LLAMA2_VOCAB = 32000


def config(name: str, *overrides: str) -> Config:
    return load_config(ROOT / "configs" / name, list(overrides))


def states(plan: Plan, names: tuple[str, ...] = PAPER) -> int:
    """Model states of the busiest rank: what stays, and the gradients as the optimizer step holds them."""
    r = plan.busiest
    return sum(p.bytes for p in (*r.parts, *r.step) if p.name in names)


def layout(cfg: Config, tp: int, pp: int, zero: int, micro: int = 1) -> Config:
    return replace(
        cfg,
        parallel=ParallelConfig(tensor=tp, pipeline=pp, zero_stage=zero),
        train=replace(cfg.train, micro_batch_size=micro),
    )


def main() -> None:
    rows: list[tuple[str, str, str, str]] = []
    llama2 = config("llama2-7b.yaml", "train.global_batch_size=64")
    vocab = LLAMA2_VOCAB
    n7 = stage_parameters(layout(llama2, 1, 1, 1), vocab, 0)

    # 1. The ZeRO paper, Figure 1: model states per device of a 7.5B model at data-parallel 64 (K = 12).
    # 2. xtuner's DeepSpeed guide: 7B on 8 GPUs, model states per GPU. Both: Llama-2-7B's count scaled to theirs.
    published_states = (
        (7.5e9, 64, (31.4, 16.6, 1.9), "Rajbhandari et al. 2020 (ZeRO), Figure 1"),
        (7e9, 8, (38.5, 26.25, 14.0), "InternLM/xtuner docs/zh_cn/acceleration/deepspeed.rst"),
    )
    for size, world, figures, source in published_states:
        for zero, published in zip((1, 2, 3), figures, strict=True):
            p = plan_memory(layout(llama2, 1, 1, zero), world=world, vocab_size=vocab)
            rows.append((
                f"{size / 1e9:g}B, DP {world}, ZeRO-{zero}: model states per GPU",
                f"{published} GB",
                f"{states(p) * size / n7 / 1e9:.2f} GB (Llama-2-7B's {n7 / 1e9:.2f}B scaled to {size / 1e9:g}B)",
                source,
            ))  # fmt: skip

    # 3. DeepSpeed's own estimator (the installed package), ZeRO-2 without offload, Llama-2-7B on 8 GPUs.
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, gpu = estimate_zero2_model_states_mem_needs(n7, num_gpus_per_node=8, cpu_offload=False)
    p = plan_memory(layout(llama2, 1, 1, 2), world=8, vocab_size=vocab)
    rows.append((
        "Llama-2-7B, DP 8, ZeRO-2: model states per GPU",
        f"{gpu / GiB:.2f} GiB",
        f"{states(p, DEEPSPEED) / GiB:.2f} GiB; peak with activations (micro-batch 1 pair x 2048) {p.per_rank_peak_bytes / GiB:.1f} GiB",
        "DeepSpeed estimate_zero2_model_states_mem_needs (installed package)",
    ))  # fmt: skip

    # 4. OpenRLHF issue #698: Llama-3-8B, ZeRO-2 on one A100 80GB, max_len 128, micro-batch 1, gradient
    # checkpointing: ~61 GB after backward (the first step: Adam's moments do not exist yet), then out of memory
    # at the optimizer step.
    l3 = config("llama3-8b.yaml", "data.max_length=128", "data.max_prompt_length=64", "model.recompute=full")
    p = plan_memory(layout(l3, 1, 1, 2), world=1, vocab_size=128256)
    first = states(p, ("weights", "gradients", "optimizer: fp32 master weights"))
    rows.append((
        "Llama-3-8B, 1 GPU, ZeRO-2, 128 tokens: after the first backward; then the step",
        "~61 GB, then out of memory on 80 GB",
        f"{first / 1e9:.0f} GB of weights, gradients and fp32 master weights (no Adam moments yet); peak {p.per_rank_peak_bytes / 1e9:.0f} GB (> 80)",
        "OpenRLHF/OpenRLHF issue #698",
    ))  # fmt: skip

    # 5. LLaMA-Factory issue #1221: llama-7b, ZeRO-2 out of memory on 8 x V100 32GB at batch 1, ZeRO-3 runs.
    for zero in (2, 3):
        c = layout(llama2, 1, 1, zero)
        c = replace(c, data=replace(c.data, max_length=1024, max_prompt_length=512))
        p = plan_memory(c, world=8, vocab_size=vocab)
        verdict = "fits" if p.per_rank_peak_bytes <= 32e9 else "does not fit"
        rows.append((
            f"llama-7b, 8 x V100 32GB, ZeRO-{zero}, batch 1",
            "out of memory" if zero == 2 else "runs",
            f"{p.per_rank_peak_bytes / 1e9:.1f} GB peak at 1024 tokens: {verdict}",
            "hiyouga/LLaMA-Factory issue #1221",
        ))  # fmt: skip

    # 6. NVIDIA's Llama3-70B DPO (NeMo): 80 GB GPUs, TP 8 x PP 2 at least (2 nodes), context 4096.
    l70 = config("llama3-70b.yaml", "data.max_length=4096", "data.max_prompt_length=2048",
                 "model.max_position_embeddings=8192", "train.global_batch_size=16")  # fmt: skip
    for tp, pp, world in ((8, 2, 16),):
        c = layout(l70, tp, pp, 1)
        p = plan_memory(c, world=world, vocab_size=128256)
        rows.append((
            f"Llama-3-70B DPO, 4096 tokens, 80 GB GPUs: TP {tp} x PP {pp} x DP 1",
            "fits (the minimum: 2 nodes)",
            f"{p.per_rank_peak_bytes / 1e9:.0f} GB peak ({'fits' if p.per_rank_peak_bytes <= 80e9 else 'does not fit'})",
            "nvidia/Llama3-70B-DPO-Chat discussion #1",
        ))  # fmt: skip
    fit = smallest_fit(replace(l70, parallel=ParallelConfig()), 1, 128256, int(80e9))
    best = feasible(l70, fit, 128256, int(80e9))[0] if fit else None
    rows.append((
        "Llama-3-70B DPO, 4096 tokens, 80 GB GPUs: the fewest GPUs",
        "16 (TP 8 x PP 2)",
        f"{fit} (fastest: TP {best.tensor} x PP {best.pipeline} x DP {best.dp}, ZeRO-{best.zero_stage}, "
        f"{best.peak_bytes / 1e9:.0f} GB)"
        if fit and best else "none up to 4096",
        "nvidia/Llama3-70B-DPO-Chat discussion #1",
    ))  # fmt: skip

    # 7. LLaMA-Factory's hardware table: full bf16 training, all GPUs together (18 bytes a parameter, estimated).
    for name, published, cfg, v in (("7B", 120, llama2, vocab), ("70B", 1200, l70, 128256)):
        world = 8 if name == "7B" else 64
        c = layout(cfg, 1, 1, 3)
        c = replace(c, train=replace(c.train, global_batch_size=64))
        p = plan_memory(c, world=world, vocab_size=v)
        rows.append((
            f"{name} full bf16 fine-tuning: model states over all GPUs",
            f"{published} GB (estimated)",
            f"{states(p, DEEPSPEED) * world / 1e9:.0f} GB (ZeRO-3 over {world} GPUs, fp32 gradients included)",
            "hiyouga/LLaMA-Factory README, Hardware Requirement",
        ))  # fmt: skip

    print("| setup | published | planner | source |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
