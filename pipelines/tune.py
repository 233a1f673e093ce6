"""Hyper-parameter sweep: each Ray Tune trial is one Ray Train run, logged as its own MLflow run.

    python pipelines/tune.py --config tiny --search-space configs/tune/lr_hoi.yaml \
        [--data runs/demo/data] [--max-steps N] [--name SWEEP] [--set key=value ...]

The search space file names dotted preset keys and a distribution for each (see
configs/tune/lr_hoi.yaml). Trials run their TorchTrainer from inside a Tune function trainable
(Train V2 rejects Tune callbacks on the trainer); the trial's metric is the loss on a fixed batch
at its last checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a bare checkout / job working_dir

from handsonvlm.config import TrainConfig, add_section_flags, load_preset, section_overrides
from pipelines import tracking
from pipelines.common import DEFAULT_OBJECT_STORE_BYTES, absolute_uri, init_ray, setup_logging
from pipelines.train import DEFAULT_STORAGE, launch, resolve_config
from preprocessing.storage import is_local

TUNE_FLAGS = ("data", "max_steps")  # --data, --max-steps: train.<name> of every trial
PATH_KEYS = ("data", "export_dir")  # train keys made absolute: trials run in their own directories
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")
# The trial only waits for its TorchTrainer, so it reserves no CPU: Tune needs a non-empty bundle,
# and even 0.01 CPU starves the workers' Ray Data reads, whose file-listing task asks for a whole CPU.
TRIAL_RESOURCES = {"cpu": 0, "memory": 64 * 1024**2}


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


def trial(params: dict, base_overrides: list[str], preset: str, sweep: str, storage: str, tracking_uri: str) -> None:
    """One Tune trial: the preset plus this trial's values, trained and reported."""
    import ray
    from ray import tune

    config = resolve_config(preset, base_overrides + [f"{k}={v}" for k, v in params.items()])

    run_name = f"{sweep}-{tune.get_context().get_trial_id()}"
    tags = {"sweep": sweep, "stage": "tune", **{f"tune.{k}": str(v) for k, v in params.items()}}
    # A Tune trial captures the tasks it starts into its own (tiny) placement group, where the
    # TorchTrainer's workers would never fit: launch the run from a task scheduled outside it.
    # Ray workers keep the environment of the Ray they belong to: hand the driver's tracking URI on.
    launcher = ray.remote(num_cpus=0)(launch).options(
        scheduling_strategy="DEFAULT", runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": tracking_uri}})
    out = ray.get(launcher.remote(config, run_name, storage, extra_tags=tags))
    if not out["ok"]:
        raise RuntimeError(f"trial {run_name} failed")
    tune.report({"fixed_batch_loss": out["metrics"]["fixed_batch_loss"], "mlflow_run_id": out["run_id"]})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--search-space", required=True, help="YAML with metric, mode, num_samples, params")
    add_section_flags(p, TrainConfig.section, TrainConfig, TUNE_FLAGS)
    p.add_argument("--name", help="sweep name (default: sweep-<time>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--storage", default=DEFAULT_STORAGE)
    p.add_argument("--ray-address")
    p.add_argument("--num-cpus", type=int)
    args = p.parse_args(argv)
    setup_logging()
    from ray import tune

    with open(args.search_space) as f:
        spec = yaml.safe_load(f)
    space = search_space(spec)

    # Trials run in their own working directories: hand them absolute paths and one tracking URI.
    tracking_uri = tracking.tracking_uri()
    overrides = [*args.set, *section_overrides(args, TrainConfig.section, TUNE_FLAGS)]
    train_section = load_preset(args.config, overrides).get(TrainConfig.section, {})
    for key in PATH_KEYS:
        value = train_section.get(key)
        if value and is_local(str(value)):
            overrides.append(f"train.{key}={absolute_uri(str(value))}")
    sweep = args.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    storage_path = absolute_uri(args.storage)
    init_ray(args.ray_address, args.num_cpus, DEFAULT_OBJECT_STORE_BYTES)
    trainable = tune.with_parameters(trial, base_overrides=overrides, preset=args.config, sweep=sweep,
                                     storage=storage_path, tracking_uri=tracking_uri)
    tuner = tune.Tuner(
        tune.with_resources(trainable, TRIAL_RESOURCES),
        param_space=space,
        tune_config=tune.TuneConfig(metric=spec.get("metric", "fixed_batch_loss"), mode=spec.get("mode", "min"),
                                    num_samples=int(spec.get("num_samples", 1)),
                                    max_concurrent_trials=int(spec.get("max_concurrent_trials", 1))),
        run_config=tune.RunConfig(name=sweep, storage_path=storage_path),
    )
    results = tuner.fit()
    best = results.get_best_result()
    print(f"[tune] {len(results)} trials; best {best.metrics.get('fixed_batch_loss')} with {best.config}", flush=True)
    return 0 if not results.errors else 1


if __name__ == "__main__":
    sys.exit(main())
