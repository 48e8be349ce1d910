"""Run a function on several CPU processes joined by a gloo process group, and surface their failures.

The processes are a pool, started once per test session and world size: a test pays for importing torch,
megatron-core and DeepSpeed (about 6 s a process) once per session, not once per run. Each run still gets what a
fresh set of processes would have: a new default process group on a new port (``MASTER_ADDR``/``MASTER_PORT``,
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set as a launcher sets them), the test's environment and working directory,
torch's initial seed, and megatron-core's and DeepSpeed's module-level state as they were after import. A run that
fails on any rank takes its processes down; the next run of that size starts new ones.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import gc
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import connection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 300.0  # one run, every rank
# A process that holds more threads than this after a run has leaked something of it (gloo's threads poll on as long
# as a process group lives): it answers, then leaves, and the next run of its size starts new processes.
MAX_IDLE_THREADS = 24
GRACE_S = 20.0  # after one rank failed: how long the others get to say why before the group is stopped
SETTLE_S = 3.0  # the same for a command that returned an exit code (the local launcher waits 2 s)

# Modules whose globals hold one run's state (process groups, layouts, counters): restored after each run to what
# they held right after import. Names only: a module not imported by the run is left alone.
STATEFUL_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.num_microbatches_calculator",
    "deepspeed.comm.comm",
    "deepspeed.utils.groups",
    "deepspeed.runtime.zero.partition_parameters",
    "deepspeed.runtime.zero.parameter_offload",
)
WARM_IMPORTS = (
    "deepspeed",
    "megatron.core.parallel_state",
    "megatron.core.models.gpt",
    "megatron.core.pipeline_parallel",
    "transformers",
    "gatedpo_mega.training.loop",
    "gatedpo_mega.training.data",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _library_caches() -> list[Any]:
    """The ``functools.lru_cache``s of DeepSpeed and megatron-core: some hold a run's objects (ZeRO-3's parameter
    coordinator caches a method on ``self``, and with it the model and its process groups, whose gloo threads
    would poll on in this process after the run)."""
    return [
        o
        for o in gc.get_objects()
        if isinstance(o, functools._lru_cache_wrapper)
        and str(getattr(o, "__module__", "")).startswith(("deepspeed", "megatron"))
    ]


def _snapshot() -> dict[str, dict[str, Any]]:
    """Every global of the stateful modules, as they are now (right after import): values, and functions a test
    may have replaced (a test that forbids reading megatron-core's global state swaps its getters)."""
    out = {}
    for name in STATEFUL_MODULES:
        module = sys.modules.get(name)
        if module is not None:
            out[name] = {
                k: copy.copy(v) if isinstance(v, dict | list | set) else v for k, v in vars(module).items()
            }
    return out


def _restore(snapshot: dict[str, dict[str, Any]]) -> None:
    for name, values in snapshot.items():
        module = vars(sys.modules[name])
        for k, v in values.items():
            if module.get(k) is not v:
                module[k] = copy.copy(v) if isinstance(v, dict | list | set) else v
    tracker = sys.modules.get("megatron.core.tensor_parallel.random")
    if tracker is not None:
        tracker.get_cuda_rng_tracker().reset()


class _Redirect:
    """This process's stdout and stderr (the file descriptors, so that C code's output is caught too) into two
    files for the length of one run."""

    def __init__(self, folder: str, rank: int) -> None:
        self.paths = (os.path.join(folder, f"{rank}.out"), os.path.join(folder, f"{rank}.err"))

    def __enter__(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = (os.dup(1), os.dup(2))
        for fd, path in zip((1, 2), self.paths, strict=True):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(target, fd)
            os.close(target)

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip((1, 2), self.saved, strict=True):
            os.dup2(saved, fd)
            os.close(saved)


def _serve(rank: int, world: int, conn: Any) -> None:
    """A pool process: warm imports, then one run per message until told to stop (``None``)."""
    from gatedpo_mega.environment import quiet_known_warnings

    quiet_known_warnings()
    # What the launcher does for local processes: the host's cores shared, not oversubscribed.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import importlib

    for name in (*WARM_IMPORTS, *STATEFUL_MODULES):
        importlib.import_module(name)
    seed = torch.initial_seed()
    clean, caches = _snapshot(), _library_caches()
    conn.send(("ready", None, False))
    while (msg := conn.recv()) is not None:
        env, cwd, port, folder, join_group, fn, args = msg
        os.environ.clear()
        os.environ.update(env)
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        )  # fmt: skip
        os.chdir(cwd)
        torch.manual_seed(seed)
        failure, result = None, None
        with _Redirect(folder, rank):
            try:
                if join_group:
                    dist.init_process_group("gloo", rank=rank, world_size=world)
                result = fn(rank, world, *args)
                if (
                    join_group
                ):  # every rank done with its last collective before any tears its connections down
                    dist.barrier()
            except BaseException:
                failure = f"rank {rank}:\n{traceback.format_exc()}"
                traceback.print_exc()
            finally:
                if failure is None and dist.is_initialized():
                    dist.destroy_process_group()
        if failure is not None:
            # The peers may be waiting in a collective this rank will never join: leave, so that they fail
            # fast, and let the next run start new processes.
            conn.send(("failed", failure, True))
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        _restore(clean)
        for cache in caches:
            cache.cache_clear()
        gc.collect()  # the run's process groups (and their gloo threads) go with the last references to them
        leaked = (
            len(os.listdir("/proc/self/task")) > MAX_IDLE_THREADS
            if os.path.isdir("/proc/self/task")
            else False
        )
        conn.send(("ok", result, leaked))
        if leaked:
            return


class _Group:
    """``world`` pool processes, one pipe each."""

    def __init__(self, world: int) -> None:
        ctx = mp.get_context("spawn")
        self.world = world
        self.retiring = False  # a process has left or will leave: the next run starts new ones
        pipes = [ctx.Pipe() for _ in range(world)]
        self.conns = [parent for parent, _ in pipes]
        self.procs = [ctx.Process(target=_serve, args=(r, world, pipes[r][1])) for r in range(world)]
        for p in self.procs:
            p.start()
        for _, child in pipes:
            child.close()
        replies = self._collect(TIMEOUT_S, lambda reply: reply[0] != "ready")
        if any(r is None or r[0] != "ready" for r in replies):
            self.stop()
            raise AssertionError(f"the pool of {world} processes did not start: {replies}")

    def _collect(
        self, timeout: float, bad: Callable[[tuple[str, Any]], bool], grace: float = GRACE_S
    ) -> list[tuple[str, Any] | None]:
        """Each rank's reply, ``("died", exit code)`` for a rank that died, or None for one that did not answer;
        once a rank's reply is ``bad``, the others get ``grace`` seconds to answer."""
        replies: list[tuple[str, Any] | None] = [None] * self.world
        waiting = dict(enumerate(self.conns))
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            ready = connection.wait(list(waiting.values()), timeout=max(0.0, deadline - time.monotonic()))
            for conn in ready:
                r = next(r for r, c in waiting.items() if c is conn)
                del waiting[r]
                try:
                    reply = conn.recv()
                except EOFError:  # the process died without answering
                    self.procs[r].join(timeout=5)
                    reply = ("died", self.procs[r].exitcode, True)
                self.retiring |= reply[2]
                replies[r] = reply = reply[:2]
                if bad(reply):
                    deadline = min(deadline, time.monotonic() + grace)
        return replies

    def run(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        *,
        join_group: bool,
        bad: Callable[[Any], bool],
        grace: float = GRACE_S,
        env: dict[str, str] | None = None,
    ) -> tuple[list[tuple[str, Any] | None], list[tuple[bytes, bytes]]]:
        """Each rank's reply to ``fn(rank, world, *args)`` and what it printed (stdout, stderr)."""
        port = _free_port()
        with tempfile.TemporaryDirectory(prefix="pool-run-") as folder:
            msg = (dict(os.environ if env is None else env), os.getcwd(), port, folder, join_group, fn, args)
            for conn in self.conns:
                conn.send(msg)
            replies = self._collect(TIMEOUT_S, bad, grace)
            printed = []
            for r in range(self.world):
                out, err = (Path(folder, f"{r}.{suffix}") for suffix in ("out", "err"))
                printed.append(tuple(p.read_bytes() if p.exists() else b"" for p in (out, err)))
        return replies, printed  # type: ignore[return-value]

    def alive(self) -> bool:
        return not self.retiring and all(p.is_alive() for p in self.procs)

    def stop(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):  # a process that has left
                conn.send(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()


_GROUPS: dict[int, _Group] = {}


def _group(world: int) -> _Group:
    group = _GROUPS.get(world)
    if group is None or not group.alive():
        if group is not None:
            group.stop()
        group = _GROUPS[world] = _Group(world)
    return group


def _discard(world: int) -> None:
    group = _GROUPS.pop(world, None)
    if group is not None:
        group.stop()


def run_distributed(fn: Callable[..., Any], world: int, *args: Any) -> None:
    """Call ``fn(rank, world, *args)`` on ``world`` processes joined by a gloo group; raise with the failing ranks'
    tracebacks on failure. What the ranks print reaches this process's stdout and stderr.

    ``fn`` must be a module-level function (it is pickled into the pool's processes), and so must ``args``.
    """
    group = _group(world)
    replies, printed = group.run(fn, args, join_group=True, bad=lambda reply: reply[0] != "ok")
    for out, err in printed:  # as spawned processes' output would appear
        os.write(1, out)
        os.write(2, err)
    if all(r is not None and r[0] == "ok" for r in replies):
        return
    _discard(world)
    failures = [r[1] for r in replies if r is not None and r[0] == "failed"]
    states = [r[0] if r is not None else "no answer" for r in replies]
    raise AssertionError(f"distributed run failed (ranks: {states}):\n" + "\n".join(failures))


@dataclass
class Finished:
    """What ``subprocess.run(..., capture_output=True, text=True)`` gives: the exit code, and the ranks' output
    (rank 0's first)."""

    returncode: int
    stdout: str
    stderr: str


def _command(rank: int, world: int, argv: list[str], before: Callable[[], Any] | None) -> int:
    from gatedpo_mega.cli import main

    if before is None:
        return main(argv)
    undo = before()
    try:
        return main(argv)
    finally:
        undo()


def gatedpo(
    world: int,
    *argv: str,
    before: Callable[[], Callable[[], None]] | None = None,
    env: dict[str, str] | None = None,
) -> Finished:
    """``gatedpo *argv`` on ``world`` pool processes as a launcher (torchrun) starts it: every process runs the
    command with ``RANK``, ``WORLD_SIZE`` and ``MASTER_ADDR``/``PORT`` set, rank 0 checks before the group forms.
    The exit code is the first failing rank's, as a launcher reports it (a rank stopped by another's failure
    counts last). ``before`` (module-level) runs in each process first and returns what undoes it; ``env``: the
    processes' environment (default: this one's).

    Runs that need the local launcher itself (``--nproc``: its process start, its one line for a failed rank,
    signals) start it as a real process instead."""
    from gatedpo_mega.training.launch import PEER_STOPPED

    group = _group(world)
    replies, printed = group.run(
        _command,
        (list(argv), before),
        join_group=False,
        bad=lambda reply: reply != ("ok", 0),
        grace=SETTLE_S,
        env=env,
    )
    codes = [r[1] if r is not None and r[0] in ("ok", "died") else None for r in replies]
    if any(r is None or r[0] != "ok" for r in replies):
        _discard(world)  # a rank died or hangs: the next run starts new processes
    failures = [r[1] for r in replies if r is not None and r[0] == "failed"]
    if failures:
        raise AssertionError("gatedpo raised in the pool:\n" + "\n".join(failures))
    causes = [c for c in codes if c not in (0, PEER_STOPPED)]
    code = causes[0] if causes else next((c for c in codes if c != 0), 0)
    if code is None:  # a rank that never answered: stopped by the pool, as a launcher stops it
        code = -9
    return Finished(
        code,
        "".join(out.decode(errors="replace") for out, _ in printed),
        "".join(err.decode(errors="replace") for _, err in printed),
    )


@atexit.register
def _stop_all() -> None:
    for group in _GROUPS.values():
        group.stop()
    _GROUPS.clear()


def here(*argv: str) -> Finished:
    """``gatedpo *argv`` in this process, for what the launching process does before any worker starts (refusals,
    ``checkpoint verify``, ``convert``, ``plan``): its exit code and what it printed; the environment is restored
    afterwards."""
    import io

    from gatedpo_mega.cli import main

    saved = dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as e:  # the argument parser's refusals
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return Finished(code, out.getvalue(), err.getvalue())
