"""Value checks shared by the config sections: each raises ``ValueError`` naming the full key and what is allowed
(``gatedpo_mega.config`` turns it into a one-line ``ConfigError``)."""

from __future__ import annotations

from typing import Any

# SentencePiece takes its seed as a C uint32 (``set_random_generator_seed``), and ``train.seed`` reaches it when
# ``data.seed`` is null; numpy's and torch's generators take any seed in this range too.
SEED_LIMIT = 2**32


def choice(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")


def positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    # Written so that NaN (every comparison false) is refused too, for sections built without the loader.
    if not (value > 0 or (allow_zero and value == 0)):
        raise ValueError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def not_empty(key: str, value: str | list[Any]) -> None:
    if not value:
        raise ValueError(f"{key} must not be empty")


def valid_seed(key: str, value: int) -> None:
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{key}={value} must be in [0, 2**32)")
