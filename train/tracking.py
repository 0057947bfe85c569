"""Experiment trackers (``--report-to``): every record of metrics.jsonl, and the run's config, also to TensorBoard,
Weights & Biases or MLflow, through each library's own API (docs/integrations.md, "Experiment trackers").

The seam: a :class:`Tracker` per library, registered by name in :data:`TRACKERS`; :class:`MetricsLog` is what the
trainer writes its records to (metrics.jsonl, then each tracker), on rank 0 only. The trainer knows no tracker's
name. A record's ``step`` (optimizer steps) is the x-axis everywhere; every other number in it is a metric under
its metrics.jsonl name (``tokens_seen`` among them, for comparing runs of other batch sizes).

Each library runs without a server unless the user points it at one: TensorBoard writes event files, W&B runs in
offline mode (``WANDB_MODE`` overrides; ``wandb sync`` uploads later), MLflow writes a local SQLite store
(``MLFLOW_TRACKING_URI`` overrides). Where each writes: ``--tracker-dir`` (default: the run directory).

Resuming (``--resume``) continues the same tracker run, without repeating steps past the checkpoint (a killed run
may have logged some): the ids are kept in ``OUT/trackers.json``. TensorBoard: the same log directory, with
``purge_step`` = the checkpoint's step + 1, so events a killed run wrote past it are hidden on reading. W&B: the
same run id (``resume="allow"``); an offline run writes one ``offline-run-*`` folder per process and W&B keeps the
first value logged for a step. MLflow: the same run id; steps it already holds are not logged again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from kd_pipeline.errors import ConfigError, MissingDependency

STATE_FILE = "trackers.json"  # per tracker, what resuming its run needs (ids)
PROJECT = "kd-pipeline"  # W&B project / MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say


@dataclass
class RunInfo:
    """What a tracker is told about the run.

    ``root``: where trackers write locally; ``config``: the run's config (JSON values); ``resume_step``: the
    checkpoint's step on --resume, None for a new run; ``state``: what this tracker saved in trackers.json before.
    """

    root: Path
    name: str
    config: dict
    resume_step: int | None
    state: dict


class Tracker:
    """One experiment tracker: opened once on rank 0, told each metrics record, closed at the end of the run.

    A subclass sets ``name`` (the --report-to value), ``modules`` (what must be importable; a missing one is
    MissingDependency before training starts) and implements :meth:`log` and :meth:`close`; what it returns from
    :meth:`state` is saved and given back on --resume.
    """

    name: ClassVar[str]
    modules: ClassVar[tuple[str, ...]]

    def __init__(self, run: RunInfo):
        self.run = run

    @classmethod
    def check_installed(cls) -> None:
        missing = [m for m in cls.modules if importlib.util.find_spec(m) is None]
        if missing:
            raise MissingDependency(
                f"--report-to {cls.name} needs {', '.join(missing)}, which is not installed here: "
                f"pip install 'kd-pipeline[{cls.name}]'"
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def state(self) -> dict:
        return {}

    def close(self) -> None:
        raise NotImplementedError


TRACKERS: dict[str, type[Tracker]] = {}


def register(cls: type[Tracker]) -> type[Tracker]:
    TRACKERS[cls.name] = cls
    return cls


def check(names: list[str]) -> None:
    """Refuse unknown or uninstalled trackers (at start, before anything is trained)."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"--report-to {name}: unknown tracker; choose from {', '.join(sorted(TRACKERS))}")
        TRACKERS[name].check_installed()


def flat_config(config: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """The config as one level of scalars (trackers' hyperparameter tables take no lists, nests or None)."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, bool | int | float | str):
            flat[prefix + key] = value
        else:
            flat[prefix + key] = json.dumps(value)
    return flat


def metric_values(record: dict) -> dict[str, float]:
    """The numbers of a metrics record (its ``step`` is the x-axis, not a metric)."""
    return {
        k: float(v) for k, v in record.items() if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)
    }


class MetricsLog:
    """Where the trainer's records go: one JSON line each in metrics.jsonl (flushed), then every tracker."""

    def __init__(self, path: Path, names: list[str], run_name: str, config: dict, root: Path, resume_step):
        self.path = Path(path)
        self.file = open(self.path, "a")
        self.state_path = self.path.parent / STATE_FILE
        saved = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self.trackers: list[Tracker] = []
        try:
            for name in names:
                state = saved.get(name, {}) if resume_step is not None else {}  # a new run starts new tracker runs
                info = RunInfo(Path(root), run_name, config, resume_step, state)
                self.trackers.append(TRACKERS[name](info))
                saved[name] = self.trackers[-1].state()
        except BaseException:
            self.close()
            raise
        if names:
            self.state_path.write_text(json.dumps(saved, indent=1) + "\n")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        values = metric_values(record)
        for tracker in self.trackers:
            tracker.log(int(record["step"]), values)

    def close(self) -> None:
        self.file.close()
        for tracker in self.trackers:
            tracker.close()


# ------------------------------------------------------------------------------------------ trackers
@register
class TensorBoard(Tracker):
    """Event files in ROOT/tensorboard (torch.utils.tensorboard, which needs the ``tensorboard`` package). Scalars
    are float32 there. The config is a text summary ``config`` and the HParams table."""

    name = "tensorboard"
    modules = ("tensorboard",)

    def __init__(self, run: RunInfo):
        super().__init__(run)
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = run.root / "tensorboard"
        # purge_step: events of a killed run at or past it are dropped by TensorBoard's readers
        purge = None if run.resume_step is None else run.resume_step + 1
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)
        step = run.resume_step or 0
        self.writer.add_text("config", "```json\n" + json.dumps(run.config, indent=1) + "\n```", global_step=step)
        if run.resume_step is None:
            # run_name=".": the same directory (by default add_hparams writes a new one per call)
            self.writer.add_hparams(flat_config(run.config), {}, run_name=".")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # as metrics.jsonl: a killed run keeps what it logged (the writer queues otherwise)

    def close(self) -> None:
        self.writer.close()


@register
class WandB(Tracker):
    """A Weights & Biases run, offline unless ``WANDB_MODE`` says otherwise (ROOT/wandb/offline-run-*; upload
    with ``wandb sync``). Project: ``WANDB_PROJECT`` or kd-pipeline."""

    name = "wandb"
    modules = ("wandb",)

    def __init__(self, run: RunInfo):
        super().__init__(run)
        import wandb

        self.id = run.state.get("id") or secrets.token_hex(4)
        run.root.mkdir(parents=True, exist_ok=True)
        self.wb = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT),
            name=run.name,
            id=self.id,
            resume="allow",
            dir=str(run.root.resolve()),
            mode=os.environ.get("WANDB_MODE", "offline"),
            config=run.config,
            allow_val_change=True,  # a resume with --allow-config-change updates the config
            settings=wandb.Settings(console="off"),  # our console lines stay ours
        )

    def state(self) -> dict:
        return {"id": self.id}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.wb.log(metrics, step=step)

    def close(self) -> None:
        self.wb.finish()


@register
class MLflow(Tracker):
    """An MLflow run in ``MLFLOW_TRACKING_URI`` or a local SQLite store ROOT/mlflow/mlflow.db (artifacts beside
    it), experiment ``MLFLOW_EXPERIMENT_NAME`` or kd-pipeline. Parameters: the flattened config; artifact
    config.json: the whole config. Telemetry is off unless MLFLOW_DISABLE_TELEMETRY is set otherwise."""

    name = "mlflow"
    modules = ("mlflow", "sqlalchemy", "alembic")

    def __init__(self, run: RunInfo):
        super().__init__(run)
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # it would look up a telemetry host otherwise
        from mlflow import MlflowClient
        from mlflow.entities import Param

        store = (run.root / "mlflow").resolve()
        default_uri = f"sqlite:///{store / 'mlflow.db'}"
        self.uri = run.state.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or default_uri
        if self.uri == default_uri:
            store.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.last_logged: dict[str, int] = {}  # per metric, the last step the store holds (a resumed run's)
        self.pending: list = []  # MLflow's RunOperations of records still being written
        if run.state.get("run_id"):
            self.run_id = run.state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            # per metric: a killed run may have written a step's training record and not its eval record
            for key in self.client.get_run(self.run_id).data.metrics:
                history = self.client.get_metric_history(self.run_id, key)
                self.last_logged[key] = max((m.step for m in history), default=-1)
            self.client.log_dict(self.run_id, run.config, f"config-resumed-at-step-{run.resume_step}.json")
            return
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            # An explicit artifact location: with a SQLite store MLflow's default is ./mlruns in the working dir.
            location = (store / "artifacts").as_uri() if self.uri == default_uri else None
            experiment_id = self.client.create_experiment(experiment_name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=run.name).info.run_id
        params = [Param(k, str(v)) for k, v in flat_config(run.config).items()]
        for start in range(0, len(params), 100):  # log_batch takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.client.log_dict(self.run_id, run.config, "config.json")

    def state(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # what a killed run logged already is not logged again (see the module's docstring)
        metrics = [Metric(k, v, now, step) for k, v in metrics.items() if step > self.last_logged.get(k, -1)]
        if not metrics:
            return
        # MLflow's own background queue: a SQLite commit per record (~10-40 ms here) stays off the training loop
        self.pending.append(self.client.log_batch(self.run_id, metrics=metrics, synchronous=False))
        if len(self.pending) >= 1000:
            self._wait()

    def _wait(self) -> None:
        for operations in self.pending:
            operations.wait()  # raises what a background write raised
        self.pending.clear()

    def close(self) -> None:
        self._wait()
        self.client.set_terminated(self.run_id)
