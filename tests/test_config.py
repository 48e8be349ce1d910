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
        ("gate.shape=cosine", "gate.shape='cosine' is not one of none, sigmoid, psigmoid, hard, power"),
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


BIG = "1" + "0" * 5000  # beyond Python's 4300-digit int conversion limit


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=.nan", r"^train\.lr=nan must be a finite number$"),
        ("train.lr=nan", r"^train\.lr=nan must be a finite number$"),
        ("train.lr=1e999", r"^train\.lr=inf must be a finite number$"),
        ("train.lr=1" + "0" * 400, r"^train\.lr=10{400} must be a finite number$"),
        ("objective.beta=-.inf", r"^objective\.beta=-inf must be a finite number$"),
        ("objective.nll_weight=.inf", r"^objective\.nll_weight=inf must be a finite number$"),
        ("train.grad_clip=.nan", r"^train\.grad_clip=nan must be a finite number$"),
        ("train.weight_decay=.inf", r"^train\.weight_decay=inf must be a finite number$"),
        ("gate.alpha=.inf", r"^gate\.alpha=inf must be a finite number$"),
        ("gate.temperature=.nan", r"^gate\.temperature=nan must be a finite number$"),
        ("squeeze.init_scale=.inf", r"^squeeze\.init_scale=inf must be a finite number$"),
        ("squeeze.rejected_probs=[0.1, .nan]", r"^squeeze\.rejected_probs\[1\]=nan must be a finite number$"),
        ("train.adam_betas=[.nan, 0.9]", r"^train\.adam_betas\[0\]=nan must be a finite number$"),
        ("train.collective_timeout_minutes=.inf", r"^train\.collective_timeout_minutes=inf must be a finite"),
        ("train.collective_timeout_minutes=1e9", r"=1000000000\.0 must be <= 525600 \(one year\)$"),
        ("model.init_std=.nan", r"^model\.init_std=nan must be a finite number$"),
        ("train.min_lr=0.01", r"^train\.min_lr=0\.01 must be <= train\.lr=0\.001$"),
        ("train.adam_eps=-1e-8", r"^train\.adam_eps=-1e-08 must be > 0$"),
        ("train.adam_eps=0", r"^train\.adam_eps=0\.0 must be > 0$"),
        ("train.weight_decay=-0.1", r"^train\.weight_decay=-0\.1 must be >= 0$"),
        ("train.seed=-1", r"^train\.seed=-1 must be in \[0, 2\*\*32\)$"),
        ("train.seed=4294967296", r"^train\.seed=4294967296 must be in \[0, 2\*\*32\)$"),
        ("data.seed=-1", r"^data\.seed=-1 must be in \[0, 2\*\*32\)$"),
        ("model.init_std=0", r"^model\.init_std=0\.0 must be > 0$"),
        ("model.norm_epsilon=-1e-5", r"^model\.norm_epsilon=-1e-05 must be > 0$"),
        ("model.rotary_base=0", r"^model\.rotary_base=0\.0 must be > 0$"),
        ("model.rotary_base=6e20", r"^model\.rotary_base=6e\+20 must be below 2\*\*63$"),
        ("model.max_position_embeddings=0", r"^model\.max_position_embeddings=0 must be > 0$"),
        ("model.max_position_embeddings=64", r"^model\.max_position_embeddings=64 must be >= data\.max_length=128$"),
        ("train.output_dir=", r"^train\.output_dir must not be empty$"),
        ("train.output_dir=''", r"^train\.output_dir must not be empty$"),
        ("squeeze.output_dir=", r"^squeeze\.output_dir must not be empty$"),
        ("squeeze.init_scale=-1", r"^squeeze\.init_scale=-1\.0 must be >= 0$"),
        ("squeeze.shapes=[]", r"^squeeze\.shapes must not be empty$"),
        ("squeeze.rejected_probs=[]", r"^squeeze\.rejected_probs must not be empty$"),
        ("data.tokenizer=", r"^data\.tokenizer must not be empty$"),
        ("train.max_steps=" + str(2**63), r"^train\.max_steps=9223372036854775808 must be an integer in \[-2\*\*63, 2\*\*63\)$"),
        ("train.max_steps=" + BIG, r"^override 'train\.max_steps=10+': value is not valid YAML$"),
    ],
)  # fmt: skip
def test_bad_values_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.seed=0", "data.seed=4294967295", "data.seed=null"],
        ["train.min_lr=0.001", "train.weight_decay=0", "train.grad_clip=0", "squeeze.init_scale=0"],
        ["data.max_length=512", "data.max_prompt_length=256"],  # = the default max_position_embeddings
        ["train.collective_timeout_minutes=525600"],
    ],
)
def test_values_at_the_edges_are_accepted(overrides):
    load_config(None, overrides)


def test_a_huge_integer_in_a_file_is_one_line(tmp_path):
    f = tmp_path / "big.yaml"
    f.write_text(f"train:\n  max_steps: {BIG}\n")
    with pytest.raises(ConfigError, match=r"big\.yaml: not valid YAML \(Exceeds the limit") as e:
        load_config(f)
    assert "\n" not in str(e.value)


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
    assert err == ["gatedpo: error: gate.shape='cosine' is not one of none, sigmoid, psigmoid, hard, power"]


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


def _write(path, text):
    path.write_text(text)
    return path


def test_several_files_merge_in_order(tmp_path):
    base = _write(
        tmp_path / "base.yaml",
        "model:\n  num_layers: 2\n  hidden_size: 32\ntrain:\n  adam_betas: [0.8, 0.9]\n",
    )
    top = _write(tmp_path / "top.yaml", "model:\n  num_layers: 6\ntrain:\n  adam_betas: [0.5, 0.6]\n")
    cfg = load_config([base, top], ["model.num_layers=8"])
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (8, 32)  # deep merge, then the override
    assert cfg.train.adam_betas == [0.5, 0.6]  # lists are replaced, not concatenated
    assert load_config([top, base]).model.num_layers == 2  # the later file wins
    assert load_config(str(base)).model.hidden_size == 32  # one path, as before
    assert load_config([]) == load_config(None) == load_config()


def test_include_is_merged_before_the_files_own_keys(tmp_path):
    (tmp_path / "parts").mkdir()
    _write(tmp_path / "parts" / "data.yaml", "data:\n  max_length: 64\n  max_prompt_length: 32\n")
    _write(tmp_path / "parts" / "model.yaml", "include: data.yaml\nmodel:\n  num_layers: 2\n")
    one = _write(tmp_path / "one.yaml", "include: parts/model.yaml\nmodel:\n  num_layers: 3\n")
    cfg = load_config(one)
    assert (cfg.model.num_layers, cfg.data.max_length, cfg.data.max_prompt_length) == (3, 64, 32)
    many = _write(
        tmp_path / "many.yaml", "include: [parts/model.yaml, parts/data.yaml]\ndata:\n  max_length: 96\n"
    )
    cfg = load_config(many)
    assert (cfg.model.num_layers, cfg.data.max_length) == (2, 96)


def test_include_cycles_and_bad_includes_are_one_line(tmp_path):
    a = _write(tmp_path / "a.yaml", "include: b.yaml\n")
    _write(tmp_path / "b.yaml", "include: a.yaml\n")
    with pytest.raises(ConfigError, match=r"a.yaml: include cycle .*a.yaml -> .*b.yaml -> .*a.yaml$"):
        load_config(a)
    self_ref = _write(tmp_path / "self.yaml", "include: self.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(self_ref)
    missing = _write(tmp_path / "m.yaml", "include: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"config file .*nowhere.yaml does not exist"):
        load_config(missing)
    number = _write(tmp_path / "n.yaml", "include: 3\n")
    with pytest.raises(ConfigError, match=r"n.yaml: include must be a file path or a list"):
        load_config(number)
    # The same file included twice along two branches is not a cycle.
    _write(tmp_path / "leaf.yaml", "gate:\n  tau: 0.01\n")
    _write(tmp_path / "l1.yaml", "include: leaf.yaml\n")
    diamond = _write(tmp_path / "d.yaml", "include: [l1.yaml, leaf.yaml]\n")
    assert load_config(diamond).gate.tau == 0.01


def test_unknown_key_names_its_file(tmp_path):
    good = _write(tmp_path / "good.yaml", "model:\n  num_layers: 2\n")
    bad = _write(tmp_path / "bad.yaml", "model:\n  num_layer: 2\n")
    with pytest.raises(ConfigError, match=r"^config file .*bad.yaml: unknown config key 'model.num_layer'"):
        load_config([good, bad])
    host = _write(tmp_path / "host.yaml", "include: bad.yaml\n")
    with pytest.raises(ConfigError, match=r"^config file .*bad.yaml: unknown config key"):
        load_config(host)


def test_cli_takes_several_configs(tmp_path, capsys):
    a = _write(tmp_path / "a.yaml", "model:\n  num_layers: 2\n")
    b = _write(tmp_path / "b.yaml", "model:\n  hidden_size: 32\n")
    assert main(["config", "--config", str(a), "--config", str(b), "gate.tau=0.5"]) == 0
    out = capsys.readouterr().out
    assert "num_layers: 2" in out and "hidden_size: 32" in out and "tau: 0.5" in out
    assert main(["config", "--config", str(a), "--config", str(tmp_path / "no.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no.yaml does not exist" in err[0]
