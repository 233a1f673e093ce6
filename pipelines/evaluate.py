"""Evaluation job: Ray Data batch inference of an exported HandsOnVLM on the sample shards + metrics.

    python pipelines/evaluate.py --model runs/models/<name> --data OUT [--split validation]
        [--task vhp|rbhp|both] [--num-samples K] [--seed S] [--limit N] [--shuffle-questions]
        [--batch-size B] [--temperature 0.5] [--top-p 0.9] [--max-new-tokens 64] [--replicas R]
        [--run-name NAME] [--gallery 8] [--no-mlflow] [--ray-address ADDR] [--num-cpus N]

Locally it starts a Ray of its own; on a cluster: ``ray job submit --working-dir . -- python
pipelines/evaluate.py ...``.

Pipeline
--------
1. The driver reads the light columns of ``OUT/samples/<split>/*.parquet`` (ids, narration, RBHP
   questions, hand targets; no frames), keeps the first ``--limit`` clips in ``sample_id`` order
   and builds every prompt (the "jobs"):

   * ``vhp``: ``mixture.vhp_eval_turns`` (an action question with the raw narration), every clip
     with a narration;
   * ``rbhp``: ``mixture.rbhp_eval_turns`` (one of the clip's reasoning questions), only clips for
     which ``mixture.has_rbhp``;
   * ``--shuffle-questions``: per task, each clip is also asked the question of another clip of that
     task, via a seeded derangement (Sattolo's algorithm, seed = ``--seed`` and the task name) among
     the evaluated clips (skipped for a task with fewer than 2 clips).

   The prompt template draw and the sampling seed of a clip come from
   ``mixture.eval_rng(sample_id, --seed)`` (a fresh generator per clip and task), so a clip's
   result does not depend on ``--limit``, batching or the number of replicas.
2. ``ray.data.read_parquet`` reads only the shards holding the selected clips; ``map_batches`` runs
   an actor class (``ActorPoolStrategy(size=--replicas)``, ``num_gpus=1`` per replica when the
   cluster has GPUs, else ``num_cpus=1``); each actor loads the model once
   (``HandsOnVLM.from_pretrained``) and answers every job of its clips with
   ``handsonvlm.generation.generate`` (KV cache, K samples per clip). Sampling
   (temperature > 0): one call per job with its K samples as the batch and the clip's own seed (a
   torch generator is shared by the rows of a call, so per-clip seeds need per-clip calls).
   Greedy (``--temperature 0``, deterministic): one left-padded call for all jobs of a batch. A
   call that raises is retried job by job, so an error only fails its own clip. Actors return
   predictions only (no frames).
3. The driver computes the metrics, writes the artifacts and logs one MLflow run.

Failures are counted, never dropped. A clip *fails* (``n_failed``) when generation raised (its
``error`` holds the exception) or when none of its K samples is complete (``error`` = "no complete
sample ..."). Failed clips stay in ``n_clips`` and in every metric below.

Metrics (per task; ``T`` = 4 future points; GT = ``future_hands[:, :, 1:]``, valid = ``future_valid``)
------------------------------------------------------------------------------------------------
* ``<task>/<key>`` for every key of ``handsonvlm.metrics.trajectory_metrics`` over **all** clips
  and all K samples, where a point the model did not produce (NaN: an incomplete sample, or every
  sample of a clip whose generation raised) is replaced by the **last-position baseline** (the
  hand stays at ``future_hands[:, :, 0]``). A model that fails is thus scored like the trivial
  baseline on those points, never silently improved by dropping them.
* ``<task>/complete_only/<key>``: the same keys over complete samples only (a clip contributes
  the mean over its complete samples; clips without any are left out; counts ``n_*`` are summed,
  each metric is averaged with its own count as weight, ``wde_paper`` per clip), plus
  ``<task>/complete_only/n_clips``.
* ``<task>/coverage``: mean over clips of the fraction of its K samples whose answer held exactly
  T ``<hand_traj>`` tokens (sample-level; a clip whose generation raised counts 0);
  ``<task>/coverage_all_k``: fraction of clips whose K samples are all complete (clip-level).
* ``<task>/n_clips``, ``<task>/n_failed``, ``<task>/n_errors`` (generation raised: a subset of
  ``n_failed``).
* ``<task>/baseline_<name>/<key>``: ``handsonvlm.baselines.run_baselines`` on the same clips.
* ``<task>/shuffled/<key>``, ``<task>/shuffled/coverage``, ``.../coverage_all_k``,
  ``.../n_clips``, ``.../n_failed`` (``--shuffle-questions``): the clip's own GT against the
  answer to another clip's question, same NaN policy.
* ``<task>/ade_over_constant_velocity`` and (with ``--shuffle-questions``)
  ``<task>/shuffled_over_true_ade``: whether the model learned anything (below 1) and whether it
  reads the question (above 1); ``make demo`` prints both.

Outputs
-------
``<eval dir>`` = ``OUT/eval/<run-name>/`` (``runs/eval/<run-name>/`` when ``--data`` is a URI):
``metrics.json`` (summary: metrics, parameters, run ids), ``predictions.parquet`` (one row per clip,
task and variant: sample_id, task, variant ("question" | "shuffled"), question, question_from,
answers [K], trajectories [K][2][T][2] (NaN = missing point), complete [K], hand_counts [K], seed,
error (null when fine), gt [2][T][2], valid [2]) and ``gallery/<task>_<i>_<sample_id>.png`` (the
first ``--gallery`` clips per task: the last observed frame with the mean of the complete samples,
solid, and the GT, dashed). The same files are logged as artifacts of one MLflow run in experiment
``handsonvlm`` (tag ``stage=eval``; ``train_run_id``/``train_run_name`` when ``--model`` matches the
``model_path`` tag or the name of a training run). A table (task | ade/fde/wde | baseline ades |
shuffled ade | coverage | the two ratios) is printed. Exit status 0 on success, 1 when evaluation fails, 2 on a
usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a bare checkout / job working_dir

import numpy as np  # noqa: E402

from pipelines import tracking  # noqa: E402
from pipelines.common import DEFAULT_OBJECT_STORE_BYTES, init_ray, positive_int, setup_logging  # noqa: E402

log = logging.getLogger("evaluate")

TASKS = ("vhp", "rbhp")
GROUNDING_BASELINE = "constant_velocity"  # the baseline a learned model is compared with
ADE_OVER_BASELINE = f"ade_over_{GROUNDING_BASELINE}"  # the two learning ratios (learning_ratios)
SHUFFLED_OVER_TRUE = "shuffled_over_true_ade"
VARIANTS = ("question", "shuffled")
LIGHT_COLUMNS = ["sample_id", "narration", "rbhp_questions", "future_hands", "future_valid",
                 "past_hands", "past_hands_valid"]
NUM_FUTURE = 4
EXIT_ERROR = 2
SEED_BITS = 62


class EvalError(Exception):
    """A usage problem (missing model or data) reported as one line."""


# ---------------------------------------------------------------------------------------- jobs
NO_COMPLETE_SAMPLE = "no complete sample"  # the error note of a clip whose K samples all lack hand tokens

def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation without fixed points (Sattolo's algorithm: one n-cycle); n >= 2."""
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(i))  # 0 <= j < i
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def _user_question(turns) -> str:
    return turns[-1][0]


def build_jobs(rows: list[dict], cfg, tasks, seed: int, shuffle: bool) -> list[dict]:
    """One job per (clip, task, variant): the prompt turns and the clip's generation seed."""
    from handsonvlm.mixture import eval_rng, has_rbhp, rbhp_eval_turns, stable_hash, vhp_eval_turns

    jobs = []
    for task in tasks:
        make = vhp_eval_turns if task == "vhp" else rbhp_eval_turns
        own = []
        for row in rows:
            if task == "rbhp" and not has_rbhp(row):
                continue
            if task == "vhp" and not (isinstance(row.get("narration"), str) and row["narration"].strip()):
                continue
            rng = eval_rng(f"{row['sample_id']}#{task}", seed)
            turns = make(row, cfg, rng)
            own.append({"sample_id": row["sample_id"], "task": task, "variant": "question",
                        "question": _user_question(turns), "question_from": row["sample_id"],
                        "seed": int(rng.integers(1 << SEED_BITS))})
        jobs += own
        if shuffle and len(own) >= 2:
            perm = derangement(len(own), np.random.default_rng([seed, stable_hash(f"shuffle#{task}")]))
            for i, job in enumerate(own):
                other = own[int(perm[i])]
                jobs.append({**job, "variant": "shuffled", "question": other["question"],
                             "question_from": other["sample_id"]})
        elif shuffle:
            log.warning("%s: %d clip(s): no derangement possible, shuffled questions skipped", task, len(own))
    return jobs


# ---------------------------------------------------------------------------------------- generation
def generate_for_jobs(model, jobs: list[dict], frames: list, settings: dict) -> list[dict]:
    """Answer ``jobs`` (frames[i]: the clip of jobs[i], [F, 3, S, S]) -> one result dict per job.

    Greedy: one left-padded batch; sampling: the caller passes one job at a time (its own seed)."""
    import torch

    from handsonvlm.data import encode_conversation, pad_sequences
    from handsonvlm.generation import generate

    device = settings["device"]
    ids = [encode_conversation(model.tokenizer, [(job["question"], None)], model.cfg)[0] for job in jobs]
    input_ids, mask = pad_sequences(ids, model.tokens.pad, side="left")
    result = generate(model, input_ids.to(device), mask.to(device), frames=torch.stack(frames).to(device),
                      num_samples=settings["num_samples"], max_new_tokens=settings["max_new_tokens"],
                      temperature=settings["temperature"], top_p=settings["top_p"], seed=int(jobs[0]["seed"]))
    traj = result.trajectories.detach().float().cpu().numpy()
    return [{"answers": list(result.texts[i]), "trajectories": traj[i],
             "complete": result.complete[i].cpu().numpy().astype(bool),
             "hand_counts": result.hand_counts[i].cpu().numpy().astype(np.int64)} for i in range(len(jobs))]


class Predictor:
    """Ray Data actor: loads the model once, answers every job of the clips of each batch."""

    def __init__(self, model_dir: str, jobs: dict, settings: dict, generate_fn=None):
        import torch

        from handsonvlm.model import HandsOnVLM

        device = settings.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.settings = {**settings, "device": device}
        self.model = HandsOnVLM.from_pretrained(model_dir).to(device).eval()
        self.jobs = jobs  # sample_id -> [job]
        self.generate_fn = generate_fn or generate_for_jobs

    def _run(self, jobs, frames) -> list[dict]:
        try:
            return self.generate_fn(self.model, jobs, frames, self.settings)
        except Exception as exc:  # noqa: BLE001 - isolate the failing clip(s)
            if len(jobs) == 1:
                return [{"error": f"{type(exc).__name__}: {exc}"[:2000]}]
            return [r for j, f in zip(jobs, frames) for r in self._run([j], [f])]

    def __call__(self, batch):
        import pandas as pd

        from handsonvlm.data import clip_frames

        size = self.model.vision.image_size
        todo, frames, out = [], [], []
        for sample_id, jpegs in zip(batch["sample_id"], batch["obs_jpeg"]):
            mine = self.jobs.get(str(sample_id), [])
            if not mine:  # a clip of the same shard that is not evaluated (--limit)
                continue
            try:
                clip = clip_frames(list(jpegs), image_size=size)
            except Exception as exc:  # noqa: BLE001 - an undecodable clip fails its jobs only
                out += [(job, {"error": f"frames: {type(exc).__name__}: {exc}"[:2000]}) for job in mine]
                continue
            todo += mine
            frames += [clip] * len(mine)
        if todo:
            if self.settings["temperature"] <= 0:
                results = self._run(todo, frames)
            else:
                results = [r for job, f in zip(todo, frames) for r in self._run([job], [f])]
            out += list(zip(todo, results))
        K, T = self.settings["num_samples"], NUM_FUTURE
        rows = []
        for job, res in out:
            traj = res.get("trajectories")
            rows.append({
                "sample_id": job["sample_id"], "task": job["task"], "variant": job["variant"],
                "question": job["question"], "question_from": job["question_from"], "seed": int(job["seed"]),
                "answers": json.dumps(res.get("answers", [])),
                "trajectories": (np.full(K * 2 * T * 2, np.nan) if traj is None
                                 else np.asarray(traj, np.float64).reshape(-1)).tolist(),
                "complete": np.asarray(res.get("complete", np.zeros(K, bool)), bool).tolist(),
                "hand_counts": np.asarray(res.get("hand_counts", np.zeros(K, np.int64)), np.int64).tolist(),
                "error": res.get("error", ""),
            })
        columns = ["sample_id", "task", "variant", "question", "question_from", "seed", "answers", "trajectories",
                   "complete", "hand_counts", "error"]
        return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------------------------------- metrics
def fill_missing(pred: np.ndarray, future_hands: np.ndarray) -> np.ndarray:
    """pred [N, K, 2, T, 2] with NaN -> the last observed position (future_hands[:, :, 0]) there."""
    last = np.broadcast_to(future_hands[:, None, :, None, 0, :], pred.shape)
    return np.where(np.isfinite(pred), pred, last)


COUNT_WEIGHT = {"ade": "n_traj", "min_ade": "n_traj", "fde": "n_fde", "min_fde": "n_fde", "wde": "n_wde",
                "ade_paper": "n_valid", "fde_paper": "n_valid"}


def complete_only_metrics(pred: np.ndarray, complete: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> dict:
    """trajectory_metrics over the complete samples only (variable K per clip), combined per clip."""
    from handsonvlm.metrics import trajectory_metrics

    per_clip = [trajectory_metrics(pred[n][complete[n]][None], gt[n:n + 1], valid[n:n + 1])
                for n in range(len(pred)) if complete[n].any()]
    keys = list(trajectory_metrics(np.zeros((1, 1, 2, gt.shape[2], 2)), gt[:1], valid[:1]).keys()) if len(gt) else []
    out = {}
    for key in keys:
        if key.startswith("n_"):
            out[key] = float(sum(m[key] for m in per_clip))
            continue
        weights = [m[COUNT_WEIGHT[key]] if key in COUNT_WEIGHT else 1.0 for m in per_clip]
        pairs = [(m[key], w) for m, w in zip(per_clip, weights) if w > 0 and math.isfinite(m[key])]
        total = sum(w for _, w in pairs)
        out[key] = float(sum(v * w for v, w in pairs) / total) if total > 0 else float("nan")
    out["n_clips"] = float(len(per_clip))
    return out


def variant_metrics(preds: list[dict], clips: dict, K: int) -> dict:
    """Metrics of one (task, variant): see the module docstring."""
    from handsonvlm.metrics import trajectory_metrics

    ids = [p["sample_id"] for p in preds]
    fh = np.stack([clips[i]["future_hands"] for i in ids])           # [N, 2, 5, 2]
    gt, valid = fh[:, :, 1:], np.stack([clips[i]["future_valid"] for i in ids])
    pred = np.stack([np.asarray(p["trajectories"], np.float64).reshape(K, 2, NUM_FUTURE, 2) for p in preds])
    complete = np.stack([np.asarray(p["complete"], bool).reshape(K) for p in preds])
    # "no complete sample" notes are failures but not errors: generation ran and ended without hands
    errors = np.array([bool(p["error"]) and not p["error"].startswith(NO_COMPLETE_SAMPLE) for p in preds])
    out = trajectory_metrics(fill_missing(pred, fh), gt, valid)
    out.update({f"complete_only/{k}": v for k, v in complete_only_metrics(pred, complete, gt, valid).items()})
    out["coverage"] = float(complete.mean(1).mean())
    out["coverage_all_k"] = float(complete.all(1).mean())
    out["n_clips"] = float(len(preds))
    out["n_failed"] = float((errors | ~complete.any(1)).sum())
    out["n_errors"] = float(errors.sum())
    return out


def task_metrics(task: str, preds: list[dict], clips: dict, K: int) -> dict:
    from handsonvlm.baselines import run_baselines
    from handsonvlm.metrics import trajectory_metrics

    out = {}
    mine = [p for p in preds if p["task"] == task and p["variant"] == "question"]
    if not mine:
        out[f"{task}/n_clips"] = 0.0
        out[f"{task}/n_failed"] = 0.0
        return out
    out.update({f"{task}/{k}": v for k, v in variant_metrics(mine, clips, K).items()})
    ids = [p["sample_id"] for p in mine]
    fh = np.stack([clips[i]["future_hands"] for i in ids])
    valid = np.stack([clips[i]["future_valid"] for i in ids])
    for name, pred in run_baselines(fh, np.stack([clips[i]["past_hands"] for i in ids]),
                                    np.stack([clips[i]["past_hands_valid"] for i in ids])).items():
        out.update({f"{task}/baseline_{name}/{k}": v for k, v in trajectory_metrics(pred, fh[:, :, 1:], valid).items()})
    shuffled = [p for p in preds if p["task"] == task and p["variant"] == "shuffled"]
    if shuffled:
        out.update({f"{task}/shuffled/{k}": v for k, v in variant_metrics(shuffled, clips, K).items()
                    if not k.startswith("complete_only/")})
    out.update(learning_ratios(out, task))
    return out


def learning_ratios(metrics: dict, task: str) -> dict:
    """The two numbers that say whether a model learned the task (both ADE ratios):
    ``<task>/ade_over_constant_velocity`` (below 1: it beats extrapolating the observed motion) and
    ``<task>/shuffled_over_true_ade`` (above 1: another clip's question makes it worse, i.e. it
    reads the question). Absent when an input is missing or not positive."""
    def ratio(num_key: str, den_key: str) -> float | None:
        num, den = metrics.get(f"{task}/{num_key}"), metrics.get(f"{task}/{den_key}")
        if num is None or den is None or not (math.isfinite(num) and math.isfinite(den)) or den <= 0:
            return None
        return num / den

    ratios = {ADE_OVER_BASELINE: ratio("ade", f"baseline_{GROUNDING_BASELINE}/ade"),
              SHUFFLED_OVER_TRUE: ratio("shuffled/ade", "ade")}
    return {f"{task}/{k}": v for k, v in ratios.items() if v is not None}


# ---------------------------------------------------------------------------------------- data
def read_clips(samples_dir: str) -> tuple[list[dict], dict[str, str]]:
    """Light columns of every shard -> (rows sorted by sample_id, {sample_id: shard file})."""
    import pyarrow.parquet as pq

    from preprocessing import storage
    from preprocessing.schema import tensor_column

    rows, where = [], {}
    for path in storage.list_files(samples_dir, ".parquet"):
        fs, inner = storage.resolve(path)
        table = pq.read_table(inner, filesystem=fs, columns=LIGHT_COLUMNS)
        arrays = {name: tensor_column(table, name) for name in LIGHT_COLUMNS[3:]}
        for i, (sid, narration, questions) in enumerate(zip(table.column("sample_id").to_pylist(),
                                                            table.column("narration").to_pylist(),
                                                            table.column("rbhp_questions").to_pylist())):
            rows.append({"sample_id": sid, "narration": narration, "rbhp_questions": questions or [],
                         **{name: arrays[name][i] for name in arrays}})
            where[sid] = path
    rows.sort(key=lambda r: r["sample_id"])
    return rows, where


def last_frames(where: dict[str, str], sample_ids: list[str]) -> dict[str, np.ndarray]:
    """The last observed frame (RGB) of a few clips, read on the driver for the gallery."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from handsonvlm.image import decode_jpegs
    from preprocessing import storage

    out = {}
    for path in sorted({where[s] for s in sample_ids}):
        fs, inner = storage.resolve(path)
        table = pq.read_table(inner, filesystem=fs, columns=["sample_id", "obs_jpeg"])
        table = table.filter(pc.is_in(table.column("sample_id"), value_set=pa.array(sample_ids)))
        for sid, jpegs in zip(table.column("sample_id").to_pylist(), table.column("obs_jpeg").to_pylist()):
            out[sid] = decode_jpegs([jpegs[-1]])[0]
    return out


# ---------------------------------------------------------------------------------------- outputs
def predictions_table(preds: list[dict], clips: dict, K: int):
    import pyarrow as pa

    def nested(flat):
        return np.asarray(flat, np.float64).reshape(K, 2, NUM_FUTURE, 2).tolist()

    rows = [{"sample_id": p["sample_id"], "task": p["task"], "variant": p["variant"], "question": p["question"],
             "question_from": p["question_from"], "answers": json.loads(p["answers"]),
             "trajectories": nested(p["trajectories"]), "complete": list(p["complete"]),
             "hand_counts": list(p["hand_counts"]), "seed": int(p["seed"]), "error": p["error"] or None,
             "gt": clips[p["sample_id"]]["future_hands"][:, 1:].astype(np.float64).tolist(),
             "valid": clips[p["sample_id"]]["future_valid"].astype(bool).tolist()} for p in preds]
    f64 = pa.float64()
    schema = pa.schema([("sample_id", pa.string()), ("task", pa.string()), ("variant", pa.string()),
                        ("question", pa.string()), ("question_from", pa.string()), ("answers", pa.list_(pa.string())),
                        ("trajectories", pa.list_(pa.list_(pa.list_(pa.list_(f64))))),
                        ("complete", pa.list_(pa.bool_())), ("hand_counts", pa.list_(pa.int64())),
                        ("seed", pa.int64()), ("error", pa.string()),
                        ("gt", pa.list_(pa.list_(pa.list_(f64)))), ("valid", pa.list_(pa.bool_()))])
    return pa.Table.from_pylist(rows, schema=schema)


def write_gallery(preds: list[dict], clips: dict, where: dict, K: int, per_task: int, directory: Path) -> list[str]:
    from handsonvlm import viz

    chosen = []
    for task in TASKS:
        chosen += [p for p in preds if p["task"] == task and p["variant"] == "question"][:per_task]
    if not chosen:
        return []
    frames = last_frames(where, sorted({p["sample_id"] for p in chosen}))
    written = []
    for i, p in enumerate(chosen):
        clip = clips[p["sample_id"]]
        traj = np.asarray(p["trajectories"], np.float64).reshape(K, 2, NUM_FUTURE, 2)
        done = np.asarray(p["complete"], bool)
        pred = traj[done].mean(0) if done.any() else None
        image = viz.overlay_image(frames[p["sample_id"]], pred=pred, gt=clip["future_hands"][:, 1:],
                                  valid=clip["future_valid"], start=clip["future_hands"][:, 0])
        name = f"{p['task']}_{sum(q['task'] == p['task'] for q in chosen[:i]):02d}_{p['sample_id']}.png"
        written.append(viz.save_png(image, directory / "gallery" / name))
    return written


def _fmt(value) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.4f}"


def summary_table(metrics: dict, tasks, baselines) -> str:
    header = ["task", "n_clips", "failed", "ade", "fde", "wde"] + [f"{b} ade" for b in baselines] + \
             ["shuffled ade", "coverage", "ade / cv", "shuffled / true"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for task in tasks:
        m = lambda key: metrics.get(f"{task}/{key}")  # noqa: E731
        optional = lambda key, fmt=_fmt: "-" if m(key) is None else fmt(m(key))  # noqa: E731
        cells = [task, str(int(m("n_clips") or 0)), str(int(m("n_failed") or 0)), _fmt(m("ade")), _fmt(m("fde")),
                 _fmt(m("wde"))] + [_fmt(m(f"baseline_{b}/ade")) for b in baselines] + \
                [optional("shuffled/ade"), _fmt(m("coverage")),
                 optional(ADE_OVER_BASELINE, _fmt_ratio), optional(SHUFFLED_OVER_TRUE, _fmt_ratio)]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def _fmt_ratio(value) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def find_training_run(mlflow_client, exp_id: str, model_dir: str) -> tuple[str, str] | None:
    """(run_id, run name) of the training run whose ``model_path`` tag or name matches ``model_dir``."""
    path = str(Path(model_dir).absolute())
    try:
        runs = mlflow_client.search_runs([exp_id], filter_string="tags.stage = 'train'", max_results=1000)
    except Exception:  # noqa: BLE001 - linking is best effort
        return None
    for run in runs:
        tags = run.data.tags
        if tags.get("model_path") and str(Path(tags["model_path"]).absolute()) == path:
            return run.info.run_id, tags.get(tracking.RUN_NAME_TAG, run.info.run_name)
    for run in runs:
        if run.data.tags.get(tracking.RUN_NAME_TAG, run.info.run_name) == Path(path).name:
            return run.info.run_id, Path(path).name
    return None


# ---------------------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="exported model directory (runs/models/<run-name>)")
    p.add_argument("--data", required=True, help="preprocessing output root (holds samples/<split>/)")
    p.add_argument("--split", default="validation")
    p.add_argument("--task", choices=("vhp", "rbhp", "both"), default="both")
    p.add_argument("--num-samples", type=positive_int, default=1, help="K stochastic samples per clip")
    p.add_argument("--seed", type=int, default=0, help="seeds prompts, sampling and the question shuffle")
    p.add_argument("--limit", type=positive_int, help="evaluate the first N clips (sample_id order)")
    p.add_argument("--shuffle-questions", action="store_true", help="also ask each clip another clip's question")
    p.add_argument("--batch-size", type=positive_int, default=8, help="clips per map_batches call")
    p.add_argument("--temperature", type=float, default=0.5, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--replicas", type=positive_int, help="model replicas (default: #GPUs, else 1)")
    p.add_argument("--run-name", help="MLflow run / output folder name (default: eval-<model>-<split>-<time>)")
    p.add_argument("--gallery", type=int, default=8, help="overlay PNGs per task")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    args = p.parse_args(argv)
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    if not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    return args


def run(args: argparse.Namespace, generate_fn=None) -> dict:
    """The whole evaluation (Ray must be initialised). ``generate_fn(model, jobs, frames, settings)``
    replaces :func:`generate_for_jobs` in the actors (tests)."""
    import ray

    from handsonvlm.config import ModelConfig
    from handsonvlm.model import CONFIG_FILE, WEIGHTS_FILE

    model_dir = str(Path(args.model).absolute())
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (Path(model_dir) / name).is_file():
            raise EvalError(f"{args.model} is not an exported HandsOnVLM model (no {name})")
    cfg = ModelConfig.from_dict(json.loads((Path(model_dir) / CONFIG_FILE).read_text()))
    if cfg.num_future_points != NUM_FUTURE:
        raise EvalError(f"the model predicts {cfg.num_future_points} points; the shards hold {NUM_FUTURE}")
    data = args.data if "://" in args.data else str(Path(args.data).absolute())
    samples_dir = f"{data.rstrip('/')}/samples/{args.split}"
    rows, where = read_clips(samples_dir)
    if not rows:
        raise EvalError(f"no sample shards under {samples_dir}")
    rows = rows[:args.limit] if args.limit else rows
    clips = {r["sample_id"]: r for r in rows}
    tasks = TASKS if args.task == "both" else (args.task,)
    jobs = build_jobs(rows, cfg, tasks, args.seed, args.shuffle_questions)
    by_clip: dict[str, list] = {}
    for job in jobs:
        by_clip.setdefault(job["sample_id"], []).append(job)
    K = args.num_samples
    run_name = args.run_name or f"eval-{Path(model_dir).name}-{args.split}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"[eval] {run_name}: {len(rows)} clips, {len(jobs)} prompts ({', '.join(tasks)}), K={K}", flush=True)

    preds: list[dict] = []
    if jobs:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        replicas = args.replicas or max(1, gpus)
        replicas = max(1, min(replicas, len(by_clip)))
        use_gpu = gpus >= 1
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        files = sorted({where[s] for s in by_clip})
        ds = ray.data.read_parquet(files, columns=["sample_id", "obs_jpeg"])  # clips without jobs are skipped
        settings = {"num_samples": K, "temperature": float(args.temperature), "top_p": float(args.top_p),
                    "max_new_tokens": int(args.max_new_tokens), "device": "cuda" if use_gpu else "cpu"}
        ds = ds.map_batches(Predictor, batch_size=args.batch_size, batch_format="pandas",
                            compute=ray.data.ActorPoolStrategy(size=replicas),
                            num_gpus=1 if use_gpu else None, num_cpus=None if use_gpu else 1,
                            fn_constructor_kwargs={"model_dir": model_dir, "jobs": by_clip, "settings": settings,
                                                   "generate_fn": generate_fn})
        preds = ds.take_all()
        for p in preds:
            for key in ("trajectories", "complete", "hand_counts"):
                p[key] = list(p[key])
            if not p["error"] and not any(p["complete"]):
                p["error"] = (f"{NO_COMPLETE_SAMPLE}: hand tokens per sample {[int(c) for c in p['hand_counts']]}, "
                              f"{NUM_FUTURE} expected")
        missing = {(j["sample_id"], j["task"], j["variant"]) for j in jobs} - \
            {(p["sample_id"], p["task"], p["variant"]) for p in preds}
        for j in jobs:  # a clip the pipeline lost is a failure too, never dropped
            if (j["sample_id"], j["task"], j["variant"]) in missing:
                preds.append({**j, "answers": "[]", "trajectories": [float("nan")] * (K * 2 * NUM_FUTURE * 2),
                              "complete": [False] * K, "hand_counts": [0] * K, "error": "no prediction returned"})
        order = {(j["sample_id"], j["task"], j["variant"]): i for i, j in enumerate(jobs)}
        preds.sort(key=lambda p: order[(p["sample_id"], p["task"], p["variant"])])

    metrics: dict[str, float] = {}
    for task in tasks:
        metrics.update(task_metrics(task, preds, clips, K))

    out_root = Path(data) if "://" not in data else Path("runs")
    out_dir = out_root / "eval" / run_name
    out_dir.mkdir(parents=True, exist_ok=True)
    import pyarrow.parquet as pq

    pq.write_table(predictions_table(preds, clips, K), out_dir / "predictions.parquet")
    gallery = write_gallery(preds, clips, where, K, args.gallery, out_dir) if args.gallery > 0 else []
    params = {"model": model_dir, "data": data, "split": args.split, "task": args.task, "num_samples": str(K),
              "seed": str(args.seed), "temperature": str(args.temperature), "top_p": str(args.top_p),
              "limit": str(args.limit), "max_new_tokens": str(args.max_new_tokens),
              "shuffle_questions": str(args.shuffle_questions), "batch_size": str(args.batch_size),
              "model_mode": cfg.mode}

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
            now = int(time.time() * 1000)
            items = [Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())]
            for start in range(0, len(items), 1000):
                mlflow_client.log_batch(run_id, metrics=items[start:start + 1000])
            mlflow_client.log_artifacts(run_id, str(out_dir))
            ok = True
        finally:
            tracking.finish_run(mlflow_client, run_id, ok)

    from handsonvlm.baselines import BASELINES

    print(summary_table(metrics, tasks, list(BASELINES)), flush=True)
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
