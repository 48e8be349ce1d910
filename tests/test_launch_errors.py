"""Refusals before any worker starts, and a failing worker reported in one line with a one-line summary."""

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from gatedpo_mega.config import load_config
from gatedpo_mega.errors import UserError
from gatedpo_mega.training import launch as launch_module
from gatedpo_mega.training.initial_weights import InitSource, check_source_fits, source_mismatches
from gatedpo_mega.training.launch import PEER_STOPPED, launch

BASE = [
    "model.num_layers=4", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=64", "train.micro_batch_size=2", "train.global_batch_size=8", "train.warmup_steps=1",
    "train.reference_batch_size=8", "data.builtin_pairs=120", "data.max_length=64", "data.max_prompt_length=40",
    "data.eval_fraction=0", "train.max_steps=3",
]  # fmt: skip


def _train(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "gatedpo_mega.cli", "train", "--nproc", "2", *BASE]
    cmd += [f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={tmp_path / 'out'}", *extra]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    return proc, time.monotonic() - t0


def _assert_refused_up_front(proc: subprocess.CompletedProcess, seconds: float, tmp_path: Path) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gatedpo: error: "), proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()  # no worker ever ran
    assert seconds < 30, seconds  # a refusal, not a failed run (a worker's start-up alone takes ~10 s here)
    return lines[0]


@pytest.mark.slow
def test_a_bad_data_file_is_refused_before_any_worker_starts(tmp_path):
    good = json.dumps({"prompt": "What is 2 plus 2?", "chosen": " 4.", "rejected": " 5."})
    data = tmp_path / "pairs.jsonl"
    data.write_text(f"{good}\n{{oops\n{good}\n")
    proc, seconds = _train(tmp_path, f"data.source={data}")
    line = _assert_refused_up_front(proc, seconds, tmp_path)
    assert line.startswith(f"gatedpo: error: {data} line 2: not valid JSON"), line


def _hf_folder(path: Path, **fields) -> Path:
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 512,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 128, **fields,
    }  # fmt: skip
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.slow
def test_init_from_that_disagrees_with_the_config_names_every_field_before_any_worker_starts(tmp_path):
    src = _hf_folder(tmp_path / "hf", hidden_size=64, num_hidden_layers=2)
    proc, seconds = _train(tmp_path, f"model.init_from={src}")
    line = _assert_refused_up_front(proc, seconds, tmp_path)
    assert line == (
        f"gatedpo: error: model.init_from={src} disagrees with the config: model.num_layers 2 (source) vs 4 "
        "(config); model.hidden_size 64 (source) vs 32 (config)"
    )


def test_source_mismatches_of_a_checkpoint_and_an_mcore_folder():
    cfg = load_config(None, [*BASE, "parallel.tensor=2"])
    theirs = asdict(load_config(None, [*BASE, "model.num_layers=2", "model.ffn_hidden_size=128"]).model)
    ckpt = InitSource(
        "checkpoint", Path("run/checkpoints/step-00000004"), 512, {"model": theirs, "layout": {}}
    )
    assert source_mismatches(cfg, ckpt, 600) == [
        "model.num_layers 2 (source) vs 4 (config)",
        "model.ffn_hidden_size 128 (source) vs 64 (config)",
        "vocabulary 512 (source) vs 600 (this run)",
    ]
    mcore = InitSource(
        "mcore",
        Path("m"),
        512,
        {"model": asdict(cfg.model), "tensor": 1, "pipeline": 1, "padded_vocab_size": 512},
    )
    assert source_mismatches(cfg, mcore, 512) == [
        "parallel.tensor x pipeline 1 x 1 (source) vs 2 x 1 (config; gatedpo convert reshard --src m --dst DIR "
        "--tensor 2 --pipeline 1 re-cuts it)"
    ]
    fits = InitSource("checkpoint", Path("c"), 512, {"model": asdict(cfg.model), "layout": {}})
    check_source_fits(cfg, fits, 512)  # no mismatch: no error
    with pytest.raises(UserError, match=r"^model.init_from=m disagrees with the config: parallel.tensor x"):
        check_source_fits(cfg, mcore, 512)


# ---------------------------------------------------------------------------------------------------------------
# A worker that fails: its line and one summary, never the peers' collective errors


def test_a_peer_error_is_one_line_and_a_bug_keeps_its_traceback(capsys):
    cfg = load_config(None, BASE)
    gloo = RuntimeError(
        "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:33413. "
        "This is typically caused by a remote worker crashing. Check the logs of the remote worker."
    )
    assert launch_module._report(1, cfg, gloo) == PEER_STOPPED
    assert (
        capsys.readouterr().err
        == "gatedpo: rank 1: a peer stopped (Connection closed by peer [127.0.0.1]:33413)\n"
    )
    assert launch_module._report(0, cfg, UserError("bad input")) == 2
    assert capsys.readouterr().err == "gatedpo: error: bad input\n"
    try:
        raise ValueError("a bug")
    except ValueError as e:
        assert launch_module._report(0, cfg, e) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("gatedpo: rank 0 failed: ValueError: a bug\n")
    oom = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 549755813888 bytes. Error code 12 (Cannot allocate memory)"
    )
    assert launch_module._report(0, cfg, oom) == 6
    err = capsys.readouterr().err
    assert err.startswith("gatedpo: error: rank 0: out of memory ([enforce fail") and err.count("\n") == 1


def _exit_after(seconds: float, code: int) -> None:
    time.sleep(seconds)
    sys.exit(code)


def test_the_launcher_names_the_rank_that_failed_first_not_its_peers():
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # only sleeps and exits: no torch state in the children
    # Rank 0 reports a broken collective at once; rank 1, the cause, exits a moment later; rank 2 would run on.
    plan = [(0.0, PEER_STOPPED), (0.5, 2), (60.0, 0)]
    procs = [ctx.Process(target=_exit_after, args=a) for a in plan]
    for p in procs:
        p.start()
    t0 = time.monotonic()
    assert launch_module._wait(procs) == (1, 2)
    assert time.monotonic() - t0 < 10
    assert procs[2].exitcode is not None and procs[2].exitcode < 0  # stopped


def test_ranks_that_fail_together_are_not_taken_for_a_success():
    """Ranks that raise one decision together (a checkpoint refused) end within a moment of each other: both may
    end after the launcher's last look at their exit codes. Here both have ended before it looks at all."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_exit_after, args=(0.0, 2)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert launch_module._wait(procs) == (0, 2)


def _fail_on_rank_1(cfg, layout):
    from gatedpo_mega.training.data import make_run_data

    data = make_run_data(cfg, layout)
    if layout.rank == 1:
        real = data.steps

        class Failing:
            num_micro_batches = real.num_micro_batches

            def __init__(self):
                self.calls = 0

            def __next__(self):
                self.calls += 1
                if self.calls == 2:
                    raise UserError("rank 1 cannot read its batch of step 2")
                return next(real)

        data.steps = Failing()
    return data


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_rank_failing_mid_run_is_one_line_and_a_summary(tmp_path, capfd):
    from gatedpo_mega.data import load_preference_data

    cfg = load_config(
        None, [*BASE, f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={tmp_path / 'out'}"]
    )
    load_preference_data(cfg.data, seed=cfg.train.seed)  # tokenized now: the ranks start quickly
    capfd.readouterr()
    assert launch(cfg, 2, make_data=_fail_on_rank_1, quiet=True) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    ours = re.findall(r"gatedpo: [^\r\n]*", err)  # rank 0's progress bar may precede a line
    assert ours[0] == "gatedpo: error: rank 1 cannot read its batch of step 2", err[-3000:]
    assert ours[-1] == "gatedpo: rank 1 failed (exit 2); the other ranks were stopped"
    assert all(line.startswith("gatedpo: rank 0: a peer stopped") for line in ours[1:-1]), ours


def _refuse(cfg, layout):
    raise UserError("this run's data cannot be used")


@pytest.mark.slow
def test_under_a_launcher_a_user_error_is_one_line_and_its_exit_code(tmp_path, capfd, monkeypatch):
    """What torchrun runs on each rank: the error's line and code, no traceback."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for k, v in {**env, "MASTER_PORT": str(launch_module._free_port())}.items():
        monkeypatch.setenv(k, v)
    cfg = load_config(None, [*BASE, f"train.output_dir={tmp_path / 'out'}"])
    capfd.readouterr()
    assert launch(cfg, None, make_data=_refuse) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("gatedpo:")] == [
        "gatedpo: error: this run's data cannot be used"
    ]


def test_an_init_from_name_too_long_for_the_filesystem_is_one_line():
    from gatedpo_mega.training.initial_weights import source_kind

    with pytest.raises(UserError, match=r"^model\.init_from=x{200}: File name too long$"):
        source_kind(Path("x" * 10_000))


def test_a_path_the_system_refuses_is_one_line(capsys, tmp_path):
    from gatedpo_mega.cli import main

    long = "x" * 10_000
    assert main(["data", "inspect", f"data.cache_dir={tmp_path / long}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gatedpo: error: File name too long: ") and err.count("\n") == 1, err[-2000:]
    cfg = load_config(None, BASE)
    assert launch_module._report(1, cfg, PermissionError(13, "Permission denied", "/data/x.jsonl")) == 2
    assert capsys.readouterr().err == "gatedpo: error: rank 1: Permission denied: /data/x.jsonl\n"
