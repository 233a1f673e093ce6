"""Training job: Ray Train + DeepSpeed ZeRO fine-tuning of HandsOnVLM on the sample shards.

    python pipelines/train.py --config tiny [--data runs/demo/data] [--run-name NAME] [--max-steps N]
        [--num-workers W] [--zero-stage 2|3] [--set key=value ...]

Locally it starts a Ray of its own; on a cluster the same command runs under
``ray job submit --working-dir . -- python pipelines/train.py ...``. Re-running with the same
``--run-name`` resumes from the last checkpoint (and continues the same MLflow run). The model is
exported to ``<train.export_dir>/<run-name>/`` (safetensors + config + tokenizer).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a bare checkout / job working_dir

from pipelines import tracking  # noqa: E402
from pipelines.common import DEFAULT_OBJECT_STORE_BYTES, init_ray, setup_logging  # noqa: E402
from pipelines.training import export_path_for, feature_cache_plan, plan_data, train_loop_per_worker  # noqa: E402

DEFAULT_STORAGE = "runs/ray_results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="tiny", help="preset name in configs/ or a YAML path")
    p.add_argument("--data", help="preprocessing output root (holds samples/<split>/); default: train.data")
    p.add_argument("--run-name", help="Ray Train run name; the same name resumes (default: <preset>-<time>)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--zero-stage", type=int, choices=(2, 3))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any preset key, e.g. train.lr=1e-3 or model.mode=release")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="Ray Train storage path (checkpoints; local or URI)")
    p.add_argument("--max-failures", type=int, default=0, help="worker-group restarts from the last checkpoint")
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    return p.parse_args(argv)


def resolve_config(args) -> dict:
    from handsonvlm.config import ModelConfig, TrainConfig, load_preset

    overrides = list(args.set)
    for flag, key in ((args.data, "train.data"), (args.max_steps, "train.max_steps"),
                      (args.num_workers, "train.num_workers"), (args.zero_stage, "train.zero_stage")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    data = load_preset(args.config, overrides)
    model = ModelConfig.from_dict(data.get("model", {}))
    train = TrainConfig.from_dict(data.get("train", {}))
    return {"model": model.to_dict(), "train": train.to_dict(), "preset": args.config}


def launch(config: dict, run_name: str, storage: str = DEFAULT_STORAGE, max_failures: int = 0,
           use_mlflow: bool = True, extra_tags: dict | None = None) -> dict:
    """Run one training (Ray must be initialised). Returns {ok, metrics, export_path, run_id}.

    Used by this CLI and by each Tune trial (pipelines/tune.py)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    train = config["train"]
    data = train["data"] if "://" in train["data"] else str(Path(train["data"]).absolute())
    samples_dir = f"{data.rstrip('/')}/samples/{train['split']}"
    plan = plan_data(samples_dir, train["num_workers"], train["micro_batch_size"], train["gradient_accumulation_steps"])
    print(f"[train] {run_name}: {plan['total_rows']} samples in {sum(map(len, plan['files']))} shards; "
          f"{plan['steps_per_epoch']} steps/epoch on {train['num_workers']} workers", flush=True)
    plan["features"] = feature_cache_plan(data, train["split"], [f for fs in plan["files"] for f in fs],
                                          config["model"], train["feature_cache"])
    use_gpu = ray.cluster_resources().get("GPU", 0) >= train["num_workers"]
    export_path = export_path_for(train["export_dir"], run_name)

    mlflow_client, run_id = None, None
    if use_mlflow:
        mlflow_client = tracking.client()
        exp_id = tracking.experiment_id(mlflow_client)
        tags = {"git_commit": tracking.git_commit() or "unknown", "preset": str(config.get("preset")),
                "zero_stage": str(train["zero_stage"]), "world_size": str(train["num_workers"]),
                "stage": "train", "device": "gpu" if use_gpu else "cpu", **(extra_tags or {})}
        params = tracking.flatten({"model": config["model"], "train": train})
        run_id, resumed = tracking.start_run(mlflow_client, exp_id, run_name, params, tags)
        print(f"[train] MLflow run {run_id} ({'resumed' if resumed else 'new'}) at {tracking.tracking_uri()}", flush=True)
    loop_config = {**config, "plan": plan, "export_path": export_path,
                   "mlflow": {"tracking_uri": tracking.tracking_uri(), "run_id": run_id} if run_id else None}

    storage = storage if "://" in storage else str(Path(storage).absolute())
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=train["num_workers"], use_gpu=use_gpu,
                                     resources_per_worker={"CPU": train["cpus_per_worker"]}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=run_name, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=train["keep_checkpoints"]),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    ok, result = False, None
    try:
        result = trainer.fit()
        ok = result.error is None
    finally:
        if mlflow_client is not None:
            if ok:
                mlflow_client.set_tag(run_id, "model_path", export_path)
                if Path(export_path).exists():
                    mlflow_client.log_artifacts(run_id, export_path, artifact_path="model")
            tracking.finish_run(mlflow_client, run_id, ok)
    return {"ok": ok, "metrics": result.metrics if result else None, "export_path": export_path, "run_id": run_id,
            "checkpoint": result.checkpoint.path if result and result.checkpoint else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    config = resolve_config(args)
    run_name = args.run_name or f"{config['model']['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
    init_ray(args.ray_address, args.num_cpus, DEFAULT_OBJECT_STORE_BYTES)
    out = launch(config, run_name, args.storage, args.max_failures, use_mlflow=not args.no_mlflow)
    print(f"[train] done: {out['metrics']}", flush=True)
    print(f"[train] model: {out['export_path']}", flush=True)
    print(f"[train] checkpoints: {out['checkpoint']}", flush=True)
    if out["run_id"]:
        print(f"[train] MLflow UI: mlflow ui --backend-store-uri {tracking.tracking_uri()}", flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
