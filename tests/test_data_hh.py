"""The HH-RLHF sample (../shared/data): exact counts, masks, round-trips, determinism, DP invariance."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA

from gatedpo_mega.data import DataConfig, PreferenceLoader, load_preference_data
from gatedpo_mega.data.cli import train_tokenizer
from gatedpo_mega.data.loader import collate
from gatedpo_mega.data.records import split_hh

HH = SHARED_DATA / "hh-rlhf" / "harmless-base-test-2000.jsonl.gz"
pytestmark = pytest.mark.skipif(not HH.is_file(), reason=f"shared HH-RLHF sample not found at {HH}")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hh-cache")


def hh_cfg(cache_dir: Path, **kw) -> DataConfig:
    return DataConfig(source=str(HH), cache_dir=str(cache_dir), **kw)


@pytest.fixture(scope="module")
def hh_full(cache_dir: Path):
    """No truncation: long enough for every transcript under the built-in tokenizer."""
    return load_preference_data(hh_cfg(cache_dir, max_length=8192, max_prompt_length=6144), seed=0)


@pytest.fixture(scope="module")
def raw() -> list[dict[str, str]]:
    with gzip.open(HH, "rt") as fh:
        return [json.loads(line) for line in fh]


def test_exact_counts_by_reason(cache_dir: Path) -> None:
    d = load_preference_data(hh_cfg(cache_dir), seed=0)
    r = d.report
    assert r.records == 2000
    assert r.dropped == {"prompt_mismatch": 4, "empty_response": 4}
    assert r.kept == 1992 == r.train + r.eval == len(d.train) + len(d.eval)
    assert r.truncated["prompt"] > 0  # default max_prompt_length=64 cuts most HH prompts, keeping their end


def test_decode_round_trip_and_masks(hh_full, raw) -> None:
    d = hh_full
    tok = d.tokenizer
    assert d.report.truncated == {"prompt": 0, "response": 0}
    for i in range(0, len(d.train), 37):
        pair = d.train[i]
        rec = raw[int(d.train.source_index[i])]
        (prompt, chosen), (_, rejected) = split_hh(rec["chosen"]), split_hh(rec["rejected"])
        assert pair.prompt[0] == tok.bos_id
        assert tok.decode(pair.prompt[1:]) == prompt
        assert tok.decode(pair.chosen[:-1]) == chosen and pair.chosen[-1] == tok.eos_id
        assert tok.decode(pair.rejected[:-1]) == rejected and pair.rejected[-1] == tok.eos_id
        batch = collate(d.train, [i], pad_to_multiple=8, pad_id=tok.pad_id)
        mask = batch.loss_mask
        assert int(mask[0].sum()) == len(pair.chosen) and int(mask[1].sum()) == len(pair.rejected)
        # the mask starts exactly at the last prompt position (which predicts the first response token)
        assert not mask[:, : len(pair.prompt) - 1].any() and mask[:, len(pair.prompt) - 1].all()
        assert tok.decode(batch.labels[0][mask[0]].tolist()[:-1]) == chosen


def _pair_ids(pairs, *, dp: int, mbs: int, steps: int, seed: int = 11) -> list[list[int]]:
    loaders = [
        PreferenceLoader(
            pairs,
            global_batch_size=32,
            micro_batch_size=mbs,
            dp_rank=r,
            dp_size=dp,
            seed=seed,
            pad_to_multiple=8,
            pad_id=0,
        )
        for r in range(dp)
    ]
    return [sorted(int(i) for ld in loaders for b in next(ld) for i in b.pair_ids) for _ in range(steps)]


def test_same_pairs_over_dp1_and_dp2(hh_full) -> None:
    steps = 2 * (len(hh_full.train) // 32) + 3  # across two epoch boundaries
    dp1 = _pair_ids(hh_full.train, dp=1, mbs=8, steps=steps)
    assert _pair_ids(hh_full.train, dp=2, mbs=4, steps=steps) == dp1
    assert _pair_ids(hh_full.train, dp=2, mbs=16, steps=steps) == dp1


def test_deterministic_across_runs_and_resume(cache_dir: Path, tmp_path: Path) -> None:
    a = load_preference_data(hh_cfg(cache_dir), seed=0)
    b = load_preference_data(hh_cfg(tmp_path / "fresh"), seed=0)  # a second, independent tokenization
    assert a.fingerprint == b.fingerprint
    assert np.array_equal(a.train.tokens, b.train.tokens) and np.array_equal(a.train.offsets, b.train.offsets)

    def make(pairs):
        return PreferenceLoader(
            pairs,
            global_batch_size=16,
            micro_batch_size=4,
            dp_rank=1,
            dp_size=2,
            seed=5,
            pad_to_multiple=8,
            pad_id=3,
        )

    la, lb = make(a.train), make(b.train)
    for _ in range(10):
        assert [x.input_ids.tolist() for x in next(la)] == [x.input_ids.tolist() for x in next(lb)]
    state = la.state_dict()
    expect = [[x.input_ids.tolist() for x in next(la)] for _ in range(5)]
    lc = make(b.train)
    lc.load_state_dict(state)
    assert [[x.input_ids.tolist() for x in next(lc)] for _ in range(5)] == expect


@pytest.mark.slow
def test_trained_tokenizer_loads_as_file_and_folder(cache_dir: Path, tmp_path: Path, raw) -> None:
    from gatedpo_mega.config import load_config

    cfg = load_config(None, [f"data.source={HH}", f"data.cache_dir={cache_dir}"])
    model = train_tokenizer(cfg, vocab_size=2000, output=str(tmp_path / "tok"), seed=0)
    for spec in (model, model.parent):
        d = load_preference_data(
            hh_cfg(cache_dir, tokenizer=str(spec), max_length=4096, max_prompt_length=3072), seed=0
        )
        assert d.tokenizer.vocab_size == 2000 and d.report.kept == 1992
        pair = d.train[0]
        prompt, chosen = split_hh(raw[int(d.train.source_index[0])]["chosen"])  # type: ignore[misc]
        assert (
            d.tokenizer.decode(pair.prompt[1:]) == prompt and d.tokenizer.decode(pair.chosen[:-1]) == chosen
        )
        # a tokenizer trained on the data is far more compact than the built-in one's byte fallback
        assert d.train.row_lengths.mean() < 500
