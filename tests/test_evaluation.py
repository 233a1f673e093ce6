"""The evaluation policy (handsonvlm.evaluation) on plain arrays: no Ray, no model, no shards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from handsonvlm import evaluation
from handsonvlm.evaluation import NO_COMPLETE_SAMPLE, Answers, Clips

N, K, T, P = 8, 3, 4, 10  # clips, samples, future points, observed frames of the golden evaluation
RBHP_CLIPS = [0, 2, 5, 6, 7]  # the golden clips that have reasoning questions
TOLERANCE = {"rel": 1e-9, "abs": 1e-12}


# ---------------------------------------------------------------------------------------- golden
def golden_inputs() -> tuple[dict, dict]:
    """Seeded shard arrays of N clips and the answers of three (task, variant)s, with every kind of
    failure: NaN points of incomplete samples, a clip whose generation raised, a clip without any
    complete sample, a hand without a trajectory, a clip without any valid hand, GT points off the
    frame (coordinates up to 1.1)."""
    rng = np.random.default_rng(0)
    clips = {
        "future_hands": (rng.random((N, 2, 1 + T, 2)) * 1.1).astype(np.float32),
        "future_valid": rng.random((N, 2)) > 0.3,
        "past_hands": rng.random((N, 2, P, 2)).astype(np.float32),
        "past_hands_valid": rng.random((N, 2, P)) > 0.2,
    }
    clips["future_valid"][0] = True
    clips["future_valid"][1] = False

    def answers(n: int) -> dict:
        return {"trajectories": rng.random((n, K, 2, T, 2)), "complete": np.ones((n, K), bool), "errors": [""] * n}

    vhp, shuffled, rbhp = answers(N), answers(N), answers(len(RBHP_CLIPS))
    vhp["trajectories"][2, 1, :, 2:] = np.nan  # clip 2: one sample with two points, one with none
    vhp["trajectories"][2, 2] = np.nan
    vhp["complete"][2, 1:] = False
    vhp["trajectories"][3] = np.nan  # clip 3: generation raised
    vhp["complete"][3] = False
    vhp["errors"][3] = "RuntimeError: boom"
    vhp["trajectories"][4, :, :, 3:] = np.nan  # clip 4: three hand tokens in every sample
    vhp["complete"][4] = False
    vhp["errors"][4] = evaluation.no_complete_note([3, 3, 3])
    shuffled["trajectories"][5] = np.nan
    shuffled["complete"][5] = False
    shuffled["errors"][5] = "RuntimeError: out of memory"
    shuffled["trajectories"][6, 0] = np.nan
    shuffled["complete"][6, 0] = False
    rbhp["trajectories"][1, 0, 1] = np.nan
    rbhp["complete"][1, 0] = False
    return clips, {("vhp", "question"): vhp, ("vhp", "shuffled"): shuffled, ("rbhp", "question"): rbhp}


def as_rows(clips: dict, answers: dict) -> tuple[list[dict], dict[str, dict]]:
    """The same inputs as the job holds them: prediction rows and {sample_id: clip row}."""
    ids = [f"c{n}" for n in range(N)]
    clip_rows = {sid: {k: v[n] for k, v in clips.items()} for n, sid in enumerate(ids)}
    preds = []
    for (task, variant), a in answers.items():
        mine = ids if task == "vhp" else [ids[n] for n in RBHP_CLIPS]
        preds += [{"sample_id": sid, "task": task, "variant": variant, "error": a["errors"][i],
                   "trajectories": a["trajectories"][i].ravel().tolist(), "complete": a["complete"][i].tolist()}
                  for i, sid in enumerate(mine)]
    return preds, clip_rows


# test_golden_evaluation: pinned, see its docstring (regenerate only on purpose)
GOLDEN_METRICS = json.loads((Path(__file__).parent / "golden" / "evaluation_metrics_seed0.json").read_text())

def test_golden_evaluation():
    """The full metrics dict of a seeded evaluation, pinned: computed by pipelines/evaluate.py before
    the policy moved here (and by this module since). These numbers change only on purpose, and the
    commit that changes them says why."""
    clips, answers = golden_inputs()
    preds, clip_rows = as_rows(clips, answers)
    metrics = evaluation.metrics_from_rows(preds, clip_rows, K, ("vhp", "rbhp"))
    assert sorted(metrics) == sorted(GOLDEN_METRICS)
    assert metrics == pytest.approx(GOLDEN_METRICS, **TOLERANCE)


def test_golden_evaluation_on_arrays():
    """The array API gives the adapter's numbers (here: VHP with shuffled questions)."""
    clips, answers = golden_inputs()
    arrays = {key: Answers(a["trajectories"], a["complete"], evaluation.generation_errors(a["errors"]))
              for key, a in answers.items()}
    vhp = evaluation.task_metrics("vhp", Clips(**clips), arrays["vhp", "question"], arrays["vhp", "shuffled"])
    assert vhp == pytest.approx({k: v for k, v in GOLDEN_METRICS.items() if k.startswith("vhp/")}, **TOLERANCE)
    assert evaluation.task_metrics("rbhp", None, None) == {"rbhp/n_clips": 0.0, "rbhp/n_failed": 0.0}


def test_shuffled_frames_add_their_keys_and_leave_the_golden_values_alone():
    """--shuffle-frames adds <task>/shuffled_frames/* and the ratio; every golden key keeps its value."""
    clips, answers = golden_inputs()
    rng = np.random.default_rng(1)
    frames = {"trajectories": rng.random((N, K, 2, T, 2)), "complete": np.ones((N, K), bool), "errors": [""] * N}
    frames["trajectories"][7] = np.nan  # clip 7: generation raised over another clip's frames
    frames["complete"][7] = False
    frames["errors"][7] = "RuntimeError: boom"
    preds, clip_rows = as_rows(clips, {**answers, ("vhp", "shuffled_frames"): frames})
    metrics = evaluation.metrics_from_rows(preds, clip_rows, K, ("vhp", "rbhp"))
    new = sorted(set(metrics) - set(GOLDEN_METRICS))
    assert set(GOLDEN_METRICS) <= set(metrics)
    assert {k: metrics[k] for k in GOLDEN_METRICS} == pytest.approx(GOLDEN_METRICS, **TOLERANCE)
    expected = {"vhp/shuffled_frames/" + k.removeprefix("vhp/shuffled/") for k in GOLDEN_METRICS
                if k.startswith("vhp/shuffled/")}  # the same keys as the shuffled questions'
    assert new == sorted(expected | {"vhp/shuffled_frames_over_true_ade"})
    arrays = Answers(frames["trajectories"], frames["complete"], evaluation.generation_errors(frames["errors"]))
    alone = evaluation.variant_metrics(arrays, Clips(**clips))
    assert metrics["vhp/shuffled_frames/ade"] == pytest.approx(alone["ade"], **TOLERANCE)
    assert metrics["vhp/shuffled_frames/n_errors"] == 1 and metrics["vhp/shuffled_frames/n_clips"] == N
    assert metrics["vhp/shuffled_frames_over_true_ade"] == pytest.approx(alone["ade"] / metrics["vhp/ade"])
    assert not any(k.startswith("rbhp/shuffled_frames") for k in metrics)  # RBHP was not shuffled


def test_first_derangement_is_pinned():
    """The first shuffle of seed 0 over 10 clips: changes only on purpose (it decides which question
    each clip is asked under --shuffle-questions)."""
    assert evaluation.derangement(10, np.random.default_rng(0)).tolist() == [8, 2, 9, 4, 0, 6, 1, 3, 5, 7]


# ---------------------------------------------------------------------------------------- rules
def test_derangement_has_no_fixed_points():
    for n in (2, 3, 7):
        perm = evaluation.derangement(n, np.random.default_rng(n))
        assert sorted(perm.tolist()) == list(range(n)) and not (perm == np.arange(n)).any()


def test_missing_points_fall_back_to_the_last_position():
    fh = np.random.default_rng(0).random((2, 2, 5, 2))
    pred = np.full((2, 3, 2, 4, 2), np.nan)
    pred[0, 0] = 0.5
    filled = evaluation.fill_missing(pred, fh)
    assert np.isfinite(filled).all() and (filled[0, 0] == 0.5).all()
    np.testing.assert_allclose(filled[1, 2, :, 3], fh[1, :, 0])


def _clips(future_hands: np.ndarray, valid: np.ndarray) -> Clips:
    n = len(future_hands)
    return Clips(future_hands, valid, np.zeros((n, 2, P, 2)), np.zeros((n, 2, P), bool))


def test_metrics_policies_on_synthetic_predictions():
    from handsonvlm.metrics import trajectory_metrics

    rng = np.random.default_rng(1)
    n_clips, k = 5, 3
    fh = rng.random((n_clips, 2, 5, 2)) * 0.9
    valid = np.array([[True, n % 2 == 0] for n in range(n_clips)])
    clips = _clips(fh, valid)
    pred = rng.random((n_clips, k, 2, 4, 2)) * 0.9
    complete = np.ones((n_clips, k), bool)
    full = evaluation.variant_metrics(Answers(pred, complete, np.zeros(n_clips, bool)), clips)
    expected = trajectory_metrics(pred, fh[:, :, 1:], valid)
    for key, value in expected.items():  # all complete: both policies equal the plain metrics
        np.testing.assert_allclose(full[key], value, rtol=1e-9)
        np.testing.assert_allclose(full[f"complete_only/{key}"], value, rtol=1e-9)
    assert full["coverage"] == 1.0 and full["n_failed"] == 0

    pred[0, 1:] = np.nan  # clip 0: one complete sample; clip 1: none (failed)
    pred[1] = np.nan
    pred[1, 0, :, :2] = 0.3  # an incomplete sample with 2 points
    complete[0, 1:] = complete[1] = False
    pred[2], complete[2] = np.nan, False  # clip 2: generation raised
    errors = evaluation.generation_errors(["", evaluation.no_complete_note([2] * k), "RuntimeError: boom", "", ""])
    part = evaluation.variant_metrics(Answers(pred, complete, errors), clips)
    assert part["n_failed"] == 2 and part["n_errors"] == 1 and part["complete_only/n_clips"] == 3
    np.testing.assert_allclose(part["coverage"], (1 / 3 + 0 + 0 + 1 + 1) / 5)
    assert part["coverage_all_k"] == 2 / 5 and np.isfinite(part["ade"])
    kept = [0, 3, 4]
    ade0 = trajectory_metrics(pred[0, :1][None], fh[:1, :, 1:], valid[:1])
    rest = trajectory_metrics(pred[3:], fh[3:, :, 1:], valid[3:])
    weight = ade0["n_traj"] + rest["n_traj"]
    np.testing.assert_allclose(part["complete_only/ade"],
                               (ade0["ade"] * ade0["n_traj"] + rest["ade"] * rest["n_traj"]) / weight)
    assert part["complete_only/n_valid"] == valid[kept].sum()


def test_a_no_complete_sample_note_is_a_failure_not_an_error():
    notes = ["", None, evaluation.no_complete_note([3, 0]), "frames: OSError: truncated", evaluation.NO_PREDICTION]
    assert evaluation.generation_errors(notes).tolist() == [False, False, False, True, True]
    assert evaluation.no_complete_note([3, 0]).startswith(NO_COMPLETE_SAMPLE)


def test_learning_ratios_and_table():
    metrics = {"vhp/ade": 0.06, "vhp/baseline_constant_velocity/ade": 0.1, "vhp/shuffled/ade": 0.15,
               "vhp/n_clips": 4.0, "vhp/coverage": 1.0,
               "rbhp/ade": 0.05, "rbhp/baseline_constant_velocity/ade": 0.0}  # no shuffled, degenerate baseline
    vhp = evaluation.learning_ratios(metrics, "vhp")
    assert vhp == {"vhp/ade_over_constant_velocity": pytest.approx(0.6),
                   "vhp/shuffled_over_true_ade": pytest.approx(2.5)}
    assert evaluation.learning_ratios(metrics, "rbhp") == {}
    table = evaluation.summary_table({**metrics, **vhp}, ("vhp", "rbhp"), ["constant_velocity"]).splitlines()
    assert table[0].endswith("ade / cv | shuffled / true")  # no shuffled-frames columns without that variant
    assert "frames" not in table[0] and len(table[2].split(" | ")) == len(table[0].split(" | "))
    assert table[2].endswith("0.60x | 2.50x") and table[3].endswith("- | -")

    # --shuffle-frames: the ratio beside shuffled / true, the variant's ADE beside the shuffled ADE
    metrics["vhp/shuffled_frames/ade"] = 0.09
    vhp = evaluation.learning_ratios(metrics, "vhp")
    assert vhp["vhp/shuffled_frames_over_true_ade"] == pytest.approx(1.5) and len(vhp) == 3
    table = evaluation.summary_table({**metrics, **vhp}, ("vhp", "rbhp"), ["constant_velocity"]).splitlines()
    header = table[0].split(" | ")
    assert header[-6:] == ["shuffled ade", "shuffled frames ade", "coverage", "ade / cv", "shuffled / true",
                           "shuffled_frames / true"]
    assert table[2].split(" | ")[-6:] == ["0.1500", "0.0900", "1.0000", "0.60x", "2.50x", "1.50x"]
    assert table[3].split(" | ")[-6:] == ["-", "-", "nan", "-", "-", "-"]


# ---------------------------------------------------------------------------------------- rows
def _job(sample_id: str, variant: str = "question", task: str = "vhp") -> dict:
    return {"sample_id": sample_id, "task": task, "variant": variant, "question": f"q {sample_id}",
            "question_from": sample_id, "seed": 7}


def test_prediction_rows_name_the_clip_whose_frames_were_seen():
    row = evaluation.prediction_row(_job("a"), {"error": "x"}, K)  # a job without frames_from: its own clip's
    assert row["frames_from"] == "a" and tuple(row) == evaluation.PREDICTION_FIELDS
    row = evaluation.prediction_row({**_job("a", "shuffled_frames"), "frames_from": "b"}, {"error": "x"}, K)
    assert (row["frames_from"], row["question_from"], row["variant"]) == ("b", "a", "shuffled_frames")


def test_reconcile_keeps_job_order_and_counts_every_failure():
    jobs = [_job("a"), _job("b"), _job("c"), _job("a", "shuffled")]
    ok = {"answers": ["x"] * K, "trajectories": np.zeros((K, 2, T, 2)), "complete": np.ones(K, bool),
          "hand_counts": np.full(K, T)}
    tokenless = {**ok, "trajectories": np.full((K, 2, T, 2), np.nan), "complete": np.zeros(K, bool),
                 "hand_counts": np.full(K, 1)}
    returned = [evaluation.prediction_row(jobs[3], ok, K), evaluation.prediction_row(jobs[1], tokenless, K),
                evaluation.prediction_row(jobs[0], {"error": "RuntimeError: boom"}, K)]  # "c" was lost
    rows = evaluation.reconcile(jobs, returned, K)
    assert [(r["sample_id"], r["variant"]) for r in rows] == [("a", "question"), ("b", "question"),
                                                              ("c", "question"), ("a", "shuffled")]
    assert [r["error"] for r in rows] == ["RuntimeError: boom", evaluation.no_complete_note([1] * K),
                                          evaluation.NO_PREDICTION, ""]
    assert rows[2]["complete"] == [False] * K and all(math.isnan(v) for v in rows[2]["trajectories"])
    assert len(rows[2]["trajectories"]) == K * 2 * T * 2 and rows[3]["answers"] == '["x", "x", "x"]'


@pytest.mark.parametrize("variant", ["shuffled", "shuffled_frames"])
def test_metrics_from_rows_needs_shuffled_rows_in_clip_order(variant):
    clips, answers = golden_inputs()
    answers[("vhp", "shuffled_frames")] = answers[("vhp", "shuffled")]
    preds, clip_rows = as_rows(clips, answers)
    shuffled = [p for p in preds if p["variant"] == variant]
    preds = [p for p in preds if p["variant"] != variant] + shuffled[::-1]
    with pytest.raises(ValueError, match=f"the {variant} answers are not in the order"):
        evaluation.metrics_from_rows(preds, clip_rows, K, ("vhp",))


def test_output_rows_attach_the_ground_truth():
    clips, answers = golden_inputs()
    preds, clip_rows = as_rows(clips, answers)
    preds = [{**p, "answers": "[]", "hand_counts": [0] * K, "seed": 1} for p in preds]
    out = evaluation.output_rows(preds, clip_rows, K)
    assert np.asarray(out[0]["trajectories"]).shape == (K, 2, T, 2) and out[0]["error"] is None
    np.testing.assert_array_equal(out[1]["gt"], clips["future_hands"][1, :, 1:])
    assert out[1]["valid"] == [False, False] and out[3]["error"] == "RuntimeError: boom"


def test_gallery_picks_the_first_clips_of_each_task():
    preds = [_job(s) for s in "abc"] + [_job("a", "shuffled")] + [_job(s, task="rbhp") for s in "bc"]
    picks = evaluation.gallery_picks(preds, ("vhp", "rbhp"), 2)
    assert [name for name, _ in picks] == ["vhp_00_a.png", "vhp_01_b.png", "rbhp_00_b.png", "rbhp_01_c.png"]


# ---------------------------------------------------------------------------------------- jobs
def test_jobs_ask_each_task_of_the_clips_that_have_it():
    from handsonvlm.config import load_model_config

    cfg = load_model_config("tiny")
    rows = [{"sample_id": f"s{i}", "narration": "open fridge" if i != 2 else " ",
             "rbhp_questions": ["Where do I grab the cup?"] if i % 2 else []} for i in range(5)]
    jobs = evaluation.build_jobs(rows, cfg, ("vhp", "rbhp"), seed=0, shuffle=True)
    own = {(j["task"], j["sample_id"]) for j in jobs if j["variant"] == "question"}
    assert own == {("vhp", s) for s in ("s0", "s1", "s3", "s4")} | {("rbhp", "s1"), ("rbhp", "s3")}
    shuffled = [j for j in jobs if j["variant"] == "shuffled"]
    assert len(shuffled) == len(own) and all(j["question_from"] != j["sample_id"] for j in shuffled)
    assert all(0 <= j["seed"] < 1 << evaluation.SEED_BITS for j in jobs)
    # a clip's prompt and seed do not depend on which other clips are evaluated (--limit)
    fewer = evaluation.build_jobs(rows[:2], cfg, ("vhp",), seed=0, shuffle=False)
    same = [j for j in jobs if j["variant"] == "question" and j["task"] == "vhp"][:2]
    assert [(j["question"], j["seed"]) for j in fewer] == [(j["question"], j["seed"]) for j in same]


def test_shuffled_frames_jobs_are_a_seeded_derangement_of_the_frames():
    """--shuffle-frames: each clip asked its OWN question (same prompt, same seed) over another
    clip's frames, by a seeded derangement of its own stream (not the questions' shuffle)."""
    from handsonvlm.config import load_model_config

    cfg = load_model_config("tiny")
    rows = [{"sample_id": f"s{i}", "narration": f"open drawer {i}", "rbhp_questions": ["Where is the cup?"] * (i % 2)}
            for i in range(7)]
    jobs = evaluation.build_jobs(rows, cfg, ("vhp", "rbhp"), seed=0, shuffle=True, shuffle_frames=True)
    for task, n in (("vhp", 7), ("rbhp", 3)):
        own = {j["sample_id"]: j for j in jobs if j["task"] == task and j["variant"] == "question"}
        frames = [j for j in jobs if j["task"] == task and j["variant"] == "shuffled_frames"]
        assert [j["sample_id"] for j in frames] == list(own) and len(own) == n  # clip order, every clip once
        assert all(j["frames_from"] != j["sample_id"] for j in frames)  # no fixed point
        assert sorted(j["frames_from"] for j in frames) == sorted(own)  # a permutation of the clips
        for j in frames:  # the clip's own prompt and seed: only the frames differ
            mine = own[j["sample_id"]]
            assert (j["question"], j["question_from"], j["seed"]) == (mine["question"], j["sample_id"], mine["seed"])
        assert all(j["frames_from"] == j["sample_id"] for j in own.values())
        ids = list(own)
        perm = evaluation.shuffle_permutation(n, 0, task, "shuffled_frames")
        assert [j["frames_from"] for j in frames] == [ids[int(i)] for i in perm]
    # seeded: the same seed gives the same jobs, another seed another shuffle
    assert evaluation.build_jobs(rows, cfg, ("vhp",), seed=0, shuffle=False, shuffle_frames=True) == \
        [j for j in jobs if j["task"] == "vhp" and j["variant"] != "shuffled"]
    other = evaluation.build_jobs(rows, cfg, ("vhp",), seed=1, shuffle=False, shuffle_frames=True)
    assert [j["frames_from"] for j in other if j["variant"] == "shuffled_frames"] != \
        [j["frames_from"] for j in jobs if j["task"] == "vhp" and j["variant"] == "shuffled_frames"]
    # pinned: changes only on purpose; independent of the question shuffle of the same seed
    assert evaluation.shuffle_permutation(10, 0, "vhp", "shuffled_frames").tolist() == [9, 3, 8, 7, 1, 2, 4, 5, 0, 6]
    assert evaluation.shuffle_permutation(10, 0, "vhp", "shuffled").tolist() == [5, 6, 9, 1, 0, 7, 4, 2, 3, 8]
    for n in (2, 3, 5, 11):
        for seed in range(5):
            perm = evaluation.shuffle_permutation(n, seed, "rbhp", "shuffled_frames")
            assert sorted(perm.tolist()) == list(range(n)) and not (perm == np.arange(n)).any()
    # without the flag the jobs are exactly what they were
    plain = evaluation.build_jobs(rows, cfg, ("vhp", "rbhp"), seed=0, shuffle=True)
    assert plain == [j for j in jobs if j["variant"] != "shuffled_frames"]
    # fewer than 2 clips: nothing to swap with, skipped
    single = evaluation.build_jobs(rows[:1], cfg, ("vhp",), seed=0, shuffle=False, shuffle_frames=True)
    assert [j["variant"] for j in single] == ["question"]
