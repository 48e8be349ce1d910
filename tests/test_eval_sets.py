"""Evaluation sets of their own (``data.eval_sets``): config, refusals naming the set, and a run that logs each set
as ``eval/<name>/<metric>`` with the numbers the hash split gives for the same pairs."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed import run_distributed

from gatedpo_mega.config import dump_config, load_config
from gatedpo_mega.data import builtin
from gatedpo_mega.data.errors import DataError
from gatedpo_mega.data.pipeline import is_eval, load_eval_set
from gatedpo_mega.errors import ConfigError

BASE = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=64", "train.micro_batch_size=2", "train.global_batch_size=4", "train.lr=3e-3",
    "train.warmup_steps=1", "train.reference_batch_size=8", "data.builtin_pairs=120", "data.max_length=64",
    "data.max_prompt_length=40", "data.eval_fraction=0.2", "train.report_to=none",
]  # fmt: skip
GOOD = {"prompt": "What is 2 plus 2?", "chosen": " 4.", "rejected": " 5."}


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _heldout_file(path: Path, cfg) -> Path:
    """The built-in pairs the hash split holds out, in order, as a plain-format file."""
    pairs = builtin.generate(cfg.data.builtin_pairs, cfg.data.seed, cfg.data.builtin_off_policy)
    kept = [e for e in pairs if is_eval(e.prompt, cfg.data.eval_fraction)]
    return _jsonl(path, [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in kept])


# ---------------------------------------------------------------------------------------------------------------
# Config


def test_a_set_is_its_source_or_a_mapping_and_the_saved_config_reads_back():
    cfg = load_config(
        None,
        [
            "train.eval_every=1",
            "data.eval_sets.hh=a.jsonl",
            "data.eval_sets.m={source: b.jsonl, format: plain}",
        ],
    )
    assert cfg.data.eval_sets["hh"].source == "a.jsonl" and cfg.data.eval_sets["hh"].format is None
    assert cfg.data.eval_sets["m"].format == "plain"
    import yaml

    from gatedpo_mega.config import build_config

    assert build_config(yaml.safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "data.eval_sets.heldout=a.jsonl",
            "data.eval_sets.heldout: 'heldout' names the data.eval_fraction split",
        ),
        ("data.eval_sets.x.sorce=a.jsonl", "unknown config key 'data.eval_sets.x.sorce'"),
        ("data.eval_sets.x={source: a.jsonl, format: csv}", "data.eval_sets.x.format='csv' is not one of"),
        ("data.eval_sets.x={format: plain}", "data.eval_sets.x.source must name a data file"),
        ("data.eval_sets.x=builtin", "data.eval_sets.x.source must name a data file"),
        (
            "data.eval_sets.x={source: a, chosen_field: rejected}",
            "data.eval_sets.x: chosen_field and rejected_field",
        ),
        ("data.eval_sets=a.jsonl", "data.eval_sets must be a mapping of names"),
    ],
)
def test_bad_sets_are_refused_naming_the_set(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.eval_every=1", override])
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.probe_pairs=-1", "train.eval_every=1"], "data.probe_pairs=-1 must be >= 0"),
        (["data.probe_pairs=5", "data.eval_fraction=0", "train.eval_every=1"],
         "data.probe_pairs=5 are taken from the held-out split: data.eval_fraction must be > 0"),
        (["data.probe_pairs=5"], "data.probe_pairs=5 are evaluated every train.eval_every steps"),
        (["data.eval_sets.probe=a.jsonl", "train.eval_every=1"], "data.eval_sets.probe: 'probe' names data.probe_pairs"),
    ],
)  # fmt: skip
def test_bad_probe_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_sets_without_eval_every_are_refused():
    with pytest.raises(ConfigError, match=r"data.eval_sets \(hh\) are evaluated every train.eval_every"):
        load_config(None, ["data.eval_sets.hh=a.jsonl"])


# ---------------------------------------------------------------------------------------------------------------
# Reading a set: the training data's pipeline, its problems named by the set


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _load(cache: Path, source: Path, fmt: str = "auto", *extra: str):
    mine = f"data.eval_sets.mine={{source: {source}, format: {fmt}}}"
    cfg = load_config(None, [*BASE, f"data.cache_dir={cache}", "train.eval_every=1", mine, *extra])
    return load_eval_set(cfg.data, "mine", seed=cfg.train.seed)


def test_a_set_is_read_tokenized_and_cached(cache, tmp_path):
    source = _jsonl(tmp_path / "mine.jsonl", [GOOD, {**GOOD, "prompt": "And 3 plus 3?"}])
    first = _load(cache, source)
    assert len(first.train) == 2 and first.eval is None
    again = _load(cache, source)
    assert again.cache_path == first.cache_path and again.fingerprint == first.fingerprint
    # Other reading options: another cache entry; the training data's key does not see the sets.
    assert _load(cache, source, "plain").cache_path != first.cache_path
    # data.max_train_pairs cuts the training pairs only: a set is evaluated whole.
    assert len(_load(cache, source, "auto", "data.max_train_pairs=1").train) == 2


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (None, "data.eval_sets.mine: {src}: file does not exist"),
        ([GOOD, "{oops"], "data.eval_sets.mine: {src} line 2: not valid JSON"),
        ([{"prompt": "p", "chosen": 3, "rejected": "r"}], "data.eval_sets.mine: {src} line 1"),
        ([{**GOOD, "chosen": " "}], "data.eval_sets.mine: {src}: no usable evaluation pairs"),
    ],
)
def test_a_bad_set_is_one_line_naming_the_set(cache, tmp_path, records, message):
    src = tmp_path / "mine.jsonl"
    if records is not None:
        src.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    with pytest.raises(DataError) as e:
        _load(cache, src)
    assert str(e.value).startswith(message.format(src=src)), str(e.value)
    assert "\n" not in str(e.value)


def test_probes_that_would_take_the_whole_split_are_refused(cache):
    from gatedpo_mega.data import load_preference_data
    from gatedpo_mega.training.data import eval_sets

    cfg = load_config(None, [*BASE, f"data.cache_dir={cache}", "train.eval_every=1"])
    data = load_preference_data(cfg.data, seed=cfg.train.seed)
    n = len(data.eval)
    cfg = load_config(None, [*BASE, f"data.cache_dir={cache}", "train.eval_every=1", f"data.probe_pairs={n}"])
    with pytest.raises(
        ConfigError, match=f"data.probe_pairs={n} would take every one of the {n} held-out pairs"
    ):
        eval_sets(cfg, data.eval, data.cache_path, seed=0)
    cfg = load_config(
        None, [*BASE, f"data.cache_dir={cache}", "train.eval_every=1", f"data.probe_pairs={n - 1}"]
    )
    sets = eval_sets(cfg, data.eval, data.cache_path, seed=0)
    assert [(prefix, len(pairs), offset) for prefix, pairs, _, offset in sets] == [
        ("eval/", 1, n - 1), ("eval/probe/", n - 1, 0)
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# A run


def _train_worker(rank, world, overrides, out):
    from gatedpo_mega.training.data import make_run_data
    from gatedpo_mega.training.loop import train

    history = train(load_config(None, overrides), make_run_data)
    if rank == 0:
        Path(out).write_text(json.dumps(history))


def _run(cache: Path, tmp_path: Path, name: str, *extra: str) -> list[dict]:
    out = tmp_path / f"{name}.json"
    overrides = [*BASE, f"data.cache_dir={cache}", f"train.output_dir={tmp_path / name}", "train.max_steps=2",
                 "train.eval_every=2", *extra]  # fmt: skip
    run_distributed(_train_worker, 1, overrides, str(out))
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.multiprocess
def test_each_set_is_logged_by_name_and_the_hash_split_as_a_file_gives_its_numbers(cache, tmp_path):
    cfg = load_config(None, BASE)
    split = _heldout_file(tmp_path / "split.jsonl", cfg)
    other = _jsonl(tmp_path / "other.jsonl", [GOOD, {**GOOD, "prompt": "And 3 plus 3?", "chosen": " 6."}])
    held = split.read_text().splitlines(keepends=True)
    (tmp_path / "first3.jsonl").write_text("".join(held[:3]))
    (tmp_path / "rest.jsonl").write_text("".join(held[3:]))
    plain = _run(cache, tmp_path, "plain")
    named = _run(cache, tmp_path, "named", f"data.eval_sets.split={split}",
                 f"data.eval_sets.other={{source: {other}, format: plain}}",
                 f"data.eval_sets.first3={tmp_path / 'first3.jsonl'}", f"data.eval_sets.rest={tmp_path / 'rest.jsonl'}")  # fmt: skip
    probed = _run(cache, tmp_path, "probed", "data.probe_pairs=3")
    assert [r["step"] for r in named] == [0, 1, 2]
    # data.probe_pairs: the split's first 3 pairs apart as eval/probe/, the split's metrics over the rest
    for step in (0, 2):
        for m in ("loss", "logps/chosen", "logps/rejected", "rewards/accuracies", "squeeze/top1_rejected"):
            got, want = probed[step][f"eval/probe/{m}"], named[step][f"eval/first3/{m}"]
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (step, m)
            assert probed[step][f"eval/{m}"] == pytest.approx(
                named[step][f"eval/rest/{m}"], rel=1e-5, abs=1e-6
            )
    assert probed[1]["loss"] == pytest.approx(plain[1]["loss"])  # training is the same
    metrics = [k.removeprefix("eval/") for k in plain[0] if k.startswith("eval/")]
    assert "rewards/accuracies" in metrics and "loss" in metrics
    for step in (0, 2):
        row = named[step]
        assert not any(f"eval/{m}" in row for m in metrics)  # with sets, every name says its set
        for m in metrics:
            for s in ("heldout", "split", "other"):
                assert f"eval/{s}/{m}" in row, (step, s, m)
            # The same pairs and the same model: the same numbers, as the hash split and as a file.
            assert row[f"eval/split/{m}"] == pytest.approx(row[f"eval/heldout/{m}"], rel=1e-5, abs=1e-6), m
            assert row[f"eval/heldout/{m}"] == pytest.approx(plain[step][f"eval/{m}"], rel=1e-5, abs=1e-6), m
    assert named[0]["eval/other/loss"] == pytest.approx(math.log(2.0), abs=1e-6)  # policy = reference
    assert named[1]["loss"] == pytest.approx(plain[1]["loss"])  # the sets change nothing about training

    # gatedpo analyze reads the run and keeps each set's metrics apart.
    from gatedpo_mega.analysis import group_runs, load_run, write_report

    (tmp_path / "named" / "config.yaml").write_text(dump_config(load_config(None, [
        *BASE, "train.eval_every=2", f"data.eval_sets.split={split}", f"data.eval_sets.other={other}"])))  # fmt: skip
    run = load_run(tmp_path / "named")
    assert run.eval[2]["split/rewards/accuracies"] == named[2]["eval/split/rewards/accuracies"]
    paths = write_report(group_runs([run]), tmp_path / "report")
    assert {"eval_split_loss", "eval_other_loss", "eval_heldout_loss"} <= set(paths), sorted(paths)
    # The table: one per set, each from that set's own evaluations; the hash split's equals the plain run's.
    from gatedpo_mega.analysis import summary_rows

    plain_run = load_run(tmp_path / "plain")
    table = paths["table"].read_text()
    for s in ("split", "other", "heldout"):
        assert f"### Evaluation set `{s}`" in table and f"Last evaluation on `{s}`" in table
    rows = {s: summary_rows(group_runs([run]), s)[0] for s in ("split", "other", "heldout")}
    expected = summary_rows(group_runs([plain_run]))[0]
    for col in ("accuracy", "chosen_delta_per_token", "d_top1_rejected", "d_entropy_chosen"):
        assert rows["heldout"][col]["mean"] == pytest.approx(expected[col]["mean"], rel=1e-5, abs=1e-6), col
        assert rows["split"][col]["mean"] == pytest.approx(expected[col]["mean"], rel=1e-5, abs=1e-6), col
    assert rows["other"]["train_fallback"] == 0 and rows["other"]["accuracy"] is not None
    assert rows["other"]["d_top1_rejected"]["mean"] != rows["split"]["d_top1_rejected"]["mean"]


@pytest.mark.slow
def test_a_bad_eval_file_is_refused_before_any_worker_starts(tmp_path):
    bad = tmp_path / "held.jsonl"
    bad.write_text(f"{json.dumps(GOOD)}\n{{oops\n")
    cmd = [sys.executable, "-m", "gatedpo_mega.cli", "train", "--nproc", "2", *BASE, "train.max_steps=2",
           "train.eval_every=1", f"data.eval_sets.held={bad}", f"data.cache_dir={tmp_path / 'cache'}",
           f"train.output_dir={tmp_path / 'out'}"]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    seconds = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"gatedpo: error: data.eval_sets.held: {bad} line 2: not valid JSON"), lines[0]
    assert not (tmp_path / "out").exists()  # no worker ever ran
    assert seconds < 30, seconds
