"""Interrupted runs: a SIGKILL, a signal to the launcher or to one rank, a signal during a checkpoint write, two runs
on one output folder, and resume at another layout. Each resumed run logs the uninterrupted run's numbers."""

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from distributed import gatedpo, here

from gatedpo_mega.training.checkpoint import verify
from gatedpo_mega.training.preemption import PREEMPTED
from gatedpo_mega.training.run_lock import LOCK_NAME, STALE_S, RunLock, RunLocked

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

BASE = [
    "model.num_layers=4", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=64", "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=3e-3",
    "train.warmup_steps=1", "train.reference_batch_size=8", "data.builtin_pairs=120", "data.max_length=64",
    "data.max_prompt_length=40", "data.eval_fraction=0.2", "train.report_to=none",
]  # fmt: skip
TIMING = {"tokens_per_second", "real_tokens_per_second", "step_seconds", "memory/peak_mib_max_rank"}


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _lines(kind: str, stderr: str) -> list[str]:  # the progress bar may precede a line on rank 0's stderr
    return re.findall(rf"gatedpo: {kind}: [^\r\n]*", stderr)


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def args(cache):
    """TP 2 on 2 processes, 10 steps, a checkpoint every 2 and an evaluation every 3."""
    return ["train", "--nproc", "2", *BASE, f"data.cache_dir={cache}", "parallel.tensor=2", "train.max_steps=10",
            "train.save_every=2", "train.eval_every=3"]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(args, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    full = gatedpo(2, *args, f"train.output_dir={out}")  # the pool runs it as a launcher would
    assert full.returncode == 0, full.stderr[-3000:]
    return _untimed(_rows(out))


def _start(args: list[str], out: Path) -> subprocess.Popen:
    """``gatedpo train --nproc 2`` as a real process (its own launcher), in a session of its own."""
    return subprocess.Popen(
        [sys.executable, "-m", "gatedpo_mega.cli", *args, f"train.output_dir={out}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip


def _wait_for_rows(out: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not log {n} rows (exit {proc.poll()})")


def _holder(out: Path) -> dict:
    """The lock's record, once the run that takes it has written it."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            return dict(json.loads((out / LOCK_NAME).read_text()))
        except (FileNotFoundError, ValueError):
            time.sleep(0.02)
    raise AssertionError(f"no lock in {out}")


def test_sigkill_mid_training_then_resume_takes_over_the_stale_lock(args, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = _start(args, out)
    _wait_for_rows(out, 5, proc)  # mid-run, perhaps mid-checkpoint
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, as a node loss takes it: nothing runs a finally
    proc.communicate()
    killed_at = _rows(out)[-1]["step"]
    assert 4 <= killed_at < 10, "the run was not interrupted mid-training"
    holder = _holder(out)
    assert holder["pid"] == proc.pid and holder["host"] == socket.gethostname()  # left behind, stale

    resumed = gatedpo(2, *args, f"train.output_dir={out}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(
        rf"gatedpo train: taking over the lock of host {re.escape(holder['host'])}, pid {proc.pid}, started "
        r"[0-9-]+ [0-9:]+: its process is not running", resumed.stderr
    ), resumed.stderr[-3000:]  # fmt: skip
    assert "resumed from" in resumed.stdout
    assert not (out / LOCK_NAME).exists()  # given back at the end
    rows = _untimed(_rows(out))
    assert [r["step"] for r in rows] == list(range(0, 11))  # step 0: the evaluation before training
    assert rows == uninterrupted
    assert "eval/loss" in rows[3] and "eval/loss" in rows[-1] and "eval/loss" not in rows[4]
    assert rows[0]["eval/loss"] == pytest.approx(math.log(2.0), abs=1e-6) and "loss" not in rows[0]
    assert _checkpoints(out) == [f"step-{s:08d}" for s in (2, 4, 6, 8, 10)]

    # The same folder without --resume is refused, and so is a model of another shape, another global batch or a
    # layout that cannot be resharded: by the launching process, before any worker starts.
    again = here(*args, f"train.output_dir={out}")
    assert again.returncode == 2
    assert _lines("error", again.stderr) == [
        f"gatedpo: error: {out} already holds checkpoints (latest step-00000010); pass --resume to continue "
        "that run, or choose another train.output_dir"
    ]
    ckpt = f"{out}/checkpoints/step-00000010"
    more = [f"train.output_dir={out}", "--resume", "train.max_steps=12"]
    refusals = {
        "model.ffn_hidden_size=128": f"checkpoint {ckpt} holds a model with model.ffn_hidden_size=64; this run has "
        "model.ffn_hidden_size=128",
        "train.global_batch_size=16": f"checkpoint {ckpt} was trained with train.global_batch_size=8; this run has "
        "16: the resumed run would see other batches (a data-parallel size or micro-batch size may change; the "
        "global batch may not)",
        "parallel.zero_stage=0": f"checkpoint {ckpt} was written at tensor 2, pipeline 1, data 1, zero_stage 1; "
        "this run has tensor 2, pipeline 1, data 1, zero_stage 0: resuming at another layout needs ZeRO stage 1-3 "
        "on both sides (DeepSpeed's partitions are read and written). Resume with the checkpoint's layout",
    }
    for override, line in refusals.items():
        r = here(*args, *more, override)
        assert r.returncode == 2
        assert _lines("error", r.stderr) == [f"gatedpo: error: {line}"], r.stderr[-3000:]
    assert not (out / LOCK_NAME).exists()  # a refused run gives the lock back


def test_sigterm_to_the_launcher_saves_while_a_second_run_on_the_folder_is_refused(
    args, uninterrupted, tmp_path
):
    out = tmp_path / "preempted"
    proc = _start(args, out)
    holder = _holder(out)  # taken before any rank starts
    second = here(*args, f"train.output_dir={out}", "train.seed=7", "objective.beta=0.5")
    assert second.returncode == 2
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
    assert _lines("error", second.stderr) == [
        f"gatedpo: error: {out} is in use by another run (host {socket.gethostname()}, pid {proc.pid}, started "
        f"{started}); wait for it to end, stop it, or choose another train.output_dir (its lock: {out / LOCK_NAME})"
    ]
    _wait_for_rows(out, 4, proc)
    proc.send_signal(signal.SIGTERM)  # to the launcher only: it passes the signal on to its ranks
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == PREEMPTED, stderr[-3000:]
    step = _rows(out)[-1]["step"]
    assert 3 <= step < 10
    saved = out / "checkpoints" / f"step-{step:08d}"
    assert _lines("preempted", stderr) == [
        f"gatedpo: preempted: SIGTERM received: stopped after step {step} of 10, checkpoint {saved} written and "
        "verified; --resume (train.resume=auto) continues the run"
    ]
    assert "failed" not in stderr
    assert verify(saved) is None and not (out / LOCK_NAME).exists()
    assert (
        "seed: 1234" in (out / "config.yaml").read_text()
    )  # the first run's outputs, untouched by the second
    assert [r["step"] for r in _rows(out)] == list(range(step + 1))

    resumed = gatedpo(2, *args, f"train.output_dir={out}", "train.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {saved} (step {step})" in resumed.stdout
    assert _untimed(_rows(out)) == uninterrupted


def _signals_mid_step_and_mid_save():
    """Rank 1 is sent SIGUSR1 during step 5; rank 0 is sent SIGTERM while it writes the checkpoint of step 5."""
    import torch.distributed as dist

    import gatedpo_mega.training.loop as loop
    from gatedpo_mega.training.checkpoint import RecordingSaves

    step, save = loop.train_step, RecordingSaves.save

    def signalled_step(engine, backend, layout, ctx, batches):
        if layout.rank == 1 and ctx.step == 5:
            os.kill(os.getpid(), signal.SIGUSR1)
        return step(engine, backend, layout, ctx, batches)

    def signalled_save(self, state_dict, path):
        if dist.get_rank() == 0 and "step-00000005" in path:
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal, during the save it asked for
        return save(self, state_dict, path)

    loop.train_step, RecordingSaves.save = signalled_step, signalled_save

    def undo():
        loop.train_step, RecordingSaves.save = step, save

    return undo


def test_a_signal_to_one_rank_stops_every_rank_and_one_during_the_save_leaves_it_whole(
    args, uninterrupted, tmp_path
):
    out = tmp_path / "signalled"
    r = gatedpo(2, *args, f"train.output_dir={out}", before=_signals_mid_step_and_mid_save)
    assert r.returncode == PREEMPTED, r.stderr[-3000:]
    saved = out / "checkpoints" / "step-00000005"
    assert _lines("preempted", r.stderr) == [
        f"gatedpo: preempted: SIGUSR1 received: stopped after step 5 of 10, checkpoint {saved} written and "
        "verified; --resume (train.resume=auto) continues the run"
    ]
    assert _checkpoints(out) == ["step-00000002", "step-00000004", "step-00000005"]  # no .tmp-* left
    assert all(verify(out / "checkpoints" / name) is None for name in _checkpoints(out))
    resumed = gatedpo(2, *args, f"train.output_dir={out}", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _untimed(_rows(out)) == uninterrupted


def test_runs_that_start_together_get_the_lock_once(tmp_path):
    start, outcomes = threading.Barrier(8), []

    def attempt():
        lock = RunLock(tmp_path)
        start.wait()
        try:
            lock.acquire()
            outcomes.append(lock)
        except RunLocked as e:
            outcomes.append(str(e))

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [o for o in outcomes if isinstance(o, RunLock)]
    assert len(held) == 1, outcomes
    assert all(f"{tmp_path} is in use by another run" in o for o in outcomes if isinstance(o, str))
    held[0].release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_from_another_host_is_stale_once_its_heartbeat_stops(tmp_path, capsys):
    path = tmp_path / LOCK_NAME
    record = {"host": "node-17", "pid": 4242, "start_time": "99", "since": time.time(), "token": "t"}
    path.write_text(json.dumps(record))
    with pytest.raises(RunLocked, match=r"in use by another run \(host node-17, pid 4242, started "):
        RunLock(tmp_path).acquire()  # a live heartbeat: refused
    old = time.time() - STALE_S - 5
    os.utime(path, (old, old))
    lock = RunLock(tmp_path)
    lock.acquire()
    assert re.search(
        r"taking over the lock of host node-17, pid 4242, started .*: no heartbeat for 12\d s \(more than 120\)",
        capsys.readouterr().err,
    )
    assert json.loads(path.read_text())["token"] == lock.token
    lock.release()
    path.write_text("")  # a holder killed while writing it, long ago
    os.utime(path, (old, old))
    lock = RunLock(tmp_path)
    lock.acquire()
    assert (
        "taking over the lock of an unknown run: its lock file is empty or unreadable"
        in capsys.readouterr().err
    )
    lock.release()


def _resume(world: int, args: list[str], src: Path, dst: Path, *layout: str):
    """Resume ``src``'s step-3 checkpoint (a copy of the folder without step 6) at another layout."""
    shutil.copytree(src, dst, ignore=lambda _, names: [n for n in names if n == "step-00000006"])
    return gatedpo(world, *args, f"train.output_dir={dst}", "--resume", *layout)


def test_resume_at_another_layout_continues_the_uninterrupted_run(cache, tmp_path):
    args = ["train", *BASE, f"data.cache_dir={cache}", "train.max_steps=6", "train.save_every=3"]
    src = tmp_path / "tp2-dp2"
    full = gatedpo(4, *args, f"train.output_dir={src}", "parallel.tensor=2")  # TP 2 x DP 2, ZeRO 1
    assert full.returncode == 0, full.stderr[-3000:]
    expected = _rows(src)
    cases = {  # name: (processes, overrides, what the run says changed)
        "tp1-dp2": (2, ["parallel.tensor=1"], "tensor 2 -> 1"),
        "tp2-dp1": (2, ["parallel.tensor=2"], "data 2 -> 1"),
        "zero2": (4, ["parallel.tensor=2", "parallel.zero_stage=2"], "zero_stage 1 -> 2"),
        "pp2": (2, ["parallel.pipeline=2"], "tensor 2 -> 1, pipeline 1 -> 2, data 2 -> 1"),
        "dp2-zero3": (2, ["parallel.zero_stage=3"], "tensor 2 -> 1, zero_stage 1 -> 3"),
        # ZeRO partitions over data x context: 4 partitions of the resumed run from 2 of the saved one
        "cp2-dp2-zero2": (
            4,
            ["parallel.tensor=1", "parallel.context=2", "parallel.zero_stage=2"],
            "tensor 2 -> 1, context 1 -> 2, zero_stage 1 -> 2",
        ),
        "cp2-zero3": (
            2,
            ["parallel.tensor=1", "parallel.context=2", "parallel.zero_stage=3"],
            "tensor 2 -> 1, context 1 -> 2, data 2 -> 1, zero_stage 1 -> 3",
        ),
    }
    for name, (world, layout, changes) in cases.items():
        r = _resume(world, args, src, tmp_path / name, *layout)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"(step 3) at another layout ({changes}): model and optimizer state resharded" in r.stdout, (
            r.stdout[-2000:]
        )
        rows = _rows(tmp_path / name)
        assert rows[:3] == expected[:3]  # kept as written
        for a, b in zip(expected[3:], rows[3:], strict=True):
            for key in ("loss", "grad_norm", "rewards/margins", "lr"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (name, a["step"], key)

    # bf16 at ZeRO 1 is DeepSpeed's BF16_Optimizer (its own partitions), the usual large-model setting: DP 2 -> TP 2,
    # equal to bf16's rounding (another layout sums in another order; a reshard that dropped Adam's moments moved
    # the loss by 0.4-0.8% relative in these steps, the fp32 cases above by 3e-3 to 5e-3).
    bf16 = [*args, "model.dtype=bf16"]
    src = tmp_path / "bf16-dp2"
    assert gatedpo(2, *bf16, f"train.output_dir={src}").returncode == 0
    expected = _rows(src)
    r = _resume(2, bf16, src, tmp_path / "bf16-tp2", "parallel.tensor=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at another layout (tensor 1 -> 2, data 2 -> 1)" in r.stdout
    for a, b in zip(expected[3:], _rows(tmp_path / "bf16-tp2")[3:], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=5e-4), a["step"]
