"""One run per output folder: ``OUTPUT/.gatedpo.lock``, held for the run's life by the process that starts it.

The lock is a file created with ``O_EXCL`` (atomic on local filesystems and NFS), so of two runs that start
together on one folder exactly one gets it; the other is refused in one line naming the holder. It records the
holder's host, pid, process start time and a token; the holder refreshes its modification time every
``HEARTBEAT_S`` seconds and removes it at exit (its own token only).

A lock whose holder is gone is stale: on the holder's host, its pid is not running (or runs another program, by
its start time); from another host, its heartbeat is older than ``STALE_S``. A new run takes a stale lock over
with one line naming the run that left it (a crashed or SIGKILLed run, then ``--resume``). Taking over renames the
stale file away first, so that of two runs that find the same stale lock, one takes it over.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gatedpo_mega.errors import UserError

LOCK_NAME = ".gatedpo.lock"
HEARTBEAT_S = 15.0
STALE_S = 120.0  # a lock from another host whose heartbeat is this old: its holder is gone
_YOUNG_S = 10.0  # a lock file just created and not yet written: its holder is starting


class RunLocked(UserError):
    """The output folder is in use by a live run."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _running(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    now = _start_time(pid)
    return started is None or now is None or now == started


def describe(holder: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {since}"


def stale_reason(holder: dict[str, Any], age: float) -> str | None:
    """Why the holder of a lock is gone (None: it may be alive). ``age``: seconds since its last heartbeat."""
    if holder.get("host") == socket.gethostname():
        if not _running(int(holder.get("pid", -1)), holder.get("start_time")):
            return "its process is not running"
        return None
    if age > STALE_S:
        return f"no heartbeat for {age:.0f} s (more than {STALE_S:.0f})"
    return None


class RunLock:
    """The lock of ``folder``, taken by ``acquire`` and given back by ``release``."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._made: list[Path] = []

    def acquire(self) -> None:
        # The folders made here go again at release when the run left nothing in them (a refused run leaves none).
        self._made = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self._beat = threading.Thread(target=self._heartbeat, name="gatedpo-lock", daemon=True)
                self._beat.start()
                return
            holder, age = self._read()
            if age < 0:
                continue  # released meanwhile: try again
            if holder is None:
                if age < _YOUNG_S:  # being written by a run that starts right now
                    raise RunLocked(
                        f"{self.path.parent} is in use by another run that is starting ({self.path})"
                    )
                holder, reason = {}, "its lock file is empty or unreadable"
            else:
                stale = stale_reason(holder, age)
                if stale is None:
                    raise RunLocked(
                        f"{self.path.parent} is in use by another run ({describe(holder)}); wait for it to end, "
                        f"stop it, or choose another train.output_dir (its lock: {self.path})"
                    )
                reason = stale
            if self._take_over(holder):
                what = describe(holder) if holder else "an unknown run"
                print(f"gatedpo train: taking over the lock of {what}: {reason}", file=sys.stderr, flush=True)
        raise RunLocked(f"{self.path}: could not take the lock (other runs keep taking it)")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        record = {
            "host": socket.gethostname(), "pid": os.getpid(), "start_time": _start_time(os.getpid()),
            "since": time.time(), "token": self.token, "argv": sys.argv,
        }  # fmt: skip
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
            f.flush()
            os.fsync(f.fileno())
        return True

    def _read(self) -> tuple[dict[str, Any] | None, float]:
        """The holder's record (None: unreadable) and seconds since its heartbeat (-1: no lock file)."""
        try:
            age = time.time() - self.path.stat().st_mtime
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None, -1.0
        except (OSError, ValueError):
            return None, age
        return (holder if isinstance(holder, dict) else None), age

    def _take_over(self, holder: dict[str, Any]) -> bool:
        """Move the stale lock away; False if another run moved or replaced it first."""
        if not holder:  # unreadable: no token to compare
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return True
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        if isinstance(moved, dict) and moved.get("token") != holder.get("token"):
            with contextlib.suppress(OSError):  # a live run's lock, taken over by a third run: put it back
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._beat is None:
            return
        self._beat.join()
        self._beat = None
        holder, _ = self._read()
        if holder and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        for folder in self._made:  # innermost first
            try:
                folder.rmdir()
            except OSError:  # not empty (the run's outputs), or gone
                break


@contextlib.contextmanager
def run_lock(folder: str | Path) -> Iterator[RunLock]:
    """Hold the lock of ``folder`` for the ``with`` block; ``RunLocked`` when a live run holds it."""
    lock = RunLock(folder)
    lock.acquire()
    _HELD.append(lock)
    try:
        yield lock
    finally:
        _HELD.remove(lock)
        lock.release()


_HELD: list[RunLock] = []


def release_all() -> None:
    """Give back every lock this process holds (before ``os._exit``, which runs no ``finally``)."""
    for lock in list(_HELD):
        lock.release()
