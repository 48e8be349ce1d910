"""``configs/hh.yaml``: the HH recipe from a fresh clone, scaled down (tiny model, a few steps), and the tokenizer it
trains when the one it names is missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from gatedpo_mega.config import load_config
from gatedpo_mega.data.pipeline import ensure_tokenizer
from gatedpo_mega.data.tokenizer import load_tokenizer
from gatedpo_mega.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
HH = SHARED_DATA / "hh-rlhf" / "harmless-base-test-2000.jsonl.gz"


def test_a_missing_tokenizer_is_trained_once_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "tok" / "small"
    data = load_config(
        None,
        [f"data.tokenizer={target}", "data.train_tokenizer_if_missing=true", "data.tokenizer_vocab_size=320",
         "data.builtin_pairs=300", f"data.cache_dir={tmp_path / 'cache'}"],
    ).data  # fmt: skip
    assert ensure_tokenizer(data, seed=0) == target / "tokenizer.model"
    assert capsys.readouterr().out == f"tokenizer {target} not found: training it on the data (320 pieces)\n"
    assert load_tokenizer(str(target)).vocab_size == 320
    assert ensure_tokenizer(data, seed=0) is None  # there now: nothing to do, nothing said
    assert capsys.readouterr().out == ""
    as_file = tmp_path / "tok" / "named.model"
    data.tokenizer = str(as_file)
    assert ensure_tokenizer(data, seed=0) == as_file and as_file.is_file()


def test_training_a_tokenizer_needs_a_path_and_enough_pieces() -> None:
    with pytest.raises(ConfigError, match=r"data.train_tokenizer_if_missing=true needs data.tokenizer"):
        load_config(None, ["data.train_tokenizer_if_missing=true"])
    with pytest.raises(ConfigError, match=r"data.tokenizer_vocab_size=100 must be >= 300"):
        load_config(None, ["data.tokenizer_vocab_size=100"])


@pytest.mark.slow
@pytest.mark.skipif(not HH.is_file(), reason=f"shared HH-RLHF sample not found at {HH}")
def test_the_hh_recipe_trains_its_tokenizer_then_the_model(tmp_path: Path) -> None:
    tok, out = tmp_path / "tokenizers" / "hh-400", tmp_path / "run"
    tiny = [
        "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64", "model.max_position_embeddings=64",
        "data.max_length=64", "data.max_prompt_length=32", "data.tokenizer_vocab_size=400",
        "train.max_steps=3", "train.eval_every=3", "train.eval_max_pairs=16", "train.reference_batch_size=64",
    ]  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-m", "gatedpo_mega.cli", "train", "--config", "configs/hh.yaml", *tiny,
         f"data.tokenizer={tok}", f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={out}"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[0].startswith(
        f"tokenizer {tok} not found: training it on the data (400 pieces"
    )
    assert load_tokenizer(str(tok)).vocab_size == 400
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    assert "eval/rewards/accuracies" in rows[-1] and rows[-1]["loss"] > 0
