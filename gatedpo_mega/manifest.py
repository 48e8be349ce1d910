"""What a checkpoint holds: each file's size and SHA-256, recorded in its ``meta.json`` when it is written and
checked before it is read. Pure functions over a folder; the collective parts are in ``training/checkpoint.py``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

HASH = "sha256"
_CHUNK = 16 << 20


def file_record(path: Path, *, sync: bool = False) -> dict[str, Any]:
    """Size and SHA-256 of a file; ``sync``: flush it to stable storage first (after writing it)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if sync:
            os.fsync(f.fileno())
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
        size = f.tell()
    return {"size": size, HASH: digest.hexdigest()}


def share(names: list[str], rank: int, world: int) -> list[str]:
    """The files one of ``world`` processes checks (every file is checked by exactly one)."""
    return sorted(names)[rank::world]


def missing_or_resized(root: Path, files: dict[str, dict[str, Any]]) -> str | None:
    """The first file of ``files`` that is absent or not its recorded size (cheap: no file is read). A process
    that passes this sees every file of the checkpoint, which is what resuming on a shared filesystem needs."""
    for name in sorted(files):
        path = root / name
        try:
            size = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != files[name]["size"]:
            return f"{name} is {size} bytes, {files[name]['size']} were written"
    return None


def changed(root: Path, files: dict[str, dict[str, Any]], names: list[str]) -> str | None:
    """The first of ``names`` whose content no longer has its recorded checksum (None: all intact)."""
    for name in names:
        try:
            actual = file_record(root / name)[HASH]
        except OSError as e:
            return f"{name} is unreadable ({e.strerror or e})"
        if actual != files[name][HASH]:
            return f"{name} does not have the checksum it was written with (its content changed)"
    return None


def total_size(files: dict[str, dict[str, Any]]) -> int:
    return sum(int(f["size"]) for f in files.values())
