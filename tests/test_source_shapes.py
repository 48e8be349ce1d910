"""``model.init_from`` fixes the model's shapes: a run's config reads them from the source (a Hugging Face folder of
each family, an mcore folder with its padding, a training checkpoint); a written field that agrees is accepted, every
written one that disagrees is refused in one line before any worker starts."""

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from convert_helpers import hf_config, make_hf_folder

from gatedpo_mega.cli import main
from gatedpo_mega.convert.hf_config import hf_model_config
from gatedpo_mega.convert.mcore import mcore_meta
from gatedpo_mega.errors import UserError
from gatedpo_mega.families import SHAPE_FIELDS
from gatedpo_mega.formats import MCORE_META
from gatedpo_mega.training.preflight import load_run_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# What tests/convert_helpers.py's tiny models are (hidden 64, 4 heads in 2 groups, SwiGLU 96, eps 1e-6, 128 positions).
COMMON = {"hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2, "ffn_hidden_size": 96, "num_experts": 0,
          "moe_ffn_hidden_size": 0}  # fmt: skip
FAMILY_MODELS = {
    "llama": {**COMMON, "num_layers": 2, "head_dim": 0, "tie_embeddings": False, "qkv_bias": False,
              "qk_norm": False, "rotary_base": 500000.0},
    "mistral": {**COMMON, "num_layers": 4, "head_dim": 0, "tie_embeddings": False, "qkv_bias": False,
                "qk_norm": False},
    "qwen2": {**COMMON, "num_layers": 2, "head_dim": 0, "tie_embeddings": True, "qkv_bias": True, "qk_norm": False},
    "qwen3": {**COMMON, "num_layers": 2, "head_dim": 32, "tie_embeddings": True, "qkv_bias": False, "qk_norm": True},
}  # fmt: skip
# A run that trains for two steps in a few seconds: the built-in data, one process.
RUN = [
    "train.max_steps=2", "train.micro_batch_size=2", "train.global_batch_size=4", "train.reference_batch_size=8",
    "train.lr=1e-2", "train.warmup_steps=0", "train.report_to=none", "data.builtin_pairs=32", "data.max_length=48",
    "data.max_prompt_length=32", "data.eval_fraction=0",
]  # fmt: skip


def config_folder(root: Path, name: str, config: dict) -> Path:
    """A Hugging Face folder of ``config.json`` alone: all that the config reads from it."""
    path = root / name
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def model_fields(cfg) -> dict:
    m = cfg.model
    return {k: getattr(m, k) for k in SHAPE_FIELDS}


def printed_config(capsys, *args: str) -> tuple[dict, str]:
    """``gatedpo config ARGS``: the printed YAML and what went to stderr."""
    assert main(["config", *args]) == 0
    out = capsys.readouterr()
    return yaml.safe_load(out.out), out.err


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """A tiny Qwen2 model (q/k/v bias, tied embeddings) with a vocabulary of 520: the built-in tokenizer's 512 fit,
    and padding to 64 (576) and to 128 (640) differ; and the same model converted by ``gatedpo convert
    hf-to-mcore`` (padded to a multiple of 64)."""
    root = tmp_path_factory.mktemp("qwen2")
    hf = make_hf_folder("qwen2", root, vocab_size=520)
    mcore = root / "mcore"
    assert main(["convert", "hf-to-mcore", "--src", str(hf), "--dst", str(mcore)]) == 0
    return {"hf": hf, "mcore": mcore, "root": root}


@pytest.mark.parametrize("kind", list(FAMILY_MODELS))
def test_a_config_without_shapes_reads_them_from_a_hugging_face_folder(kind, tmp_path, capsys):
    folder = config_folder(tmp_path, kind, hf_config(kind).to_dict())
    expected = FAMILY_MODELS[kind]
    cfg, notes = load_run_config(None, [f"model.init_from={folder}"])
    assert notes == []
    m = cfg.model
    assert {k: getattr(m, k) for k in expected} == expected
    assert (m.norm_epsilon, m.max_position_embeddings) == (1e-6, 128)
    assert (m.make_vocab_size_divisible_by, m.vocab_size) == (
        64,
        0,
    )  # the config's padding; the vocabulary: later
    printed, err = printed_config(capsys, f"model.init_from={folder}")
    assert {k: printed["model"][k] for k in expected} == expected and err == ""


def test_a_written_field_that_agrees_is_accepted_and_a_written_limit_is_kept(tmp_path):
    folder = config_folder(tmp_path, "qwen3", hf_config("qwen3").to_dict())
    written = ["model.num_layers=2", "model.head_dim=32", "model.qk_norm=true", "model.norm_epsilon=1e-6",
               "model.rotary_base=10000", "model.max_position_embeddings=256"]  # fmt: skip
    cfg, _ = load_run_config(None, [f"model.init_from={folder}", *written])
    assert model_fields(cfg) == {**FAMILY_MODELS["qwen3"], "head_dim": 32}
    assert cfg.model.max_position_embeddings == 256  # a limit, not a shape: the config's
    with pytest.raises(UserError) as e:
        load_run_config(None, [f"model.init_from={folder}", "model.vocab_size=152"])
    assert str(e.value).endswith("disagrees with the config: model.vocab_size 150 (source) vs 152 (config)")


def test_the_transformers_backend_takes_its_model_from_the_folder_itself(tmp_path):
    """Not read for the config: a folder the megatron-core model cannot represent (an o_proj bias) still loads."""
    folder = config_folder(tmp_path, "llama", {**hf_config("llama").to_dict(), "attention_bias": True})
    cfg, notes = load_run_config(None, ["model.backend=transformers", f"model.init_from={folder}"])
    assert cfg.model.num_layers == 4 and notes == []  # the default, unused by that backend
    with pytest.raises(UserError, match=r"attention_bias=true puts a bias on o_proj"):
        load_run_config(None, [f"model.init_from={folder}"])


def test_every_disagreeing_written_field_is_refused_in_one_line_before_any_worker_starts(tmp_path):
    """Written in an included file and as an override: both named, with both values, in one line (exit 2)."""
    folder = config_folder(tmp_path, "llama", hf_config("llama").to_dict())
    (tmp_path / "base.yaml").write_text("model: {num_layers: 3, num_attention_heads: 4}\n")
    (tmp_path / "run.yaml").write_text("include: base.yaml\ntrain: {max_steps: 2}\n")
    cmd = [
        sys.executable,
        "-m",
        "gatedpo_mega.cli",
        "train",
        "--nproc",
        "2",
        "--config",
        str(tmp_path / "run.yaml"),
    ]
    cmd += [f"model.init_from={folder}", "model.hidden_size=32", f"train.output_dir={tmp_path / 'out'}"]
    cmd += [f"data.cache_dir={tmp_path / 'cache'}"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"gatedpo: error: model.init_from={folder} disagrees with the config: model.num_layers 2 (source) vs 3 "
        "(config); model.hidden_size 64 (source) vs 32 (config)"
    ]
    assert (
        not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    )  # nothing ran, nothing was read
    assert time.monotonic() - t0 < 30


def _real_model_config(kind: str) -> dict:
    """config.json of Qwen2.5-0.5B and Qwen3-0.6B (the values the shipped configs describe)."""
    common = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
              "vocab_size": 151936, "use_sliding_window": False, "attention_dropout": 0.0}  # fmt: skip
    if kind == "qwen2":
        own = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
               "num_key_value_heads": 2, "max_position_embeddings": 32768, "sliding_window": 32768}  # fmt: skip
    else:
        own = {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
               "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
               "attention_bias": False, "sliding_window": None}  # fmt: skip
    return {"model_type": kind, "architectures": [f"{kind.capitalize()}ForCausalLM"], **common, **own}


@pytest.mark.parametrize(("kind", "config"), [("qwen2", "qwen2.5-0.5b.yaml"), ("qwen3", "qwen3-0.6b.yaml")])
def test_the_shipped_configs_agree_with_their_models_and_take_an_mcore_folders_padding(
    kind, config, tmp_path
):
    """configs/qwen2.5-0.5b.yaml writes make_vocab_size_divisible_by 128; a folder of ``gatedpo convert hf-to-mcore``
    was padded to a multiple of 64 (its gatedpo_mcore.json, as the converter writes it): the run takes 64."""
    hf = _real_model_config(kind)
    cfg, notes = load_run_config([CONFIGS / config], [f"model.init_from={config_folder(tmp_path, 'hf', hf)}"])
    assert notes == [] and cfg.model.make_vocab_size_divisible_by == 128
    mcore = tmp_path / "mcore"
    mcore.mkdir()
    meta = mcore_meta(hf_model_config(hf)[0], 151936, tensor=1, pipeline=1, hf_config=hf)
    (mcore / MCORE_META).write_text(json.dumps(meta))
    from_mcore, notes = load_run_config([CONFIGS / config], [f"model.init_from={mcore}"])
    assert from_mcore.model.make_vocab_size_divisible_by == 64
    assert notes == [
        "model.make_vocab_size_divisible_by 64 from model.init_from, whose embedding is padded already (the "
        "config's 128 applies to models initialised here)"
    ]
    assert model_fields(from_mcore) == model_fields(cfg)


def test_an_mcore_folder_gives_its_shapes_and_padding(qwen2, tmp_path, capsys):
    (tmp_path / "pad128.yaml").write_text("model: {make_vocab_size_divisible_by: 128}\n")
    printed, err = printed_config(capsys, f"model.init_from={qwen2['mcore']}")
    assert {k: printed["model"][k] for k in FAMILY_MODELS["qwen2"]} == FAMILY_MODELS["qwen2"]
    assert (printed["model"]["make_vocab_size_divisible_by"], err) == (64, "")
    printed, err = printed_config(
        capsys, "--config", str(tmp_path / "pad128.yaml"), f"model.init_from={qwen2['mcore']}"
    )
    assert printed["model"]["make_vocab_size_divisible_by"] == 64
    assert err == (
        "gatedpo config: model.make_vocab_size_divisible_by 64 from model.init_from, whose embedding is padded "
        "already (the config's 128 applies to models initialised here)\n"
    )
    printed, _ = printed_config(
        capsys, "--config", str(tmp_path / "pad128.yaml"), f"model.init_from={qwen2['hf']}"
    )
    assert (
        printed["model"]["make_vocab_size_divisible_by"] == 128
    )  # a Hugging Face folder is padded on the way in


@pytest.fixture(scope="module")
def trained(qwen2):
    """Two steps from the mcore folder with a config that writes make_vocab_size_divisible_by 128 (refused before:
    the folder is padded to 576 rows, 128 would make 640), through ``gatedpo train``."""
    root = qwen2["root"]
    (root / "run.yaml").write_text("model: {make_vocab_size_divisible_by: 128}\n")
    out = root / "run"
    args = ["train", "--config", str(root / "run.yaml"), f"model.init_from={qwen2['mcore']}", *RUN]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*args, f"data.cache_dir={root / 'cache'}", f"train.output_dir={out}"]) == 0
    return {"out": out, "printed": printed.getvalue()}


def test_a_run_from_an_mcore_folder_padded_to_64_trains_under_a_config_of_128(trained):
    assert (
        "gatedpo train: model.make_vocab_size_divisible_by 64 from model.init_from, whose embedding is padded "
        "already (the config's 128 applies to models initialised here)\ngatedpo train: objective dpo"
    ) in trained["printed"]
    out = trained["out"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)  # the policy is the reference
    assert all(math.isfinite(r["loss"]) for r in rows)
    saved = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert {k: saved[k] for k in FAMILY_MODELS["qwen2"]} == FAMILY_MODELS["qwen2"]
    assert saved["make_vocab_size_divisible_by"] == 64


def test_a_training_checkpoint_gives_its_shapes_and_padding(trained, qwen2):
    run = trained["out"]
    cfg, notes = load_run_config([qwen2["root"] / "run.yaml"], [f"model.init_from={run}"])
    assert model_fields(cfg) == FAMILY_MODELS["qwen2"]
    assert (cfg.model.make_vocab_size_divisible_by, cfg.model.norm_epsilon) == (64, 1e-6)
    assert len(notes) == 1 and notes[0].startswith(
        "model.make_vocab_size_divisible_by 64 from model.init_from"
    )
    with pytest.raises(UserError) as e:
        load_run_config(None, [f"model.init_from={run}", "model.qkv_bias=false", "model.num_layers=2"])
    step = run / "checkpoints" / "step-00000002"
    assert str(e.value) == (
        f"model.init_from={step} disagrees with the config: model.qkv_bias true (source) vs false (config)"
    )
