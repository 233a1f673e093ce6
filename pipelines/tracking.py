"""MLflow on the driver: one experiment, one run per training (reused when a run resumes); the
training workers' rank 0 logs into that run (:class:`WorkerLogger`).

The tracking URI comes from ``MLFLOW_TRACKING_URI``; by default a sqlite database under ``runs/``
(``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``). The experiment is created here, once,
never by workers: concurrent ``set_experiment`` calls race and silently log to "Default".
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

EXPERIMENT = "handsonvlm"
RUN_NAME_TAG = "handsonvlm.run_name"
DEFAULT_DB = Path("runs") / "mlflow.db"
MAX_PARAM_LENGTH = 500  # MLflow's limit for a parameter value
SECRET_WORDS = ("token", "password", "secret", "api_key", "apikey", "credential")
RESTARTS_METRIC = "train/restarts"


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    DEFAULT_DB.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{DEFAULT_DB.absolute()}"


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def experiment_id(mlflow_client, name: str = EXPERIMENT) -> str:
    found = mlflow_client.get_experiment_by_name(name)
    return found.experiment_id if found else mlflow_client.create_experiment(name)


def flatten(data: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"model.lm.config.hidden_size": "64", ...}; secret-looking keys are dropped."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if any(word in key.lower() for word in SECRET_WORDS):
            continue
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:MAX_PARAM_LENGTH]
    return out


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def start_run(mlflow_client, exp_id: str, run_name: str, params: dict[str, str],
              tags: dict[str, str]) -> tuple[str, bool]:
    """The run named ``run_name`` in the experiment (reused when resuming), else a new one.

    Returns (run_id, resumed)."""
    from mlflow.entities import Param

    existing = mlflow_client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                         max_results=1)
    if existing:
        run_id = existing[0].info.run_id
        mlflow_client.update_run(run_id, status="RUNNING")
        return run_id, True
    run = mlflow_client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **tags})
    items = [Param(k, v) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        mlflow_client.log_batch(run.info.run_id, params=items[start:start + 100])
    return run.info.run_id, False


def finish_run(mlflow_client, run_id: str, ok: bool) -> None:
    mlflow_client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")


class WorkerLogger:
    """A training worker's metrics into the run the driver created: rank 0 logs, other ranks log nothing."""

    def __init__(self, settings: dict | None, rank: int):
        self.client = None
        if settings and rank == 0:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=settings["tracking_uri"])
            self.run_id = settings["run_id"]

    def log(self, metrics: dict, step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def restarts_so_far(self) -> int:
        """Restores this MLflow run has recorded so far (kept in the run itself, so the count survives
        worker restarts and re-runs alike)."""
        if self.client is None:
            return 0
        return int(max((m.value for m in self.client.get_metric_history(self.run_id, RESTARTS_METRIC)), default=0))

    def close(self) -> None:
        self.client = None
