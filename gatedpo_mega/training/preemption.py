"""Preemption: a signal asks the run to save and stop, on every rank together.

A scheduler that takes the nodes back (SLURM's ``--signal``, Kubernetes, spot instances) sends SIGTERM or SIGUSR1
some time before it kills the job. A handler here only records the signal; the loop finishes the step it is in,
and after every step all ranks agree on whether any of them received one (``at_step_end``: in the all-reduce that
already brings the busiest rank's peak memory to the step's record), so a signal delivered to a single rank stops
all of them at the same step. The loop then writes a whole
checkpoint of that step, verifies it, and every rank exits with ``PREEMPTED`` (75, ``EX_TEMPFAIL``: "try again"),
which a requeueing job script tells apart from a failure. A second signal during the save is recorded and
ignored: the checkpoint is written whole or, if the process is killed first, not at all (``checkpoint.py``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from types import FrameType
from typing import Any, Self

import torch
import torch.distributed as dist

from gatedpo_mega.errors import UserError

PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: the job was stopped on request and its state saved; requeue it


class Preempted(UserError):
    """The run saved a checkpoint on a signal and stops; not an error (``gatedpo: preempted: ...``, exit 75)."""

    exit_code = PREEMPTED
    every_rank = True


class SignalWatch:
    """Records the first of ``names`` this process receives while inside the ``with`` block (the previous handlers
    are restored at its end). Outside the main thread, where Python cannot install handlers, it watches nothing."""

    def __init__(self, names: list[str] | tuple[str, ...]) -> None:
        self.signals = [signal.Signals[name] for name in names]
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def at_step_end(watch: SignalWatch, peak_mib: float, device: torch.device) -> tuple[float, str | None]:
    """Collective over the default group, once per step: the busiest rank's peak memory (``peak_mib`` is this
    rank's) and the name of a signal some rank received (None: none; the highest-numbered when several did). One
    all-reduce for both, so that watching for signals adds no collective to a step. Every rank gets the same
    answer. ``device``: the backend's (NCCL needs CUDA tensors)."""
    mine = float(watch.received) if watch.received is not None else 0.0
    values = torch.tensor([peak_mib, mine], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    peak, code = float(values[0]), int(values[1])
    return peak, (signal.Signals(code).name if code else None)


class ForwardingWatch(SignalWatch):
    """For a launching process: passes each signal it records on to ``pids`` (the ranks it started), so that
    ``kill <launcher>`` reaches every rank."""

    def __init__(self, names: list[str] | tuple[str, ...], pids: list[int | None]) -> None:
        super().__init__(names)
        self.pids = pids

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        super()._handle(signum, frame)
        self.forward(signal.Signals(signum))

    def forward(self, sig: signal.Signals) -> None:
        for pid in [p for p in self.pids if p is not None]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
