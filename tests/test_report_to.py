"""``train.report_to``: a tiny run read back with the trackers' own clients and files (W&B offline, MLflow's local
file store, TensorBoard's event reader), its resume continuing the same runs, a missing package refused in one
line before any worker starts, and the config key's parsing."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gatedpo_mega.config import config_to_dict, load_config
from gatedpo_mega.errors import ConfigError, UserError
from gatedpo_mega.training.reporters import (
    RUN_IDS,
    check_installed,
    flat_params,
    mlflow_metric_name,
    run_name,
)

TINY = [
    "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.ffn_hidden_size=64", "train.micro_batch_size=2", "train.global_batch_size=4", "train.warmup_steps=1",
    "train.reference_batch_size=8", "data.builtin_pairs=40", "data.max_length=64", "data.max_prompt_length=40",
    "data.eval_fraction=0.2", "train.eval_every=1",
]  # fmt: skip
# No tracker may reach the network, nor write outside the test's folders.
QUIET = {
    "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "DS_ACCELERATOR": "cpu",
}  # fmt: skip


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    dirs = {f"WANDB_{d}_DIR": str(tmp / f"wandb-{d.lower()}") for d in ("CONFIG", "CACHE", "DATA")}
    return env | QUIET | dirs | extra


def _train(
    tmp: Path, out: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gatedpo_mega.cli", "train", "--nproc", "1", *TINY]
    cmd += [f"data.cache_dir={tmp / 'cache'}", f"train.output_dir={out}", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(tmp))


def wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` file, as wandb's own protobuf: the file is a LevelDB-style log (a 7-byte header
    ``:W&B`` + magic + version, then 32 KiB blocks of records, each a 7-byte header: CRC, length, type) that
    wandb's Go core writes and the Python package no longer reads."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, pos, block, pending = [], 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:  # the padded tail of a block
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def wandb_run(out: Path) -> tuple[str, str, dict, dict[int, dict[str, float]]]:
    """(run id, display name, config, metrics by step) of the offline runs in ``out/wandb``, oldest first."""
    run_id, name, config, history = "", "", {}, {}
    for path in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id, name = record.run.run_id, record.run.display_name
                config |= {u.key: json.loads(u.value_json) for u in record.run.config.update}
            elif kind == "config":
                config |= {u.key: json.loads(u.value_json) for u in record.config.update}
            elif kind == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item
                }
                step = items.pop("_step")
                history[step] = {k: float(v) for k, v in items.items() if not k.startswith("_")}
    return run_id, name, config, history


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def _expected(out: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row.pop("step"): row for row in rows}


def _check_wandb(out: Path, expected: dict, name: str, cfg: dict) -> str:
    run_id, display_name, config, history = wandb_run(out)
    assert display_name == name
    assert {k: v for k, v in config.items() if k != "_wandb"} == cfg
    assert history.keys() == expected.keys()
    for step, row in expected.items():
        assert history[step].keys() == row.keys(), step
        assert all(_same(history[step][k], v) for k, v in row.items()), step
    return run_id


def _check_mlflow(out: Path, expected: dict, name: str, cfg: dict, params: dict, run_id: str) -> None:
    """The run's metrics, name, config artifact (the latest run's) and params (the first run's: MLflow's are
    immutable)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    run = client.get_run(run_id)
    assert run.info.run_name == name and run.info.status == "FINISHED"
    assert run.data.params == flat_params(params) and run.data.params["train.lr"] == str(
        params["train"]["lr"]
    )
    (out / "dl").mkdir(exist_ok=True)
    assert (
        yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", str(out / "dl"))).read_text())
        == cfg
    )
    keys = {k for row in expected.values() for k in row}
    assert set(run.data.metrics) == {mlflow_metric_name(k) for k in keys}
    for key in keys:
        logged = {m.step: m.value for m in client.get_metric_history(run_id, mlflow_metric_name(key))}
        wanted = {step: row[key] for step, row in expected.items() if key in row}
        assert logged.keys() == wanted.keys(), key
        assert all(_same(logged[s], v) for s, v in wanted.items()), key


@pytest.mark.slow
def test_every_metric_reaches_tensorboard_wandb_and_mlflow_and_a_resume_continues_the_runs(
    tmp_path, monkeypatch
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for the reading client here; the run sets its own
    out = tmp_path / "pilot-run"  # the run's name when train.run_name is not set
    first = _train(tmp_path, out, "train.max_steps=2", "train.report_to=[tensorboard,wandb,mlflow]")
    assert first.returncode == 0, first.stderr[-3000:]
    expected = _expected(out)
    assert sorted(expected) == [0, 1, 2] and "loss" not in expected[0] and "eval/loss" in expected[2]
    cfg = config_to_dict(load_config(out / "config.yaml"))
    ids = json.loads((out / RUN_IDS).read_text())
    assert _check_wandb(out, expected, "pilot-run", cfg) == ids["wandb"]
    _check_mlflow(out, expected, "pilot-run", cfg, cfg, ids["mlflow"])
    first_cfg = cfg
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for key in {k for row in expected.values() for k in row}:
        assert {e.step for e in events.Scalars(key)} == {s for s, row in expected.items() if key in row}, key

    # Resumed at its step-2 checkpoint (comma-separated names, as a command line writes them): the same runs go on.
    resumed = _train(tmp_path, out, "train.max_steps=3", "train.resume=true", "train.report_to=wandb,mlflow")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / RUN_IDS).read_text()) == ids
    expected = _expected(out)
    cfg = config_to_dict(load_config(out / "config.yaml"))
    assert sorted(expected) == [0, 1, 2, 3]
    assert _check_wandb(out, expected, "pilot-run", cfg) == ids["wandb"]
    _check_mlflow(out, expected, "pilot-run", cfg, first_cfg, ids["mlflow"])


@pytest.mark.slow
def test_a_missing_tracker_package_is_one_line_before_any_worker_starts(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    # None in sys.modules is Python's own "not importable": find_spec returns None and ``import wandb`` fails.
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None\n")
    path = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p)
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "gatedpo_mega.cli", "train", "--nproc", "2", "train.report_to=mlflow,wandb"]
    cmd += [f"train.output_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path, PYTHONPATH=path))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "gatedpo: error: train.report_to names wandb, which is not installed: pip install wandb"
    ]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # no worker, no data read
    assert time.monotonic() - t0 < 30


def test_report_to_is_a_list_of_known_trackers():
    assert load_config().train.report_to == ["tensorboard"]
    assert load_config(None, ["train.report_to=[wandb, mlflow]"]).train.report_to == ["wandb", "mlflow"]
    assert load_config(None, ["train.report_to=mlflow,wandb,mlflow"]).train.report_to == ["mlflow", "wandb"]
    assert load_config(None, ["train.report_to=wandb"]).train.report_to == ["wandb"]
    for nothing in ("none", "", "[]", "[none]"):
        assert load_config(None, [f"train.report_to={nothing}"]).train.report_to == [], nothing
    with pytest.raises(
        ConfigError, match=r"^train\.report_to: 'comet' is not one of tensorboard, wandb, mlflow"
    ):
        load_config(None, ["train.report_to=wandb,comet"])
    with pytest.raises(ConfigError, match=r"^train\.report_to=\['none', 'wandb'\]: none names no tracker"):
        load_config(None, ["train.report_to=none,wandb"])
    with pytest.raises(ConfigError, match=r"^train\.report_to must be a list; got 3"):
        load_config(None, ["train.report_to=3"])
    # The comma form belongs to lists of strings; a list of numbers still wants a list.
    with pytest.raises(ConfigError, match=r"^train\.adam_betas must be a list"):
        load_config(None, ["train.adam_betas=0.9,0.95"])


def test_run_name_is_the_output_folders_unless_set(tmp_path):
    assert run_name(load_config(None, [f"train.output_dir={tmp_path / 'my-run'}"])) == "my-run"
    assert run_name(load_config(None, ["train.output_dir=outputs/x/", "train.run_name=sweep-7"])) == "sweep-7"


def test_check_installed_names_the_package_to_install(monkeypatch):
    check_installed(["tensorboard", "wandb", "mlflow"])  # all three are in the test extra
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(UserError, match=r"^train\.report_to names mlflow, which is not installed: "
                       r"pip install mlflow-skinny$"):  # fmt: skip
        check_installed(["wandb", "mlflow"])


def test_mlflow_metric_names_keep_what_mlflow_allows(tmp_path, monkeypatch):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    assert mlflow_metric_name("eval/rewards/margins") == "eval/rewards/margins"
    assert mlflow_metric_name("a b:c-d.e_f") == "a b:c-d.e_f"
    assert mlflow_metric_name("loss@τ=0.1 (x)") == "loss___0.1 _x_"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    run_id = client.create_run(client.create_experiment("names")).info.run_id
    name = mlflow_metric_name("loss@τ=0.1 (x)")
    client.log_batch(run_id, metrics=[Metric(name, 1.0, 0, 0)])  # MLflow refuses the raw name, not this one
    assert client.get_metric_history(run_id, name)[0].value == 1.0
