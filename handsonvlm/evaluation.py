"""The evaluation policy: which prompts a model is asked and how its answers become metrics.

``pipelines/evaluate.py`` runs the model on a Ray cluster; everything it decides about the numbers
lives here, as pure functions over arrays, so that each rule (missing points fall back to the last
observed position, failures are counted and never dropped, the two learning ratios) is unit-tested
without Ray and pinned by a golden test. Definitions of every key: docs/METRICS.md ("Evaluation").

Shapes: N clips, K samples per clip, T = ``NUM_FUTURE_POINTS``, hands in ``HANDS`` order.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

from handsonvlm.baselines import BASELINES, run_baselines
from handsonvlm.constants import NUM_FUTURE_POINTS, NUM_HANDS, POINT_DIM
from handsonvlm.metrics import trajectory_metrics

log = logging.getLogger(__name__)

VHP, RBHP = "vhp", "rbhp"
# the clip's own question; another clip's (does the model read it?); its own question with another
# clip's frames (does the model look at them?)
VARIANTS = ("question", "shuffled", "shuffled_frames")
QUESTION, SHUFFLED, SHUFFLED_FRAMES = VARIANTS
SHUFFLE_STREAMS = {SHUFFLED: "shuffle", SHUFFLED_FRAMES: "shuffle_frames"}  # seeds each variant's derangement
GROUNDING_BASELINE = "constant_velocity"  # the baseline a learned model is compared with
ADE_OVER_BASELINE = f"ade_over_{GROUNDING_BASELINE}"  # the two learning ratios (learning_ratios)
SHUFFLED_OVER_TRUE = "shuffled_over_true_ade"
SHUFFLED_FRAMES_OVER_TRUE = "shuffled_frames_over_true_ade"
NO_COMPLETE_SAMPLE = "no complete sample"  # the error note of a clip whose K samples all lack hand tokens
NO_PREDICTION = "no prediction returned"  # the error note of a job the pipeline lost
SEED_BITS = 62  # per-clip generation seeds stay well inside a signed int64 (parquet, torch)
TRAJECTORY_SHAPE = (NUM_HANDS, NUM_FUTURE_POINTS, POINT_DIM)  # one sample's answer [2, T, 2]
# complete_only_metrics: the count that weighs each clip's value of a metric (others: 1 per clip)
COUNT_WEIGHT = {"ade": "n_traj", "min_ade": "n_traj", "fde": "n_fde", "min_fde": "n_fde", "wde": "n_wde",
                "ade_paper": "n_valid", "fde_paper": "n_valid"}


# ---------------------------------------------------------------------------------------- jobs
def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation [n] without fixed points (Sattolo's algorithm: one n-cycle); n >= 2."""
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(i))  # 0 <= j < i
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def shuffle_permutation(n: int, seed: int, task: str, variant: str = SHUFFLED) -> np.ndarray:
    """The derangement of a task's n clips for a shuffled ``variant``: clip i gets clip perm[i]'s
    question (``shuffled``) or frames (``shuffled_frames``). Seeded by ``seed``, the task and the
    variant, so the two shuffles are independent of each other."""
    from handsonvlm.mixture import stable_hash  # torch: see build_jobs

    return derangement(n, np.random.default_rng([seed, stable_hash(f"{SHUFFLE_STREAMS[variant]}#{task}")]))


def frames_source(job: Mapping) -> str:
    """The clip whose frames a job is answered with (``frames_from``; default: its own clip)."""
    return job.get("frames_from") or job["sample_id"]


def _user_question(turns) -> str:
    return turns[-1][0]


def _has_narration(row: Mapping) -> bool:
    return isinstance(row.get("narration"), str) and bool(row["narration"].strip())


def build_jobs(rows: Sequence[Mapping], cfg, tasks: Sequence[str], seed: int, shuffle: bool,
               shuffle_frames: bool = False) -> list[dict]:
    """One job per (clip, task, variant): the prompt's question, the clip whose frames it sees
    (``frames_from``) and the clip's generation seed.

    ``rows``: clips in evaluation order (``sample_id``, ``narration``, ``rbhp_questions``); ``cfg``:
    the model's ``ModelConfig``. Per task: the clips that can be asked it, then (``shuffle``) the
    same clips asked another clip's question, then (``shuffle_frames``) the same clips asked their
    own question (same seed) over another clip's frames, each via a derangement seeded by ``seed``,
    the task and the variant (:func:`shuffle_permutation`). Every answer is scored against the
    clip's own GT."""
    # The prompt templates live with the training mixture (torch): imported here, so that the
    # metric functions of this module need numpy only.
    from handsonvlm.mixture import eval_rng, has_rbhp, rbhp_eval_turns, vhp_eval_turns

    asks = {VHP: (_has_narration, vhp_eval_turns), RBHP: (has_rbhp, rbhp_eval_turns)}
    jobs = []
    for task in tasks:
        can_ask, make = asks[task]
        own = []
        for row in filter(can_ask, rows):
            rng = eval_rng(f"{row['sample_id']}#{task}", seed)  # a clip's prompt and seed ignore --limit
            turns = make(row, cfg, rng)
            own.append({"sample_id": row["sample_id"], "task": task, "variant": QUESTION,
                        "question": _user_question(turns), "question_from": row["sample_id"],
                        "frames_from": row["sample_id"], "seed": int(rng.integers(1 << SEED_BITS))})
        jobs += own
        for variant, wanted, what in ((SHUFFLED, shuffle, "questions"), (SHUFFLED_FRAMES, shuffle_frames, "frames")):
            if not wanted:
                continue
            if len(own) < 2:
                log.warning("%s: %d clip(s): no derangement possible, shuffled %s skipped", task, len(own), what)
                continue
            perm = shuffle_permutation(len(own), seed, task, variant)
            for i, job in enumerate(own):
                other = own[int(perm[i])]
                swap = ({"question": other["question"], "question_from": other["sample_id"]} if variant == SHUFFLED
                        else {"frames_from": other["sample_id"]})
                jobs.append({**job, "variant": variant, **swap})
    return jobs


# ---------------------------------------------------------------------------------------- rows
JOB_FIELDS = ("sample_id", "task", "variant", "question", "question_from", "frames_from", "seed")  # copied into its row
PREDICTION_FIELDS = (*JOB_FIELDS, "answers", "trajectories", "complete", "hand_counts", "error")


def no_complete_note(hand_counts: Sequence[int]) -> str:
    """The error note of a clip that generated fine but none of whose samples is complete."""
    return f"{NO_COMPLETE_SAMPLE}: hand tokens per sample {[int(c) for c in hand_counts]}, {NUM_FUTURE_POINTS} expected"


def prediction_row(job: Mapping, result: Mapping, num_samples: int) -> dict:
    """One job's answer as a flat row: the job's fields, ``answers`` (JSON list of K texts),
    ``trajectories`` [K * 2 * T * 2] (NaN = missing point), ``complete`` [K], ``hand_counts`` [K]
    and ``error`` ("" when fine). ``result``: the generation's ``answers``, ``trajectories``
    [K, 2, T, 2], ``complete``, ``hand_counts``, or only an ``error`` (then every point is NaN)."""
    traj = result.get("trajectories")
    return {**{key: frames_source(job) if key == "frames_from" else job[key] for key in JOB_FIELDS},
            "seed": int(job["seed"]),
            "answers": json.dumps(list(result.get("answers", []))),
            "trajectories": (np.full(num_samples * math.prod(TRAJECTORY_SHAPE), np.nan) if traj is None
                             else np.asarray(traj, np.float64).reshape(-1)).tolist(),
            "complete": np.asarray(result.get("complete", np.zeros(num_samples, bool)), bool).tolist(),
            "hand_counts": np.asarray(result.get("hand_counts", np.zeros(num_samples, np.int64)), np.int64).tolist(),
            "error": result.get("error", "")}


def _job_key(job: Mapping) -> tuple[str, str, str]:
    return job["sample_id"], job["task"], job["variant"]


def reconcile(jobs: Sequence[Mapping], preds: Sequence[Mapping], num_samples: int) -> list[dict]:
    """The rows of ``jobs`` (:func:`prediction_row`, any order) in job order, failures explicit,
    none dropped: a clip without any complete sample gets the ``no complete sample`` note, a job
    without a row (lost by the pipeline) a NaN row noted ``no prediction returned``."""
    out = []
    for p in preds:
        p = {**p, **{key: list(p[key]) for key in ("trajectories", "complete", "hand_counts")}}
        if not p["error"] and not any(p["complete"]):
            p["error"] = no_complete_note(p["hand_counts"])
        out.append(p)
    returned = {_job_key(p) for p in out}
    out += [prediction_row(j, {"error": NO_PREDICTION}, num_samples) for j in jobs if _job_key(j) not in returned]
    order = {_job_key(j): i for i, j in enumerate(jobs)}
    return sorted(out, key=lambda p: order[_job_key(p)])


def output_rows(preds: Sequence[Mapping], clips: Mapping[str, Mapping], num_samples: int) -> list[dict]:
    """The stored form of :func:`reconcile`'s rows (predictions.parquet): ``answers`` as a list,
    ``trajectories`` nested [K][2][T][2], ``error`` None when fine, plus the clip's ``gt`` [2][T][2]
    and ``valid`` [2] (``clips``: ``{sample_id: clip row}``)."""
    shape = (num_samples, *TRAJECTORY_SHAPE)
    return [{**p, "answers": json.loads(p["answers"]), "seed": int(p["seed"]), "error": p["error"] or None,
             "trajectories": np.asarray(p["trajectories"], np.float64).reshape(shape).tolist(),
             "gt": clips[p["sample_id"]]["future_hands"][:, 1:].astype(np.float64).tolist(),
             "valid": clips[p["sample_id"]]["future_valid"].astype(bool).tolist()} for p in preds]


TABLE_METRICS = ("ade", "fde")  # the per-clip errors of prediction_table


def prediction_table(preds: Sequence[Mapping], clips: Mapping[str, Mapping], num_samples: int) -> dict[str, list]:
    """:func:`reconcile`'s rows as columns for a table viewer (MLflow's ``log_table``): the job's
    fields, the answers, ``trajectories`` [K][2][T][2] (None = missing), ``n_complete``, ``error``
    and the clip's own ``ade``/``fde`` (missing points filled as in the metrics; None when no hand
    of the clip is scored)."""
    shape = (num_samples, *TRAJECTORY_SHAPE)
    columns: dict[str, list] = {key: [] for key in (*JOB_FIELDS, "answers", "trajectories", "n_complete", "error",
                                                     *TABLE_METRICS)}
    for p in preds:
        clip, pred = clips[p["sample_id"]], np.asarray(p["trajectories"], np.float64).reshape(shape)
        scores = trajectory_metrics(fill_missing(pred[None], clip["future_hands"][None]),
                                    clip["future_hands"][None, :, 1:], clip["future_valid"][None])
        for key in JOB_FIELDS:
            columns[key].append(int(p[key]) if key == "seed" else frames_source(p) if key == "frames_from" else p[key])
        columns["answers"].append(json.loads(p["answers"]))
        columns["trajectories"].append(np.where(np.isfinite(pred), pred, None).tolist())
        columns["n_complete"].append(int(np.sum(p["complete"])))
        columns["error"].append(p["error"] or None)
        for key in TABLE_METRICS:
            columns[key].append(scores[key] if math.isfinite(scores[key]) else None)
    return columns


# ---------------------------------------------------------------------------------------- arrays
@dataclass(frozen=True)
class Clips:
    """Shard arrays of N clips, dtypes as stored: ``future_hands`` [N, 2, 1 + T, 2] (point 0 = the
    last observed position), ``future_valid`` [N, 2], ``past_hands`` [N, 2, P, 2],
    ``past_hands_valid`` [N, 2, P]."""

    future_hands: np.ndarray
    future_valid: np.ndarray
    past_hands: np.ndarray
    past_hands_valid: np.ndarray

    @property
    def gt(self) -> np.ndarray:
        """The scored ground truth [N, 2, T, 2]."""
        return self.future_hands[:, :, 1:]

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping]) -> Clips:
        """Stack per-clip rows (the shard's columns of one clip each)."""
        return cls(*(np.stack([r[f.name] for r in rows]) for f in fields(cls)))


PROMPT_COLUMNS = ("sample_id", "narration", "rbhp_questions")  # the shard columns build_jobs reads
CLIP_COLUMNS = tuple(f.name for f in fields(Clips))  # the shard columns the metrics read


@dataclass(frozen=True)
class Answers:
    """A model's answers for N clips: ``trajectories`` [N, K, 2, T, 2] float64 (NaN = a point it did
    not produce), ``complete`` [N, K] (the sample held exactly T hand tokens), ``errors`` [N]
    (generation raised for the clip)."""

    trajectories: np.ndarray
    complete: np.ndarray
    errors: np.ndarray

    @classmethod
    def from_rows(cls, preds: Sequence[Mapping], num_samples: int) -> Answers:
        """Stack prediction rows (``trajectories`` flat, ``complete`` [K], ``error`` note or empty)."""
        shape = (num_samples, *TRAJECTORY_SHAPE)
        return cls(np.stack([np.asarray(p["trajectories"], np.float64).reshape(shape) for p in preds]),
                   np.stack([np.asarray(p["complete"], bool).reshape(num_samples) for p in preds]),
                   generation_errors([p["error"] for p in preds]))


def generation_errors(notes: Sequence[str | None]) -> np.ndarray:
    """[N] bool: the clip's error note says generation raised. A "no complete sample" note is a
    failure but not an error: generation ran and ended without hands."""
    return np.array([bool(n) and not n.startswith(NO_COMPLETE_SAMPLE) for n in notes], bool)


# ---------------------------------------------------------------------------------------- metrics
def fill_missing(pred: np.ndarray, future_hands: np.ndarray) -> np.ndarray:
    """pred [N, K, 2, T, 2] with NaN -> the last observed position (future_hands[:, :, 0]) there."""
    last = np.broadcast_to(future_hands[:, None, :, None, 0, :], pred.shape)
    return np.where(np.isfinite(pred), pred, last)


def complete_only_metrics(pred: np.ndarray, complete: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> dict:
    """trajectory_metrics over the complete samples only (variable K per clip), combined per clip.

    pred [N, K, 2, T, 2], complete [N, K], gt [N, 2, T, 2], valid [N, 2]. Counts ``n_*`` are summed;
    each metric is the mean of the clips' values weighted by its count (``COUNT_WEIGHT``), else 1."""
    per_clip = [trajectory_metrics(pred[n][complete[n]][None], gt[n:n + 1], valid[n:n + 1])
                for n in range(len(pred)) if complete[n].any()]
    keys = list(trajectory_metrics(np.zeros((1, 1, *gt.shape[1:])), gt[:1], valid[:1]).keys()) if len(gt) else []
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


def variant_metrics(answers: Answers, clips: Clips) -> dict:
    """Metrics of one (task, variant) of N clips (row n of ``answers`` answers clip n): every
    trajectory metric with missing points filled (:func:`fill_missing`), ``complete_only/*``,
    coverage and failure counts."""
    pred, complete, errors = answers.trajectories, answers.complete, answers.errors
    gt, valid = clips.gt, clips.future_valid
    out = trajectory_metrics(fill_missing(pred, clips.future_hands), gt, valid)
    out.update({f"complete_only/{k}": v for k, v in complete_only_metrics(pred, complete, gt, valid).items()})
    out["coverage"] = float(complete.mean(1).mean())
    out["coverage_all_k"] = float(complete.all(1).mean())
    out["n_clips"] = float(len(pred))
    out["n_failed"] = float((errors | ~complete.any(1)).sum())
    out["n_errors"] = float(errors.sum())
    return out


def task_metrics(task: str, clips: Clips | None, answers: Answers | None, shuffled: Answers | None = None,
                 shuffled_frames: Answers | None = None) -> dict:
    """``<task>/*`` metrics: the answers to the clips' own questions, the baselines on the same
    clips, the answers to shuffled questions (row n: clip n asked another clip's question), the
    answers over shuffled frames (row n: clip n's own question over another clip's frames) and the
    learning ratios. No clip (``answers`` None): ``n_clips`` = ``n_failed`` = 0 only."""
    if answers is None or not len(answers.trajectories):
        return {f"{task}/n_clips": 0.0, f"{task}/n_failed": 0.0}
    out = {f"{task}/{k}": v for k, v in variant_metrics(answers, clips).items()}
    for name, pred in run_baselines(clips.future_hands, clips.past_hands, clips.past_hands_valid).items():
        out.update({f"{task}/baseline_{name}/{k}": v
                    for k, v in trajectory_metrics(pred, clips.gt, clips.future_valid).items()})
    for variant, given in ((SHUFFLED, shuffled), (SHUFFLED_FRAMES, shuffled_frames)):
        if given is not None:
            out.update({f"{task}/{variant}/{k}": v for k, v in variant_metrics(given, clips).items()
                        if not k.startswith("complete_only/")})
    out.update(learning_ratios(out, task))
    return out


def learning_ratios(metrics: dict, task: str) -> dict:
    """The numbers that say whether a model learned the task (all ADE ratios):
    ``<task>/ade_over_constant_velocity`` (below 1: it beats extrapolating the observed motion),
    ``<task>/shuffled_over_true_ade`` (above 1: another clip's question makes it worse, i.e. it
    reads the question) and ``<task>/shuffled_frames_over_true_ade`` (above 1: another clip's frames
    make it worse, i.e. it looks at the frames). Absent when an input is missing or not positive."""
    def ratio(num_key: str, den_key: str) -> float | None:
        num, den = metrics.get(f"{task}/{num_key}"), metrics.get(f"{task}/{den_key}")
        if num is None or den is None or not (math.isfinite(num) and math.isfinite(den)) or den <= 0:
            return None
        return num / den

    ratios = {ADE_OVER_BASELINE: ratio("ade", f"baseline_{GROUNDING_BASELINE}/ade"),
              SHUFFLED_OVER_TRUE: ratio(f"{SHUFFLED}/ade", "ade"),
              SHUFFLED_FRAMES_OVER_TRUE: ratio(f"{SHUFFLED_FRAMES}/ade", "ade")}
    return {f"{task}/{k}": v for k, v in ratios.items() if v is not None}


def metrics_from_rows(preds: Sequence[Mapping], clips: Mapping[str, Mapping], num_samples: int,
                      tasks: Sequence[str]) -> dict:
    """Adapter for the job: prediction rows (:func:`reconcile`'s order) and ``{sample_id: clip
    row}`` -> the :func:`task_metrics` of every task."""
    out = {}
    for task in tasks:
        rows = {v: [p for p in preds if p["task"] == task and p["variant"] == v] for v in VARIANTS}
        ids = [p["sample_id"] for p in rows[QUESTION]]
        for variant in (SHUFFLED, SHUFFLED_FRAMES):
            if rows[variant] and [p["sample_id"] for p in rows[variant]] != ids:
                raise ValueError(f"{task}: the {variant} answers are not in the order of the clips' own")
        arrays = {v: Answers.from_rows(r, num_samples) if r else None for v, r in rows.items()}
        clip_arrays = Clips.from_rows([clips[i] for i in ids]) if ids else None
        out.update(task_metrics(task, clip_arrays, arrays[QUESTION], arrays[SHUFFLED], arrays[SHUFFLED_FRAMES]))
    return out


def gallery_picks(preds: Sequence[Mapping], tasks: Sequence[str], per_task: int) -> list[tuple[str, Mapping]]:
    """The rows the gallery draws, with their file names: the first ``per_task`` own-question
    rows of each task, ``<task>_<i>_<sample_id>.png``."""
    picks = []
    for task in tasks:
        mine = [p for p in preds if p["task"] == task and p["variant"] == QUESTION][:per_task]
        picks += [(f"{task}_{i:02d}_{p['sample_id']}.png", p) for i, p in enumerate(mine)]
    return picks


# ---------------------------------------------------------------------------------------- table
def _fmt(value, spec: str = ".4f", suffix: str = "") -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:{spec}}{suffix}"


def _fmt_ratio(value) -> str:
    return _fmt(value, ".2f", "x")


def summary_table(metrics: dict, tasks: Sequence[str], baselines: Sequence[str] = tuple(BASELINES)) -> str:
    """The printed table: one row per task (counts, ADE/FDE/WDE, baseline ADEs, shuffled ADE,
    coverage, the learning ratios; "-" where a ratio or the shuffled variant is absent). The
    shuffled-frames columns (``shuffled frames ade`` beside ``shuffled ade``, ``shuffled_frames /
    true`` beside ``shuffled / true``) are there only when some task has that variant
    (``--shuffle-frames``), so the table of a run without it is unchanged."""
    frames = any(f"{task}/{SHUFFLED_FRAMES}/ade" in metrics for task in tasks)
    header = ["task", "n_clips", "failed", "ade", "fde", "wde"] + [f"{b} ade" for b in baselines] + \
             ["shuffled ade"] + (["shuffled frames ade"] if frames else []) + \
             ["coverage", "ade / cv", "shuffled / true"] + (["shuffled_frames / true"] if frames else [])
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for task in tasks:
        def m(key: str, task: str = task):
            return metrics.get(f"{task}/{key}")

        def optional(key: str, fmt=_fmt):
            return "-" if m(key) is None else fmt(m(key))

        cells = [task, str(int(m("n_clips") or 0)), str(int(m("n_failed") or 0)), _fmt(m("ade")), _fmt(m("fde")),
                 _fmt(m("wde"))] + [_fmt(m(f"baseline_{b}/ade")) for b in baselines] + \
                [optional(f"{SHUFFLED}/ade")] + ([optional(f"{SHUFFLED_FRAMES}/ade")] if frames else []) + \
                [_fmt(m("coverage")), optional(ADE_OVER_BASELINE, _fmt_ratio),
                 optional(SHUFFLED_OVER_TRUE, _fmt_ratio)] + \
                ([optional(SHUFFLED_FRAMES_OVER_TRUE, _fmt_ratio)] if frames else [])
        lines.append(" | ".join(cells))
    return "\n".join(lines)
