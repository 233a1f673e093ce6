"""MLflow on the driver: one experiment, one run per training (reused when a run resumes); the
training workers' rank 0 logs into that run (:class:`WorkerLogger`).

Also here: the shards a run read as dataset inputs (:func:`log_shards`), system metrics
(:func:`system_metrics`), the Model Registry (:func:`register_model`; :func:`resolve_model`
turns ``models:/`` and ``runs:/`` URIs into a local export folder) and an evaluation's outputs
(:func:`log_eval_outputs`).

The tracking URI comes from ``MLFLOW_TRACKING_URI``; by default a sqlite database under ``runs/``
(``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``). The experiment is created here, once,
never by workers: concurrent ``set_experiment`` calls race and silently log to "Default".
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

EXPERIMENT = "handsonvlm"
RUN_NAME_TAG = "handsonvlm.run_name"
DEFAULT_DB = Path("runs") / "mlflow.db"
MAX_PARAM_LENGTH = 500  # MLflow's limit for a parameter value
SECRET_WORDS = ("token", "password", "secret", "api_key", "apikey", "credential")
RESTARTS_METRIC = "train/restarts"
WORKER_NODES_TAG = "worker_nodes"  # the Ray node ids the training workers ran on (sorted, comma-separated)
MODEL_ARTIFACT = "model"  # the training run's artifact folder of the exported model
MODEL_URI_TAG = "model_uri"  # the training run's tag: where its export is (a folder or URI)
MAX_TAG_LENGTH = 5000  # of a tag value we write (MLflow's limit is 8,000 characters)
# where resolve_model downloads models; on a cluster a shared path, so that actors on other nodes read it
MODEL_CACHE_ENV, DEFAULT_MODEL_CACHE = "HANDSONVLM_MODEL_CACHE", Path("runs") / "model_cache"
MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))/?$")
RUNS_URI = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<path>.+?)/?$")
METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
MAX_TRAIN_RUNS = 1000  # training runs searched for the one an evaluated model folder came from
DIGEST_CHARS = 16  # of a sha256 hex digest: MLflow keeps at most 36; 64 bits tell shard lists apart
SYSTEM_METRICS_ENV = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"  # "false" turns them off (they are on by default)
SYSTEM_METRICS_INTERVAL_ENV = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"  # MLflow's own variable
SYSTEM_METRICS_INTERVAL_S = 10.0  # MLflow's default sampling interval


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


def finish_run(mlflow_client, run_id: str, ok: bool, monitor=None) -> None:
    """End the run (after its :func:`system_metrics` monitor, which stops on a terminated run)."""
    if monitor is not None:
        monitor.finish()
    mlflow_client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")


def system_metrics_interval_s() -> float:
    return float(os.environ.get(SYSTEM_METRICS_INTERVAL_ENV) or SYSTEM_METRICS_INTERVAL_S)


def system_metrics(run_id: str, uri: str, interval_s: float | None = None, node_id: str | None = None):
    """A started MLflow monitor logging ``system/[<node_id>/]*`` (CPU, memory, disk, network; GPU
    with pynvml) into the run every ``interval_s``, continuing the run's steps; None when
    ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` is false. It works on runs created by any client:
    it only needs the run id (the fluent ``mlflow.start_run`` is not involved)."""
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    if SYSTEM_METRICS_ENV in os.environ and not MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get():
        return None
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s or system_metrics_interval_s(),
                                   resume_logging=True, node_id=node_id, tracking_uri=uri)
    monitor.start()
    return monitor


def shards_digest(files: list[str], extra: tuple[str, ...] = ()) -> str:
    """A digest of shard file names and sizes (and ``extra`` strings): the same shards give the same
    digest wherever they are stored."""
    from preprocessing import storage

    digest = hashlib.sha256()
    for uri in sorted(files):
        fs, path = storage.resolve(uri)
        digest.update(f"{Path(path).name}\t{fs.get_file_info(path).size}\n".encode())
    for item in extra:
        digest.update(f"{item}\n".encode())
    return digest.hexdigest()[:DIGEST_CHARS]


def log_shards(mlflow_client, run_id: str, context: str, name: str, source: str, files: list[str],
               extra: tuple[str, ...] = (), rows: int | None = None) -> None:
    """The shards ``files`` of the directory ``source`` as one dataset input of the run (context
    ``training``, ``validation``, ``evaluation``); logging it again (a resumed run) adds nothing."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from preprocessing import storage

    kind = "local" if storage.is_local(source) else source.split("://", 1)[0]
    dataset = Dataset(name=name, digest=shards_digest(files, extra), source_type=kind,
                      source=json.dumps({"uri": source}))
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag("shards", str(len(files)))]
    tags += [InputTag("rows", str(rows))] if rows is not None else []
    mlflow_client.log_inputs(run_id, [DatasetInput(dataset, tags)])


def register_model(mlflow_client, run_id: str, name: str, source: str | None = None) -> str:
    """The version of registered model ``name`` made from this run's ``model`` artifact, or from
    ``source`` (the export's own folder or URI, for an export not uploaded to MLflow): a new one, or
    the one already made (a resumed run re-logs the same export). Returns the version.

    A tracking server accepts a local ``source`` only inside the run's artifact directory: register an
    export on object storage (``s3://...``) there, or upload it."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    made = mlflow_client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if made:
        return str(max(int(v.version) for v in made))
    source = source or f"{mlflow_client.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
    return str(mlflow_client.create_model_version(name, source, run_id=run_id).version)


def _registered_version(mlflow_client, match: re.Match) -> str:
    return match["version"] or mlflow_client.get_model_version_by_alias(match["name"], match["alias"]).version


def resolve_model(model: str) -> str:
    """A ``--model`` value as a local export folder: a folder as it is; ``models:/NAME/VERSION``,
    ``models:/NAME@ALIAS`` and ``runs:/RUN_ID/PATH`` downloaded (afresh each time: a resumed run
    re-logs its model) to ``NAME-vVERSION`` or ``run-RUN_ID-PATH`` under ``$HANDSONVLM_MODEL_CACHE``
    (default ``runs/model_cache``)."""
    from handsonvlm.inference import ModelLoadError

    models, runs = MODELS_URI.match(model), RUNS_URI.match(model)
    if not (models or runs):
        if model.startswith(("models:", "runs:")):
            raise ModelLoadError(f"{model}: expected models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/PATH")
        return model
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    mlflow_client = client()
    try:
        if models:
            version = _registered_version(mlflow_client, models)
            source = mlflow_client.get_model_version_download_uri(models["name"], version)
            label = f"{models['name']}-v{version}"
        else:
            source, label = model, f"run-{runs['run_id']}-{runs['path'].replace('/', '-')}"
        cache = Path(os.environ.get(MODEL_CACHE_ENV) or DEFAULT_MODEL_CACHE)
        target = cache / label
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as scratch:
            downloaded = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=scratch,
                                                             tracking_uri=tracking_uri())
            shutil.rmtree(target, ignore_errors=True)
            os.replace(downloaded, target)
    except MlflowException as exc:
        raise ModelLoadError(f"cannot resolve {model}: {(str(exc).splitlines() or [''])[0]}") from exc
    return str(target.absolute())


def training_link(mlflow_client, exp_id: str, model: str, model_dir: str) -> dict[str, str]:
    """Tags ``train_run_id``/``train_run_name`` of the training run ``--model`` came from: the run of a
    ``models:/`` version or ``runs:/`` URI, else the run whose ``model_path`` tag, else whose name,
    matches the folder ``model_dir``; {} when none does (linking is best effort)."""
    models, runs = MODELS_URI.match(model), RUNS_URI.match(model)
    try:
        if models or runs:
            run_id = runs["run_id"] if runs else \
                mlflow_client.get_model_version(models["name"], _registered_version(mlflow_client, models)).run_id
            found = [mlflow_client.get_run(run_id)]
        else:
            found = mlflow_client.search_runs([exp_id], filter_string="tags.stage = 'train'",
                                              max_results=MAX_TRAIN_RUNS)
    except Exception:  # an unreachable or old tracking server must not fail the evaluation
        return {}
    names = {r.info.run_id: r.data.tags.get(RUN_NAME_TAG, r.info.run_name) for r in found}
    path = Path(model_dir).absolute()
    by_path = [r for r in found if r.data.tags.get("model_path") and Path(r.data.tags["model_path"]).absolute() == path]
    by_name = [r for r in found if names[r.info.run_id] == path.name]
    run = found[0] if models or runs else (by_path or by_name or [None])[0]
    return {"train_run_id": run.info.run_id, "train_run_name": names[run.info.run_id]} if run else {}


def log_eval_outputs(mlflow_client, run_id: str, metrics: dict[str, float], out_dir: Path, table: dict,
                     images: list[str]) -> None:
    """An evaluation's metrics (step 0), its output folder as artifacts, the per-clip predictions
    as the table ``predictions.json`` and each gallery PNG as an image ``images/<name>``."""
    from mlflow.entities import Metric
    from PIL import Image

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())]
    for start in range(0, len(items), METRICS_PER_BATCH):
        mlflow_client.log_batch(run_id, metrics=items[start:start + METRICS_PER_BATCH])
    mlflow_client.log_artifacts(run_id, str(out_dir))
    mlflow_client.log_table(run_id, table, artifact_file="predictions.json")
    for path in images:
        with Image.open(path) as image:
            mlflow_client.log_image(run_id, image.convert("RGB"), key=Path(path).stem, step=0)


class WorkerLogger:
    """A training worker's metrics into the run the driver created: rank 0 logs, other ranks log nothing."""

    def __init__(self, settings: dict | None, rank: int, context=None):
        """``context``: the worker's ``ray.train`` context; with it, local rank 0 of each node logs
        the node's system metrics (``system/node_<rank>/*`` when the run spans nodes)."""
        self.client, self.monitor = None, None
        if settings and rank == 0:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=settings["tracking_uri"])
            self.run_id = settings["run_id"]
        if settings and context is not None and context.get_local_rank() == 0:
            nodes = context.get_local_world_size() < context.get_world_size()
            self.monitor = system_metrics(settings["run_id"], settings["tracking_uri"],
                                          settings.get("system_metrics_interval_s"),
                                          node_id=f"node_{context.get_node_rank()}" if nodes else None)

    def log(self, metrics: dict, step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def tag_worker_nodes(self) -> str:
        """Collective (every rank calls it): each rank's Ray node id is all-gathered over torch.distributed
        and rank 0 tags the run ``worker_nodes`` with the distinct ids, sorted and comma-separated (set
        again by each start of the worker group, so after a restart it names the nodes of the last one).
        Returns that value."""
        import ray
        import torch.distributed as dist

        node = ray.get_runtime_context().get_node_id()
        nodes = [node]
        if dist.is_available() and dist.is_initialized():
            nodes = [None] * dist.get_world_size()
            dist.all_gather_object(nodes, node)
        value = ",".join(sorted(set(nodes)))
        if self.client is not None:
            self.client.set_tag(self.run_id, WORKER_NODES_TAG, value)
        return value

    def restarts_so_far(self) -> int:
        """Restores this MLflow run has recorded so far (kept in the run itself, so the count survives
        worker restarts and re-runs alike)."""
        if self.client is None:
            return 0
        return int(max((m.value for m in self.client.get_metric_history(self.run_id, RESTARTS_METRIC)), default=0))

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
        self.client, self.monitor = None, None
