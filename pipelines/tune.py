"""Hyper-parameter sweep: each Ray Tune trial is one Ray Train run, an MLflow run nested in the sweep's.

    python pipelines/tune.py --config tiny --search-space configs/tune/lr_hoi.yaml \
        [--data runs/demo/data] [--max-steps N] [--name SWEEP] [--set key=value ...]

The search space file names dotted preset keys and a distribution for each (see
configs/tune/lr_hoi.yaml). Trials run their TorchTrainer from inside a Tune function trainable
(Train V2 rejects Tune callbacks on the trainer). The trial's metric is the validation metric of
its last checkpoint: by default ``val_vhp_ade``, the VHP ADE on the ``train.val_clips`` clips of
``train.val_split`` that every checkpoint validates (any ``val_<task>_<metric>`` works, and
``fixed_batch_loss``, the loss on one fixed training batch, for runs without validation).

In MLflow the sweep is one parent run (tag ``stage=sweep``, the search space as params) with the
trials' runs nested in it (tag ``mlflow.parentRunId``); at the end the parent gets the tags
``best_trial_run_id``/``best_metric`` and the metric ``best/<metric>``. Trials register no model and
upload none (``train.log_model=uri``: the run's tag ``model_uri`` says where the trial's export is).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a bare checkout / job working_dir

from handsonvlm.config import TrainConfig, add_section_flags, load_preset, section_overrides
from pipelines import tracking
from pipelines.common import DEFAULT_OBJECT_STORE_BYTES, absolute_uri, add_ray_flags, init_ray, setup_logging
from pipelines.train import AUTO, DEFAULT_STORAGE, launch, resolve_config
from preprocessing.storage import is_local

TUNE_FLAGS = ("data", "max_steps")  # --data, --max-steps: train.<name> of every trial
PATH_KEYS = ("data", "export_dir")  # train keys made absolute: trials run in their own directories
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")
# The trial only waits for its TorchTrainer, so it reserves no CPU: Tune needs a non-empty bundle,
# and even 0.01 CPU starves the workers' Ray Data reads, whose file-listing task asks for a whole CPU.
TRIAL_RESOURCES = {"cpu": 0, "memory": 64 * 1024**2}
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's nesting tag (the UI shows the trials under the sweep)
VAL_PREFIX = "val_"  # validation metrics in a training's result, reported to Tune with the trial
NO_REGISTRATION = "train.register_model=null"  # trials are candidates, not models: a --set can turn it on
NO_UPLOAD = "train.log_model=uri"  # nor is a trial's export streamed through MLflow: its URI is recorded
DEFAULT_METRIC = "val_vhp_ade"  # the validation ADE of VHP (train.val_clips clips), lower is better


def search_space(spec: dict) -> dict:
    """{dotted key: {kind: args}} -> Tune param space."""
    from ray import tune

    space = {}
    for key, dist in (spec.get("params") or {}).items():
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise ValueError(f"search space entry {key!r} must be one of {DISTRIBUTIONS}, got {dist!r}")
        kind, args = next(iter(dist.items()))
        space[key] = {"grid": tune.grid_search, "choice": tune.choice}[kind](list(args)) if kind in ("grid", "choice") \
            else {"uniform": tune.uniform, "loguniform": tune.loguniform}[kind](*args)
    if not space:
        raise ValueError("the search space has no params")
    return space


def trial(params: dict, base_overrides: list[str], preset: str, sweep: str, storage: str, tracking_uri: str,
          parent_run_id: str, metric: str = DEFAULT_METRIC) -> None:
    """One Tune trial: the preset plus this trial's values, trained (an MLflow run nested in
    ``parent_run_id``) and reported with its last checkpoint's ``metric``."""
    import ray
    from ray import tune

    config = resolve_config(preset, base_overrides + [f"{k}={v}" for k, v in params.items()])

    run_name = f"{sweep}-{tune.get_context().get_trial_id()}"
    tags = {"sweep": sweep, "stage": "tune", PARENT_RUN_TAG: parent_run_id,
            **{f"tune.{k}": str(v) for k, v in params.items()}}
    # A Tune trial captures the tasks it starts into its own (tiny) placement group, where the
    # TorchTrainer's workers would never fit: launch the run from a task scheduled outside it.
    # Ray workers keep the environment of the Ray they belong to: hand the driver's tracking URI on
    # (and no MLFLOW_RUN_ID: runs are made by the client with the parent tag, not by mlflow.start_run).
    launcher = ray.remote(num_cpus=0)(launch).options(
        scheduling_strategy="DEFAULT", runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri}})
    out = ray.get(launcher.remote(config, run_name, storage, extra_tags=tags))
    if not out["ok"]:
        raise RuntimeError(f"trial {run_name} failed")
    reported = {**{k: v for k, v in out["metrics"].items() if k.startswith(VAL_PREFIX)},
                "fixed_batch_loss": out["metrics"]["fixed_batch_loss"]}
    if metric not in reported:
        raise RuntimeError(f"trial {run_name} has no {metric} (it reported {sorted(reported)}): validation needs "
                           "train.val_clips > 0 and train.val_split shards; without them use metric: fixed_batch_loss")
    tune.report({**reported, "mlflow_run_id": out["run_id"]})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--search-space", required=True, help="YAML with metric, mode, num_samples, params")
    add_section_flags(p, TrainConfig.section, TrainConfig, TUNE_FLAGS)
    p.add_argument("--name", help="sweep name (default: sweep-<time>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--storage", default=DEFAULT_STORAGE)
    add_ray_flags(p)
    args = p.parse_args(argv)
    setup_logging()
    from ray import tune

    with open(args.search_space) as f:
        spec = yaml.safe_load(f)
    space = search_space(spec)

    # Trials run in their own working directories: hand them absolute paths and one tracking URI.
    tracking_uri = tracking.tracking_uri()
    overrides = [NO_REGISTRATION, NO_UPLOAD, *args.set, *section_overrides(args, TrainConfig.section, TUNE_FLAGS)]
    train_section = load_preset(args.config, overrides).get(TrainConfig.section, {})
    for key in PATH_KEYS:
        value = train_section.get(key)
        # export_dir auto: each trial's export beside its checkpoints (a trial launches from a Ray task)
        if value and value != AUTO and is_local(str(value)):
            overrides.append(f"train.{key}={absolute_uri(str(value))}")
    sweep = args.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    storage_path = absolute_uri(args.storage)
    init_ray(args.ray_address, args.num_cpus, DEFAULT_OBJECT_STORE_BYTES)
    mlflow_client = tracking.client()
    parent_id, _ = tracking.start_run(mlflow_client, tracking.experiment_id(mlflow_client), sweep,
                                      tracking.flatten({"search_space": spec, "overrides": " ".join(overrides)}),
                                      {"stage": "sweep", "preset": args.config,
                                       "git_commit": tracking.git_commit() or "unknown"})
    print(f"[tune] MLflow parent run {parent_id} at {tracking_uri}", flush=True)
    metric = spec.get("metric", DEFAULT_METRIC)
    trainable = tune.with_parameters(trial, metric=metric, base_overrides=overrides, preset=args.config, sweep=sweep,
                                     storage=storage_path, tracking_uri=tracking_uri, parent_run_id=parent_id)
    tuner = tune.Tuner(
        tune.with_resources(trainable, TRIAL_RESOURCES),
        param_space=space,
        tune_config=tune.TuneConfig(metric=metric, mode=spec.get("mode", "min"),
                                    num_samples=int(spec.get("num_samples", 1)),
                                    max_concurrent_trials=int(spec.get("max_concurrent_trials", 1))),
        run_config=tune.RunConfig(name=sweep, storage_path=storage_path),
    )
    ok = False
    try:
        results = tuner.fit()
        best = results.get_best_result()
        print(f"[tune] {len(results)} trials; best {metric} {best.metrics.get(metric)} with {best.config}", flush=True)
        tag_best_trial(mlflow_client, parent_id, metric, best.metrics, best.config)
        ok = not results.errors
    finally:
        tracking.finish_run(mlflow_client, parent_id, ok)
    return 0 if ok else 1


def tag_best_trial(mlflow_client, parent_id: str, metric: str, metrics: dict, config: dict) -> None:
    """The best trial on the sweep's parent run: its run id, the metric's name, value and the trial's values."""
    mlflow_client.set_tag(parent_id, "best_trial_run_id", str(metrics.get("mlflow_run_id")))
    mlflow_client.set_tag(parent_id, "best_metric", metric)
    mlflow_client.set_tag(parent_id, "best_trial_config", json.dumps(config, sort_keys=True, default=str))
    if isinstance(metrics.get(metric), (int, float)):
        mlflow_client.log_metric(parent_id, f"best/{metric}", float(metrics[metric]))


if __name__ == "__main__":
    sys.exit(main())
