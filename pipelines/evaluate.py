"""Evaluation job: Ray Data batch inference of an exported HandsOnVLM on the sample shards + metrics.

    python pipelines/evaluate.py --model runs/models/<name> --data OUT [--config PRESET] [--set eval.KEY=VALUE]
        [--split validation] [--task vhp|rbhp|both] [--num-samples K] [--seed S] [--limit N] [--shuffle-questions]
        [--batch-size B] [--temperature 0.5] [--top-p 0.9] [--max-new-tokens 64] [--replicas R]
        [--run-name NAME] [--gallery 8] [--no-mlflow] [--ray-address ADDR] [--num-cpus N]

Settings (``handsonvlm.config.EvalConfig``): the ``eval:`` section of ``--config`` (default: the preset
named by the model's exported ``model.name``, else ``tiny``), then ``--set``, then the flags. Locally it
starts a Ray of its own; on a cluster: ``ray job submit --working-dir . -- python pipelines/evaluate.py ...``.

1. The driver reads the light columns of ``OUT/samples/<split>/`` (no frames), keeps the first ``--limit``
   clips in ``sample_id`` order and builds the prompts (``handsonvlm.evaluation.build_jobs``: VHP, RBHP and,
   with ``--shuffle-questions``, each clip asked another clip's question). A clip's prompt and sampling
   seed depend on its id and ``--seed`` only, never on ``--limit``, batching or the replicas.
2. ``map_batches`` runs :class:`Predictor` on the shards holding those clips, an actor pool of
   ``--replicas`` (one GPU each when the cluster has GPUs, else one CPU); each actor loads the model once.
3. The driver scores the answers with ``handsonvlm.evaluation`` (every key: docs/METRICS.md, "Evaluation"),
   writes the outputs and logs one MLflow run (experiment ``handsonvlm``, tag ``stage=eval``, linked to the
   training run whose ``model_path`` tag or name matches ``--model``).

Outputs in ``OUT/eval/<run-name>/`` (``runs/eval/<run-name>/`` when ``--data`` is a URI), also the MLflow
run's artifacts: ``metrics.json`` (metrics, parameters, run ids), ``predictions.parquet`` (one row per
clip, task and variant: sample_id, task, variant ("question" | "shuffled"), question, question_from,
answers [K], trajectories [K][2][T][2] (NaN = missing point), complete [K], hand_counts [K], seed, error
(null when fine), gt [2][T][2], valid [2]) and ``gallery/<task>_<i>_<sample_id>.png`` (the first
``--gallery`` clips per task: the last observed frame, the mean of the complete samples solid, the GT
dashed). A table (task | ade/fde/wde | baseline ades | shuffled ade | coverage | the two ratios) is
printed. Exit status 0 on success, 1 when evaluation fails, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a bare checkout / job working_dir

import numpy as np

from handsonvlm.config import CONFIG_DIR, EvalConfig, ModelConfig, add_section_flags
from handsonvlm.constants import NUM_FUTURE_POINTS
from handsonvlm.evaluation import (
    QUESTION,
    TRAJECTORY_SHAPE,
    build_jobs,
    metrics_from_rows,
    prediction_row,
    reconcile,
    summary_table,
)
from pipelines import tracking
from pipelines.common import (
    DEFAULT_OBJECT_STORE_BYTES,
    add_preset_flags,
    init_ray,
    load_config_section,
    setup_logging,
)
from preprocessing import layout, storage

EVAL_FLAGS = ("split", "task", "num_samples", "seed", "limit", "shuffle_questions", "batch_size", "temperature",
              "top_p", "max_new_tokens", "replicas", "gallery")
DEFAULT_PRESET = "tiny"
TEXT_COLUMNS = ["sample_id", "narration", "rbhp_questions"]
TENSOR_COLUMNS = ["future_hands", "future_valid", "past_hands", "past_hands_valid"]
FRAME_COLUMNS = ["sample_id", "obs_jpeg"]
URI_OUTPUT_ROOT = "runs"  # where the outputs go when --data is a URI (the job's working directory)
MAX_ERROR_CHARS = 2000
MLFLOW_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
EXIT_ERROR = 2


class EvalError(Exception):
    """A usage problem (missing model or data) reported as one line."""


def _error_note(exc: Exception, prefix: str = "") -> str:
    return f"{prefix}{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]


def generate_for_jobs(model, jobs: list[dict], frames: list, settings: EvalConfig) -> list[dict]:
    """Answer ``jobs`` (frames[i]: the clip of jobs[i], [F, 3, S, S]) in one left-padded call, K samples
    each, seeded by the first job -> one result dict per job (see ``evaluation.prediction_row``)."""
    import torch

    from handsonvlm.data import encode_conversation, pad_sequences
    from handsonvlm.generation import generate

    device = next(model.parameters()).device
    ids = [encode_conversation(model.tokenizer, [(job["question"], None)], model.cfg)[0] for job in jobs]
    input_ids, mask = pad_sequences(ids, model.tokens.pad, side="left")
    result = generate(model, input_ids.to(device), mask.to(device), frames=torch.stack(frames).to(device),
                      num_samples=settings.num_samples, max_new_tokens=settings.max_new_tokens,
                      temperature=settings.temperature, top_p=settings.top_p, seed=int(jobs[0]["seed"]))
    traj = result.trajectories.detach().float().cpu().numpy()
    return [{"answers": list(result.texts[i]), "trajectories": traj[i],
             "complete": result.complete[i].cpu().numpy().astype(bool),
             "hand_counts": result.hand_counts[i].cpu().numpy().astype(np.int64)} for i in range(len(jobs))]


class Predictor:
    """Ray Data actor: loads the model once, answers every job of the clips of each batch.

    Sampling (temperature > 0) makes one call per job, its K samples as the batch: a torch generator
    is shared by the rows of a call, so per-clip seeds need per-clip calls. Greedy is deterministic:
    one call for all jobs of a batch. A call that raises is retried job by job, so an error only
    fails its own clip. Actors return predictions only (no frames)."""

    def __init__(self, model_dir: str, jobs: dict, settings: EvalConfig, device: str | None = None,
                 generate_fn=None):
        import torch

        from handsonvlm.model import HandsOnVLM

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = HandsOnVLM.from_pretrained(model_dir).to(device).eval()
        self.settings, self.jobs = settings, jobs  # jobs: sample_id -> [job]
        self.generate_fn = generate_fn or generate_for_jobs

    def _run(self, jobs, frames) -> list[dict]:
        try:
            return self.generate_fn(self.model, jobs, frames, self.settings)
        except Exception as exc:  # isolate the failing clip(s)
            if len(jobs) == 1:
                return [{"error": _error_note(exc)}]
            return [r for j, f in zip(jobs, frames) for r in self._run([j], [f])]

    def __call__(self, batch):
        import pandas as pd

        from handsonvlm.data import clip_frames

        todo, frames, out = [], [], []
        for sample_id, jpegs in zip(batch["sample_id"], batch["obs_jpeg"]):
            mine = self.jobs.get(str(sample_id), [])
            if not mine:  # a clip of the same shard that is not evaluated (--limit)
                continue
            try:
                clip = clip_frames(list(jpegs), image_size=self.model.vision.image_size)
            except Exception as exc:  # an undecodable clip fails its jobs only
                out += [(job, {"error": _error_note(exc, "frames: ")}) for job in mine]
                continue
            todo += mine
            frames += [clip] * len(mine)
        if todo:
            if self.settings.temperature <= 0:
                results = self._run(todo, frames)
            else:
                results = [r for job, f in zip(todo, frames) for r in self._run([job], [f])]
            out += list(zip(todo, results))
        return pd.DataFrame([prediction_row(job, res, self.settings.num_samples) for job, res in out])


def predict(jobs: list[dict], where: dict[str, str], model_dir: str, settings: EvalConfig, generate_fn=None):
    """Every job answered by the actor pool: the rows of :class:`Predictor`, in any order."""
    import ray

    by_clip: dict[str, list] = {}
    for job in jobs:
        by_clip.setdefault(job["sample_id"], []).append(job)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    replicas = max(1, min(settings.replicas or max(1, gpus), len(by_clip)))
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.read_parquet(sorted({where[s] for s in by_clip}), columns=FRAME_COLUMNS)  # only shards with jobs
    ds = ds.map_batches(Predictor, batch_size=settings.batch_size, batch_format="pandas",
                        compute=ray.data.ActorPoolStrategy(size=replicas),
                        num_gpus=1 if gpus else None, num_cpus=None if gpus else 1,
                        fn_constructor_kwargs={"model_dir": model_dir, "jobs": by_clip, "settings": settings,
                                               "device": "cuda" if gpus else "cpu", "generate_fn": generate_fn})
    return ds.take_all()


def read_shards(paths, columns: list[str]):
    """(shard path, pyarrow table of ``columns``) for each shard."""
    import pyarrow.parquet as pq

    for path in paths:
        fs, inner = storage.resolve(path)
        yield path, pq.read_table(inner, filesystem=fs, columns=columns)


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


def predictions_table(preds: list[dict], clips: dict, K: int):
    import pyarrow as pa

    f64, string, traj = pa.float64(), pa.string(), (K, *TRAJECTORY_SHAPE)
    rows = [{**p, "answers": json.loads(p["answers"]), "error": p["error"] or None,
             "trajectories": np.asarray(p["trajectories"], np.float64).reshape(traj).tolist(),
             "gt": clips[p["sample_id"]]["future_hands"][:, 1:].astype(np.float64).tolist(),
             "valid": clips[p["sample_id"]]["future_valid"].astype(bool).tolist()} for p in preds]
    schema = pa.schema([("sample_id", string), ("task", string), ("variant", string), ("question", string),
                        ("question_from", string), ("answers", pa.list_(string)),
                        ("trajectories", pa.list_(pa.list_(pa.list_(pa.list_(f64))))),
                        ("complete", pa.list_(pa.bool_())), ("hand_counts", pa.list_(pa.int64())),
                        ("seed", pa.int64()), ("error", string),
                        ("gt", pa.list_(pa.list_(pa.list_(f64)))), ("valid", pa.list_(pa.bool_()))])
    return pa.Table.from_pylist(rows, schema=schema)


def write_gallery(preds: list[dict], clips: dict, where: dict, K: int, per_task: int, tasks, directory: Path):
    """Overlays of the first ``per_task`` clips of each task on their last observed frame."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from handsonvlm import viz
    from handsonvlm.image import decode_jpegs

    chosen = [p for task in tasks for p in [p for p in preds if (p["task"], p["variant"]) == (task, QUESTION)][:per_task]]
    ids = sorted({p["sample_id"] for p in chosen})
    frames = {}
    for _, table in read_shards(sorted({where[s] for s in ids}), FRAME_COLUMNS):
        table = table.filter(pc.is_in(table.column("sample_id"), value_set=pa.array(ids)))
        for sid, jpegs in zip(*(table.column(c).to_pylist() for c in FRAME_COLUMNS)):
            frames[sid] = decode_jpegs([jpegs[-1]])[0]
    written = []
    for i, p in enumerate(chosen):
        clip, done = clips[p["sample_id"]], np.asarray(p["complete"], bool)
        traj = np.asarray(p["trajectories"], np.float64).reshape(K, *TRAJECTORY_SHAPE)
        image = viz.overlay_image(frames[p["sample_id"]], pred=traj[done].mean(0) if done.any() else None,
                                  gt=clip["future_hands"][:, 1:], valid=clip["future_valid"],
                                  start=clip["future_hands"][:, 0])
        name = f"{p['task']}_{sum(q['task'] == p['task'] for q in chosen[:i]):02d}_{p['sample_id']}.png"
        written.append(viz.save_png(image, directory / "gallery" / name))
    return written


def find_training_run(mlflow_client, exp_id: str, model_dir: str) -> tuple[str, str] | None:
    """(run_id, run name) of the training run whose ``model_path`` tag or name matches ``model_dir``."""
    path = str(Path(model_dir).absolute())
    try:
        runs = mlflow_client.search_runs([exp_id], filter_string="tags.stage = 'train'", max_results=1000)
    except Exception:  # linking is best effort
        return None
    for run in runs:
        tags = run.data.tags
        if tags.get("model_path") and str(Path(tags["model_path"]).absolute()) == path:
            return run.info.run_id, tags.get(tracking.RUN_NAME_TAG, run.info.run_name)
    for run in runs:
        if run.data.tags.get(tracking.RUN_NAME_TAG, run.info.run_name) == Path(path).name:
            return run.info.run_id, Path(path).name
    return None


def trained_preset(model_dir: str) -> str:
    """The preset a model was trained from: each preset names its model after itself and the export
    keeps ``model.name``; a name that is not a preset in configs/ falls back to ``tiny``."""
    from handsonvlm.model import CONFIG_FILE

    try:
        name = str(json.loads((Path(model_dir) / CONFIG_FILE).read_text())["name"])
    except (OSError, ValueError, KeyError):
        return DEFAULT_PRESET
    return name if Path(name).name == name and (CONFIG_DIR / f"{name}.yaml").is_file() else DEFAULT_PRESET


def parse_args(argv=None) -> argparse.Namespace:
    """The flags; ``args.eval`` is the resolved :class:`EvalConfig` (a bad value exits with 2)."""
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="exported model directory (runs/models/<run-name>)")
    p.add_argument("--data", required=True, help="preprocessing output root (holds samples/<split>/)")
    add_preset_flags(p, "eval", default=f"the preset the model's model.name names, else {DEFAULT_PRESET}")
    add_section_flags(p, "eval", EvalConfig, EVAL_FLAGS)
    p.add_argument("--run-name", help="MLflow run / output folder name (default: eval-<model>-<split>-<time>)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    args = p.parse_args(argv)
    args.config = args.config or trained_preset(args.model)
    args.eval = load_config_section(p, args, EvalConfig, "eval", EVAL_FLAGS)
    return args


def run(args: argparse.Namespace, generate_fn=None) -> dict:
    """The whole evaluation (Ray must be initialised). ``generate_fn(model, jobs, frames, settings)``
    replaces :func:`generate_for_jobs` in the actors (tests)."""
    import pyarrow.parquet as pq

    from handsonvlm.model import CONFIG_FILE, WEIGHTS_FILE

    cfg: EvalConfig = args.eval
    model_dir = str(Path(args.model).absolute())
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (Path(model_dir) / name).is_file():
            raise EvalError(f"{args.model} is not an exported HandsOnVLM model (no {name})")
    model_cfg = ModelConfig.from_dict(json.loads((Path(model_dir) / CONFIG_FILE).read_text()))
    if model_cfg.num_future_points != NUM_FUTURE_POINTS:
        raise EvalError(f"the model predicts {model_cfg.num_future_points} points; the shards hold {NUM_FUTURE_POINTS}")
    data = storage.join(args.data) if storage.is_local(args.data) else args.data  # an absolute path, or the URI
    rows, where = read_clips(layout.samples_dir(data, cfg.split))
    if not rows:
        raise EvalError(f"no sample shards under {layout.samples_dir(data, cfg.split)}")
    rows = rows[:cfg.limit] if cfg.limit else rows
    clips = {r["sample_id"]: r for r in rows}
    jobs = build_jobs(rows, model_cfg, cfg.tasks, cfg.seed, cfg.shuffle_questions)
    K = cfg.num_samples
    run_name = args.run_name or f"eval-{Path(model_dir).name}-{cfg.split}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"[eval] {run_name}: {len(rows)} clips, {len(jobs)} prompts ({', '.join(cfg.tasks)}), K={K}", flush=True)

    preds = reconcile(jobs, predict(jobs, where, model_dir, cfg, generate_fn), K) if jobs else []
    metrics = metrics_from_rows(preds, clips, K, cfg.tasks)

    out_dir = Path(layout.eval_dir(data if storage.is_local(data) else URI_OUTPUT_ROOT, run_name))
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(predictions_table(preds, clips, K), out_dir / "predictions.parquet")
    gallery = write_gallery(preds, clips, where, K, cfg.gallery, cfg.tasks, out_dir) if cfg.gallery > 0 else []
    params = {"model": model_dir, "data": data, "model_mode": model_cfg.mode, "config": str(args.config),
              **{key: str(value) for key, value in cfg.to_dict().items()}}  # the EvalConfig's fields

    run_id, train_link = None, None
    if not args.no_mlflow:
        mlflow_client = tracking.client()
        exp_id = tracking.experiment_id(mlflow_client)
        train_link = find_training_run(mlflow_client, exp_id, model_dir)
        tags = {"stage": "eval", "git_commit": tracking.git_commit() or "unknown", "model_path": model_dir}
        if train_link:
            tags.update(train_run_id=train_link[0], train_run_name=train_link[1])
        run_id, _ = tracking.start_run(mlflow_client, exp_id, run_name, params, tags)
    summary = {"run_name": run_name, "mlflow_run_id": run_id, "train_run": list(train_link) if train_link else None,
               "params": params, "metrics": {k: (v if math.isfinite(v) else None) for k, v in sorted(metrics.items())},
               "predictions": str(out_dir / "predictions.parquet"), "gallery": gallery}
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    if run_id:
        from mlflow.entities import Metric

        ok = False
        try:
            items = [Metric(k, float(v), int(time.time() * 1000), 0) for k, v in sorted(metrics.items())]
            for start in range(0, len(items), MLFLOW_METRICS_PER_BATCH):
                mlflow_client.log_batch(run_id, metrics=items[start:start + MLFLOW_METRICS_PER_BATCH])
            mlflow_client.log_artifacts(run_id, str(out_dir))
            ok = True
        finally:
            tracking.finish_run(mlflow_client, run_id, ok)

    print(summary_table(metrics, cfg.tasks), flush=True)
    print(f"[eval] outputs: {out_dir}", flush=True)
    if run_id:
        print(f"[eval] MLflow run {run_id} at {tracking.tracking_uri()}", flush=True)
    return {"metrics": metrics, "run_id": run_id, "out_dir": str(out_dir), "predictions": preds}


def main(argv=None, generate_fn=None) -> int:
    args = parse_args(argv)
    setup_logging()
    init_ray(args.ray_address, args.num_cpus, DEFAULT_OBJECT_STORE_BYTES)
    try:
        run(args, generate_fn=generate_fn)
    except EvalError as exc:
        print(f"evaluate.py: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
