"""Every config key against hostile values: either a one-line ``ConfigError`` that names the key, or a config
whose numbers are all finite and that reloads from its own dump (what a run prints and saves). A cheap stand-in
for "exit 2 with one line, or a run that trains finite": no training is launched here."""

from __future__ import annotations

import dataclasses
import math
import tempfile
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatedpo_mega.config import Config, dump_config, load_config
from gatedpo_mega.errors import ConfigError


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of every non-section field under ``cls``."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            keys += leaf_keys(tp, f"{key}.")
        else:
            keys.append(key)
    return keys


KEYS = leaf_keys(Config)
# Override texts, parsed as YAML the way the CLI parses them.
HOSTILE = (
    ".nan", ".inf", "-.inf", "nan", "1e999", "-1e999", "1" + "0" * 400, "1" + "0" * 5000,
    "0", "-1", "0.0", "-0.0", "1e-320", "1e308", str(2**31), str(2**32), str(2**63 - 1), str(2**63), str(-(2**63) - 1),
    "''", "[]", "[.nan]", "[1, 2, 3]", "{}", "{a: 1}", "true", "null", "2001-12-14", '"a\\nb"', "x" * 10_000,
)  # fmt: skip


def numbers(tree: Any) -> list[Any]:
    if dataclasses.is_dataclass(tree):
        return [n for f in dataclasses.fields(tree) for n in numbers(getattr(tree, f.name))]
    if isinstance(tree, list):
        return [n for item in tree for n in numbers(item)]
    return [tree] if isinstance(tree, int | float) and not isinstance(tree, bool) else []


def check(overrides: dict[str, str]) -> None:
    """The property: refused in one line naming one of the keys set, or accepted with finite numbers (ints in 64
    bits) and a dump that reloads to the same config."""
    try:
        cfg = load_config(None, [f"{key}={raw}" for key, raw in overrides.items()])
    except ConfigError as e:
        message = str(e)
        assert "\n" not in message and any(key in message for key in overrides), (overrides, message)
        return
    for n in numbers(cfg):
        assert math.isfinite(n) and (isinstance(n, float) or -(2**63) <= n < 2**63), (overrides, n)
    assert _reloaded(cfg) == cfg, overrides


def _reloaded(cfg: Config) -> Config:
    """The config as a run reads it back from the ``config.yaml`` it saved."""
    with tempfile.TemporaryDirectory() as d:
        saved = Path(d) / "config.yaml"
        saved.write_text(dump_config(cfg))
        return load_config(saved)


def test_the_walk_reaches_every_section():
    sections = {k.split(".")[0] for k in KEYS}
    assert sections == {f.name for f in dataclasses.fields(Config)}
    assert {"train.lr", "squeeze.rejected_probs", "data.seed", "model.max_position_embeddings"} <= set(KEYS)


@pytest.mark.parametrize("key", KEYS)
def test_every_key_against_every_hostile_value(key):
    for raw in HOSTILE:
        check({key: raw})


VALUES = st.one_of(
    st.sampled_from(HOSTILE),
    st.floats().map(repr).map(lambda r: {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}.get(r, r)),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.text(max_size=40),
)


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(overrides=st.dictionaries(st.sampled_from(KEYS), VALUES, min_size=1, max_size=3))
def test_any_values_of_any_keys(overrides):
    check(overrides)
