"""Checkpoints that are damaged, or cannot be written: verification against the recorded file list, fallback to the
newest checkpoint that verifies, a full disk, a rank whose write fails. Each ends in one line or a verified
fallback, and the resumed run logs the uninterrupted run's numbers."""

import functools
import json
import os
import re
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from distributed import gatedpo, here, run_distributed

from gatedpo_mega.config import load_config
from gatedpo_mega.training.checkpoint import verify

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

BASE = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=64", "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=3e-3",
    "train.warmup_steps=1", "data.builtin_pairs=120", "data.max_length=64", "data.max_prompt_length=40",
    "parallel.zero_stage=2", "train.save_every=2",
]  # fmt: skip
TIMING = {"tokens_per_second", "real_tokens_per_second", "step_seconds", "memory/peak_mib_max_rank"}
STATES = "deepspeed/state"


def _train(out, cache, *extra, before=None):
    """``gatedpo train`` on 2 processes of the test pool, as a launcher starts them."""
    return gatedpo(
        2, "train", *BASE, f"data.cache_dir={cache}", f"train.output_dir={out}", *extra, before=before
    )


def _errors(stderr: str) -> list[str]:  # the progress bar may precede a line on rank 0's stderr
    return re.findall(r"gatedpo: error: [^\r\n]*", stderr)


def _warnings(stderr: str) -> list[str]:
    return re.findall(r"gatedpo: warning: [^\r\n]*", stderr)


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _step(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache):
    """An uninterrupted 6-step run at data parallel 2, ZeRO 2 (sharded optimizer states), checkpoints 2, 4, 6."""
    out = tmp_path_factory.mktemp("run") / "run"
    r = _train(out, cache, "train.max_steps=6")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _copy(run: Path, tmp_path: Path, keep=(2, 4, 6)) -> Path:
    out = tmp_path / "run"
    dropped = {f"step-{s:08d}" for s in (2, 4, 6) if s not in keep} | {"tensorboard"}
    shutil.copytree(run, out, ignore=lambda _, names: [n for n in names if n in dropped])
    rows = (out / "metrics.jsonl").read_text().splitlines()[: max(keep)]
    (out / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    return out


def _flip_bytes(path: Path) -> None:
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2)
        data = f.read(8)
        f.seek(-len(data), 1)
        f.write(bytes(b ^ 0xFF for b in data))


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 3)


DAMAGE = {
    "truncated optimizer shard": (
        lambda c: _truncate(c / STATES / "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
        "zero_pp_rank_1_mp_rank_00_optim_states.pt is ",
    ),
    "deleted optimizer shard": (
        lambda c: (c / STATES / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink(),
        "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt is missing",
    ),
    "random bytes in the model states": (
        lambda c: _flip_bytes(c / STATES / "mp_rank_00_model_states.pt"),
        "deepspeed/state/mp_rank_00_model_states.pt does not have the checksum it was written with",
    ),
    "truncated trainer state": (
        lambda c: _truncate(c / "trainer" / "rank_00001.pt"),
        "trainer/rank_00001.pt is ",
    ),
    "missing meta.json": (lambda c: (c / "meta.json").unlink(), "meta.json is missing"),
    "garbage meta.json": (
        lambda c: (c / "meta.json").write_bytes(b"\x00{not json"),
        "meta.json is unreadable",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_verify_names_each_kind_of_damage(run, tmp_path, damage):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(_step(run, 4), ckpt)
    assert verify(ckpt) is None
    apply, expected = DAMAGE[damage]
    apply(ckpt)
    problem = verify(ckpt)
    assert problem is not None and expected in problem, problem


def test_checkpoint_verify_command_checks_every_checkpoint_of_a_run(run, tmp_path):
    out = _copy(run, tmp_path)
    ok = here("checkpoint", "verify", str(_step(out, 6)))
    assert ok.returncode == 0 and ok.stdout.startswith(f"ok      {_step(out, 6)} (8 files, "), ok.stdout
    _flip_bytes(_step(out, 6) / STATES / "mp_rank_00_model_states.pt")
    r = here("checkpoint", "verify", str(out))
    assert r.returncode == 2
    lines = r.stdout.splitlines()
    assert lines[0].startswith(
        f"DAMAGED {_step(out, 6)}: deepspeed/state/mp_rank_00_model_states.pt does not"
    )
    assert lines[1].startswith(f"ok      {_step(out, 4)}") and lines[2].startswith(f"ok      {_step(out, 2)}")
    assert lines[3] == f"--resume continues from {_step(out, 4)}"
    missing = here("checkpoint", "verify", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and _errors(missing.stderr)


def test_resume_skips_damaged_checkpoints_and_a_half_written_metrics_line(run, cache, tmp_path):
    out = _copy(run, tmp_path)
    _flip_bytes(_step(out, 6) / STATES / "mp_rank_00_model_states.pt")
    (_step(out, 4) / STATES / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 0.69')  # the run was killed while logging
    r = _train(out, cache, "train.max_steps=6", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _warnings(r.stderr) == [
        f"gatedpo: warning: skipping damaged checkpoint {_step(out, 6)}: deepspeed/state/mp_rank_00_model_states.pt "
        "does not have the checksum it was written with (its content changed) (found by rank 1)",
        f"gatedpo: warning: skipping damaged checkpoint {_step(out, 4)}: "
        "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt is missing (found by rank 0)",
    ]
    assert f"resumed from {_step(out, 2)} (step 2)" in r.stdout
    assert _metrics(out) == _metrics(run)
    for step in (2, 4, 6):  # the damaged ones were written again
        assert verify(_step(out, step)) is None

    # Without the fallback, the damaged checkpoint is refused in one line and nothing is written.
    _flip_bytes(_step(out, 6) / "trainer" / "rank_00000.pt")
    before = (out / "metrics.jsonl").read_text()
    r = _train(out, cache, "train.max_steps=8", "train.resume_fallback=false", "--resume")
    assert r.returncode == 2
    assert _errors(r.stderr) == [
        f"gatedpo: error: checkpoint {_step(out, 6)} is damaged: trainer/rank_00000.pt does not have the checksum "
        "it was written with (its content changed) (found by rank 0) (train.resume_fallback is false: not falling "
        "back to an earlier checkpoint)"
    ], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert (out / "metrics.jsonl").read_text() == before


def _limit_file_size(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG instead of a signal (as on a full disk); returns what undoes it."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    saved = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, saved[1]))

    def undo() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, saved)
        signal.signal(signal.SIGXFSZ, handler)

    return undo


def _assert_not_written(r, out: Path, reason: str) -> None:
    assert r.returncode == 2, r.stderr[-3000:]
    errors = _errors(r.stderr)
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert errors[0].startswith(f"gatedpo: error: checkpoint {_step(out, 4)} not written: rank ")
    assert reason in errors[0] and errors[0].endswith(
        "the partial folder was removed; step-00000002 is untouched"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert verify(_step(out, 2)) is None


def test_a_write_that_fails_removes_the_partial_checkpoint_and_the_run_resumes(run, cache, tmp_path):
    out = _copy(run, tmp_path, keep=(2,))
    # Every file limited to 100 kB: the optimizer shards cannot be written (as on a full disk).
    r = _train(
        out, cache, "train.max_steps=6", "--resume", before=functools.partial(_limit_file_size, 100_000)
    )
    _assert_not_written(r, out, "File too large")
    r = _train(out, cache, "train.max_steps=6", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _metrics(out) == _metrics(run)


def _can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"gatedpo-mount-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True
        )
        if ok.returncode == 0:
            subprocess.run(["umount", str(probe)], check=True)
        return ok.returncode == 0
    finally:
        probe.rmdir()


@pytest.mark.skipif(not _can_mount(), reason="needs root and a mountable tmpfs for a real full disk")
def test_a_full_disk_names_itself_and_the_previous_checkpoint_stays_resumable(run, cache, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k", "tmpfs", str(disk)], check=True)
    try:
        out = _copy(run, disk, keep=(2,))  # ~0.9 MiB: the next checkpoint does not fit
        r = _train(out, cache, "train.max_steps=6", "--resume")
        _assert_not_written(r, out, "No space left on device")
        assert len(_warnings(r.stderr)) == 1 and "will likely not fit" in _warnings(r.stderr)[0]
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        r = _train(out, cache, "train.max_steps=6", "--resume")
        assert r.returncode == 0, r.stderr[-3000:]
        assert _metrics(out) == _metrics(run)
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def _one_rank_cannot_write(rank, world, overrides, out):
    from gatedpo_mega.training.checkpoint import CheckpointError
    from gatedpo_mega.training.data import make_run_data
    from gatedpo_mega.training.loop import train

    undo = _limit_file_size(20_000) if rank == 1 else (lambda: None)
    try:
        train(load_config(None, overrides), make_run_data)
    except CheckpointError as e:
        Path(out, f"rank{rank}.txt").write_text(str(e))
    finally:
        undo()


def test_a_rank_whose_write_fails_leaves_no_checkpoint_and_every_rank_says_so(cache, tmp_path):
    out = tmp_path / "run"
    overrides = [*BASE, f"data.cache_dir={cache}", f"train.output_dir={out}", "train.max_steps=2"]
    run_distributed(_one_rank_cannot_write, 2, overrides, str(tmp_path))
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert said[0] == said[1]
    assert said[0].startswith(f"checkpoint {_step(out, 2)} not written: rank 1: File too large (")
    assert said[0].endswith("the partial folder was removed")
    assert list((out / "checkpoints").iterdir()) == []


def test_conversion_refuses_a_checkpoint_with_a_missing_or_cut_file(run, tmp_path):
    out = _copy(run, tmp_path, keep=(2,))
    _truncate(_step(out, 2) / STATES / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    r = here("convert", "zero-to-hf", "--src", str(_step(out, 2)), "--dst", str(tmp_path / "hf"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert _errors(r.stderr) == [
        f"gatedpo: error: {_step(out, 2)}: damaged checkpoint: deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states"
        f".pt is {(_step(out, 2) / STATES / 'zero_pp_rank_1_mp_rank_00_optim_states.pt').stat().st_size} bytes, "
        f"{(_step(run, 2) / STATES / 'zero_pp_rank_1_mp_rank_00_optim_states.pt').stat().st_size} were written"
    ]
    assert not (tmp_path / "hf").exists()


def test_a_rank_that_cannot_see_a_checkpoint_file_is_a_refusal_not_damage(tmp_path):
    from gatedpo_mega.training.checkpoint import unshared

    path = tmp_path / "step-00000002"
    missing = ("deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt is missing", False)
    assert unshared(path, [(None, True), missing]) == (
        f"checkpoint {path}: rank 1 cannot see a file rank 0 sees (deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_"
        "states.pt is missing): checkpoints must be on a filesystem every rank shares"
    )
    assert unshared(path, [missing, missing]) is None  # missing for everyone: damage, skipped
    assert unshared(path, [(None, True), (None, True)]) is None
    assert unshared(path, [("meta.json is missing", False), (None, True)]) is not None
