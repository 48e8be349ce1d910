"""Starting a run: under a launcher (torchrun, deepspeed: RANK/WORLD_SIZE set), or ``--nproc N`` local processes
started here, or one process. The layout is validated before any process or group starts."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gatedpo_mega.config import Config, dump_config
from gatedpo_mega.errors import UserError
from gatedpo_mega.megatron.parallel import validate_layout
from gatedpo_mega.training.checkpoint import check_resume


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_this_process(cfg: Config, make_data: Any = None) -> None:
    from gatedpo_mega.training.data import make_run_data
    from gatedpo_mega.training.loop import train

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        # Local processes share the host's cores: oversubscribed threads make every collective wait on a
        # descheduled peer (tensor parallelism on CPU ran 17x slower with the default thread count).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(minutes=cfg.train.collective_timeout_minutes)
        dist.init_process_group(backend, timeout=timeout)
    try:
        train(cfg, make_data or make_run_data)
    finally:
        dist.destroy_process_group()


def _is_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, TimeoutError) or "timed out" in text or "timeout" in text


def _worker(rank: int, world: int, port: int, cfg: Config, make_data: Any = None) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )  # fmt: skip
    try:
        _run_this_process(cfg, make_data)
    except UserError as e:
        if rank == 0 or not e.every_rank:
            print(f"gatedpo: error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except Exception as e:
        from gatedpo_mega.loss import NonFiniteLossError

        if isinstance(e, NonFiniteLossError):
            print(f"gatedpo: error: rank {rank}: {e}", file=sys.stderr, flush=True)
            sys.exit(3)
        if _is_timeout(e):
            minutes = cfg.train.collective_timeout_minutes
            print(
                f"gatedpo: error: rank {rank}: a collective waited longer than train.collective_timeout_minutes="
                f"{minutes:g}: another rank stopped responding ({str(e).splitlines()[0][:200]})",
                file=sys.stderr, flush=True,
            )  # fmt: skip
            sys.exit(4)
        traceback.print_exc()
        print(f"gatedpo: rank {rank} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def launch(cfg: Config, nproc: int | None, make_data: Any = None, *, quiet: bool = False) -> int:
    """Run ``cfg`` to the end; returns the exit code. ``make_data(cfg, layout) -> RunData`` replaces the data
    pipeline (a module-level function: it is pickled into the processes)."""
    under_launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if under_launcher else (nproc or 1)
    validate_layout(cfg, world)
    if not under_launcher or int(os.environ["RANK"]) == 0:
        check_resume(cfg, world)  # refused before any process starts (under a launcher: by rank 0 only)
    if under_launcher:
        if int(os.environ["RANK"]) == 0:
            print(dump_config(cfg), flush=True)
        _run_this_process(cfg, make_data)
        return 0
    if not quiet:
        print(dump_config(cfg), flush=True)
    port = _free_port()
    if world == 1:
        saved = dict(os.environ)  # in this process: leave no RANK/WORLD_SIZE behind for a later launch
        try:
            _worker(0, 1, port, cfg, make_data)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return 0
    ctx: Any = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, cfg, make_data), name=f"rank{r}")
        for r in range(world)
    ]
    for p in procs:
        p.start()
    failed: list[tuple[int, int]] = []
    # Wait for all; when one rank fails, the others would wait on it in a collective: stop them.
    while any(p.is_alive() for p in procs):
        for r, p in enumerate(procs):
            p.join(timeout=0.5)
            if p.exitcode not in (None, 0) and (r, p.exitcode) not in failed:
                failed.append((r, p.exitcode))
        if failed:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join()
            break
    if failed:
        r, code = failed[0]
        print(f"gatedpo: rank {r} exited with code {code}; the other ranks were stopped", file=sys.stderr)
        return code if code > 0 else 1
    return 0
