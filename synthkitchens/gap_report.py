"""SynthKitchens design check: how much does knowing the target object help a hand-trajectory predictor?

``language_gap_report`` scores reference predictors that know more or less than a model could
(the object layout, the target, only the question) against the labels of a generated tree, so a
change to the scene model shows at once whether the dataset still needs language. The motion
reference is the library's constant-velocity baseline (:mod:`handsonvlm.baselines`), the one the
evaluation reports.
"""

from __future__ import annotations

import json

import numpy as np

from handsonvlm.baselines import constant_velocity
from handsonvlm.constants import (
    EPIC_FRAME_HEIGHT,
    EPIC_FRAME_WIDTH,
    FUTURE_STEP_SECONDS,
    HOI_FORECAST_SIDES,
    NUM_FUTURE_POINTS,
)
from preprocessing import safe_pickle
from preprocessing.window import LABEL_FPS
from synthkitchens.generate import label_file, tree_paths
from synthkitchens.scene import HAND_HOME_NORM, KITCHEN_LAYOUT_PX, REACH_S, min_jerk_profile

# The future points HandsOnVLM predicts (t = +0.25, +0.5, +0.75, +1.0 s) in the 21-point label grid.
LABEL_POINTS_PER_STEP = int(round(LABEL_FPS * FUTURE_STEP_SECONDS))  # 5
FUTURE_POINTS = np.arange(1, NUM_FUTURE_POINTS + 1) * LABEL_POINTS_PER_STEP  # [5, 10, 15, 20]
FUTURE_TIMES_S = FUTURE_POINTS / LABEL_FPS  # [0.25, 0.5, 0.75, 1.0]
FRAME_SIZE = np.array([EPIC_FRAME_WIDTH, EPIC_FRAME_HEIGHT], dtype=np.float64)
PREDICTORS = ("cv", "text_free", "text", "question_only", "shuffled_question")


def geometric_median(points: np.ndarray, iterations: int = 200, eps: float = 1e-9) -> np.ndarray:
    """Weiszfeld's algorithm: the point minimising the summed distance to ``points`` [N, 2]."""
    estimate = points.mean(axis=0)
    for _ in range(iterations):
        dist = np.maximum(np.linalg.norm(points - estimate, axis=1), eps)
        update = (points / dist[:, None]).sum(axis=0) / (1.0 / dist).sum()
        if np.linalg.norm(update - estimate) < eps:
            break
        estimate = update
    return estimate


def _min_jerk_path(start: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """[4, 2] minimum-jerk positions at FUTURE_TIMES_S for a 1-s move from ``start`` to ``goal``."""
    fraction = min_jerk_profile(FUTURE_TIMES_S / REACH_S)
    return start[None, :] + fraction[:, None] * (goal - start)[None, :]


def _constant_velocity_by_side(past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """side -> [4, 2] constant-velocity forecast (handsonvlm.baselines) from the observed track [10, 2]."""
    past_hands = np.stack([past[side] for side in HOI_FORECAST_SIDES])[None]  # [1, 2, 10, 2]
    forecast = constant_velocity(past_hands[:, :, -1], past_hands, horizon=NUM_FUTURE_POINTS)[0]
    return dict(zip(HOI_FORECAST_SIDES, forecast))


def _layout_spot_norm(noun: str) -> np.ndarray:
    """The object class's KITCHEN_LAYOUT_PX spot in normalised coordinates."""
    return np.asarray(KITCHEN_LAYOUT_PX[noun]) / FRAME_SIZE


def language_gap_report(out_dir, split: str = "validation", seed: int = 0) -> dict:
    """ADE (normalised coordinates, 4 future points, active hands only) of reference predictors.

    * ``ade_constant_velocity`` (a): extrapolate the last two observed hand positions
      (``handsonvlm.baselines.constant_velocity``).
    * ``ade_text_free_oracle`` (b): knows where the objects are but not which one is meant: the
      hand nearest to the objects' geometric median moves there (minimum jerk, 1 s); the other
      hand keeps constant velocity.
    * ``ade_text_oracle`` (c): knows the target (as the narration/question implies it): every
      active hand moves (minimum jerk, 1 s) to the target's centre.
    * ``ade_question_only`` (d): reads only the question, not the frames: every active hand moves
      from its side's resting spot (``HAND_HOME_NORM``) to the named object's layout spot
      (``KITCHEN_LAYOUT_PX``). What a model can reach without localising anything.
    * ``ade_shuffled_question`` (e): (d) told another object of the same scene, drawn with
      ``seed``: what reading the wrong question costs.
    Distances for "nearest" are in pixels; errors in x/456, y/256 units.
    """
    paths = tree_paths(out_dir)
    meta = json.loads(paths["metadata"].read_text(encoding="utf-8"))
    rng = np.random.default_rng(seed)
    errors: dict[str, list[float]] = {name: [] for name in PREDICTORS}
    num_actions = 0
    for video in meta["videos"]:
        if video["split"] != split:
            continue
        centres = np.array([o["centre"] for o in video["objects"]], dtype=np.float64)  # normalised
        median = geometric_median(centres * FRAME_SIZE) / FRAME_SIZE
        names = [o["name"] for o in video["objects"]]
        for action in video["actions"]:
            label = safe_pickle.loads(label_file(paths["labels"], action["hoi_uid"]).read_bytes())
            num_actions += 1
            past = {s: label["past_hand_centers"][s].astype(np.float64) / FRAME_SIZE for s in HOI_FORECAST_SIDES}
            cv = _constant_velocity_by_side(past)
            nearest = min(HOI_FORECAST_SIDES, key=lambda s: np.linalg.norm((past[s][-1] - median) * FRAME_SIZE))
            target = centres[action["target"]]
            others = [n for i, n in enumerate(names) if i != action["target"]]
            spot = _layout_spot_norm(names[action["target"]])
            wrong_spot = _layout_spot_norm(others[int(rng.integers(len(others)))])
            for side in label["hand_trajs"]:
                truth = label["hand_trajs"][side]["traj"][FUTURE_POINTS].astype(np.float64) / FRAME_SIZE
                home = np.asarray(HAND_HOME_NORM[side])
                preds = {
                    "cv": cv[side],
                    "text_free": _min_jerk_path(past[side][-1], median) if side == nearest else cv[side],
                    "text": _min_jerk_path(past[side][-1], target),
                    "question_only": _min_jerk_path(home, spot),
                    "shuffled_question": _min_jerk_path(home, wrong_spot),
                }
                for name, pred in preds.items():
                    errors[name].append(float(np.linalg.norm(pred - truth, axis=1).mean()))
    ade = {name: float(np.mean(values)) if values else float("nan") for name, values in errors.items()}
    report = {"split": split, "actions": num_actions, "hand_tracks": len(errors["cv"]),
              "ade_constant_velocity": ade["cv"], "ade_text_free_oracle": ade["text_free"],
              "ade_text_oracle": ade["text"], "ade_question_only": ade["question_only"],
              "ade_shuffled_question": ade["shuffled_question"]}
    report["text_free_over_cv"] = report["ade_text_free_oracle"] / report["ade_constant_velocity"]
    report["text_over_cv"] = report["ade_text_oracle"] / report["ade_constant_velocity"]
    report["question_only_over_cv"] = report["ade_question_only"] / report["ade_constant_velocity"]
    report["shuffled_over_question_only"] = report["ade_shuffled_question"] / report["ade_question_only"]
    return report
