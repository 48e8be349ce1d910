"""Run a function on several CPU processes joined by a gloo process group, and surface their failures."""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from gatedpo_mega.environment import quiet_known_warnings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...], errors: Any
) -> None:
    quiet_known_warnings()
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        fn(rank, world, *args)
        # Every rank done with its last collective before any tears its connections down: a rank whose peer has
        # already closed them can abort in gloo's threads ("terminate called without an active exception").
        dist.barrier()
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world: int, *args: Any) -> None:
    """Call ``fn(rank, world, *args)`` on ``world`` processes; raise with the first rank's traceback on failure.

    ``fn`` must be a module-level function (it is pickled into the spawned processes).
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    for p in procs:
        if p.is_alive():
            p.kill()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if failures or any(p.exitcode != 0 for p in procs):
        codes = [p.exitcode for p in procs]
        raise AssertionError(f"distributed run failed (exit codes {codes}):\n" + "\n".join(failures))
