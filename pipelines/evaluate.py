"""Evaluation job: Ray Data batch inference of an exported HandsOnVLM on the sample shards + metrics.

    python pipelines/evaluate.py --model runs/models/<name> --data OUT [--config PRESET] [--set eval.KEY=VALUE]
        [--split validation] [--task vhp|rbhp|both] [--num-samples K] [--shuffle-questions] [--shuffle-frames]
        [--limit N] [--seed S]
        [... a flag per eval key: --help] [--run-name NAME] [--no-mlflow] [--ray-address ADDR] [--num-cpus N]

Settings: ``handsonvlm.config.EvalConfig`` from the ``eval:`` section of ``--config`` (default: the preset
the model's exported ``model.name`` names, else ``tiny``), then ``--set``, then the flags; what is left unset
(top-k, length, dtype, prompt template) takes the model mode's value (``handsonvlm.inference.resolve_sampling``,
docs/MODEL.md "Inference settings"), and those resolved settings run, are printed and logged. The driver builds
the prompts of the first ``--limit`` clips (``sample_id`` order); an actor pool of ``--replicas``
:class:`Predictor` answers them, each on a GPU or a CPU as ``eval.device`` says (``--device``; cuda requests
the GPUs, which an autoscaler provides; ``handsonvlm.devices.eval_actors``); the driver scores them
(``handsonvlm.evaluation``), writes ``metrics.json``, ``predictions.parquet`` and ``gallery/*.png`` to
``OUT/eval/<run-name>/`` (``runs/eval/<run-name>/`` for a URI ``--data``), logs them as one MLflow run (tag
``stage=eval``, linked to the training run of ``--model``) and prints a table. Keys and columns:
docs/METRICS.md, "Evaluation". Exit status 0 on success, 1 when evaluation fails, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a bare checkout / job working_dir

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from handsonvlm import evaluation
from handsonvlm.config import EvalConfig, add_section_flags
from handsonvlm.constants import NUM_FUTURE_POINTS
from handsonvlm.devices import DeviceError, cpus_per_cpu_replica, eval_actors
from handsonvlm.evaluation import TRAJECTORY_SHAPE
from handsonvlm.inference import ModelLoadError, check_export, read_model_config, resolve_sampling
from pipelines import common, tracking
from preprocessing import layout, storage
from preprocessing.features import map_batches_without_restarts
from preprocessing.stages import disable_progress_bars
from preprocessing.training_data import read_shard

EVAL_FLAGS = tuple(f.name for f in fields(EvalConfig))  # every key has its flag: --split ... --gallery
DEFAULT_PRESET = "tiny"
TEXT_COLUMNS = list(evaluation.PROMPT_COLUMNS)
TENSOR_COLUMNS = list(evaluation.CLIP_COLUMNS)
FRAME_COLUMNS = ["sample_id", "obs_jpeg"]
URI_OUTPUT_ROOT = "runs"  # where the outputs go when --data is a URI (the job's working directory)
MAX_ERROR_CHARS = 2000
EXIT_ERROR = 2
PREDICTIONS_FILE = "predictions.parquet"
F64, STRING = pa.float64(), pa.string()
PREDICTIONS_SCHEMA = pa.schema([  # predictions.parquet: nested lists [K][2][T][2], [2][T][2], ...
    ("sample_id", STRING), ("task", STRING), ("variant", STRING), ("question", STRING), ("question_from", STRING),
    ("frames_from", STRING),
    ("answers", pa.list_(STRING)), ("trajectories", pa.list_(pa.list_(pa.list_(pa.list_(F64))))),
    ("complete", pa.list_(pa.bool_())), ("hand_counts", pa.list_(pa.int64())), ("seed", pa.int64()),
    ("error", STRING), ("gt", pa.list_(pa.list_(pa.list_(F64)))), ("valid", pa.list_(pa.bool_()))])


class EvalError(Exception):
    """A usage problem (missing model or data) reported as one line."""


def generate_for_jobs(model, jobs: list[dict], frames: list, settings: EvalConfig) -> list[dict]:
    """Answer ``jobs`` (frames[i]: the clip of jobs[i] as its pooled tower features, ``model.frame_features``
    of [1, F, 3, S, S]: means [1, F, C], grids [1, F, G, C]) in one left-padded call, K samples each, seeded
    by the first job -> one result dict per job (see ``evaluation.prediction_row``).
    ``settings``: resolved (``inference.resolve_sampling``), as :func:`run` hands them to the actors."""
    import torch

    from handsonvlm.inference import answer_jobs

    return answer_jobs(model, jobs, settings, frame_means=torch.cat([means for means, _ in frames]),
                       frame_grids=torch.cat([grids for _, grids in frames]))


class Predictor:
    """Ray Data actor: loads the model once, answers every job of the clips of each batch.

    ``jobs``: ``{sample_id: [job]}`` keyed by the clip whose FRAMES a job sees
    (``evaluation.frames_source``): its own clip's, or another's for ``--shuffle-frames``.

    Sampling (temperature > 0) makes one call per job, its K samples as the batch: a torch generator
    is shared by the rows of a call, so per-clip seeds need per-clip calls. Greedy is deterministic:
    one call for all jobs of a batch. A call that raises is retried job by job, so an error only
    fails its own clip. Actors return predictions only (no frames)."""

    def __init__(self, model_dir: str, jobs: dict, settings: EvalConfig, device: str | None = None, generate_fn=None):
        from handsonvlm.inference import load_model

        # settings: resolved by run() (dtype, top-k, length, template); load_model turns TF32 on on CUDA
        self.model, _ = load_model(model_dir, device or "auto", dtype=settings.dtype)
        self.settings, self.jobs = settings, jobs  # jobs: sample_id -> [job]
        self.generate_fn = generate_fn or generate_for_jobs

    def _run(self, jobs, frames) -> list[dict]:
        try:
            return self.generate_fn(self.model, jobs, frames, self.settings)
        except Exception as exc:  # isolate the failing clip(s)
            if len(jobs) == 1:
                return [{"error": f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]}]
            return [r for j, f in zip(jobs, frames) for r in self._run([j], [f])]

    def __call__(self, batch):
        import pandas as pd

        from handsonvlm.data import clip_frames

        todo, frames, out = [], [], []
        for sample_id, jpegs in zip(batch["sample_id"], batch["obs_jpeg"]):
            mine = self.jobs.get(str(sample_id), [])  # jobs over this clip's frames; none: not evaluated (--limit)
            try:
                clip = clip_frames(list(jpegs), image_size=self.model.vision.image_size) if mine else None
                # the tower runs once per clip: all the jobs over its frames (own and shuffled question, other
                # clips' --shuffle-frames jobs) share its pooled features
                clip = self.model.frame_features(clip[None]) if mine else None
            except Exception as exc:  # an undecodable clip fails its jobs only
                out += [(job, {"error": f"frames: {type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]}) for job in mine]
                continue
            todo += mine
            frames += [clip] * len(mine)
        greedy = self.settings.temperature <= 0
        calls = [(todo, frames)] if greedy and todo else [([job], [f]) for job, f in zip(todo, frames)]
        out += [pair for jobs, clips in calls for pair in zip(jobs, self._run(jobs, clips))]
        rows = [evaluation.prediction_row(job, res, self.settings.num_samples) for job, res in out]
        return pd.DataFrame(rows, columns=list(evaluation.PREDICTION_FIELDS))  # columns even without rows


def place_actors(settings: EvalConfig) -> EvalConfig:
    """``settings`` with ``device`` (cuda or cpu) and ``replicas`` made concrete for this Ray:
    ``handsonvlm.devices.eval_actors`` from the cluster's GPUs now and whether an autoscaler can add nodes
    (not on a local Ray this command started). ``EvalError`` when cuda cannot get its GPUs."""
    import ray

    try:
        use_gpu, replicas = eval_actors(settings.device, settings.replicas, ray.cluster_resources().get("GPU", 0),
                                        can_autoscale=not common.LOCAL_RAY["started"])
    except DeviceError as exc:
        raise EvalError(str(exc)) from exc
    return dataclasses.replace(settings, device="cuda" if use_gpu else "cpu", replicas=replicas)


def predict(jobs: list[dict], where: dict[str, str], model_dir: str, settings: EvalConfig, generate_fn=None):
    """Every job answered by the actor pool: the rows of :class:`Predictor`, in any order. ``settings``:
    placed (:func:`place_actors`: ``device`` cuda or cpu, ``replicas``) and resolved."""
    import ray

    by_clip: dict[str, list] = {}  # by the clip whose frames the job sees (its own, or another's: --shuffle-frames)
    for job in jobs:
        by_clip.setdefault(evaluation.frames_source(job), []).append(job)
    gpu = settings.device == "cuda"
    replicas = min(settings.replicas, len(by_clip))  # no idle replica (each loads the whole model)
    print(f"[eval] {replicas} model replica{'s' if replicas > 1 else ''} on {'GPUs' if gpu else 'CPUs'} "
          f"(eval.device {settings.device})", flush=True)
    disable_progress_bars(ray.data.DataContext.get_current())
    ds = ray.data.read_parquet(sorted({where[s] for s in by_clip})).select_columns(FRAME_COLUMNS)  # shards with jobs
    # a dead Predictor fails the evaluation (see map_batches_without_restarts); it reruns as it is
    ds = map_batches_without_restarts(ds, Predictor, batch_size=settings.batch_size, batch_format="pandas",
                                      compute=ray.data.ActorPoolStrategy(size=replicas),
                                      num_gpus=1 if gpu else None,
                                      num_cpus=None if gpu else cpus_per_cpu_replica(
                                          ray.cluster_resources().get("CPU", 1), replicas),
                                      fn_constructor_kwargs={"model_dir": model_dir, "jobs": by_clip,
                                                             "settings": settings, "generate_fn": generate_fn,
                                                             "device": settings.device})
    return ds.take_all()


def read_shards(paths, columns: list[str], sample_ids: list[str] | None = None):
    """(shard path, pyarrow table of ``columns``) per shard: every row, or those of ``sample_ids``."""
    for path in paths:
        yield path, read_shard(path, columns, sample_ids)


def read_clips(samples_dir: str) -> tuple[list[dict], dict[str, str]]:
    """Light columns of every shard -> (rows sorted by sample_id, {sample_id: shard file})."""
    from preprocessing.schema import tensor_column

    rows, where = [], {}
    for path, table in read_shards(storage.list_files(samples_dir, layout.SHARD_SUFFIX), TEXT_COLUMNS + TENSOR_COLUMNS):
        arrays = {name: tensor_column(table, name) for name in TENSOR_COLUMNS}
        for i, (sid, narration, questions) in enumerate(zip(*(table.column(c).to_pylist() for c in TEXT_COLUMNS))):
            rows.append({"sample_id": sid, "narration": narration, "rbhp_questions": questions or [],
                         **{name: arrays[name][i] for name in arrays}})
            where[sid] = path
    rows.sort(key=lambda r: r["sample_id"])
    return rows, where


def write_gallery(preds: list[dict], clips: dict, where: dict, K: int, per_task: int, tasks, directory: Path):
    """Overlays of ``evaluation.gallery_picks`` on the last observed frame: mean of the complete samples, GT."""
    from handsonvlm import viz
    from handsonvlm.image import decode_jpegs

    picks = evaluation.gallery_picks(preds, tasks, per_task)
    ids = sorted({p["sample_id"] for _, p in picks})
    shards = read_shards(sorted({where[s] for s in ids}), FRAME_COLUMNS, ids)
    frames = {sid: decode_jpegs([jpegs[-1]])[0] for _, table in shards
              for sid, jpegs in zip(*(table.column(c).to_pylist() for c in FRAME_COLUMNS))}
    written = []
    for name, p in picks:
        clip, done = clips[p["sample_id"]], np.asarray(p["complete"], bool)
        traj = np.asarray(p["trajectories"], np.float64).reshape(K, *TRAJECTORY_SHAPE)
        image = viz.overlay_image(frames[p["sample_id"]], pred=traj[done].mean(0) if done.any() else None,
                                  gt=clip["future_hands"][:, 1:], valid=clip["future_valid"],
                                  start=clip["future_hands"][:, 0])
        written.append(viz.save_png(image, directory / "gallery" / name))
    return written


def parse_args(argv=None) -> argparse.Namespace:
    """The flags; ``args.eval`` is the resolved :class:`EvalConfig` (a bad value exits with 2)."""
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported model directory (runs/models/<run-name>), "
                   "models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/model")
    p.add_argument("--data", required=True, help="preprocessing output root (holds samples/<split>/)")
    common.add_preset_flags(p, "eval", default=f"the preset the model's model.name names, else {DEFAULT_PRESET}")
    add_section_flags(p, "eval", EvalConfig, EVAL_FLAGS)
    p.add_argument("--run-name", help="MLflow run / output folder name (default: eval-<model>-<split>-<time>)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    common.add_ray_flags(p)
    args = p.parse_args(argv)
    try:  # an MLflow model URI becomes its local download (runs/model_cache/)
        args.model_uri, args.model = args.model, tracking.resolve_model(args.model)
    except ModelLoadError as exc:
        p.error(str(exc))
    args.config = args.config or common.trained_preset(args.model, DEFAULT_PRESET)
    args.eval = common.load_config_section(p, args, EvalConfig, "eval", EVAL_FLAGS)
    return args


def run(args: argparse.Namespace, generate_fn=None) -> dict:
    """The whole evaluation (Ray initialised); ``generate_fn`` replaces :func:`generate_for_jobs` (tests)."""
    from handsonvlm.model import CONFIG_FILE, WEIGHTS_FILE

    model_dir = str(Path(args.model).absolute())
    model_cfg = read_model_config(check_export(model_dir, (CONFIG_FILE, WEIGHTS_FILE)))  # ModelLoadError: usage
    placed = place_actors(args.eval)  # eval.device and eval.replicas for this Ray (a cuda one fails here, in seconds)
    # the mode-dependent settings (top-k, length, dtype, template) for the actors' device: what runs and is logged
    try:
        cfg: EvalConfig = resolve_sampling(placed, model_cfg, model_dir, device=placed.device)
    except ValueError as exc:  # e.g. --dtype bf16 on GPUs without it
        raise EvalError(str(exc)) from exc
    if model_cfg.num_future_points != NUM_FUTURE_POINTS:
        raise EvalError(f"the model predicts {model_cfg.num_future_points} points; the shards hold {NUM_FUTURE_POINTS}")
    data = layout.data_root(common.absolute_uri(args.data))
    rows, where = read_clips(layout.samples_dir(data, cfg.split))
    if not rows:
        raise EvalError(f"no sample shards under {layout.samples_dir(data, cfg.split)}")
    rows = rows[:cfg.limit] if cfg.limit else rows
    clips = {r["sample_id"]: r for r in rows}
    jobs = evaluation.build_jobs(rows, model_cfg, cfg.tasks, cfg.seed, cfg.shuffle_questions, cfg.shuffle_frames)
    K = cfg.num_samples
    run_name = args.run_name or f"eval-{Path(model_dir).name}-{cfg.split}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"[eval] {run_name}: {len(rows)} clips, {len(jobs)} prompts ({', '.join(cfg.tasks)}), K={K}", flush=True)
    print(f"[eval] {model_cfg.mode} mode: temperature {cfg.temperature}, top-k {cfg.top_k}, top-p {cfg.top_p}, "
          f"{cfg.max_new_tokens} new tokens, {cfg.dtype}, template {cfg.prompt_template}", flush=True)
    params = {"model": model_dir, "data": data, "model_mode": model_cfg.mode, "config": str(args.config),
              **{key: str(value) for key, value in cfg.to_dict().items()}}  # the resolved EvalConfig's fields

    run_id, link, monitor, ok = None, {}, None, False
    if not args.no_mlflow:  # the run starts before inference, so that its system metrics cover it
        mlflow_client = tracking.client()
        exp_id = tracking.experiment_id(mlflow_client)
        link = tracking.training_link(mlflow_client, exp_id, args.model_uri, model_dir)
        tags = {"stage": "eval", "git_commit": tracking.git_commit() or "unknown", "model_path": model_dir,
                "model_uri": args.model_uri, **link}
        run_id, _ = tracking.start_run(mlflow_client, exp_id, run_name, params, tags)
        monitor = tracking.system_metrics(run_id, tracking.tracking_uri())
        tracking.log_shards(mlflow_client, run_id, "evaluation", cfg.split, layout.samples_dir(data, cfg.split),
                            sorted({where[s] for s in clips}), extra=tuple(clips) if cfg.limit else (), rows=len(rows))
    try:
        preds = evaluation.reconcile(jobs, predict(jobs, where, model_dir, cfg, generate_fn), K) if jobs else []
        metrics = evaluation.metrics_from_rows(preds, clips, K, cfg.tasks)

        out_dir = Path(layout.eval_dir(data if storage.is_local(data) else URI_OUTPUT_ROOT, run_name))
        out_dir.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(evaluation.output_rows(preds, clips, K), schema=PREDICTIONS_SCHEMA),
                       out_dir / PREDICTIONS_FILE)
        gallery = write_gallery(preds, clips, where, K, cfg.gallery, cfg.tasks, out_dir) if cfg.gallery > 0 else []
        summary = {"run_name": run_name, "mlflow_run_id": run_id, "train_run": list(link.values()) or None,
                   "params": params,
                   "metrics": {k: (v if math.isfinite(v) else None) for k, v in sorted(metrics.items())},
                   "predictions": str(out_dir / PREDICTIONS_FILE), "gallery": gallery}
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        if run_id:
            tracking.log_eval_outputs(mlflow_client, run_id, metrics, out_dir,
                                      evaluation.prediction_table(preds, clips, K), gallery)
        ok = True
    finally:
        if run_id:
            tracking.finish_run(mlflow_client, run_id, ok, monitor)

    print(evaluation.summary_table(metrics, cfg.tasks), flush=True)
    print(f"[eval] outputs: {out_dir}", flush=True)
    if run_id:
        print(f"[eval] MLflow run {run_id} at {tracking.tracking_uri()}", flush=True)
    return {"metrics": metrics, "run_id": run_id, "out_dir": str(out_dir), "predictions": preds}


def check_local_gpus(settings: EvalConfig) -> None:
    """Before a local Ray is started: it gets this machine's GPUs and no more, so a cuda evaluation that
    cannot have them fails now (``EvalError``), not after Ray's start-up (:func:`place_actors` checks the
    Ray it runs on)."""
    import torch

    try:
        eval_actors(settings.device, settings.replicas, torch.cuda.device_count(), can_autoscale=False,
                    where="this machine")
    except DeviceError as exc:
        raise EvalError(str(exc)) from exc


def main(argv=None, generate_fn=None) -> int:
    args = parse_args(argv)
    common.setup_logging()
    try:
        if (args.ray_address or os.environ.get("RAY_ADDRESS") or "local") == "local":
            check_local_gpus(args.eval)
        common.init_ray(args.ray_address, args.num_cpus, common.DEFAULT_OBJECT_STORE_BYTES)
        run(args, generate_fn=generate_fn)
    except (EvalError, ModelLoadError) as exc:
        print(f"evaluate.py: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
