"""Training job: Ray Train + DeepSpeed ZeRO fine-tuning of HandsOnVLM on the sample shards.

    python pipelines/train.py --config tiny [--data runs/demo/data] [--run-name NAME] [--max-steps N]
        [--num-workers W] [--zero-stage 2|3] [--set key=value ...] [--dry-run]

``--dry-run`` prints the plan as one JSON document (world size, batch sizes, steps per epoch, total
steps, the draws of the whole run per task and per dataset, distinct videos per micro-batch)
without loading weights or starting Ray: what to check before spending GPU hours.

Locally it starts a Ray of its own; on a cluster the same command runs under
``ray job submit --working-dir . -- python pipelines/train.py ...``. Re-running with the same
``--run-name`` resumes from the last checkpoint (and continues the same MLflow run; a checkpoint of
another world size or ZeRO stage stops it at once, exit 2). The model is exported (safetensors +
config + tokenizer) to ``<train.export_dir>/<run-name>/``; with ``export_dir: auto`` that is
``runs/models/<run-name>`` under a Ray this command started, else ``<storage>/<run-name>/export``
beside the checkpoints. MLflow records it by ``train.log_model``: the run's ``model`` artifact
(upload) or its URI (tag ``model_uri``), and it becomes a version of ``train.register_model``
(``models:/handsonvlm/N``). A failure after training (upload, registry) ends the MLflow run FAILED
with the tag ``error`` and the job with exit code 1 and the same message.
At every checkpoint a few ``train.val_split`` clips are answered greedily: ``val/<task>/*`` metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a bare checkout / job working_dir


from handsonvlm import checkpoints, validation
from handsonvlm.config import (
    DataConfig,
    ModelConfig,
    TrainConfig,
    add_section_flags,
    load_preset,
    section_overrides,
)
from handsonvlm.memory import estimate_training_memory
from handsonvlm.mixture import Mixture
from handsonvlm.networking import nccl_env
from handsonvlm.templates import TemplatesFileMissing, templates_for
from pipelines import tracking
from pipelines.common import (
    DEFAULT_OBJECT_STORE_BYTES,
    LOCAL_RAY,
    DeviceError,
    absolute_uri,
    add_ray_flags,
    backend_for,
    init_ray,
    resolve_use_gpu,
    setup_logging,
)
from preprocessing import layout, storage
from preprocessing.training_data import describe_plan, feature_cache_plan, plan_data, read_shard, total_steps

DEFAULT_STORAGE = "runs/ray_results"
TRAIN_FLAGS = ("data", "max_steps", "num_workers", "zero_stage")  # --data, --max-steps, ...: train.<name>
# Ray Train replaces print() on its workers by a logger call that also tees to the original print whenever
# sys.stdout is not sys.__stdout__, and in a Ray worker it never is (Ray wraps it): every line a worker
# printed (progress, DeepSpeed's) reached the driver twice. Without the patch a print is a print.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
AUTO = "auto"  # train.export_dir / train.log_model: decided here, by where the run's storage is
LOCAL_EXPORT_DIR = "runs/models"  # export_dir auto under a Ray this command started with local storage
EXPORT_SUBDIR = "export"  # export_dir auto on a cluster: <storage>/<run-name>/export, beside the checkpoints
# log_model auto streams an export through the tracking server only when it is local and at most this big
# (the tiny presets' few MB; a 7B export is ~14 GB, which a 2 CPU / 4 GiB proxy with a 120 s timeout drops)
AUTO_UPLOAD_MAX_BYTES = 1 << 30
ERROR_TAG = "error"  # the MLflow run's tag saying what failed after training
# train.placement -> Ray Train's placement strategy of the workers' placement group
PLACEMENT_STRATEGIES = {"pack": "PACK", "spread": "SPREAD"}


def worker_env_vars(use_gpu: bool, environ=None) -> dict[str, str]:
    """The Ray Train workers' environment variables: the print patch off, DeepSpeed's accelerator following
    the device and, on GPUs, the NCCL/EFA defaults of :data:`handsonvlm.networking.NCCL_ENV_DEFAULTS`, each
    kept at its value where this driver's environment (``environ``, default ``os.environ``) sets it."""
    env = {**WORKER_ENV, "DS_ACCELERATOR": "cuda" if use_gpu else "cpu"}
    return {**env, **nccl_env(environ)} if use_gpu else env


def torch_config_for(train: dict, use_gpu: bool):
    """Ray Train's TorchConfig: NCCL on GPUs, gloo on CPUs, ``train.pg_timeout_s`` for every collective."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend=backend_for(use_gpu), timeout_s=train["pg_timeout_s"])


def parse_args(argv=None) -> argparse.Namespace:
    # no ArgumentDefaultsHelpFormatter: the train.* flags show their preset default themselves
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help="preset name in configs/ or a YAML path (default: %(default)s)")
    p.add_argument("--run-name", help="Ray Train run name; the same name resumes (default: <preset>-<time>)")
    add_section_flags(p, TrainConfig.section, TrainConfig, TRAIN_FLAGS)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any preset key, e.g. train.lr=1e-3 or model.mode=release")
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help="Ray Train storage path (checkpoints; local or URI; default: %(default)s)")
    p.add_argument("--max-failures", type=int, default=0,
                   help="worker-group restarts from the last checkpoint (default: %(default)s)")
    add_ray_flags(p)
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--dry-run", action="store_true",
                   help="print the training plan as JSON and exit (no weights loaded, no Ray started)")
    return p.parse_args(argv)


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides, then those of the train flags that were given (the flags win)."""
    return [*args.set, *section_overrides(args, TrainConfig.section, TRAIN_FLAGS)]


def resolve_config(preset: str, overrides: list[str]) -> dict:
    """The preset with ``key=value`` overrides, validated: {"model": ..., "train": ..., "preset": ...}."""
    data = load_preset(preset, overrides)
    model = ModelConfig.from_dict(data.get("model", {}))
    train = TrainConfig.from_dict(data.get("train", {}))
    conversations = DataConfig.from_dict(data.get("data", {}))
    return {"model": model.to_dict(), "train": train.to_dict(), "data": conversations.to_dict(), "preset": preset}


def plan_training(config: dict) -> tuple[str, dict, Mixture]:
    """(data root, plan, mixture) of a resolved config: reads the sample shards' light columns only."""
    train = config["train"]
    data = layout.data_root(absolute_uri(train["data"]))
    mixture = Mixture.from_config(train, ModelConfig.from_dict(config["model"]))  # the draws need no templates
    plan = plan_data(layout.samples_dir(data, train["split"]), train["num_workers"], train["micro_batch_size"],
                     train["gradient_accumulation_steps"], mixture, train["samples_per_epoch"])
    return data, plan, mixture


def run_templates(config: dict):
    """The run's question/answer templates (``data.templates``, required in release mode)."""
    return templates_for(ModelConfig.from_dict(config["model"]), DataConfig.from_dict(config.get("data")))


def dry_run(config: dict) -> dict:
    """The plan of a run as :func:`preprocessing.training_data.describe_plan` gives it, with the
    config's mode and warm-up, and warnings about what the real run would miss (weights on disk)."""
    train, model = config["train"], config["model"]
    data, plan, mixture = plan_training(config)
    report = {"preset": config.get("preset"), "mode": model["mode"], "data": data,
              **describe_plan(plan, mixture, train["epochs"], train["max_steps"])}
    report["warmup_steps"] = math.ceil(train["warmup_ratio"] * plan["steps_per_epoch"] * train["epochs"])
    device = train["device"]
    report["device"] = device
    report["backend"] = {"cuda": backend_for(True), "cpu": backend_for(False)}.get(
        device, f"{backend_for(True)} if the cluster has {train['num_workers']} GPUs, else {backend_for(False)}")
    warnings = []
    try:
        report["templates"] = run_templates(config).source
    except TemplatesFileMissing as exc:
        report["templates"] = None
        warnings.append(str(exc))
    weights = {f"model.{part}.pretrained": model[part].get("pretrained") for part in ("lm", "vision")}
    weights["model.projector_init"] = model.get("projector_init")
    for key, path in weights.items():
        if path and not Path(path).exists():
            warnings.append(f"{key} {path} does not exist here (the run needs it on every worker)")
    report["pg_timeout_s"] = train["pg_timeout_s"]
    try:
        report["memory_per_gpu_gib"] = estimate_training_memory(ModelConfig.from_dict(model),
                                                                TrainConfig.from_dict(train))
    except FileNotFoundError as exc:  # a pretrained directory that is neither here nor a known architecture
        report["memory_per_gpu_gib"] = None
        warnings.append(f"no memory estimate: {exc}")
    report["warnings"] = warnings
    return report


def export_path_for(export_dir: str, run_name: str, storage_path: str = DEFAULT_STORAGE,
                    on_cluster: bool = False) -> str:
    """``<export_dir>/<run_name>``: a local folder made absolute, or a URI (``s3://...``; rank 0 writes
    the export to a temporary folder and uploads it, see ``preprocessing.storage.write_dir``).

    ``export_dir`` auto: ``<storage_path>/<run_name>/export`` beside the checkpoints when the storage
    is a URI or the run is ``on_cluster`` (a Ray this command connected to: its storage is shared by
    the nodes, a node-local folder is not), else ``runs/models/<run_name>`` (the local demo)."""
    if export_dir == AUTO:
        if on_cluster or not storage.is_local(storage_path):
            return storage.join(absolute_uri(storage_path), run_name, EXPORT_SUBDIR)
        export_dir = LOCAL_EXPORT_DIR
    return storage.join(absolute_uri(export_dir), run_name)


def plan_validation(data: str, train: dict) -> dict | None:
    """The clips validated at every checkpoint: ``train.val_clips`` of the ``train.val_split``
    shards, chosen by ``train.seed``. Returns ``rows`` (``validation.COLUMNS`` of each; they ride in
    the plan, JPEGs included: well under a MB per clip), ``files`` (their shards), ``source`` and
    ``sample_ids``; None when validation is off or the split has no shards."""
    if train["val_clips"] <= 0:
        return None
    source = layout.samples_dir(data, train["val_split"])
    files = storage.list_files(source, layout.SHARD_SUFFIX)
    if not files:
        print(f"[train] no {train['val_split']} shards under {source}: no validation during training", flush=True)
        return None
    ids = {uri: read_shard(uri, ["sample_id"]).column("sample_id").to_pylist() for uri in files}
    chosen = validation.choose_clips([i for shard in ids.values() for i in shard], train["val_clips"], train["seed"])
    mine = {uri: sorted(set(chosen).intersection(shard)) for uri, shard in ids.items()}
    files = [uri for uri in files if mine[uri]]
    rows = [row for uri in files for row in read_shard(uri, validation.COLUMNS, mine[uri]).to_pylist()]
    return {"rows": rows, "files": files, "source": source, "sample_ids": chosen}


def log_inputs(mlflow_client, run_id: str, data: str, train: dict, plan: dict, val: dict | None) -> None:
    """The training shards and the validation clips' shards as the run's dataset inputs."""
    tracking.log_shards(mlflow_client, run_id, "training", train["split"], layout.samples_dir(data, train["split"]),
                        plan["files"], rows=plan["total_rows"])
    if val:
        tracking.log_shards(mlflow_client, run_id, "validation", f"{train['val_split']}-{len(val['rows'])}-clips",
                            val["source"], val["files"], extra=tuple(val["sample_ids"]), rows=len(val["rows"]))


def register(mlflow_client, run_id: str, name: str, source: str | None = None) -> str | None:
    """The export as a version of registered model ``name`` (made from the run's ``model`` artifact, or
    from ``source``, the export's URI): its ``models:/`` URI, None on failure."""
    try:
        uri = f"models:/{name}/{tracking.register_model(mlflow_client, run_id, name, source)}"
    except Exception as exc:  # a registry that is missing or down must not fail a finished training
        print(f"[train] model registry: could not register {name}: {exc}", flush=True)
        return None
    mlflow_client.set_tag(run_id, "registered_model", uri)
    print(f"[train] registered {uri}", flush=True)
    return uri


def export_bytes(export_path: str) -> int:
    """Total size of the files of the export folder (local or URI)."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(export_path)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sum(i.size for i in infos if i.type == pafs.FileType.File)


def log_model_mode(log_model: str, export_path: str) -> str:
    """``train.log_model`` made concrete: auto is upload for a local export of at most
    :data:`AUTO_UPLOAD_MAX_BYTES`, else uri."""
    if log_model != AUTO:
        return log_model
    small = storage.is_local(export_path) and export_bytes(export_path) <= AUTO_UPLOAD_MAX_BYTES
    return "upload" if small else "uri"


def log_export(mlflow_client, run_id: str, export_path: str, log_model: str = "upload") -> str | None:
    """Record the export in the run: always its URI as the tag ``model_uri``; with ``log_model`` upload
    (or auto, see :func:`log_model_mode`) also its files as the run's ``model`` artifact (an export on
    object storage is downloaded for it first). Returns the mode used, None when there is no export."""
    if not storage.exists(export_path):
        return None
    mode = log_model_mode(log_model, export_path)
    mlflow_client.set_tag(run_id, tracking.MODEL_URI_TAG, export_path)
    if mode == "upload":
        with storage.local_dir(export_path) as local:
            mlflow_client.log_artifacts(run_id, local, artifact_path=tracking.MODEL_ARTIFACT)
    return mode


def publish_and_finish(mlflow_client, run_id: str, trained: bool, export_path: str, train: dict,
                       error: str | None = None) -> tuple[bool, str | None, str | None]:
    """The end of a training's MLflow run: after a successful training the export is recorded
    (:func:`log_export`) and registered, then the run ends FINISHED; FAILED, with the tag ``error``
    saying what failed, when the training (``error``) or the recording failed. Never raises for a
    failed upload: the caller's exit code and message come from the returned error.

    Returns (ok, model_uri, error): model_uri is the registered ``models:/NAME/VERSION`` or None."""
    ok, model_uri = trained, None
    if trained:
        try:
            mlflow_client.set_tag(run_id, "model_path", export_path)
            mode = log_export(mlflow_client, run_id, export_path, train["log_model"])
            if mode and train["register_model"]:
                source = export_path if mode == "uri" else None
                model_uri = register(mlflow_client, run_id, train["register_model"], source)
        except Exception as exc:  # the training is done and its export intact: say what failed, where
            ok = False
            error = (f"training finished and the model was exported to {export_path}, but recording it in MLflow "
                     f"failed ({type(exc).__name__}: {exc}); re-run with the same --run-name to record it again, "
                     "or set train.log_model=uri to record only its URI")
    if not ok and error:
        try:
            mlflow_client.set_tag(run_id, ERROR_TAG, error[:tracking.MAX_TAG_LENGTH])
        except Exception as exc:  # the tracking server itself is down: the message still reaches the job
            print(f"[train] MLflow: could not tag the error: {exc}", flush=True)
    tracking.finish_run(mlflow_client, run_id, ok)
    return ok, model_uri, error


def previous_result(storage_path: str, run_name: str):
    """Ray Train's result of an earlier run named ``run_name`` under ``storage_path`` (what a run of
    that name resumes from), None when there is no such run."""
    from ray.train import Result

    try:
        return Result.from_path(storage.join(storage_path, run_name))
    except RuntimeError:  # Ray Train's answer for a missing run directory or checkpoint record
        return None


def previous_run_step(storage_path: str, run_name: str) -> int | None:
    """The step of the last checkpoint an earlier run named ``run_name`` left under ``storage_path``;
    None when there is no such run or checkpoint."""
    previous = previous_result(storage_path, run_name)
    return (previous.metrics or {}).get("step") if previous else None


def check_resumable(storage_path: str, run_name: str, train: dict) -> None:
    """Raise :class:`handsonvlm.checkpoints.CheckpointMismatch` when the checkpoint a run named
    ``run_name`` would resume from was written by another world size or ZeRO stage (before any worker
    starts; the workers check again)."""
    previous = previous_result(storage_path, run_name)
    checkpoint = previous.checkpoint if previous else None
    if checkpoint is None:
        return
    layout = checkpoints.read_layout(checkpoint.filesystem, checkpoint.path)
    checkpoints.check_layout(layout, train["num_workers"], train["zero_stage"],
                             storage.join(storage_path, run_name, os.path.basename(checkpoint.path)))


def launch(config: dict, run_name: str, storage: str = DEFAULT_STORAGE, max_failures: int = 0,
           use_mlflow: bool = True, extra_tags: dict | None = None) -> dict:
    """Run one training (Ray must be initialised). Returns {ok, metrics, export_path, run_id, checkpoint,
    model_uri, error} (``model_uri``: the registered ``models:/NAME/VERSION``, None when not registered;
    ``error``: what failed, None when ok). Raises :class:`handsonvlm.checkpoints.CheckpointMismatch`
    before starting anything when the run's checkpoint has another world size or ZeRO stage.

    Used by this CLI and by each Tune trial (pipelines/tune.py)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.train_worker import train_loop_per_worker  # torch, the model: where training runs

    train = config["train"]
    templates = run_templates(config)  # read here, on the driver: workers need not see the file
    data, plan, _ = plan_training(config)
    shares = ", ".join(f"{n} {len(pool)} clips" for n, pool in plan["pools"].items())
    print(f"[train] {run_name}: {plan['total_rows']} clips in {len(plan['files'])} shards ({shares}); "
          f"{plan['draws_per_epoch']} draws = {plan['steps_per_epoch']} steps/epoch on {train['num_workers']} "
          f"workers", flush=True)
    plan["features"] = feature_cache_plan(data, train["split"], plan["files"], config["model"],
                                          train["feature_cache"])
    val = plan_validation(data, train)
    plan["validation"] = val["rows"] if val else None
    # On a connected cluster an autoscaler may still add the GPU nodes (the GPU groups start at 0 nodes).
    gpus_now = ray.cluster_resources().get("GPU", 0)
    use_gpu = resolve_use_gpu(train["device"], gpus_now, train["num_workers"], can_autoscale=not LOCAL_RAY["started"])
    if use_gpu and gpus_now < train["num_workers"]:
        print(f"[train] waiting for {train['num_workers']} GPUs (the cluster has {gpus_now:g} now; its autoscaler "
              "adds GPU nodes)", flush=True)
    storage = absolute_uri(storage)
    # before an MLflow run is started or resumed: a checkpoint this run cannot load stops it here
    check_resumable(storage, run_name, train)
    export_path = export_path_for(train["export_dir"], run_name, storage, on_cluster=not LOCAL_RAY["started"])

    mlflow_client, run_id = None, None
    if use_mlflow:
        mlflow_client = tracking.client()
        exp_id = tracking.experiment_id(mlflow_client)
        tags = {"git_commit": tracking.git_commit() or "unknown", "preset": str(config.get("preset")),
                "zero_stage": str(train["zero_stage"]), "world_size": str(train["num_workers"]),
                "stage": "train", "device": "gpu" if use_gpu else "cpu", "templates": templates.source,
                **(extra_tags or {})}
        params = tracking.flatten({"model": config["model"], "train": train})
        run_id, resumed = tracking.start_run(mlflow_client, exp_id, run_name, params, tags)
        state = "resumed" if resumed else "new"
        print(f"[train] MLflow run {run_id} ({state}) at {tracking.tracking_uri()}", flush=True)
        log_inputs(mlflow_client, run_id, data, train, plan, val)
    settings = {"tracking_uri": tracking.tracking_uri(), "run_id": run_id,
                "system_metrics_interval_s": tracking.system_metrics_interval_s()}
    loop_config = {**config, "plan": plan, "export_path": export_path, "mlflow": settings if run_id else None,
                   "templates": {**templates.lists(), "source": templates.source}}

    steps = total_steps(plan["steps_per_epoch"], train["epochs"], train["max_steps"])
    done = previous_run_step(storage, run_name)
    if done is not None and done >= steps:
        print(f"[train] {run_name} already finished ({done}/{steps} steps): reusing it (its last checkpoint is "
              f"restored and exported again); to train anew, give a new run name (--run-name NAME, "
              f"make demo DEMO_RUN=<new name>)", flush=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=train["num_workers"], use_gpu=use_gpu,
                                     resources_per_worker={"CPU": train["cpus_per_worker"]},
                                     placement_strategy=PLACEMENT_STRATEGIES[train["placement"]]),
        torch_config=torch_config_for(train, use_gpu),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=train["keep_checkpoints"]),
                             failure_config=FailureConfig(max_failures=max_failures),
                             worker_runtime_env={"env_vars": worker_env_vars(use_gpu)}),
    )
    ok, result, model_uri, error = False, None, None, None
    try:
        result = trainer.fit()
        ok = result.error is None
        error = None if ok else f"training failed: {result.error}"
    except BaseException as exc:
        error = f"training failed: {type(exc).__name__}: {exc}"
        raise
    finally:  # nothing in here raises for a failed upload: the run always ends, FINISHED or FAILED
        if mlflow_client is not None:
            ok, model_uri, error = publish_and_finish(mlflow_client, run_id, ok, export_path, train, error)
    return {"ok": ok, "metrics": result.metrics if result else None, "export_path": export_path, "run_id": run_id,
            "checkpoint": result.checkpoint.path if result and result.checkpoint else None, "model_uri": model_uri,
            "error": error}


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    config = resolve_config(args.config, config_overrides(args))
    if args.dry_run:
        print(json.dumps(dry_run(config), indent=1))
        return 0
    run_name = args.run_name or f"{config['model']['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
    train = config["train"]
    if not (args.ray_address or os.environ.get("RAY_ADDRESS")):
        try:  # a local Ray gets this machine's GPUs and no more: fail before starting it
            import torch

            resolve_use_gpu(train["device"], torch.cuda.device_count(), train["num_workers"], can_autoscale=False,
                            where="this machine")
        except DeviceError as exc:
            print(f"[train] error: {exc}", file=sys.stderr, flush=True)
            return 2
        if train["init_weights"]:  # the workers of a local Ray read the same disk: a wrong path fails here
            from handsonvlm.compat import state_dict_files

            try:
                state_dict_files(train["init_weights"])
            except (FileNotFoundError, KeyError, ValueError) as exc:
                print(f"[train] error: train.init_weights={train['init_weights']!r}: {exc}", file=sys.stderr,
                      flush=True)
                return 2
    init_ray(args.ray_address, args.num_cpus, DEFAULT_OBJECT_STORE_BYTES)
    try:
        out = launch(config, run_name, args.storage, args.max_failures, use_mlflow=not args.no_mlflow)
    except checkpoints.CheckpointMismatch as exc:
        print(f"[train] error: {exc}", file=sys.stderr, flush=True)
        return 2
    if out["error"]:
        print(f"[train] error: {out['error']}", file=sys.stderr, flush=True)
    print(f"[train] done: {out['metrics']}", flush=True)
    print(f"[train] model: {out['export_path']}", flush=True)
    print(f"[train] checkpoints: {out['checkpoint']}", flush=True)
    if out["run_id"]:
        print(f"[train] MLflow UI: mlflow ui --backend-store-uri {tracking.tracking_uri()}", flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
