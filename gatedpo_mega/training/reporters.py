"""The trackers ``train.report_to`` names (TensorBoard, Weights & Biases, MLflow): each gets the run's name, its
resolved config and every metric of every ``metrics.jsonl`` record at its step, from rank 0.

A tracker's package is imported only when the config names it, inside ``start``; whether it is installed is checked
in the launching process first (``check_installed``, called by preflight), so a missing one is one line before any
worker starts. A resumed run (start step > 0) continues the W&B / MLflow run whose id the first one kept in
``OUTPUT/report_to.json``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from gatedpo_mega.config import Config, config_to_dict
from gatedpo_mega.errors import UserError

# The module each tracker imports, and what to install when it is missing (the lightest package that provides it).
PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny"),
}
RUN_IDS = "report_to.json"  # in the output folder: the W&B and MLflow run ids a resumed run continues
# MLflow's metric names: alphanumerics, "_", "-", ".", " ", ":" and "/" (mlflow/utils/validation.py).
MLFLOW_REFUSED = re.compile(r"[^\w\-. :/]", re.ASCII)
MLFLOW_BATCH = 1000  # metrics per log_batch call (MLflow's limit)
MLFLOW_PARAMS_BATCH = 100  # params per log_batch call (MLflow's limit)


@dataclass(frozen=True, slots=True)
class RunInfo:
    name: str
    config: dict[str, Any]  # the resolved config, nested as in config.yaml
    output_dir: Path
    start_step: int  # > 0: a resumed run


class Reporter(Protocol):
    def start(self, run: RunInfo) -> None: ...
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


def check_installed(names: list[str]) -> None:
    """Refuse the first tracker in ``names`` whose package is missing, naming what to install."""
    for name in names:
        module, package = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"train.report_to names {name}, which is not installed: pip install {package}")


def run_name(cfg: Config) -> str:
    """``train.run_name``, or the output folder's name."""
    return cfg.train.run_name or Path(cfg.train.output_dir).resolve().name


def start_reporters(cfg: Config, start_step: int) -> list[Reporter]:
    """One started reporter per name in ``train.report_to``."""
    check_installed(cfg.train.report_to)  # a run started without the launcher's preflight
    run = RunInfo(run_name(cfg), config_to_dict(cfg), Path(cfg.train.output_dir), start_step)
    reporters: list[Reporter] = []
    try:
        for name in cfg.train.report_to:
            reporter = REPORTERS[name]()
            reporter.start(run)
            reporters.append(reporter)
    except BaseException:
        for started in reporters:  # a W&B run left open would hang on to its service process
            started.close()
        raise
    return reporters


def numeric(record: dict[str, Any]) -> dict[str, float]:
    """A ``metrics.jsonl`` record's metrics: every number but the step."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }


def mlflow_metric_name(key: str) -> str:
    """``key`` with each character MLflow refuses in a metric name replaced by ``_``."""
    return MLFLOW_REFUSED.sub("_", key)


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The config as MLflow params: ``train.lr`` -> ``"0.001"``, lists as JSON."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out |= flat_params(v, key)
        else:
            out[key] = json.dumps(v) if isinstance(v, list | bool) or v is None else str(v)
    return out


def kept_run_id(output_dir: Path, name: str, start_step: int) -> str | None:
    """The run id tracker ``name`` kept in ``output_dir``, for a resumed run; None for a new one."""
    if start_step == 0:
        return None
    try:
        ids = json.loads((output_dir / RUN_IDS).read_text())
    except (OSError, ValueError):
        return None
    run_id = ids.get(name) if isinstance(ids, dict) else None
    return run_id if isinstance(run_id, str) else None


def keep_run_id(output_dir: Path, name: str, run_id: str) -> None:
    path = output_dir / RUN_IDS
    try:
        ids = json.loads(path.read_text())
    except (OSError, ValueError):
        ids = {}
    ids = (ids if isinstance(ids, dict) else {}) | {name: run_id}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ids, indent=1) + "\n")
    tmp.replace(path)


class TensorBoardReporter:
    """Scalars in ``OUTPUT/tensorboard`` (TensorBoard shows the config as the run's folder name only)."""

    def start(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.output_dir / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """A W&B run: project ``WANDB_PROJECT`` (default gatedpo), files under ``WANDB_DIR`` (default the output folder);
    the rest of the user's ``WANDB_*`` environment (``WANDB_MODE=offline``, ``WANDB_ENTITY``, ...) applies as
    wandb reads it."""

    def start(self, run: RunInfo) -> None:
        import wandb

        run_id = kept_run_id(run.output_dir, "wandb", run.start_step)
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "gatedpo"),
                name=run.name,
                config=run.config,
                dir=None if os.environ.get("WANDB_DIR") else str(run.output_dir),
                id=run_id,
                resume="allow" if run_id else None,
                allow_val_change=bool(run_id),  # a resumed run may change train.max_steps, say
                # wandb's capture of stdout/stderr stays off unless asked for: the console is the run's.
                settings={"console": os.environ.get("WANDB_CONSOLE", "off")},
            )
        except wandb.Error as e:  # not logged in, no network in online mode, a bad entity or project
            raise UserError(
                f"train.report_to=wandb: {first_line(e)} (WANDB_MODE=offline runs without an account)"
            ) from None
        keep_run_id(run.output_dir, "wandb", self.run.id)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowReporter:
    """An MLflow run in experiment ``MLFLOW_EXPERIMENT_NAME`` (default gatedpo) at ``MLFLOW_TRACKING_URI``, or in a
    file store in ``OUTPUT/mlruns``: the config as params (``train.lr``) and as the artifact ``config.yaml``."""

    def start(self, run: RunInfo) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(run.output_dir)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "gatedpo")
        try:
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run_id = kept_run_id(run.output_dir, "mlflow", run.start_step)
            if run_id is not None and not self._resume(run_id):
                run_id = None
            if run_id is None:  # params are immutable in MLflow: set once, by the run that starts at step 0
                run_id = self.client.create_run(experiment_id, run_name=run.name).info.run_id
                params = [Param(k, v) for k, v in flat_params(run.config).items()]
                for i in range(0, len(params), MLFLOW_PARAMS_BATCH):
                    self.client.log_batch(run_id, params=params[i : i + MLFLOW_PARAMS_BATCH])
            self.client.log_text(run_id, yaml.safe_dump(run.config, sort_keys=False), "config.yaml")
        except MlflowException as e:
            raise UserError(f"train.report_to=mlflow at {uri}: {first_line(e)}") from None
        self.run_id = run_id
        keep_run_id(run.output_dir, "mlflow", run_id)

    def _resume(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.update_run(run_id, status="RUNNING")
        except MlflowException:  # not in this tracking store (MLFLOW_TRACKING_URI changed): a new run
            return False
        return True

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_metric_name(k), v, now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i : i + MLFLOW_BATCH])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def default_tracking_uri(output_dir: Path) -> str:
    """A file store in the output folder. MLflow 3 keeps file stores in maintenance mode and refuses them unless
    ``MLFLOW_ALLOW_FILE_STORE`` says otherwise; a local store with no server is what this default is for."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (output_dir / "mlruns").resolve().as_uri()


def first_line(e: BaseException) -> str:
    text = str(getattr(e, "message", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


REPORTERS: dict[str, type[TensorBoardReporter | WandbReporter | MlflowReporter]] = {
    "tensorboard": TensorBoardReporter,
    "wandb": WandbReporter,
    "mlflow": MlflowReporter,
}
