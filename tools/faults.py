"""Fault injection: kill runs, damage checkpoints, fill the disk, corrupt data files, try hostile config values and
non-finite training, signal runs, start two runs on one folder, resume at other layouts, and count how each case
ends.

    python tools/faults.py --json faults.json            # every row at its full size
    python tools/faults.py --quick --json faults.json    # scaled down: 1 kill, 1 damage type, 20 data files, ...
    python tools/faults.py --rows signals,two-runs,layouts  # some rows only

Each case is judged from outside, as a user would see it: the exit code, the ``gatedpo: error:`` and
``gatedpo: warning:`` lines on stderr (a traceback anywhere is a failure), ``metrics.jsonl`` against an
uninterrupted reference run (timing keys left out), the checkpoint folders and their verification. The training
rows run ``gatedpo train`` in a session of its own, so that a kill takes every rank at once, as a preemption does.
The data and config rows call, in this process, what the launcher's preflight and ``gatedpo data inspect`` call
(``load_preference_data``, ``load_config``) and compare with what is computed here without the package: records,
bad records and kept pairs, the line of the first bad record.

Outcomes: "one clear line" (a non-zero exit with exactly one ``gatedpo: error:`` line, or a one-line ``UserError``),
"correct" (a verified fallback, an exact resume, data loaded with the right counts, a config accepted whose numbers
are finite), "failure" (a traceback, or a wrong result: metrics that differ, a wrong count, a damaged file used) and
"time limit" (still running when the case's time ran out). Prints a table; the exit code is 1 when any case failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import gzip
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import typing
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout this script belongs to, here and in every subprocess
os.environ.setdefault("DS_ACCELERATOR", "cpu")
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test-2000.jsonl.gz"

# The tiny model and data of tests/test_runs.py; the killed run is its SIGKILL test's run.
TINY = [
    "model.num_layers=4", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=64", "train.micro_batch_size=2", "train.global_batch_size=8", "train.lr=3e-3",
    "train.warmup_steps=1", "train.reference_batch_size=8", "data.builtin_pairs=120", "data.max_length=64",
    "data.max_prompt_length=40", "data.eval_fraction=0.2",
]  # fmt: skip
STEPS = 10
RUN = [*TINY, "parallel.tensor=2", f"train.max_steps={STEPS}", "train.save_every=2", "train.eval_every=3"]
NPROC = 2
TIMING = {"tokens_per_second", "real_tokens_per_second", "step_seconds", "memory/peak_mib_max_rank"}
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

ONE_LINE, CORRECT, FAILURE, LIMIT = "one_line", "correct", "failure", "limit"
COLUMNS = {
    ONE_LINE: "one clear line, exit ≠ 0",
    CORRECT: "verified fallback, exact resume or correct result",
    FAILURE: "traceback or wrong result",
    LIMIT: "still running at the time limit",
}
SEVERITY = {FAILURE: 3, LIMIT: 2, ONE_LINE: 1, CORRECT: 0}


@dataclass(slots=True)
class Case:
    name: str
    outcome: str
    detail: str
    weight: float = 0.0  # among cases of one outcome, the larger is the worse (the row's worst case)
    stderr_tail: str = ""


@dataclass(slots=True)
class Row:
    key: str
    title: str
    cases: list[Case] = field(default_factory=list)
    seconds: float = 0.0
    not_run: str | None = None

    def counts(self) -> dict[str, int]:
        return {o: sum(c.outcome == o for c in self.cases) for o in COLUMNS}

    def worst(self) -> Case | None:
        return max(self.cases, key=lambda c: (SEVERITY[c.outcome], c.weight), default=None)

    def to_json(self) -> dict[str, Any]:
        worst = self.worst()
        return {
            "key": self.key, "title": self.title, "cases": len(self.cases), "counts": self.counts(),
            "not_run": self.not_run, "seconds": round(self.seconds, 1),
            "worst": asdict(worst) if worst else None,
            "failures": [asdict(c) for c in self.cases if c.outcome == FAILURE],
            "all": [asdict(c) for c in self.cases],
        }  # fmt: skip


@dataclass(slots=True)
class Work:
    root: Path
    seed: int
    cache: Path
    reference: Path | None = None
    ref_rows: list[dict[str, Any]] | None = None
    ref_seconds: float = 0.0
    ref_training: float = 0.0  # from its first metrics row to its end


# ---------------------------------------------------------------------------------------------------------------
# Running gatedpo and reading what it left


@dataclass(slots=True)
class Result:
    rc: int | None  # None: stopped at the time limit
    stdout: str
    stderr: str
    seconds: float
    killed: bool = False  # stopped by the case's ``until``


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


# Starts a command with resource limits set in its own process, then execs it (SIGXFSZ ignored, which exec keeps: a
# write past RLIMIT_FSIZE fails with EFBIG instead of killing the process). Not a preexec_fn: the rows run side by
# side in threads, and a fork that runs Python code in a threaded process can deadlock.
_LIMITED = (
    "import os, resource, signal, sys\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "for spec in sys.argv[1].split(','):\n"
    "    name, value = spec.split('=')\n"
    "    resource.setrlimit(getattr(resource, name), (int(value), int(value)))\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def gatedpo(
    args: list[str],
    *,
    cwd: Path | None = None,
    limits: dict[str, int] | None = None,
    until: Callable[[float], bool] | None = None,
    poke: Callable[[float, subprocess.Popen[bytes]], None] | None = None,
    timeout: float = 900.0,
) -> Result:
    """``gatedpo ARGS`` in a new session, under ``limits`` (``{"RLIMIT_FSIZE": bytes, ...}``); with ``until(seconds
    since start)``, the whole process group is killed with SIGKILL as soon as it returns true; ``poke(seconds,
    process)`` is called while it runs (to signal it)."""
    cmd = [sys.executable, "-m", "gatedpo_mega.cli", *args]
    if limits:
        cmd = [sys.executable, "-c", _LIMITED, ",".join(f"{k}={v}" for k, v in limits.items()), *cmd]
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=err, cwd=cwd, env=_env(), start_new_session=True,
        )  # fmt: skip
        killed = timed_out = False
        while proc.poll() is None:
            elapsed = time.monotonic() - start
            if poke is not None:
                poke(elapsed, proc)
            if until is not None and until(elapsed):
                killed = True
            elif elapsed > timeout:
                timed_out = True
            if killed or timed_out:
                _kill_group(proc)
                break
            time.sleep(0.002 if until is not None or poke is not None else 0.05)
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        return Result(
            None if timed_out else proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            seconds,
            killed,
        )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL to every process of the group, then wait until none of them runs."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _group_alive(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def errors(stderr: str) -> list[str]:  # a progress bar may precede a line on the same terminal line
    return re.findall(r"gatedpo: error: [^\r\n]*", stderr)


def warnings(stderr: str) -> list[str]:
    return re.findall(r"gatedpo: warning: [^\r\n]*", stderr)


def has_traceback(stderr: str) -> bool:
    return "Traceback (most recent call last)" in stderr


def clear_refusal(r: Result) -> bool:
    return r.rc not in (0, None) and len(errors(r.stderr)) == 1 and not has_traceback(r.stderr)


def tail(text: str, lines: int = 12) -> str:
    """The last lines of stderr without the libraries' warnings and the progress bar's redraws, each cut to 300
    characters."""
    keep = [
        line.rstrip()[:300] for line in re.split(r"[\r\n]", text)
        if line.strip() and "warn" not in line.lower() and not line.startswith("gate-dpo:")
    ]  # fmt: skip
    return "\n".join(keep[-lines:])[-3000:]


def exception_line(text: str) -> str:
    """The last ``SomeError: ...`` line of a traceback (else the last line), cut to 200 characters."""
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    found = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b", line)]
    return (found or lines or [""])[-1][:200]


def last_line(text: str) -> str:
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    return lines[-1] if lines else ""


def metrics(out: Path) -> list[dict[str, Any]] | None:
    """The rows of ``metrics.jsonl`` without the timing keys (None: missing or not JSON lines)."""
    try:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return None
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def metrics_problem(work: Work, out: Path) -> str | None:
    rows, ref = metrics(out), work.ref_rows
    assert ref is not None
    if rows is None:
        return "metrics.jsonl is missing or not JSON lines"
    for a, b in zip(ref, rows, strict=False):
        if a != b:
            keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            return f"metrics differ from the reference at step {a.get('step')} ({', '.join(keys[:4])})"
    if len(rows) != len(ref):
        return f"metrics.jsonl has {len(rows)} rows, the reference {len(ref)}"
    return None


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def checkpoints_problem(out: Path, extra: int | None = None) -> str | None:
    """Every checkpoint of the finished run is there (and one of step ``extra``, saved on a signal), verifies, and
    no partial folder is left."""
    from gatedpo_mega.training.checkpoint import verify

    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    expected = sorted(
        {f"step-{s:08d}" for s in range(2, STEPS + 1, 2)} | ({f"step-{extra:08d}"} if extra else set())
    )
    if names != expected:
        return f"checkpoints/ holds {', '.join(names)}; expected {', '.join(expected)}"
    for name in names:
        problem = verify(out / "checkpoints" / name)
        if problem is not None:
            return f"{name} does not verify: {problem}"
    return None


def resumed_from(stdout: str) -> int | None:
    m = re.search(r"resumed from \S+ \(step (\d+)\)", stdout)
    return int(m.group(1)) if m else None


def train_args(work: Work, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--nproc",
        str(NPROC),
        *RUN,
        f"data.cache_dir={work.cache}",
        f"train.output_dir={out}",
        *extra,
    ]


def reference(work: Work) -> None:
    """The uninterrupted run, its data tokenized beforehand (the kills' delays are drawn from its time)."""
    from gatedpo_mega.config import load_config
    from gatedpo_mega.data import load_preference_data

    cfg = load_config(None, [*RUN, f"data.cache_dir={work.cache}"])
    load_preference_data(cfg.data, seed=cfg.train.seed)
    out = work.root / "reference"
    first_row = _first_row_watch(out)
    r = gatedpo(train_args(work, out), until=lambda t: first_row(t) and False)
    if r.rc != 0:
        raise SystemExit(f"faults: the reference run failed (exit {r.rc}):\n{tail(r.stderr)}")
    work.reference, work.ref_rows, work.ref_seconds = out, metrics(out), r.seconds
    work.ref_training = r.seconds - first_row(r.seconds)
    assert work.ref_rows is not None and [row["step"] for row in work.ref_rows] == list(range(STEPS + 1))


def copy_run(work: Work, dest: Path, *, upto: int = STEPS) -> Path:
    """The reference run's folder as a run killed after step ``upto``'s checkpoint would have left it."""
    assert work.reference is not None
    later = {f"step-{s:08d}" for s in range(upto + 1, STEPS + 1)}
    shutil.copytree(
        work.reference, dest, ignore=lambda _, names: [n for n in names if n in later or n == "tensorboard"]
    )
    rows = (dest / "metrics.jsonl").read_text().splitlines()[: upto + 1]
    (dest / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    return dest


# ---------------------------------------------------------------------------------------------------------------
# 1. Kills


def _rows_written(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_bytes().count(b"\n")
    except OSError:
        return 0


def _first_row_watch(out: Path) -> Callable[[float], float]:
    """Called with the seconds since launch: when ``metrics.jsonl`` first held a row (infinity: not yet)."""
    seen: list[float] = []

    def first_row(t: float) -> float:
        if not seen and _rows_written(out):
            seen.append(t)
        return seen[0] if seen else math.inf

    return first_row


def _kill_trigger(mode: str, rng: random.Random, out: Path, training: float) -> tuple[str, Any]:
    if mode == "delay":
        at, first_row = rng.uniform(0.0, training), _first_row_watch(out)
        return f"{at:.2f} s after the first metrics row", lambda t: t >= first_row(t) + at
    if mode == "rows":
        n = rng.randint(2, STEPS)
        return f"after {n} metrics rows", lambda t: _rows_written(out) >= n
    step, extra = 2 * rng.randint(1, STEPS // 2), rng.uniform(0.0, 0.02)
    tmp = out / "checkpoints" / f".tmp-step-{step:08d}"
    seen: list[float] = []

    def during_write(t: float) -> bool:
        if not seen and tmp.exists():
            seen.append(t)
        return bool(seen) and t >= seen[0] + extra

    return f"{extra * 1000:.0f} ms into writing step-{step:08d}", during_write


def kills(work: Work, count: int) -> Row:
    row = Row(
        "kills", f"SIGKILL of a {NPROC}-process run (tensor 2) at a random moment, then train.resume=auto"
    )
    rng = random.Random(f"{work.seed}-kills")
    for i in range(count):
        mode = ("write", "rows", "delay")[i % 3]
        out = work.root / f"kill-{i:02d}"
        moment, until = _kill_trigger(mode, rng, out, work.ref_training)
        killed = gatedpo(train_args(work, out), until=until)
        root = out / "checkpoints"
        left = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        complete = [n for n in left if n.startswith("step-")]
        partial = [n for n in left if n.startswith(".tmp")]
        rows = max(_rows_written(out) - 1, -1)  # the last step logged (row 0 is step 0)
        state = (
            f"killed {moment}: {rows + 1} rows, last checkpoint {complete[-1] if complete else 'none'}"
            + (f", {partial[0]} left" if partial else "")
        )
        if not killed.killed:
            state = f"the run ended (exit {killed.rc}) before the kill ({moment})"
        name = f"kill {i + 1}"
        r = gatedpo(
            train_args(work, out, "train.resume=auto")
        )  # as a restarted job (a kill before the first checkpoint: step 0)
        if r.rc == 0 and not has_traceback(r.stderr):
            problem = metrics_problem(work, out) or checkpoints_problem(out)
            start = resumed_from(r.stdout) or 0
            if problem is None:
                weight = max(rows - start, 0) + (10 if partial else 0)
                detail = f"{state}; resumed from step {start}, metrics equal"
                row.cases.append(Case(name, CORRECT, detail, weight))
                continue
            row.cases.append(Case(name, FAILURE, f"{state}; resume: {problem}", 0, tail(r.stderr)))
        elif clear_refusal(r):
            row.cases.append(Case(name, ONE_LINE, f"{state}; resume refused: {errors(r.stderr)[0]}"))
        else:
            detail = f"{state}; resume exit {r.rc}: {exception_line(r.stderr)}"
            row.cases.append(Case(name, FAILURE, detail, 0, tail(r.stderr)))
    return row


# ---------------------------------------------------------------------------------------------------------------
# 2. Damaged checkpoints


def _pick(folder: Path, pattern: str, rng: random.Random) -> Path:
    return rng.choice(sorted(folder.glob(pattern)))


def _truncate(path: Path, rng: random.Random) -> str:
    size = path.stat().st_size
    keep = int(size * rng.uniform(0.05, 0.95))
    with path.open("r+b") as f:
        f.truncate(keep)
    return f"{path.name} cut to {keep} of {size} bytes"


def _scramble(path: Path, rng: random.Random) -> str:
    """Bytes changed in place at a random offset: the same size, another content."""
    data = bytearray(path.read_bytes())
    n = rng.randint(1, 64)
    at = rng.randrange(len(data) - n)
    for j in range(at, at + n):
        data[j] ^= rng.randint(1, 255)
    path.write_bytes(bytes(data))
    return f"{n} bytes changed at offset {at} of {path.name}"


def _unlink(path: Path) -> str:
    path.unlink()
    return f"{path.name} deleted"


def _garbage(path: Path, rng: random.Random) -> str:
    n = rng.randint(1, 4096)
    path.write_bytes(rng.randbytes(n))
    return f"{path.name} replaced by {n} random bytes"


def _half_line(run: Path, rng: random.Random) -> str:
    """A run killed while logging the step after its last checkpoint: step 8's checkpoint, then part of a row."""
    assert STEPS >= 9
    shutil.rmtree(step_dir(run, STEPS))
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    cut = rng.randint(1, len(lines[9]) - 2)
    (run / "metrics.jsonl").write_text("".join(lines[:9]) + lines[9][:cut])
    return f"last checkpoint step-{8:08d}, then {cut} of the {len(lines[9])} characters of step 9's row"


STATES = "deepspeed/state"
DAMAGE: dict[str, Callable[[Path, Path, random.Random], str]] = {  # (run folder, its latest checkpoint, rng)
    "truncated optimizer shard": lambda run, c, rng: _truncate(_pick(c / STATES, "*optim_states.pt", rng), rng),
    "random bytes in model states": lambda run, c, rng: _scramble(_pick(c / STATES, "*model_states.pt", rng), rng),
    "truncated trainer state": lambda run, c, rng: _truncate(_pick(c / "trainer", "rank_*.pt", rng), rng),
    "deleted optimizer shard": lambda run, c, rng: _unlink(_pick(c / STATES, "*optim_states.pt", rng)),
    "deleted meta.json": lambda run, c, rng: _unlink(c / "meta.json"),
    "garbage meta.json": lambda run, c, rng: _garbage(c / "meta.json", rng),
    "half-written last metrics.jsonl line": lambda run, c, rng: _half_line(run, rng),
}  # fmt: skip
METRICS_LINE = "half-written last metrics.jsonl line"


def damaged(work: Work, types: list[str]) -> tuple[Row, Row]:
    fallback = Row("damage", "damaged latest checkpoint, --resume (falls back to the newest that verifies)")
    strict = Row("damage_strict", "the same damage, --resume with train.resume_fallback=false")
    rng = random.Random(f"{work.seed}-damage")
    for damage in types:
        for row, extra in ((fallback, []), (strict, ["train.resume_fallback=false"])):
            out = copy_run(work, work.root / f"damage-{len(fallback.cases) + len(strict.cases):02d}")
            latest = step_dir(out, STEPS)
            what = DAMAGE[damage](out, latest, rng)
            before = (out / "metrics.jsonl").read_bytes()
            r = gatedpo(train_args(work, out, "--resume", *extra))
            name = f"{damage} ({what})"
            if damage == METRICS_LINE or not extra:
                row.cases.append(_judge_fallback(work, out, r, name, damage == METRICS_LINE))
            else:
                row.cases.append(_judge_refusal(out, r, name, latest, before))
    return fallback, strict


def _judge_fallback(work: Work, out: Path, r: Result, name: str, metrics_only: bool) -> Case:
    if r.rc != 0 or has_traceback(r.stderr):
        if clear_refusal(r):
            return Case(name, ONE_LINE, f"refused: {errors(r.stderr)[0]}")
        return Case(name, FAILURE, f"exit {r.rc}: {exception_line(r.stderr)}", 0, tail(r.stderr))
    said = warnings(r.stderr)
    skipped = [
        w
        for w in said
        if w.startswith(f"gatedpo: warning: skipping damaged checkpoint {step_dir(out, STEPS)}")
    ]
    problem = metrics_problem(work, out) or checkpoints_problem(out)
    if metrics_only and said:
        problem = problem or f"unexpected warnings: {said}"
    elif not metrics_only and (len(said) != 1 or len(skipped) != 1):
        problem = problem or f"expected one skip warning, got {said}"
    if resumed_from(r.stdout) != 8:
        problem = problem or f"resumed from step {resumed_from(r.stdout)}, expected 8"
    if problem:
        return Case(name, FAILURE, problem, 0, tail(r.stderr))
    detail = f"{skipped[0][len('gatedpo: warning: ') :]}; " if skipped else ""
    return Case(name, CORRECT, f"{detail}resumed from step 8, metrics equal", 0 if metrics_only else 1)


def _judge_refusal(out: Path, r: Result, name: str, latest: Path, before: bytes) -> Case:
    said = errors(r.stderr)
    expected = f"gatedpo: error: checkpoint {latest} is damaged: "
    if r.rc == 2 and len(said) == 1 and said[0].startswith(expected) and not has_traceback(r.stderr):
        if (out / "metrics.jsonl").read_bytes() != before:
            return Case(name, FAILURE, "refused, but metrics.jsonl was changed", 0, tail(r.stderr))
        return Case(name, ONE_LINE, said[0])
    what = (
        "resumed although train.resume_fallback=false"
        if r.rc == 0
        else f"exit {r.rc}, {len(said)} error lines: {exception_line(r.stderr)}"
    )
    return Case(name, FAILURE, what, 0, tail(r.stderr))


# ---------------------------------------------------------------------------------------------------------------
# 3. A full disk


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _judge_disk(
    work: Work, out: Path, r: Result, name: str, reason: str, resume: Callable[[], Result]
) -> Case:
    from gatedpo_mega.training.checkpoint import verify

    said = errors(r.stderr)
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    problem = None
    if r.rc != 2 or len(said) != 1 or has_traceback(r.stderr):
        problem = f"exit {r.rc}, {len(said)} error lines: {exception_line(r.stderr)}"
    elif reason not in said[0] or " not written: rank " not in said[0]:
        problem = f"the error line does not say '{reason}': {said[0]}"
    elif left != ["step-00000002"]:
        problem = f"checkpoints/ holds {left} after the failed write"
    elif verify(step_dir(out, 2)) is not None:
        problem = f"step-00000002 no longer verifies: {verify(step_dir(out, 2))}"
    if problem:
        return Case(name, FAILURE, problem, 0, tail(r.stderr))
    again = resume()
    problem = (
        f"the resume without the limit: exit {again.rc}"
        if again.rc != 0 or has_traceback(again.stderr)
        else metrics_problem(work, out) or checkpoints_problem(out)
    )
    if problem:
        return Case(name, FAILURE, f"{said[0]}; then {problem}", 0, tail(again.stderr))
    return Case(name, ONE_LINE, f"{said[0]}; resumed without the limit: metrics equal")


def file_size_limits(work: Work, limits: list[int]) -> Row:
    row = Row("fsize", "no room for a checkpoint: RLIMIT_FSIZE (a file cannot grow past the limit)")
    for i, limit in enumerate(limits):
        out = copy_run(work, work.root / f"fsize-{i}", upto=2)
        r = gatedpo(train_args(work, out, "--resume"), limits={"RLIMIT_FSIZE": limit})
        name = f"files limited to {limit} bytes"
        row.cases.append(
            _judge_disk(
                work, out, r, name, "File too large", lambda o=out: gatedpo(train_args(work, o, "--resume"))
            )
        )
    return row


def _mount(folder: Path, size_kib: int, *, remount: bool = False) -> subprocess.CompletedProcess[str]:
    opts = f"{'remount,' if remount else ''}size={size_kib}k"
    return subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True, text=True
    )


def full_tmpfs(work: Work, free_kib: list[int]) -> Row:
    row = Row("tmpfs", "a full disk: the run folder on a small tmpfs")
    if os.geteuid() != 0 or shutil.which("mount") is None:
        row.not_run = "not run: needs root (mount -t tmpfs)"
        return row
    probe = work.root / "mount-probe"
    probe.mkdir()
    tried = _mount(probe, 1024)
    if tried.returncode != 0:
        row.not_run = f"not run: mount -t tmpfs failed ({last_line(tried.stderr)})"
        return row
    subprocess.run(["umount", str(probe)], check=True)
    for i, free in enumerate(free_kib):
        disk = work.root / f"tmpfs-{i}"
        staged = copy_run(work, work.root / f"tmpfs-stage-{i}", upto=2)
        size = _folder_size(staged) // 1024 + free
        disk.mkdir()
        _mount(disk, size).check_returncode()
        try:
            out = disk / "run"
            shutil.copytree(staged, out)
            r = gatedpo(train_args(work, out, "--resume"))

            def resume(out: Path = out, disk: Path = disk) -> Result:
                _mount(disk, 64 * 1024, remount=True).check_returncode()
                return gatedpo(train_args(work, out, "--resume"))

            name = f"tmpfs of {size} KiB, about {free} KiB free"
            row.cases.append(_judge_disk(work, out, r, name, "No space left on device", resume))
        finally:
            subprocess.run(["umount", str(disk)], capture_output=True)
    return row


# ---------------------------------------------------------------------------------------------------------------
# 4. Corrupted data files

BASE_RECORDS = 40
HH_TURN = "\n\nAssistant:"


def base_lines(hh: Path) -> tuple[list[bytes], str]:
    """The first records of the HH-RLHF sample as they are in the file, or records of the built-in dataset in the
    same layout (two transcripts) where the sample is absent."""
    if hh.is_file():
        with gzip.open(hh, "rb") as f:
            lines = f.read().split(b"\n")[:BASE_RECORDS]
        return lines, f"the first {BASE_RECORDS} records of {hh.name}"
    from gatedpo_mega.data import builtin

    records = [
        {"chosen": e.prompt + e.chosen, "rejected": e.prompt + e.rejected}
        for e in builtin.generate(BASE_RECORDS, 0)
    ]
    return [json.dumps(r).encode() for r in records], f"{BASE_RECORDS} built-in pairs written as HH records"


def _join(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def _flip_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    b = bytearray(data)
    at = sorted(rng.randrange(len(b)) for _ in range(rng.randint(1, 3)))
    for j in at:
        b[j] ^= rng.randint(1, 255)
    return bytes(b), f"bytes flipped at {', '.join(map(str, at))}"


def _cut(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    at = rng.randrange(len(data))
    return data[:at], f"cut to {at} of {len(data)} bytes"


def _in_lines(lines: list[bytes], rng: random.Random, edit: Callable[[bytes], bytes | None]) -> list[int]:
    """``edit`` applied to 1 to 3 random lines (None: that line has no place for it); the lines changed."""
    changed = []
    for i in rng.sample(range(len(lines)), rng.randint(1, 3)):
        new = edit(lines[i])
        if new is not None:
            lines[i] = new
            changed.append(i + 1)
    return sorted(changed)


def _lone_surrogate(lines: list[bytes], rng: random.Random) -> str:
    def edit(line: bytes) -> bytes | None:
        spots = [m.end() - 1 for m in re.finditer(rb"[A-Za-z] [A-Za-z]", line)]  # inside a string: text
        if not spots:
            return None
        at = rng.choice(spots)
        return line[:at] + b"\\u%04x" % rng.randint(0xD800, 0xDFFF) + line[at:]

    return f"lone surrogate escapes in lines {_in_lines(lines, rng, edit)}"


BAD_UTF8 = (b"\xff", b"\xfe", b"\x80", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82")


def _invalid_utf8(lines: list[bytes], rng: random.Random) -> str:
    def edit(line: bytes) -> bytes:
        at = rng.randrange(len(line) + 1)
        return line[:at] + rng.choice(BAD_UTF8) + line[at:]

    return f"invalid UTF-8 in lines {_in_lines(lines, rng, edit)}"


def _delete_syntax(lines: list[bytes], rng: random.Random) -> str:
    def edit(line: bytes) -> bytes | None:
        spots = [i for i, c in enumerate(line) if c in b'"{}']
        if not spots:
            return None
        at = rng.choice(spots)
        return line[:at] + line[at + 1 :]

    return f"a quote or brace deleted in lines {_in_lines(lines, rng, edit)}"


def _line_breaks(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    spots = sorted(
        0 if rng.random() < 0.3 else rng.randrange(len(data) + 1) for _ in range(rng.randint(1, 3))
    )
    for at in reversed(spots):
        data = data[:at] + rng.choice((b"\n", b"\r\n", b"\n\n", b"  \n")) + data[at:]
    return data, f"line breaks inserted at {', '.join(map(str, spots))}"


def _missing_field(lines: list[bytes], rng: random.Random) -> str:
    def edit(line: bytes) -> bytes:
        key = rng.choice((b'"chosen":', b'"rejected":'))
        return line.replace(key, key[:-3] + b'X":', 1)

    return f"a field renamed in lines {_in_lines(lines, rng, edit)}"


WRONG = (5, None, True, 1.5, ["x"], {"role": "user"}, [{"role": "assistant", "content": "hi"}])


def _wrong_type(lines: list[bytes], rng: random.Random) -> str:
    def edit(line: bytes) -> bytes | None:
        try:
            rec = json.loads(line)
        except ValueError:
            return None
        rec[rng.choice(("chosen", "rejected"))] = rng.choice(WRONG)
        return json.dumps(rec).encode()

    return f"a field of another type in lines {_in_lines(lines, rng, edit)}"


def _hostile_json(lines: list[bytes], rng: random.Random) -> str:
    payloads = (b"1" * 5000, b"[" * 100_000 + b"]" * 100_000, b"NaN", b"-Infinity", b"1e999")

    def edit(line: bytes) -> bytes | None:
        if not line.startswith(b"{"):
            return None
        return b'{"extra": ' + rng.choice(payloads) + b", " + line[1:]

    return f"an extra field (5000-digit number, deep nesting or NaN) in lines {_in_lines(lines, rng, edit)}"


RECORD_DAMAGE: dict[str, Callable[[list[bytes], random.Random], str]] = {
    "lone surrogates": _lone_surrogate,
    "invalid UTF-8": _invalid_utf8,
    "deleted quotes or braces": _delete_syntax,
    "missing fields": _missing_field,
    "wrong types": _wrong_type,
    "hostile JSON": _hostile_json,
}


def make_variant(kind: str, lines: list[bytes], rng: random.Random) -> tuple[bytes, bool, str]:
    """(file bytes, gzip?, what was done)."""
    inner = rng.choice(list(RECORD_DAMAGE)) if kind == "gzip of damaged records" else kind
    if inner in RECORD_DAMAGE:
        out = list(lines)
        what = RECORD_DAMAGE[inner](out, rng)
        return (
            (gzip.compress(_join(out), mtime=0), True, what) if inner != kind else (_join(out), False, what)
        )
    whole: dict[str, Callable[[bytes, random.Random], tuple[bytes, str]]] = {
        "byte flips": _flip_bytes, "truncation": _cut, "line breaks": _line_breaks,
        "gzip, byte flips": _flip_bytes, "gzip, truncation": _cut,
    }  # fmt: skip
    gz = kind.startswith("gzip")
    data = gzip.compress(_join(lines), mtime=0) if gz else _join(lines)
    damaged, what = whole[kind](data, rng)
    return damaged, gz, what


DATA_KINDS = [
    "byte flips", "truncation", "lone surrogates", "invalid UTF-8", "deleted quotes or braces", "line breaks",
    "missing fields", "wrong types", "hostile JSON", "gzip, byte flips", "gzip, truncation",
    "gzip of damaged records",
]  # fmt: skip


@dataclass(slots=True)
class Expect:
    """What the loader must do with a file, computed here without the package."""

    refused: bool  # a damaged gzip stream: refused in both modes
    records: int = 0  # non-blank lines
    bad: int = 0  # lines that are not a usable record (not UTF-8, not JSON, a field missing or wrong)
    first_bad: int | None = None  # its line number (1-based, every line counted)
    kept: int = 0  # records that make a pair (bad ones, differing prompts and empty responses left out)


def expect(data: bytes, gz: bool) -> Expect:
    if gz:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error):
            return Expect(refused=True)
    e = Expect(refused=False)
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        e.records += 1
        verdict = _record(line)
        if verdict == "bad":
            e.bad += 1
            e.first_bad = e.first_bad or number
        elif verdict == "pair":
            e.kept += 1
    return e


def _record(line: bytes) -> str:
    """'bad', 'dropped' (differing prompts, an empty response) or 'pair'."""
    try:
        rec = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return "bad"
    if not isinstance(rec, dict) or "chosen" not in rec or "rejected" not in rec:
        return "bad"
    texts = [rec["chosen"], rec["rejected"]]
    if not all(isinstance(t, str) for t in texts) or rec.get("prompt") is not None:
        return "bad"  # (no variant has a prompt field; a list is a chat record, none of which is well formed here)
    try:
        for t in texts:
            t.encode("utf-8")
    except UnicodeEncodeError:
        return "bad"
    cuts = [t.rfind(HH_TURN) for t in texts]
    if min(cuts) < 0:
        return "bad"
    (p1, r1), (p2, r2) = (
        (t[: c + len(HH_TURN)], t[c + len(HH_TURN) :]) for t, c in zip(texts, cuts, strict=True)
    )
    return "pair" if p1 == p2 and r1.strip() and r2.strip() else "dropped"


BAD_REASONS_NOT = {"prompt_mismatch", "empty_response", "no_response_token"}  # drops of well-formed records


def corrupted_data(work: Work, count: int, hh: Path) -> tuple[Row, Row]:
    from gatedpo_mega.data import DataConfig, load_preference_data
    from gatedpo_mega.errors import UserError

    lines, source = base_lines(hh)
    rows = {
        mode: Row(f"data_{mode}", f"corrupted data file ({source}), data.on_bad_record={mode}")
        for mode in ("error", "skip")
    }
    rng = random.Random(f"{work.seed}-data")
    folder = work.root / "data"
    folder.mkdir()
    for i in range(count):
        kind = DATA_KINDS[i % len(DATA_KINDS)]
        data, gz, what = make_variant(kind, lines, rng)
        path = folder / f"v{i:03d}.jsonl{'.gz' if gz else ''}"
        path.write_bytes(data)
        e = expect(data, gz)
        for mode, row in rows.items():
            name = f"{path.name} ({kind}: {what})"
            cfg = DataConfig(
                source=str(path), cache_dir=str(work.cache), eval_fraction=0.0, on_bad_record=mode
            )
            try:
                loaded = load_preference_data(cfg, seed=0)
            except UserError as err:
                row.cases.append(_judge_data_refusal(name, str(err), path, mode, e))
                continue
            except Exception as err:
                detail = f"{type(err).__name__}: {str(err)[:200]}"
                row.cases.append(Case(name, FAILURE, detail, 0, traceback.format_exc()[-3000:]))
                continue
            row.cases.append(_judge_data_loaded(name, loaded, mode, e))
    return rows["error"], rows["skip"]


def _judge_data_refusal(name: str, message: str, path: Path, mode: str, e: Expect) -> Case:
    problem = None
    if "\n" in message or str(path) not in message:
        problem = "the refusal is not one line naming the file"
    elif e.refused:
        pass  # a damaged gzip stream
    elif mode == "error" and e.bad:
        if not message.startswith(f"{path} line {e.first_bad}: "):
            problem = f"the first bad record is line {e.first_bad}"
    elif "no usable training pairs" not in message:
        problem = "refused, but the file can be used" + (" (skipping its bad records)" if e.bad else "")
    elif e.kept:
        problem = f"'no usable training pairs', but {e.kept} records make pairs"
    if problem:
        return Case(name, FAILURE, f"{problem}: {message[:300]}", 0, message[:3000])
    return Case(name, ONE_LINE, message[:300], 1 if e.refused else 0)


def _judge_data_loaded(name: str, loaded: Any, mode: str, e: Expect) -> Case:
    r = loaded.report
    bad = sum(n for reason, n in r.dropped.items() if reason not in BAD_REASONS_NOT)
    problem = None
    if e.refused:
        problem = "a damaged gzip file was used"
    elif mode == "error" and e.bad:
        problem = f"loaded with on_bad_record=error although line {e.first_bad} is bad"
    elif r.kept + r.total_dropped != r.records or len(loaded.train) != r.kept:
        problem = f"counts do not add up (records {r.records}, kept {r.kept}, dropped {r.dropped})"
    elif (r.records, bad, r.kept) != (e.records, e.bad, e.kept):
        problem = (
            f"records {r.records}, bad {bad}, kept {r.kept}; the file has {e.records} records, {e.bad} bad, "
            f"{e.kept} that make pairs"
        )
    if problem:
        return Case(name, FAILURE, problem, 0, r.format()[-3000:])
    return Case(name, CORRECT, f"loaded: {r.records} records, {r.kept} kept, {bad} bad skipped", bad)


# ---------------------------------------------------------------------------------------------------------------
# 5. Hostile config values

# Override texts, parsed as YAML the way the command line parses them (those of tests/test_config_fuzz.py).
HOSTILE = (
    ".nan", ".inf", "-.inf", "nan", "1e999", "-1e999", "1" + "0" * 400, "1" + "0" * 5000,
    "0", "-1", "0.0", "-0.0", "1e-320", "1e308", str(2**31), str(2**32), str(2**63 - 1), str(2**63), str(-(2**63) - 1),
    "''", "[]", "[.nan]", "[1, 2, 3]", "{}", "{a: 1}", "true", "null", "2001-12-14", '"a\\nb"', "x" * 10_000,
)  # fmt: skip
TEXT = "abcxyz019 _-.:,'\"[]{}#&*!|>%@`\t\\éß中🙂\u200b\ud800"
TRAIN_LIMIT_S = 120.0
MEMORY_LIMIT = (
    8 << 30
)  # address space of a run from the config sample: a model too big fails, the host is spared


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            keys += leaf_keys(tp, f"{key}.")
        else:
            keys.append(key)
    return keys


def hostile_value(rng: random.Random) -> str:
    draw = rng.random()
    if draw < 0.5:
        return rng.choice(HOSTILE)
    if draw < 0.7:
        x = rng.choice(
            (rng.uniform(-1e6, 1e6), 10 ** rng.uniform(-320, 308), -(10 ** rng.uniform(-320, 308)))
        )
        return {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}.get(repr(x), repr(x))
    if draw < 0.85:
        return str(rng.randint(-(2**70), 2**70))
    return "".join(rng.choice(TEXT) for _ in range(rng.randint(0, 40)))


def _numbers(tree: Any) -> list[Any]:
    if dataclasses.is_dataclass(tree):
        return [n for f in dataclasses.fields(tree) for n in _numbers(getattr(tree, f.name))]
    if isinstance(tree, list):
        return [n for item in tree for n in _numbers(item)]
    return [tree] if isinstance(tree, int | float) and not isinstance(tree, bool) else []


def config_fuzz(work: Work, count: int, trained: int) -> tuple[Row, Row]:
    from gatedpo_mega.config import Config, dump_config, load_config
    from gatedpo_mega.errors import UserError

    keys = leaf_keys(Config)
    loaded = Row(
        "config", f"hostile override values over all {len(keys)} config keys (1 key a case, or 2 to 3)"
    )
    rng = random.Random(f"{work.seed}-config")
    accepted: list[list[str]] = []
    for i in range(count):
        chosen = [keys[i % len(keys)], *rng.sample(keys, rng.choice((0, 0, 1, 2)))]
        overrides = [f"{key}={hostile_value(rng)}" for key in dict.fromkeys(chosen)]
        name = " ".join(o if len(o) < 60 else o[:50] + f"...({len(o)} chars)" for o in overrides)
        try:
            cfg = load_config(None, overrides)
        except UserError as err:
            message = str(err)
            if "\n" in message or not any(k in message for k in chosen):
                loaded.cases.append(
                    Case(name, FAILURE, f"the refusal is not one line naming a key: {message[:300]}")
                )
            else:
                loaded.cases.append(Case(name, ONE_LINE, message[:300]))
            continue
        except Exception as err:
            detail = f"{type(err).__name__}: {str(err)[:200]}"
            loaded.cases.append(Case(name, FAILURE, detail, 0, traceback.format_exc()[-3000:]))
            continue
        bad = [
            n
            for n in _numbers(cfg)
            if not math.isfinite(n) or (isinstance(n, int) and not -(2**63) <= n < 2**63)
        ]
        saved = work.root / "config-reload.yaml"
        saved.write_text(dump_config(cfg))
        if bad:
            loaded.cases.append(Case(name, FAILURE, f"accepted with the numbers {bad[:3]}"))
        elif load_config(saved) != cfg:
            loaded.cases.append(
                Case(name, FAILURE, "accepted, but its config.yaml reloads to another config")
            )
        else:
            loaded.cases.append(Case(name, CORRECT, "accepted: finite numbers, reloads from its dump"))
            accepted.append(overrides)
    runs = Row("config_train", "accepted hostile configs: 2 training steps, 1 process (a sample)")
    runnable = [o for o in accepted if _command_line(o)]
    for i, overrides in enumerate(rng.sample(runnable, min(trained, len(runnable)))):
        runs.cases.append(_train_config(work, i, overrides))
    return loaded, runs


def _command_line(overrides: list[str]) -> bool:
    """Whether the overrides can be passed as arguments (no NUL byte, no lone surrogate)."""
    try:
        return all(b"\0" not in os.fsencode(o) for o in overrides)
    except UnicodeError:
        return False


def _train_config(work: Work, i: int, overrides: list[str]) -> Case:
    from gatedpo_mega.config import load_config

    here = work.root / f"config-run-{i}"
    here.mkdir()
    base = [*TINY, "train.max_steps=2", f"data.cache_dir={work.cache}", f"train.output_dir={here / 'out'}"]
    name = " ".join(o if len(o) < 60 else o[:50] + f"...({len(o)} chars)" for o in overrides)
    r = gatedpo(
        ["train", *base, *overrides], cwd=here, limits={"RLIMIT_AS": MEMORY_LIMIT}, timeout=TRAIN_LIMIT_S
    )
    if r.rc is None:
        return Case(name, LIMIT, f"no exit within {TRAIN_LIMIT_S:.0f} s", 0, tail(r.stderr))
    if has_traceback(r.stderr) or (r.rc != 0 and not clear_refusal(r)):
        return Case(name, FAILURE, f"exit {r.rc}: {exception_line(r.stderr)}", 0, tail(r.stderr))
    if r.rc != 0:
        return Case(name, ONE_LINE, f"exit {r.rc}: {errors(r.stderr)[0][:300]}")
    out = here / load_config(None, [*base, *overrides]).train.output_dir
    rows = metrics(out) or []
    losses = [row["loss"] for row in rows if "loss" in row]
    if not losses or not all(math.isfinite(x) for x in losses):
        return Case(name, FAILURE, f"exit 0, losses {losses}", 0, tail(r.stderr))
    return Case(name, CORRECT, f"exit 0, {len(losses)} finite losses")


# ---------------------------------------------------------------------------------------------------------------
# 8. Signals: the run saves and stops


def _ranks(pid: int) -> list[int]:
    """The rank processes the launcher ``pid`` started (multiprocessing's spawned children, not its resource
    tracker), in the order they were started."""
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    ranks = []
    for child in children:
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                ranks.append(child)
    return ranks


def _signaller(mode: str, rng: random.Random, out: Path) -> tuple[str, Callable[[float, Any], None]]:
    """When and to whom: after a random number of metrics rows, SIGTERM to the launcher, SIGUSR1 to one rank, or
    SIGTERM twice (the second while the checkpoint is written); or SIGTERM to the launcher during start-up."""
    rows, sent = rng.randint(2, STEPS - 1), []
    if mode == "start-up":
        at = rng.uniform(0.5, 4.0)
        return (
            f"SIGTERM to the launcher {at:.1f} s after launch",
            lambda t, proc: None if sent or t < at else (sent.append(t), proc.send_signal(signal.SIGTERM)),
        )
    rank = rng.randrange(NPROC)

    def poke(t: float, proc: Any) -> None:
        if not sent and _rows_written(out) >= rows:
            sent.append(t)
            if mode == "rank":
                ranks = _ranks(proc.pid)
                os.kill(ranks[rank] if rank < len(ranks) else proc.pid, signal.SIGUSR1)
            else:
                proc.send_signal(signal.SIGTERM)
        elif mode == "twice" and len(sent) == 1 and any(out.glob("checkpoints/.tmp-*")):
            sent.append(t)
            proc.send_signal(signal.SIGTERM)

    what = {"launcher": "SIGTERM to the launcher", "rank": f"SIGUSR1 to rank {rank}",
            "twice": "SIGTERM to the launcher, again during the save"}[mode]  # fmt: skip
    return f"{what} after {rows} metrics rows", poke


def signals(work: Work, count: int) -> Row:
    row = Row(
        "signals", f"a signal to a {NPROC}-process run (tensor 2): it saves and stops; then train.resume=auto"
    )
    rng = random.Random(f"{work.seed}-signals")
    for i in range(count):
        mode = ("launcher", "rank", "twice", "start-up")[i % 4]
        out = work.root / f"signal-{i:02d}"
        moment, poke = _signaller(mode, rng, out)
        stopped = gatedpo(train_args(work, out), poke=poke)
        name = f"signal {i + 1}"
        said = re.findall(r"gatedpo: preempted: [^\r\n]*", stopped.stderr)
        at = re.search(r"stopped after step (\d+) of", said[0]) if said else None
        step = int(at.group(1)) if at else None
        if stopped.rc == 0:
            state = f"{moment}: the run ended before the signal took effect"
        elif stopped.rc == -signal.SIGTERM and not (out / "metrics.jsonl").exists():
            state = (
                f"{moment}: ended by it while Python was still importing (no handler yet), nothing written"
            )
        elif stopped.rc != 75 or len(said) != 1 or has_traceback(stopped.stderr) or errors(stopped.stderr):
            detail = f"{moment}: exit {stopped.rc}: {exception_line(stopped.stderr)}"
            row.cases.append(Case(name, FAILURE, detail, 0, tail(stopped.stderr)))
            continue
        else:
            state = f"{moment}: exit 75, " + (f"saved step {step}" if step else "before the first step")
            last = max(_rows_written(out) - 1, 0)
            if step is not None and (step != last or verify_problem(step_dir(out, step))):
                detail = f"{state}, but {last} rows logged / {verify_problem(step_dir(out, step))}"
                row.cases.append(Case(name, FAILURE, detail, 0, tail(stopped.stderr)))
                continue
        r = gatedpo(train_args(work, out, "train.resume=auto"))
        problem = (metrics_problem(work, out) or checkpoints_problem(out, step)) if r.rc == 0 else None
        if r.rc == 0 and problem is None and not has_traceback(r.stderr):
            row.cases.append(Case(name, CORRECT, f"{state}; resumed from step {resumed_from(r.stdout) or 0}, "
                                                 "metrics equal"))  # fmt: skip
        else:
            detail = f"{state}; resume exit {r.rc}: {problem or exception_line(r.stderr)}"
            row.cases.append(Case(name, FAILURE, detail, 0, tail(r.stderr)))
    return row


def verify_problem(path: Path) -> str | None:
    from gatedpo_mega.training.checkpoint import verify

    return verify(path) if path.is_dir() else f"{path.name} is missing"


# ---------------------------------------------------------------------------------------------------------------
# 9. Two runs on one output folder


def _pair(work: Work, out: Path, delay: float) -> tuple[Result, Result | None]:
    """The first run, and a second one (another seed and beta) started ``delay`` seconds after it, on ``out``."""
    second: list[Result] = []

    def start_second(t: float, proc: Any) -> None:
        if not second and t >= delay:
            second.append(gatedpo(train_args(work, out, "train.seed=7", "objective.beta=0.5"), timeout=600))

    first = gatedpo(train_args(work, out), poke=start_second)
    return first, (second[0] if second else None)


def two_runs(work: Work, count: int) -> Row:
    """A second run on the folder of a running one (a resubmitted job, a sweep's typo): started a random time after
    the first, or at the same moment. One of them is refused in one line; the other's outputs are its own."""
    row = Row("two_runs", "two runs on one output folder (the second a moment later, or both at once)")
    rng = random.Random(f"{work.seed}-two-runs")
    for i in range(count):
        out = work.root / f"two-{i:02d}"
        delay = 0.0 if i % 2 else rng.uniform(1.0, 6.0)
        first, r2 = _pair(work, out, delay)
        name, when = f"pair {i + 1}", ("at the same moment" if not delay else f"{delay:.1f} s later")
        results = [("first", first), ("second", r2)] if r2 else [("first", first)]
        refused = [
            (who, r)
            for who, r in results
            if clear_refusal(r) and "is in use by another run" in errors(r.stderr)[0]
        ]
        ran = [(who, r) for who, r in results if r.rc == 0]
        if len(refused) == 1 and len(ran) == 1:
            who = ran[0][0]
            problem = metrics_problem(work, out) if who == "first" else None
            seed = "seed: 1234" in (out / "config.yaml").read_text()
            if who == "first" and problem is None and seed and checkpoints_problem(out) is None:
                detail = (
                    f"second run {when}: {errors(refused[0][1].stderr)[0]}; the first's outputs are intact"
                )
                row.cases.append(Case(name, ONE_LINE, detail))
                continue
            if who == "second":  # the second started first: fine if its own outputs are whole
                detail = f"second run {when} took the folder first; the other was refused in one line"
                row.cases.append(Case(name, ONE_LINE, detail))
                continue
            detail = (
                f"second run {when}: refused, but the first's outputs: {problem or 'config.yaml changed'}"
            )
            row.cases.append(Case(name, FAILURE, detail))
        else:
            codes = ", ".join(f"{who} exit {r.rc}" for who, r in results)
            row.cases.append(Case(name, FAILURE, f"second run {when}: {codes}", 0, tail(first.stderr)))
    return row


# ---------------------------------------------------------------------------------------------------------------
# 10. Resume at another layout


LAYOUTS = [  # (processes, overrides): each differs from the reference's TP 2 x DP 1, ZeRO 1
    (2, ["parallel.tensor=1"]),
    (1, ["parallel.tensor=1"]),
    (2, ["parallel.tensor=1", "parallel.zero_stage=2"]),
    (2, ["parallel.tensor=1", "parallel.zero_stage=3"]),
    (2, ["parallel.tensor=1", "parallel.pipeline=2"]),
    (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
]


def other_layouts(work: Work, count: int) -> Row:
    """The reference run's checkpoint of a random step, resumed at another layout: the losses and gradient norms
    of the remaining steps against the uninterrupted run's (relative 1e-5: another layout sums in another order)."""
    row = Row("layouts", "--resume at another layout (TP, PP, DP, ZeRO stage; 1 to 4 processes)")
    rng = random.Random(f"{work.seed}-layouts")
    assert work.ref_rows is not None
    for i in range(count):
        nproc, layout = LAYOUTS[i % len(LAYOUTS)]
        upto = 2 * rng.randint(1, STEPS // 2 - 1)
        out = copy_run(work, work.root / f"layout-{i:02d}", upto=upto)
        args = train_args(work, out, "--resume", *layout)
        args[args.index("--nproc") + 1] = str(nproc)
        r = gatedpo(args)
        name, what = f"layout {i + 1}", f"step {upto} at {nproc} processes, {' '.join(layout)}"
        rows = metrics(out)
        if r.rc != 0 or rows is None or has_traceback(r.stderr):
            outcome = ONE_LINE if clear_refusal(r) else FAILURE
            row.cases.append(
                Case(name, outcome, f"{what}: exit {r.rc}: {exception_line(r.stderr)}", 0, tail(r.stderr))
            )
            continue
        worst = max(
            abs(b[k] - a[k]) / max(abs(a[k]), 1e-6)
            for a, b in zip(work.ref_rows[upto + 1 :], rows[upto + 1 :], strict=True)
            for k in ("loss", "grad_norm")
        )
        said = re.search(r"at another layout \(([^)]*)\)", r.stdout)
        detail = f"{what} ({said.group(1) if said else 'no layout change said'}): largest relative difference {worst:.1e}"
        ok = worst <= 1e-5 and len(rows) == len(work.ref_rows) and said is not None
        row.cases.append(Case(name, CORRECT if ok else FAILURE, detail, worst))
    return row


# ---------------------------------------------------------------------------------------------------------------
# 6. Non-finite values in training

NON_FINITE = (["train.lr=1e6", "train.grad_clip=0"], ["objective.beta=1e38"])


def non_finite(work: Work) -> Row:
    row = Row("nonfinite", "non-finite values in training (fp32, 1 process, 4 steps)")
    for i, extra in enumerate(NON_FINITE):
        out = work.root / f"nonfinite-{i}"
        args = [
            "train",
            *TINY,
            "train.max_steps=4",
            f"data.cache_dir={work.cache}",
            f"train.output_dir={out}",
        ]
        r = gatedpo([*args, *extra])
        name = " ".join(extra)
        last = last_line(tail(r.stderr))
        said = f"exit {r.rc}, " + (
            f"last stderr line: {last}" if last else f"no line but the progress bar: {last_line(r.stderr)}"
        )
        rows = metrics(out) or []
        odd = [
            f"{k} {row[k]} at step {row['step']}"
            for row in rows for k in ("loss", "grad_norm") if k in row and not math.isfinite(row[k])
        ]  # fmt: skip
        if clear_refusal(r):
            row.cases.append(Case(name, ONE_LINE, said))
        elif r.rc == 0 and not has_traceback(r.stderr) and not odd:
            row.cases.append(Case(name, CORRECT, said))
        else:
            logged = f"; logged {', '.join(odd[:3])}{' ...' if len(odd) > 3 else ''}" if odd else ""
            row.cases.append(Case(name, FAILURE, said + logged, 0, tail(r.stderr)))
    return row


# ---------------------------------------------------------------------------------------------------------------
# The table


def printable(text: str) -> str:
    """``text`` with what a terminal cannot take (a lone surrogate from a hostile value) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def table(rows: list[Row], work: Path) -> str:
    limit = any(r.counts()[LIMIT] for r in rows)
    cols = [ONE_LINE, CORRECT, FAILURE, *([LIMIT] if limit else [])]
    head = ["", "fault injected", "cases", *(COLUMNS[c] for c in cols), "worst case seen"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, r in enumerate(rows, start=1):
        counts = r.counts()
        worst = r.worst()
        text = r.not_run or (f"{worst.name}: {worst.detail}" if worst else "")
        text = printable(text).replace(str(work), "WORK").replace("|", "\\|").replace("\n", " ")
        text = text if len(text) <= 260 else text[:257] + "..."
        cells = [str(n), r.title, str(len(r.cases)), *(str(counts[c]) for c in cols), text]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="the scaled-down set (about 1.5 minutes on 2 cores)")
    p.add_argument("--json", metavar="PATH", help="write every case and the counts here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kills", type=int, help="killed runs (default 16; quick 1)")
    p.add_argument("--data-files", type=int, help="corrupted data files (default 250; quick 20)")
    p.add_argument("--config-cases", type=int, help="hostile config cases (default 400; quick 60)")
    p.add_argument("--config-runs", type=int, help="accepted configs trained 2 steps (default 10; quick 1)")
    # tests/test_preemption.py covers signals, two runs and other layouts case by case: none of them in --quick.
    p.add_argument("--signals", type=int, help="signalled runs (default 8; quick 0)")
    p.add_argument("--pairs", type=int, help="pairs of runs on one folder (default 4; quick 0)")
    p.add_argument("--layouts", type=int, help="resumes at another layout (default 6; quick 0)")
    p.add_argument(
        "--rows",
        help="only these rows, comma-separated: kills, damage, fsize, tmpfs, data, config, non-finite, signals, "
        "two-runs, layouts",
    )
    p.add_argument(
        "--jobs", type=int, default=2, help="rows run side by side (default 2; 1: one after another)"
    )
    p.add_argument("--hh", type=Path, default=HH, help=f"the HH-RLHF sample (default {HH})")
    p.add_argument("--workdir", type=Path, help="folder for the runs (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (kept anyway when a case fails)")
    args = p.parse_args(argv)
    q = args.quick
    kill_count = args.kills if args.kills is not None else (1 if q else 16)
    data_files = args.data_files if args.data_files is not None else (20 if q else 250)
    config_cases = args.config_cases if args.config_cases is not None else (60 if q else 400)
    config_runs = args.config_runs if args.config_runs is not None else (1 if q else 10)
    signal_count = args.signals if args.signals is not None else (0 if q else 8)
    pair_count = args.pairs if args.pairs is not None else (0 if q else 4)
    layout_count = args.layouts if args.layouts is not None else (0 if q else 6)
    damage = list(DAMAGE)[:1] if q else list(DAMAGE)
    limits = [100_000] if q else [300_000, 100_000, 10_000]
    free_kib = [200] if q else [200, 600, 1000]

    root = args.workdir or Path(tempfile.mkdtemp(prefix="gatedpo-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    work = Work(root=root, seed=args.seed, cache=root / "cache")
    started = time.monotonic()
    rows: list[Row] = []

    only = set(args.rows.split(",")) if args.rows else None

    def step(produce: Callable[[], Row | tuple[Row, ...]]) -> list[Row]:
        t0 = time.monotonic()
        made = produce()
        out = list(made) if isinstance(made, tuple) else [made]
        for row in out:
            row.seconds = time.monotonic() - t0
            c = row.counts()
            said = row.not_run or ", ".join(f"{c[o]} {o.replace('_', ' ')}" for o in COLUMNS if c[o])
            print(f"faults: {row.key}: {len(row.cases)} cases: {said} ({row.seconds:.0f} s)", flush=True)
        return out

    reference(work)
    print(
        f"faults: reference run: {work.ref_seconds:.1f} s ({work.ref_training:.1f} s from its first metrics row), "
        f"in {root}",
        flush=True,
    )
    planned: list[tuple[str, Callable[[], Row | tuple[Row, ...]]]] = [
        ("kills", lambda: kills(work, kill_count)),
        ("damage", lambda: damaged(work, damage)),
        ("fsize", lambda: file_size_limits(work, limits)),
        ("tmpfs", lambda: full_tmpfs(work, free_kib)),
        ("data", lambda: corrupted_data(work, data_files, args.hh)),
        ("config", lambda: config_fuzz(work, config_cases, config_runs)),
        ("non-finite", lambda: non_finite(work)),
        *([("signals", lambda: signals(work, signal_count))] if signal_count else []),
        *([("two-runs", lambda: two_runs(work, pair_count))] if pair_count else []),
        *([("layouts", lambda: other_layouts(work, layout_count))] if layout_count else []),
    ]
    # The rows are independent (each its own folders; the reference run and the data cache only read): --jobs of
    # them run side by side, their runs' waits and start-ups overlapping; the table keeps this order.
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(step, produce) for key, produce in planned if only is None or key in only]
        for future in futures:
            rows.extend(future.result())
    seconds = time.monotonic() - started

    print()
    print(table(rows, root))
    failed = sum(r.counts()[FAILURE] for r in rows)
    print(f"\n{sum(len(r.cases) for r in rows)} cases, {failed} tracebacks or wrong results, {seconds:.0f} s")
    if args.json:
        report = {
            "date": datetime.date.today().isoformat(),
            "command": " ".join(["python", "tools/faults.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "python": platform.python_version(), "seed": args.seed, "quick": q, "seconds": round(seconds, 1),
            "rows": [r.to_json() for r in rows],
        }  # fmt: skip
        Path(args.json).write_text(json.dumps(report, indent=1))
    if failed or args.keep:
        print(f"work folder kept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
