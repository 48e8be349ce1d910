"""The config tree: YAML, overrides, and one clear line for every bad input."""

import subprocess
import sys

import pytest

from gatedpo_mega.cli import main
from gatedpo_mega.config import load_config, parse_override
from gatedpo_mega.errors import ConfigError


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("objective:\n  name: ipo\n  beta: 0.5\ngate:\n  shape: hard\n")
    cfg = load_config(f, ["objective.beta=0.25", "gate.tau=1e-3", "squeeze.rejected_probs=[0.1, 0.001]"])
    assert cfg.objective.name == "ipo" and cfg.objective.beta == 0.25
    assert cfg.gate.shape == "hard" and cfg.gate.tau == 1e-3
    assert cfg.squeeze.rejected_probs == [0.1, 0.001]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("gate.shap=hard", "unknown config key 'gate.shap'; allowed here: shape, granularity"),
        ("nosuch.key=1", "unknown config key 'nosuch'"),
        ("gate.shape=cosine", "gate.shape='cosine' is not one of none, sigmoid, hard, power"),
        ("objective.beta=abc", "objective.beta must be a number; got 'abc'"),
        ("objective.beta=-1", "objective.beta=-1.0 must be > 0"),
        ("parallel.tensor=3", "parallel.tensor=3 is not one of 1, 2, 4, 8"),
        ("parallel.pipeline=2", None),
        ("squeeze.seeds=2.5", "squeeze.seeds must be an integer"),
        ("gate=3", "gate must be a mapping"),
        ("gatetau", "is not of the form key.sub=value"),
        ("model.head_dim=-8", "model.head_dim=-8 must be >= 0"),
        ("model.head_dim=16", "model.head_dim=16 is hidden_size / num_attention_heads: leave it 0"),
    ],
)
def test_bad_values_name_the_key(override, message):
    if message is None:
        assert load_config(None, [override]).parallel.pipeline == 2
        return
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_pipeline_with_zero_beyond_one_is_refused():
    with pytest.raises(ConfigError, match=r"parallel.zero_stage=2 with parallel.pipeline=2"):
        load_config(None, ["parallel.pipeline=2", "parallel.zero_stage=2"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("gate: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar)


def test_parse_override_reads_yaml_scalars():
    assert parse_override("a.b=1.5e-3") == ("a.b", 1.5e-3)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


def test_cli_prints_one_line_and_exits_2(capsys):
    assert main(["config", "gate.shape=cosine"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["gatedpo: error: gate.shape='cosine' is not one of none, sigmoid, hard, power"]


def test_console_script_entry_point():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gatedpo_mega.cli",
            "config",
            "--config",
            "configs/squeeze.yaml",
            "objective.name=ipo",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "name: ipo" in out.stdout
