"""Value checks shared by the config sections: each raises ``ValueError`` naming the full key and what is allowed
(``gatedpo_mega.config`` turns it into a one-line ``ConfigError``)."""

from __future__ import annotations

from typing import Any


def choice(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")


def positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")
