"""Bad data input: one line naming the file, the line (or row) and the field."""

from __future__ import annotations

from gatedpo_mega.errors import UserError


class DataError(UserError):
    """A data file, record or tokenizer is unusable; the message says where and why."""


def where(file: str, index: int | None, *, unit: str = "line") -> str:
    """``file line 12`` (1-based lines) or ``file row 11`` (0-based rows, as tables count them)."""
    return file if index is None else f"{file} {unit} {index}"
