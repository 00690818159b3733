"""Runs you can watch: each epoch's ``metrics.csv`` row also sent to TensorBoard or MLflow.

The loop calls a :class:`Watch` three times: when it is opened (the run's
configuration and lineage become parameters), once per epoch with the very row
written to ``metrics.csv``, and at the end. Both trackers are optional packages
(``pip install 'kdpipe[log]'``) and write locally, no server involved:

- ``tensorboard``: event files in the run directory (or ``log_dir``), one scalar per
  column and epoch, the parameters as TensorBoard hparams and as a text table;
- ``mlflow``: a run in the experiment ``kdpipe`` of a local MLflow store,
  ``RUN_DIR/mlruns`` by default (or ``log_dir``: a folder, or a tracking URI such as
  ``sqlite:///...`` or a server's ``http://...``), metrics with the epoch as step. A
  resumed run continues its MLflow run (found by the run directory's tag).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from kdpipe.base.errors import UsageError

if TYPE_CHECKING:
    from kdpipe.train.plan import RunPlan

TRACKERS = ("none", "tensorboard", "mlflow")
EXPERIMENT = "kdpipe"
RUN_DIR_TAG = "kdpipe.run_dir"


def require(tracker: str, log_dir: str | None = None) -> None:
    """Refuse an unknown tracker, or one whose package is not installed, before a run starts."""
    if tracker not in TRACKERS:
        raise UsageError(f"--log must be one of {', '.join(TRACKERS)}, not {tracker!r}")
    if tracker == "none":
        if log_dir is not None:
            raise UsageError("--log-dir says where --log tensorboard or --log mlflow writes: "
                             "give --log too")  # fmt: skip
        return
    if importlib.util.find_spec(tracker) is None:
        raise UsageError(
            f"--log {tracker} needs the {tracker} package: pip install 'kdpipe[log]' "
            f"(or pip install {tracker})"
        )


def run_params(plan: RunPlan) -> dict[str, str | int | float | bool]:
    """The run's configuration, its kind and its lineage (``lineage.cache_id``,
    ``lineage.teacher_id`` ...) as flat parameters; None and lists as text."""
    params = {**asdict(plan.config), "kind": plan.kind, "alpha_used": plan.alpha,
              "temperature_used": plan.temperature}  # fmt: skip
    params.update({f"lineage.{key}": value for key, value in (plan.lineage or {}).items()})

    def flat(value: object) -> str | int | float | bool:
        if isinstance(value, bool | int | float | str):
            return value
        return json.dumps(value)

    return {name: flat(value) for name, value in params.items()}


def finite_metrics(row: dict) -> dict[str, float]:
    """A metrics row's numbers, without the epoch and the values an epoch did not score."""
    return {
        name: float(value)
        for name, value in row.items()
        if name != "epoch" and value is not None and math.isfinite(float(value))
    }


class Watch:
    """Nothing to watch (``--log none``, and every rank but 0 under torchrun)."""

    def epoch(self, row: dict) -> None:
        """One epoch's metrics row, as appended to ``metrics.csv``."""

    def close(self) -> None:
        """The run is over: flush and mark it finished."""


class TensorBoardWatch(Watch):
    """Event files for TensorBoard: a scalar per metrics column, the epoch as step."""

    def __init__(self, log_dir: Path, params: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(log_dir))
        table = "\n".join(f"| {name} | {value} |" for name, value in params.items())
        self.writer.add_text("config", "| parameter | value |\n|---|---|\n" + table)
        for summary in hparams(params, {"test_errors": math.nan}):
            self.writer.file_writer.add_summary(summary)

    def epoch(self, row: dict) -> None:
        for name, value in finite_metrics(row).items():
            self.writer.add_scalar(name, value, global_step=int(row["epoch"]))
        self.writer.flush()  # one write per epoch: a tensorboard reading the folder sees it now

    def close(self) -> None:
        self.writer.close()


class MLflowWatch(Watch):
    """A run of MLflow's experiment ``kdpipe``, through its client (no global state)."""

    def __init__(self, tracking_uri: str, run_dir: Path, params: dict, resume: bool) -> None:
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.metric = Metric
        self.client = MlflowClient(tracking_uri=tracking_uri)
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)
        )
        tag = str(run_dir.resolve())
        earlier = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{tag}'"
        )
        if resume and earlier:
            self.run_id = earlier[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return  # its parameters were logged when it started (MLflow keeps them fixed)
        run = self.client.create_run(experiment_id, run_name=run_dir.name,
                                     tags={RUN_DIR_TAG: tag})  # fmt: skip
        self.run_id = run.info.run_id
        self.client.log_batch(
            self.run_id, params=[Param(name, str(value)) for name, value in params.items()]
        )

    def epoch(self, row: dict) -> None:
        now = int(time.time() * 1000)
        metrics = [
            self.metric(name, value, now, int(row["epoch"]))
            for name, value in finite_metrics(row).items()
        ]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")


def mlflow_uri(location: str) -> str:
    """A tracking URI for ``--log-dir``: a URI as it is, a folder as a file store."""
    if "://" in location or location.startswith("sqlite:"):
        return location
    # MLflow 3 keeps its file store in maintenance mode and asks for this opt-in; a
    # folder next to the run needs no database or server, which is the point here
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return Path(location).resolve().as_uri()


def open_watch(plan: RunPlan, run_dir: Path, resume: bool = False) -> Watch:
    """The tracker ``plan.config.log`` names, opened with the run's parameters."""
    config = plan.config
    if config.log == "none":
        return Watch()
    params = run_params(plan)
    if config.log == "tensorboard":
        return TensorBoardWatch(Path(config.log_dir or run_dir), params)
    return MLflowWatch(mlflow_uri(config.log_dir or str(run_dir / "mlruns")), run_dir, params,
                       resume)  # fmt: skip
