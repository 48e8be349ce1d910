"""Starting a run: under a launcher (torchrun, deepspeed: RANK/WORLD_SIZE set), or ``--nproc N`` local processes
started here, or one process. The layout, the output folder, the data, the tokenizer and ``model.init_from`` are
checked before any process or group starts (under a launcher: by rank 0, before the group).

A rank that fails prints one line and exits with a code that says why; a rank whose collective broke because a
peer stopped first says so in one line and exits with ``PEER_STOPPED``, so that the launcher names the rank that
failed first, not the ones it took down with it. Only an unexpected error (a bug) prints a traceback."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from multiprocessing import connection
from multiprocessing import util as mp_util
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gatedpo_mega.config import Config
from gatedpo_mega.environment import quiet_known_warnings
from gatedpo_mega.errors import NonFiniteError, UserError, describe_os_error
from gatedpo_mega.megatron.parallel import validate_layout
from gatedpo_mega.training.checkpoint import check_resume
from gatedpo_mega.training.cluster import launcher_env
from gatedpo_mega.training.preemption import PREEMPTED, ForwardingWatch, Preempted, SignalWatch
from gatedpo_mega.training.preflight import preflight, resolve_hub_ids
from gatedpo_mega.training.run_lock import release_all, run_lock


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PEER_STOPPED = 5  # exit code of a rank whose collective failed because another rank had stopped


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _peer_reason(e: BaseException) -> str:
    """``Connection closed by peer [127.0.0.1]:33413`` from gloo's ``[.../pair.cc:553] Connection closed by peer
    [127.0.0.1]:33413. This is typically caused by ...``: the source location and the advice left out."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", _first_line(e))
    return text.split(". ")[0]


def _is_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, TimeoutError) or "timed out" in text or "timeout" in text


def _is_peer_lost(e: BaseException) -> bool:
    """A collective or the rendezvous store broke: the connection to another rank closed under it."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e).lower()
    markers = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe")
    return isinstance(e, RuntimeError) and any(m in text for m in markers)


def _report(rank: int, cfg: Config, e: Exception) -> int:
    """One line on stderr for ``e`` (a traceback only for an unexpected error); returns the exit code."""

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if isinstance(e, Preempted):
        if rank == 0:
            print(f"gatedpo: preempted: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    if isinstance(e, UserError):
        if rank == 0 or not e.every_rank:  # the same decision on every rank: said once
            say(f"gatedpo: error: {e}")
        return e.exit_code
    if isinstance(e, NonFiniteError):  # a NaN or infinite loss or gradient
        if not e.every_rank:
            say(f"gatedpo: error: rank {rank}: {e}")
        elif rank == 0:  # the same on every rank: said once
            say(f"gatedpo: error: {e}")
        return e.exit_code
    if _is_timeout(e):
        minutes = cfg.train.collective_timeout_minutes
        say(
            f"gatedpo: error: rank {rank}: a collective waited longer than train.collective_timeout_minutes="
            f"{minutes:g}: another rank stopped responding ({_first_line(e)})"
        )
        return 4
    if _is_peer_lost(e):
        say(f"gatedpo: rank {rank}: a peer stopped ({_peer_reason(e)})")
        return PEER_STOPPED
    if (
        isinstance(e, OSError) and e.errno is not None
    ):  # a path the system refuses: one line, as in the launcher
        say(f"gatedpo: error: rank {rank}: {describe_os_error(e)}")
        return 2
    if _is_out_of_memory(e):
        say(
            f"gatedpo: error: rank {rank}: out of memory ({_first_line(e)}); a smaller model, micro-batch or "
            "sequence length, more tensor/pipeline parallelism, a higher ZeRO stage or model.recompute=full fits"
        )
        return 6
    traceback.print_exc()
    say(f"gatedpo: rank {rank} failed: {type(e).__name__}: {e}")
    return 1


def _is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )


def _init_process_group(backend: str, timeout: datetime.timedelta) -> None:
    """The default group from the launcher's environment. Under torchrun the workers share the agent's store, whose
    keys outlive a restart (``--max-restarts``): restarted workers would read their dead predecessors' addresses, so
    each attempt gets keys of its own."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, timeout=timeout)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
    )
    store = dist.PrefixStore(f"gatedpo/attempt_{attempt}", agent)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def _run_this_process(cfg: Config, make_data: Any = None, watch: SignalWatch | None = None) -> int:
    """Train on this process in the default group (joined here unless already joined); returns the exit code,
    having printed the reason for a non-zero one before the group is torn down."""
    from gatedpo_mega.training.data import make_run_data
    from gatedpo_mega.training.loop import train

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        # Local processes share the host's cores: oversubscribed threads make every collective wait on a
        # descheduled peer (tensor parallelism on CPU ran 17x slower with the default thread count).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    rank = int(os.environ.get("RANK", "0"))
    # From here a signal is recorded, not fatal: one during start-up stops the run after its first step.
    own = watch is None
    watch = watch or SignalWatch(cfg.train.save_on_signal).__enter__()
    try:
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            timeout = datetime.timedelta(minutes=cfg.train.collective_timeout_minutes)
            _init_process_group(backend, timeout)
        train(cfg, make_data or make_run_data, watch)
        dist.barrier()  # every rank done with its last collective before any tears its connections down
        return 0
    except Exception as e:
        code = _report(rank, cfg, e)
        if code == PREEMPTED or (isinstance(e, NonFiniteError) and e.every_rank):
            # Every rank leaves after rank 0 has said what was saved (srun --kill-on-bad-exit stops the step when
            # the first rank exits non-zero), or what every rank decided together: a peer that has already torn its
            # connections down can abort this rank's own teardown in gloo's threads (exit -6 after the line).
            with contextlib.suppress(Exception):
                dist.barrier()
        if code == PEER_STOPPED:
            # Tearing down a group whose peer vanished can abort the process in gloo's threads ("terminate called
            # without an active exception", exit -6), which the launcher would take for this rank's own failure.
            leave(code)
        return code
    finally:
        if own:
            watch.__exit__()
        if dist.is_initialized():
            dist.destroy_process_group()


def leave(code: int) -> NoReturn:
    """End a rank's process with ``code`` now, its output flushed and its run locks given back, without the
    interpreter's finalisation: a gloo worker thread that drops the last reference to a tensor of its last
    collective while the interpreter is being finalised takes the GIL and aborts the process ("terminate called
    without an active exception", exit -6) after a run that succeeded; the launcher would take that for this rank's
    failure. Every file the run writes is closed by then (the metrics, the trackers, the checkpoints)."""
    sys.stdout.flush()
    sys.stderr.flush()
    release_all()  # os._exit runs no finally
    # multiprocessing's own exit work (as at a normal exit): a semaphore (tqdm's lock) left registered would make
    # the resource tracker warn of a leak.
    mp_util._run_finalizers()  # type: ignore[attr-defined]  # private, stable since Python 3.3
    os._exit(code)


def under_launcher() -> bool:
    """Whether this process is one rank of a launcher's (torchrun, deepspeed, srun: ``launcher_env``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _local_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What a launcher sets for rank ``rank`` of ``world`` processes on this host."""
    return {
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
    }  # fmt: skip


def _worker(rank: int, world: int, port: int, cfg: Config, make_data: Any = None) -> None:
    quiet_known_warnings()  # a fresh interpreter: the command's warning filters are not inherited
    os.environ.update(_local_env(rank, world, port))
    leave(_run_this_process(cfg, make_data))


def _wait(procs: list[Any], grace: float = 10.0) -> tuple[int, int] | None:
    """Wait for every process; on the first failure stop the others. Returns (rank, exit code) of the rank that
    failed first (None: all succeeded). A rank tears its group down as it fails, so a peer may report
    ``PEER_STOPPED`` and exit before it: such exits alone give the rank that took them down ``grace`` seconds
    to exit with its own code."""
    failed: dict[int, int] = {}
    peer_only_since: float | None = None

    def record() -> None:
        for r, p in enumerate(procs):
            if p.exitcode not in (None, 0) and r not in failed:
                failed[r] = p.exitcode

    while any(p.is_alive() for p in procs):
        connection.wait([p.sentinel for p in procs if p.is_alive()], timeout=0.5)
        record()
        # A preempted rank saved with the others and leaves with them: no cause to stop the rest.
        causes = [r for r, code in failed.items() if code not in (PEER_STOPPED, PREEMPTED)]
        stopped_by_peer = any(code == PEER_STOPPED for code in failed.values())
        if stopped_by_peer and not causes and peer_only_since is None:
            peer_only_since = time.monotonic()
        if causes or (peer_only_since is not None and time.monotonic() - peer_only_since > grace):
            # A failure every rank reaches together (a checkpoint refused) is said by rank 0: let the others finish
            # saying theirs for a moment; then stop those that wait on the failed rank in a collective.
            settle = time.monotonic() + 2.0
            while any(p.is_alive() for p in procs) and time.monotonic() < settle:
                connection.wait(
                    [p.sentinel for p in procs if p.is_alive()], timeout=settle - time.monotonic()
                )
            _stop(procs)
            break
    else:  # every rank ended by itself: those that ended after the last look too (all, when they ended together)
        record()
    if not failed:
        return None
    causes = [r for r, code in failed.items() if code not in (PEER_STOPPED, PREEMPTED)]  # in the order seen
    first = causes[0] if causes else next(iter(failed))
    return first, failed[first]


def _stop(procs: list[Any], grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds: a rank waiting in a collective on a failed peer saves nothing
    on SIGTERM (it never ends its step) and would otherwise wait for the collective's time-out."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def summary(cfg: Config, world: int, hub_notes: Sequence[str] = (), notes: Sequence[str] = ()) -> str:
    """The run in one line, after a line per Hugging Face Hub id and the cache folder it was read from and a line
    per note (what the config took from ``model.init_from``); the whole resolved config goes to
    ``<output_dir>/config.yaml`` (``gatedpo config`` prints it)."""
    o, g, m, p, t = cfg.objective, cfg.gate, cfg.model, cfg.parallel, cfg.train
    slope = f", slope {g.slope:g}" if g.shape == "psigmoid" else ""
    gate = "gate none" if g.shape == "none" else f"gate {g.shape} ({g.signal}, tau {g.tau:g}{slope})"
    model = (
        f"model {m.init_from} (transformers)"
        if m.backend == "transformers"
        else f"model {m.num_layers} layers x {m.hidden_size}"
        + (f" from {m.init_from}" if m.init_from else "")
    )
    if m.lora.enabled:
        start = f", from {m.init_adapter}" if m.init_adapter else ""
        model += (
            f", LoRA rank {m.lora.rank} alpha {m.lora.alpha:g} on {','.join(m.lora.target_modules)}{start}"
        )
    dp = world // (p.tensor * p.pipeline * p.context)
    cp = f" x CP {p.context}" if p.context > 1 else ""
    if m.num_experts:
        model += f", {m.num_experts} experts (top {m.moe_router_topk})" + (
            f" over EP {p.expert}" if p.expert > 1 else ""
        )
    lines = [*(f"Hugging Face cache: {note}" for note in hub_notes), *notes]
    return "".join(f"gatedpo train: {line}\n" for line in lines) + (
        f"gatedpo train: objective {o.name}, {gate}, {model}, TP {p.tensor}{cp} x PP {p.pipeline} x DP {dp}, "
        f"ZeRO {p.zero_stage}, {t.max_steps} steps of {t.global_batch_size} pairs -> {t.output_dir} "
        "(config.yaml there)"
    )


def launch(
    cfg: Config, nproc: int | None, make_data: Any = None, *, quiet: bool = False, notes: Sequence[str] = ()
) -> int:
    """Run ``cfg`` to the end; returns the exit code. ``make_data(cfg, layout) -> RunData`` replaces the data
    pipeline (a module-level function: it is pickled into the processes). ``notes``: lines about the config
    (``load_run_config``'s), printed with the summary by the launching process only. A signal of
    ``train.save_on_signal`` is recorded from here on: the run saves after the step it is in, or, before any rank
    started, stops there (exit 75)."""
    with SignalWatch(cfg.train.save_on_signal) as watch:
        return _launch(cfg, nproc, make_data, watch, quiet=quiet, notes=notes)


def _launch(
    cfg: Config, nproc: int | None, make_data: Any, watch: SignalWatch, *, quiet: bool, notes: Sequence[str]
) -> int:
    os.environ.update(launcher_env(os.environ))  # a task of srun: SLURM's variables as torch's (cluster.py)
    launched = under_launcher()
    world = int(os.environ["WORLD_SIZE"]) if launched else (nproc or 1)
    validate_layout(cfg, world)
    # Every process of a launcher resolves the ids itself (a cache hit: no download); started here, the workers
    # receive the resolved config.
    cfg, hub_notes = resolve_hub_ids(cfg, data=make_data is None)
    if launched and int(os.environ["RANK"]) != 0:
        return _run_this_process(cfg, make_data, watch)
    # The output folder is this run's until it ends (under a launcher: rank 0 holds it); refusals come before any
    # process starts (under a launcher: by rank 0 only, before the group forms).
    with run_lock(cfg.train.output_dir):
        check_resume(cfg, world)
        preflight(cfg, data=make_data is None)
        lines = summary(cfg, world, hub_notes, notes)
        if launched:
            print(lines, flush=True)
            return _run_this_process(cfg, make_data, watch)
        if not quiet:
            print(lines, flush=True)
        if watch.received is not None and world > 1:
            print(
                f"gatedpo: preempted: {watch.received.name} during start-up, before any rank started: nothing to "
                "save; --resume (train.resume=auto) starts the run again from its latest checkpoint",
                file=sys.stderr, flush=True,
            )  # fmt: skip
            return PREEMPTED
        return _start(cfg, world, make_data, watch)


def _start(cfg: Config, world: int, make_data: Any, early: SignalWatch) -> int:
    """Run the ranks here: this process at world 1, else ``world`` local processes, to which a signal is passed
    on (``early``: the launching process's watch, which may record one while they are being started)."""
    port = _free_port()
    if world == 1:
        saved = dict(os.environ)  # in this process: leave no RANK/WORLD_SIZE behind for a later launch
        try:
            os.environ.update(_local_env(0, 1, port))
            return _run_this_process(cfg, make_data, early)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    ctx: Any = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, cfg, make_data), name=f"rank{r}")
        for r in range(world)
    ]
    # ``kill <this process>`` (a scheduler's signal to the job's first process) reaches every rank, which saves.
    with ForwardingWatch(cfg.train.save_on_signal, pids := []) as watch:
        for p in procs:
            p.start()
            pids.append(p.pid)
        received = watch.received or early.received
        if received is not None:  # while the ranks were being started: pass it on to all of them
            watch.forward(received)
        failure = _wait(procs)
    received = watch.received or early.received
    if failure is None:
        return 0
    r, code = failure
    if received is not None and all(p.exitcode in (PREEMPTED, -received) for p in procs):
        if all(p.exitcode != PREEMPTED for p in procs):  # every rank ended before its handler was in place
            print(
                f"gatedpo: preempted: {received.name} during start-up, before the first step: nothing to save; "
                "--resume (train.resume=auto) starts the run again from its latest checkpoint",
                file=sys.stderr, flush=True,
            )  # fmt: skip
        return PREEMPTED  # else rank 0 said which step was saved
    print(
        f"gatedpo: rank {r} failed (exit {code}); the other ranks were stopped", file=sys.stderr, flush=True
    )
    return code if code > 0 else 1
