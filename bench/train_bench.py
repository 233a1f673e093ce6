"""Training: the Ray Train + DeepSpeed ZeRO-2 loop (2 workers) vs a plain single-process PyTorch
loop on the same model, data and total cores; and either loop with vs without the feature cache.

Both sides run several epochs (an epoch is one log window of draws) and checkpoint every other
window; the headline rate is END TO END: every sample after the first step over the wall time
since that step, epoch boundaries and checkpoints included (what a user waits for). The median of
the post-warm-up log windows is reported beside it (``..._steady``).

Ray side: :func:`pipelines.train.launch` on the tiny preset (the real job: the draw stream, the
seeded task mixture, DeepSpeed, gloo, checkpoints with validation of 8 clips) with MLflow logging
into a private sqlite store; it logs ``train/samples_per_s`` per window and
``train/samples_per_s_end_to_end``.

Plain side (:func:`plain_loop`): one process, ``torch.set_num_threads(total cores)``, global batch
= workers x micro-batch, the job's own set-up and batches (``handsonvlm.training.build_training``,
``rows_to_batch``, ``plain_step``; ``preprocessing.training_data.DrawStream``, ``FeatureLookup``)
and a ``torch.save`` of weights, optimizer and schedule at the job's checkpoint steps (no
validation: the Ray side's validation counts against it).
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from bench.common import Sizes, median, timed
from handsonvlm.mixture import Mixture
from handsonvlm.training import build_training, plain_step, rows_to_batch
from pipelines import train as train_job
from preprocessing import layout
from preprocessing.training_data import (
    MB,
    DrawStream,
    FeatureLookup,
    RowStore,
    feature_cache_plan,
    plan_data,
    shard_rows,
)

NUM_WORKERS = 2
ZERO_STAGE = 2


def checkpoint_every(sizes: Sizes) -> int:
    """Both loops checkpoint every other log window, so the end-to-end rates include checkpoints."""
    return 2 * sizes.train_log_every


def job_config(data_root: Path, sizes: Sizes, feature_cache: str, export_dir: Path) -> dict:
    """The resolved tiny-preset config of ``pipelines/train.py`` for one benchmark run: an epoch is
    one log window of draws, so the run crosses several epoch boundaries, and it checkpoints
    (with validation) every other window."""
    steps = sizes.train_warmup_steps + sizes.train_steps
    global_batch = sizes.micro_batch * NUM_WORKERS
    return train_job.resolve_config("tiny", [
        f"train.micro_batch_size={sizes.micro_batch}", f"train.log_every={sizes.train_log_every}",
        f"train.checkpoint_every={checkpoint_every(sizes)}", f"train.feature_cache={feature_cache}",
        f"train.export_dir={export_dir}", f"train.data={data_root}", f"train.max_steps={steps}",
        f"train.num_workers={NUM_WORKERS}", f"train.zero_stage={ZERO_STAGE}",
        f"train.samples_per_epoch={global_batch * sizes.train_log_every}", "train.register_model=null"])


def steady_windows(history: dict[int, float], warmup_steps: int) -> list[float]:
    """Rates of the windows that end after the warm-up steps, in step order."""
    return [history[step] for step in sorted(history) if step > warmup_steps]


@contextmanager
def tracking_uri(uri: str):
    """MLFLOW_TRACKING_URI = ``uri`` for the driver of one run (the job reads it), restored afterwards."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def ray_train_rate(data_root: Path, workdir: Path, sizes: Sizes, feature_cache: str, run_name: str) -> dict:
    """Samples/s of the real training job: end to end (``train/samples_per_s_end_to_end`` at the last
    step: every sample after the first step over the wall time since it, epoch boundaries, checkpoints
    and validation included) and the median of the post-warm-up windows; and its wall time."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{(workdir / 'mlflow.db').absolute()}"
    config = job_config(data_root, sizes, feature_cache, workdir / "models")
    with tracking_uri(uri):
        wall, out = timed(lambda: train_job.launch(config, run_name, storage=str(workdir / "ray_results")))
    if not out["ok"]:
        raise RuntimeError(f"training run {run_name} failed")
    client = MlflowClient(uri)
    history = client.get_metric_history(out["run_id"], "train/samples_per_s")
    windows = steady_windows({m.step: m.value for m in history}, sizes.train_warmup_steps)
    end_to_end = max(client.get_metric_history(out["run_id"], "train/samples_per_s_end_to_end"), key=lambda m: m.step)
    waits = [m.value for m in client.get_metric_history(out["run_id"], "train/data_wait_s")]
    return {"windows_samples_per_s": windows, "samples_per_s": median(windows), "job_wall_s": wall,
            "samples_per_s_end_to_end": end_to_end.value, "data_wait_s_median": median(waits),
            "steps": sizes.train_warmup_steps + sizes.train_steps}


def read_rows(files: list[str]) -> list[dict]:
    """Rows of ``files`` in order, with their shard ``path`` (as Ray Data's include_paths gives)."""
    return [row for path in files for row in shard_rows(path)]


def plain_loop(data_root: Path, sizes: Sizes, feature_cache: str, threads: int) -> dict:
    """A single-process PyTorch loop on the Ray job's model, batches and optimizer settings."""
    from handsonvlm.config import ModelConfig, TrainConfig

    config = job_config(data_root, sizes, feature_cache, data_root / "unused-exports")
    train, cfg = TrainConfig.from_dict(config["train"]), ModelConfig.from_dict(config["model"])
    batch_size = train.micro_batch_size * NUM_WORKERS  # the Ray job's global batch
    plan = plan_data(layout.samples_dir(str(data_root), train.split), 1, batch_size, 1,
                     Mixture.from_config(train.to_dict(), cfg), train.samples_per_epoch)
    cache = feature_cache_plan(str(data_root), train.split, plan["files"], config["model"], feature_cache)
    features = FeatureLookup(**cache) if cache else None
    if feature_cache == "on" and features is None:
        raise FileNotFoundError("feature cache requested but not available")

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    stream = None
    try:
        parts = build_training(train, cfg, plan["steps_per_epoch"] * train.epochs)
        generator = torch.Generator().manual_seed(train.seed)
        device = torch.device("cpu")
        # The job's input pipeline: the same draws, row store and background preparation; a step's time
        # includes any wait for its batch.
        stream = DrawStream(plan, parts.mixture, 0, RowStore(plan, train.row_cache_mb * MB),
                            lambda rows, epoch: rows_to_batch(rows, parts.model, parts.mixture, epoch, device,
                                                              features)[0])
        batches = iter(stream)
        step_seconds: list[float] = []
        first_step_end = None
        with tempfile.TemporaryDirectory() as checkpoints:
            while len(step_seconds) < sizes.train_warmup_steps + sizes.train_steps:
                start = time.perf_counter()
                _, _, batch = next(batches)
                plain_step(parts, batch, generator, train.max_grad_norm)
                step = len(step_seconds) + 1
                if step % checkpoint_every(sizes) == 0:  # what the job saves: weights, optimizer, schedule
                    torch.save({"model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict(),
                                "scheduler": parts.scheduler.state_dict()}, Path(checkpoints) / "state.pt")
                step_seconds.append(time.perf_counter() - start)
                first_step_end = first_step_end or time.perf_counter()
        end_to_end = batch_size * (len(step_seconds) - 1) / (time.perf_counter() - first_step_end)
    finally:
        if stream is not None:
            stream.close()
        torch.set_num_threads(previous_threads)

    measured = step_seconds[sizes.train_warmup_steps:]
    windows = [batch_size * len(chunk) / sum(chunk) for chunk in
               (measured[i:i + sizes.train_log_every] for i in range(0, len(measured), sizes.train_log_every))]
    return {"windows_samples_per_s": windows, "samples_per_s": median(windows), "batch": batch_size,
            "threads": threads, "step_s_median": median(measured), "samples_per_s_end_to_end": end_to_end}


def build_feature_cache(data_root: Path, processes: int) -> float:
    """Run the features stage (tiny preset's tower, float32) on the train split; returns its seconds."""
    from handsonvlm.config import load_model_config
    from preprocessing.features import run_features_stage

    seconds, _ = timed(lambda: run_features_stage(str(data_root), ["train"], load_model_config("tiny"), "float32",
                                                  actors=processes, progress=False))
    return seconds


def bench_train(data_root: Path, workdir: Path, sizes: Sizes, total_cores: int) -> dict:
    """train_overhead_ratio = Ray/plain samples/s end to end (no cache; ``..._steady``: the medians of
    the post-warm-up windows); feature_cache_speedup = cache/no cache (Ray, end to end)."""
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%H%M%S")
    result = {"workers": NUM_WORKERS, "zero_stage": ZERO_STAGE, "micro_batch_per_worker": sizes.micro_batch,
              "total_cores": total_cores, "warmup_steps": sizes.train_warmup_steps, "measured_steps": sizes.train_steps,
              "log_every": sizes.train_log_every}
    result["plain_online"] = plain_loop(data_root, sizes, "off", total_cores)
    result["ray_online"] = ray_train_rate(data_root, workdir, sizes, "off", f"bench-online-{stamp}")
    result["feature_stage_s"] = build_feature_cache(data_root, total_cores)
    result["plain_cached"] = plain_loop(data_root, sizes, "on", total_cores)
    result["ray_cached"] = ray_train_rate(data_root, workdir, sizes, "on", f"bench-cached-{stamp}")
    runs = ("plain_online", "ray_online", "plain_cached", "ray_cached")
    rate = {run: result[run]["samples_per_s_end_to_end"] for run in runs}
    steady = {run: result[run]["samples_per_s"] for run in runs}
    result["train_overhead_ratio"] = rate["ray_online"] / rate["plain_online"]
    result["train_overhead_ratio_cached"] = rate["ray_cached"] / rate["plain_cached"]
    result["train_overhead_ratio_steady"] = steady["ray_online"] / steady["plain_online"]
    result["ray_end_to_end_over_windows"] = rate["ray_online"] / steady["ray_online"]
    result["feature_cache_speedup"] = rate["ray_cached"] / rate["ray_online"]
    result["feature_cache_speedup_plain"] = rate["plain_cached"] / rate["plain_online"]
    return result


def profile_plain_step(data_root: Path, sizes: Sizes, threads: int) -> str:
    """cProfile of the plain loop for one warm-up and one measured step (online CLIP)."""
    from dataclasses import replace

    from bench.common import profile_top

    one_step = replace(sizes, train_warmup_steps=1, train_steps=1, train_log_every=1)
    return profile_top(lambda: plain_loop(data_root, one_step, "off", threads))
