"""What the command sets up before DeepSpeed starts, and what it leaves off the console."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from gatedpo_mega.environment import (
    CPU_ONLY_WARNINGS,
    KNOWN_WARNINGS,
    quiet_deepspeed_start,
    quiet_known_warnings,
    set_defaults,
)

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_fill_only_what_the_user_left_unset():
    env: dict[str, str] = {}
    assert set_defaults(env, cuda=False, prefix="/venv") == {
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": "/venv/torch_extensions",
    }
    assert env["DS_ACCELERATOR"] == "cpu"
    assert set_defaults(env, cuda=False, prefix="/other") == {}  # already set: kept

    env = {"DS_ACCELERATOR": "cuda", "TORCH_EXTENSIONS_DIR": "/mine"}
    assert set_defaults(env, cuda=False, prefix="/venv") == {}
    assert env == {"DS_ACCELERATOR": "cuda", "TORCH_EXTENSIONS_DIR": "/mine"}

    env = {}
    assert set_defaults(env, cuda=True, prefix=None) == {}  # a GPU: DeepSpeed picks it; no writable prefix


def test_the_default_extensions_folder_is_the_environments_own():
    """As tools/bootstrap.sh sets it: ``<venv>/torch_extensions``."""
    env: dict[str, str] = {}
    set_defaults(env, cuda=False)
    if os.access(sys.prefix, os.W_OK):
        assert env["TORCH_EXTENSIONS_DIR"] == os.path.join(sys.prefix, "torch_extensions")
    assert (
        'TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$venv/torch_extensions}"'
        in (ROOT / "tools" / "bootstrap.sh").read_text()
    )


def _shown(message: str, category: type[Warning], module: str) -> bool:
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        quiet_known_warnings(cuda=False)
        warnings.warn_explicit(message, category, "x.py", 1, module=module)
    return bool(seen)


# Each filter's upstream message as raised (megatron-core 0.16 and 0.19, DeepSpeed 0.19, torch 2.13), and where from.
UPSTREAM = [
    ("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning,
     "megatron.core.optimizer"),
    ("Apex is not installed. Falling back to Torch Norm", UserWarning, "megatron.core.models.backends"),
    ("Warning: tp_group is None, using default tp group. Passing tp_group will be mandatory soon",
     DeprecationWarning, "megatron.core.tensor_parallel.layers"),
    ("The following imports from `dynamic_context.py` will be removed in this file in `megatron-core` 0.14.",
     DeprecationWarning, "megatron.core.inference.contexts"),
    ("The 'megatron.core.transformer.custom_layers.transformer_engine' \n      module is deprecated and will be "
     "removed", DeprecationWarning, "megatron.core.transformer.multi_latent_attention"),
    ("MLP requires ffn_hidden_size, but it was not provided. Using config.ffn_hidden_size by default.",
     DeprecationWarning, "megatron.core.transformer.spec_utils"),
    ("MLP requires ffn_hidden_size, but it was not provided. Using config.ffn_hidden_size by default.",
     DeprecationWarning, "megatron.core.transformer.mlp"),  # where megatron-core 0.19 raises it
    ("`torch.jit.script_method` is deprecated. Please switch to `torch.compile` or `torch.export`.",
     DeprecationWarning, "torch.jit._script"),
    ("`torch.distributed.all_gather_into_tensor` is deprecated. Please use `torch.distributed.all_gather_single` "
     "instead.", FutureWarning, "torch.distributed.c10d_logger"),
    ("When using async grad allreduce it is recommended to set the environment variable "
     "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup", UserWarning, "megatron.core.tensor_parallel.layers"),
]  # fmt: skip


def test_every_filter_is_exercised():
    # two Apex messages, one filter; the MLP message from either of its modules (megatron-core 0.16 and 0.19)
    assert len(UPSTREAM) == len(KNOWN_WARNINGS) + len(CPU_ONLY_WARNINGS) + 2


@pytest.mark.parametrize("upstream", UPSTREAM, ids=lambda u: u[2])
def test_each_filter_hides_its_message_from_its_module_only(upstream):
    text, category, module = upstream
    assert not _shown(text, category, module)
    assert _shown(text, category, "gatedpo_mega.loss")  # the same words from elsewhere still show


def test_the_cuda_advice_shows_where_there_is_cuda():
    text, category, module = UPSTREAM[-1]
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        quiet_known_warnings(cuda=True)
        warnings.warn_explicit(text, category, "x.py", 1, module=module)
    assert seen


def test_deepspeeds_build_line_is_dropped_and_the_rest_kept(capsys):
    with quiet_deepspeed_start():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("something else DeepSpeed says")
    assert capsys.readouterr().out == "something else DeepSpeed says\n"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_run_from_a_bare_environment_prints_a_summary_and_its_progress_only(tmp_path):
    """No DS_ACCELERATOR or TORCH_EXTENSIONS_DIR (a plain ``source .venv/bin/activate``): no DeepSpeed accelerator
    warning, nothing built into the home folder, none of the filtered messages; the summary and the bar show."""
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR")}
    env.update(HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT))
    (tmp_path / "home").mkdir()
    out = tmp_path / "run"
    overrides = [
        "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64", "train.max_steps=2",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.reference_batch_size=4",
        "data.builtin_pairs=48", "data.max_length=64", "data.max_prompt_length=40", "data.eval_fraction=0",
        f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={out}",
    ]  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-m", "gatedpo_mega.cli", "train", "--nproc", "2", *overrides],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-3000:]
    lines = text.splitlines()
    assert lines[0] == (
        "gatedpo train: objective dpo, gate psigmoid (q10, tau 0.0002, slope 20000), model 2 layers x 32, TP 1 x PP 1 x "
        "DP 2, ZeRO 1, "
        f"2 steps of 4 pairs -> {out} (config.yaml there)"
    ), text[:2000]
    assert "gate-dpo: 100%" in text
    for quiet in (
        "Warning",
        "Apex",
        "built successfully",
        "Setting accelerator",
        "CUDA_DEVICE_MAX_CONNECTIONS",
    ):
        assert quiet not in text, text[-3000:]
    assert list((tmp_path / "home").iterdir()) == []
    assert "objective:\n  name: dpo" in (out / "config.yaml").read_text()


def test_the_libraries_do_not_import_the_trackers_and_everyone_else_does():
    """megatron-core and DeepSpeed import wandb and mlflow for features not used here (2.3 s of each process's
    start); after ``import gatedpo_mega`` they see them absent, and any other importer gets them."""
    code = (
        "import sys, gatedpo_mega\n"
        "import deepspeed, megatron.core\n"
        "from megatron.core import timers\n"
        "from deepspeed.autotuning import autotuner\n"
        "print(sorted(m for m in ('wandb', 'mlflow') if m in sys.modules), autotuner.has_mlflow, timers.wandb)\n"
        "import wandb, mlflow\n"
        "from gatedpo_mega.training import reporters\n"
        "print(wandb.__name__, mlflow.__name__)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == ["[] False None", "wandb mlflow"], r.stdout
