"""Hugging Face Hub ids as ``model.init_from`` and ``data.source``, resolved through a Hugging Face cache that the
tests build themselves, offline, in the layout huggingface_hub writes (``models--org--name/{blobs,refs,snapshots}``)."""

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from convert_helpers import make_hf_folder

from gatedpo_mega.config import load_config
from gatedpo_mega.data.sources import resolve_files, split_files
from gatedpo_mega.errors import UserError
from gatedpo_mega.hub import HubId, hub_id, parse_hub_id
from gatedpo_mega.training.preflight import load_run_config, resolve_hub_ids

TIMING = {"tokens_per_second", "real_tokens_per_second", "step_seconds", "memory/peak_mib_max_rank"}


def add_to_cache(
    cache: Path, repo_id: str, repo_type: str, files: dict[str, bytes], ref: str = "main"
) -> Path:
    """``files`` as one commit of ``repo_id`` in the Hugging Face cache ``cache``: each file a blob named by its
    hash, the snapshot a tree of relative links to the blobs, ``refs/<ref>`` the commit. Returns the snapshot."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(
        json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()
    )
    snapshot = repo / "snapshots" / commit.hexdigest()
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit.hexdigest())
    return snapshot


def _pairs(n: int, tag: str) -> bytes:
    rows = [
        {
            "prompt": f"{tag} question {i}: what is {i} plus {i}?",
            "chosen": f" It is {2 * i}.",
            "rejected": " No idea.",
        }
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A cache holding ``org/tiny-llama`` (a 2-layer Llama) and ``org/tiny-prefs`` (train and test files), and
    the same files as plain local paths."""
    root = tmp_path_factory.mktemp("hub")
    local = make_hf_folder("llama", root, vocab_size=512)  # the built-in tokenizer's vocabulary
    cache = root / "cache"
    model_files = {p.name: p.read_bytes() for p in local.iterdir()}
    model = add_to_cache(cache, "org/tiny-llama", "model", {**model_files, "README.md": b"not downloaded"})
    train, test = _pairs(24, "train"), _pairs(8, "test")
    data = add_to_cache(
        cache, "org/tiny-prefs", "dataset", {"data/train.jsonl": train, "data/test.jsonl": test}
    )
    (root / "train.jsonl").write_bytes(train)
    return {
        "cache": cache,
        "model": model,
        "data": data,
        "local_model": local,
        "local_data": root / "train.jsonl",
    }


@pytest.fixture
def offline(hub, monkeypatch):
    """This process as under ``HF_HUB_OFFLINE=1 HF_HUB_CACHE=<the test's cache>`` (huggingface_hub reads both when
    imported, so its constants are set)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("org/tiny-llama", HubId("org/tiny-llama", None)),
        ("gpt2", HubId("gpt2", None)),
        ("meta-llama/Llama-3.2-1B@main", HubId("meta-llama/Llama-3.2-1B", "main")),
        ("org/name@refs/pr/1", HubId("org/name", "refs/pr/1")),
        ("org/v1.5_x@0123abcd", HubId("org/v1.5_x", "0123abcd")),
        ("outputs/run/sft", None),  # two slashes: a path
        ("./org/name", None),
        ("/data/org/name", None),
        ("~/models/x", None),
        ("pairs.jsonl", None),  # a file name: a missing file, never a repository
        ("org/pairs.parquet", None),
        ("org/name@", None),
        ("org--x/name", None),
        ("org/na..me", None),
        ("-org/name", None),
        ("x" * 97, None),
        ("", None),
    ],
)
def test_parse_hub_id(text, expected):
    assert parse_hub_id(text) == expected


def test_an_existing_path_is_a_path_even_when_it_reads_as_an_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_id("org/name") == HubId("org/name", None)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub_id("org/name") is None
    assert hub_id("x" * 10_000) is None  # a name the system refuses: the path's own check reports it


@pytest.mark.parametrize(
    ("paths", "split", "expected"),
    [
        (["data/train-00000-of-00001.parquet", "data/test-00000-of-00001.parquet"], "train", [0]),
        (["data/train-00000-of-00001.parquet", "data/test-00000-of-00001.parquet"], "test", [1]),
        (["train/0000.parquet", "validation/0000.parquet"], "validation", [1]),
        (["train.jsonl", "dev.jsonl"], "validation", [1]),
        (["pairs.jsonl", "more.jsonl"], "train", [0, 1]),  # no split named: everything is train
        (["pairs.jsonl"], "test", []),
        (
            ["data/train_prefs-0.parquet", "data/train_sft-0.parquet", "data/test_prefs-0.parquet"],
            "train",
            [],
        ),
        (["data/train_prefs-0.parquet", "data/train_sft-0.parquet"], "train_prefs", [0]),
        (["constrained.jsonl", "train.jsonl"], "train", [1]),
    ],
)
def test_split_files(paths, split, expected):
    assert split_files(paths, split) == [paths[i] for i in expected]


def test_ids_resolve_to_their_cache_folders_offline(offline):
    cfg = load_config(None, ["model.init_from=org/tiny-llama", "data.source=org/tiny-prefs"])
    resolved, notes = resolve_hub_ids(cfg)
    assert Path(resolved.model.init_from) == offline["model"].resolve()
    assert Path(resolved.data.source) == offline["data"].resolve()
    assert [n.split(":")[0] for n in notes] == [
        "model.init_from org/tiny-llama",
        "data.source org/tiny-prefs",
    ]
    assert resolve_files(resolved.data.source) == [offline["data"].resolve() / "data" / "train.jsonl"]
    assert resolve_files("org/tiny-prefs", "test") == [offline["data"].resolve() / "data" / "test.jsonl"]
    commit = offline["model"].name
    pinned, _ = resolve_hub_ids(load_config(None, [f"model.init_from=org/tiny-llama@{commit}"]))
    assert pinned.model.init_from == resolved.model.init_from
    with pytest.raises(UserError, match=r"^data\.source org/tiny-prefs: no files of split 'validation'"):
        resolve_files("org/tiny-prefs", "validation")


def test_a_model_id_gives_a_run_config_its_shapes_from_the_cache(offline):
    """Read from the snapshot's config.json; the id stays in the config (``launch`` resolves it for the ranks)."""
    cfg, notes = load_run_config(None, ["model.init_from=org/tiny-llama"])
    m = cfg.model
    assert (m.num_layers, m.rotary_base, m.init_from, notes) == (2, 500000.0, "org/tiny-llama", [])
    with pytest.raises(UserError) as e:
        load_run_config(None, ["model.init_from=org/tiny-llama", "model.num_layers=4"])
    assert str(e.value) == (
        "model.init_from=org/tiny-llama disagrees with the config: model.num_layers 2 (source) vs 4 (config)"
    )


def test_an_id_that_is_not_cached_offline_is_one_line(offline):
    cfg = load_config(None, ["model.init_from=org/absent"])
    with pytest.raises(UserError) as e:
        resolve_hub_ids(cfg)
    assert str(e.value) == (
        f"model.init_from=org/absent: no such local file or folder, not in the Hugging Face cache "
        f"({offline['cache']}), and HF_HUB_OFFLINE=1 forbids downloading it: download it into that cache where "
        "the Hub is reachable (`hf download org/absent`) or unset HF_HUB_OFFLINE"
    )
    with pytest.raises(UserError, match=r"^data\.source=org/tiny-prefs@v2: .*`hf download org/tiny-prefs "):
        resolve_files("org/tiny-prefs@v2")


def _first_run_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.slow
def test_a_run_from_hub_ids_equals_the_run_from_the_local_folders(offline, tmp_path, capfd):
    from gatedpo_mega.training.launch import launch

    base = [
        "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=96", "model.norm_epsilon=1e-6", "model.rotary_base=500000", "train.max_steps=2",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.lr=1e-2", "train.warmup_steps=0",
        "data.max_length=48", "data.max_prompt_length=32", "data.eval_fraction=0", "train.save_final=false",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    hub = [
        "model.init_from=org/tiny-llama",
        "data.source=org/tiny-prefs",
        f"train.output_dir={tmp_path / 'hub'}",
    ]
    local = [
        f"model.init_from={offline['local_model']}", f"data.source={offline['local_data']}",
        f"train.output_dir={tmp_path / 'local'}",
    ]  # fmt: skip
    assert launch(load_config(None, [*base, *hub]), None) == 0
    out = capfd.readouterr().out
    assert f"Hugging Face cache: model.init_from org/tiny-llama: {offline['model'].resolve()}" in out
    assert launch(load_config(None, [*base, *local]), None) == 0
    from_hub, from_local = _first_run_rows(tmp_path / "hub"), _first_run_rows(tmp_path / "local")
    assert [r["step"] for r in from_hub] == [1, 2]
    assert from_hub[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)  # the policy is the reference
    assert from_hub == from_local
    saved = (tmp_path / "hub" / "config.yaml").read_text()
    assert str(offline["model"].resolve()) in saved and str(offline["data"].resolve()) in saved


@pytest.mark.slow
def test_an_uncached_id_offline_stops_the_command_before_any_worker_starts(hub, tmp_path):
    cmd = [sys.executable, "-m", "gatedpo_mega.cli", "train", "--nproc", "2", "model.init_from=org/absent"]
    cmd += [f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={tmp_path / 'out'}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub["cache"]), "DS_ACCELERATOR": "cpu"}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"gatedpo: error: model.init_from=org/absent: no such local file or folder, not in the Hugging Face cache "
        f"({hub['cache']}), and HF_HUB_OFFLINE=1 forbids downloading it: download it into that cache where the Hub "
        "is reachable (`hf download org/absent`) or unset HF_HUB_OFFLINE"
    ]
    assert not (tmp_path / "out").exists()  # no worker ever ran
    assert time.monotonic() - t0 < 30
