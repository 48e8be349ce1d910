"""A step whose gradients are NaN or infinite stops the run (exit code 3, one line naming the step and its pairs)
before its update reaches the weights: under both drivers, ZeRO 0-3, fp32 and bf16, both backends.

DeepSpeed skips such a step under ZeRO 1-3 and with bf16 (and without a loss scale to lower, skips every later one
too); with fp32 and no ZeRO it applies it. ``train.lr=1e6`` blows the weights up so that the second step's
gradients overflow; ``objective.beta=1e38`` overflows the first step's.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed import gatedpo

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

BASE = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=64", "train.max_steps=4", "train.micro_batch_size=2", "train.global_batch_size=8",
    "train.warmup_steps=0", "train.reference_batch_size=8", "train.save_every=1", "data.builtin_pairs=64",
    "data.max_length=64", "data.max_prompt_length=40", "data.eval_fraction=0",
]  # fmt: skip
MESSAGE = re.compile(
    r"gatedpo: error: gradient norm is not finite at step (\d+) \(pairs \[([\d, ]+)\]\); "
    r"the update was not applied$"
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _train(out: Path, cache: Path, nproc: int, *overrides: str, pool: bool = True):
    """``gatedpo train`` on ``nproc`` processes: the test pool's, as a launcher such as torchrun starts them (RANK
    and WORLD_SIZE set), or (``pool=False``) the local processes of ``--nproc``."""
    args = ["train", *BASE, f"data.cache_dir={cache}", f"train.output_dir={out}", *overrides]
    if pool:
        return gatedpo(nproc, *args)
    return subprocess.run(
        [sys.executable, "-m", "gatedpo_mega.cli", *args, "--nproc", str(nproc)],
        capture_output=True,
        text=True,
    )


def _stopped_at(r) -> int:
    """The step the error names: said once, in one line; the run exited with code 3, without a traceback."""
    assert r.returncode == 3, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    # The line may follow rank 0's progress bar on the same line of stderr.
    errors = [MESSAGE.search(line) for line in r.stderr.splitlines() if "gatedpo: error:" in line]
    assert len(errors) == 1 and errors[0], r.stderr[-3000:]
    step, pairs = errors[0][1], errors[0][2].split(", ")
    assert len(set(pairs)) == 8  # the whole global batch: every data-parallel rank's pairs
    return int(step)


def _checkpoint_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name.removeprefix("step-")) for p in root.glob("step-*")) if root.exists() else []


def _finite_weights(out: Path, step: int) -> bool:
    files = sorted(
        (out / "checkpoints" / f"step-{step:08d}" / "deepspeed" / "state").glob("mp_rank_*_model_states.pt")
    )
    assert files
    module = [torch.load(f, map_location="cpu", weights_only=False)["module"] for f in files]
    return all(bool(torch.isfinite(t).all()) for m in module for t in m.values() if torch.is_tensor(t))


@pytest.mark.parametrize(
    "extra",
    [
        [
            "parallel.zero_stage=0",
            "train.grad_clip=1.0",
        ],  # DeepSpeed would apply the NaN, clipped to NaN; --nproc 2
        ["parallel.zero_stage=1", "train.grad_clip=0"],  # DeepSpeed skips the step
    ],
    ids=["zero0-clip", "zero1"],
)
def test_overflowing_gradients_stop_the_run_and_the_last_checkpoint_is_finite(extra, cache, tmp_path):
    out = tmp_path / "run"
    r = _train(out, cache, 2, "train.lr=1e6", *extra, pool=extra[0] != "parallel.zero_stage=0")
    assert _stopped_at(r) == 2
    assert _checkpoint_steps(out) == [1]  # nothing saved at or after the bad step ...
    assert _finite_weights(out, 1)  # ... and what was saved before it is finite
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1]


@pytest.mark.parametrize(
    ("nproc", "extra"),
    [
        (2, ["parallel.zero_stage=2"]),  # DeepSpeed's engine drives the micro-batches
        (1, ["parallel.zero_stage=3", "model.dtype=bf16"]),  # one process under a launcher
    ],
    ids=["dp2-zero2", "launcher-zero3-bf16"],
)
def test_infinite_beta_stops_the_first_step(nproc, extra, cache, tmp_path):
    out = tmp_path / "run"
    r = _train(out, cache, nproc, "objective.beta=1e38", *extra)
    assert _stopped_at(r) == 1
    assert _checkpoint_steps(out) == []


def test_transformers_backend_stops_before_the_update_without_zero(cache, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=128)  # fmt: skip
    folder = tmp_path / "llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    out = tmp_path / "run"
    r = _train(
        out, cache, 1, "model.backend=transformers", f"model.init_from={folder}", "parallel.zero_stage=0",
        "train.lr=1e6", "train.grad_clip=0",
    )  # fmt: skip
    step = _stopped_at(r)
    assert step > 1 and _checkpoint_steps(out) == list(range(1, step))
    assert _finite_weights(out, step - 1)
    assert not (out / "hf").exists()  # the final export is never written from a stopped run
