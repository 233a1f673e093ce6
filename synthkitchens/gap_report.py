"""SynthKitchens design check: how much does knowing the target object help a hand-trajectory predictor?

``language_gap_report`` scores reference predictors that know more or less than a model could
(the object layout, the target, only the question) against the labels of a generated tree, so a
change to the scene model shows at once whether the dataset still needs language. The motion
reference is the library's constant-velocity baseline (:mod:`handsonvlm.baselines`), the one the
evaluation reports.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
from synthkitchens.scene import DEFAULT_LAYOUT, HAND_HOME_NORM, KITCHEN_LAYOUT_PX, REACH_S, min_jerk_profile

# The future points HandsOnVLM predicts (t = +0.25, +0.5, +0.75, +1.0 s) in the 21-point label grid.
LABEL_POINTS_PER_STEP = int(round(LABEL_FPS * FUTURE_STEP_SECONDS))  # 5
FUTURE_POINTS = np.arange(1, NUM_FUTURE_POINTS + 1) * LABEL_POINTS_PER_STEP  # [5, 10, 15, 20]
FUTURE_TIMES_S = FUTURE_POINTS / LABEL_FPS  # [0.25, 0.5, 0.75, 1.0]
FRAME_SIZE = np.array([EPIC_FRAME_WIDTH, EPIC_FRAME_HEIGHT], dtype=np.float64)
PREDICTORS = ("cv", "text_free", "random_object", "text")
RANDOM_OBJECT_STREAM = 1  # seed-sequence entry of (b')'s draws
FITTED_PREDICTORS = ("question_only", "shuffled_question")  # need the fitted layout's class spots
REPORT_KEYS = {"cv": "ade_constant_velocity", "text_free": "ade_text_free_oracle", "random_object": "ade_random_object",
               "text": "ade_text_oracle", "question_only": "ade_question_only",
               "shuffled_question": "ade_shuffled_question"}


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


def tree_layout(meta: dict) -> str:
    """The layout a tree was generated with (trees before 1.2 record none: ``fitted``)."""
    return meta["arguments"].get("layout", DEFAULT_LAYOUT)


def language_gap_report(out_dir, split: str = "validation", seed: int = 0, with_questions_only: bool = False) -> dict:
    """ADE (normalised coordinates, 4 future points, active hands only) of reference predictors.

    * ``ade_constant_velocity`` (a): extrapolate the last two observed hand positions
      (``handsonvlm.baselines.constant_velocity``).
    * ``ade_text_free_oracle`` (b): knows where the objects are but not which one is meant: the
      hand nearest to the objects' geometric median moves there (minimum jerk, 1 s); the other
      hand keeps constant velocity.
    * ``ade_random_object`` (b'): knows the objects, not the target: every active hand moves
      (minimum jerk, 1 s) to an object of the scene drawn with ``seed``.
    * ``ade_text_oracle`` (c): knows the target (as the narration/question implies it): every
      active hand moves (minimum jerk, 1 s) to the target's centre.
    * fitted layout only (its objects have class spots): ``ade_question_only`` (d) reads only the
      question, not the frames: every active hand moves from its side's resting spot
      (``HAND_HOME_NORM``) to the named object's layout spot (``KITCHEN_LAYOUT_PX``), what a model
      can reach without localising anything; ``ade_shuffled_question`` (e): (d) told another
      object of the same scene, drawn with ``seed``: what reading the wrong question costs.
    ``with_questions_only`` scores only the actions that have RBHP questions (the RBHP task's
    clips). Distances for "nearest" are in pixels; errors in x/456, y/256 units.
    """
    paths = tree_paths(out_dir)
    meta = json.loads(paths["metadata"].read_text(encoding="utf-8"))
    layout = tree_layout(meta)
    predictors = PREDICTORS + (FITTED_PREDICTORS if layout == "fitted" else ())
    rng = np.random.default_rng(seed)
    guess_rng = np.random.default_rng([seed, RANDOM_OBJECT_STREAM])  # its own: (e)'s draws stay as in 1.1
    errors: dict[str, list[float]] = {name: [] for name in predictors}
    num_actions = 0
    for video in meta["videos"]:
        if video["split"] != split:
            continue
        centres = np.array([o["centre"] for o in video["objects"]], dtype=np.float64)  # normalised
        median = geometric_median(centres * FRAME_SIZE) / FRAME_SIZE
        names = [o["name"] for o in video["objects"]]
        for action in video["actions"]:
            if with_questions_only and not action["num_questions"]:
                continue
            label = safe_pickle.loads(label_file(paths["labels"], action["hoi_uid"]).read_bytes())
            num_actions += 1
            past = {s: label["past_hand_centers"][s].astype(np.float64) / FRAME_SIZE for s in HOI_FORECAST_SIDES}
            cv = _constant_velocity_by_side(past)
            nearest = min(HOI_FORECAST_SIDES, key=lambda s: np.linalg.norm((past[s][-1] - median) * FRAME_SIZE))
            target = centres[action["target"]]
            guess = centres[int(guess_rng.integers(len(centres)))]
            if layout == "fitted":
                others = [n for i, n in enumerate(names) if i != action["target"]]
                spot = _layout_spot_norm(names[action["target"]])
                wrong_spot = _layout_spot_norm(others[int(rng.integers(len(others)))])
            for side in label["hand_trajs"]:
                truth = label["hand_trajs"][side]["traj"][FUTURE_POINTS].astype(np.float64) / FRAME_SIZE
                preds = {
                    "cv": cv[side],
                    "text_free": _min_jerk_path(past[side][-1], median) if side == nearest else cv[side],
                    "random_object": _min_jerk_path(past[side][-1], guess),
                    "text": _min_jerk_path(past[side][-1], target),
                }
                if layout == "fitted":
                    home = np.asarray(HAND_HOME_NORM[side])
                    preds["question_only"] = _min_jerk_path(home, spot)
                    preds["shuffled_question"] = _min_jerk_path(home, wrong_spot)
                for name, pred in preds.items():
                    errors[name].append(float(np.linalg.norm(pred - truth, axis=1).mean()))
    ade = {name: float(np.mean(values)) if values else float("nan") for name, values in errors.items()}
    report = {"split": split, "layout": layout, "actions": num_actions, "hand_tracks": len(errors["cv"])}
    report.update({REPORT_KEYS[name]: value for name, value in ade.items()})
    cv_ade = report["ade_constant_velocity"]
    report["text_free_over_cv"] = report["ade_text_free_oracle"] / cv_ade
    report["random_object_over_cv"] = report["ade_random_object"] / cv_ade
    report["text_over_cv"] = report["ade_text_oracle"] / cv_ade
    if layout == "fitted":
        report["question_only_over_cv"] = report["ade_question_only"] / cv_ade
        report["shuffled_over_question_only"] = report["ade_shuffled_question"] / report["ade_question_only"]
    return report


def references_table(out_dir, metrics: dict, tasks=("vhp", "rbhp"), split: str = "validation") -> str:
    """The model of an evaluation (``metrics``: its metrics.json ``metrics``) against the tree's
    reference predictors, per task, as ADE and ADE / constant velocity (the report's own, on the
    task's clips: RBHP scores only the actions with questions). One markdown row per predictor."""
    reports = {task: language_gap_report(out_dir, split, with_questions_only=task == "rbhp") for task in tasks}
    rows = [("constant velocity", "ade_constant_velocity"),
            ("knows the objects, not the target: nearest hand to their median", "ade_text_free_oracle"),
            ("knows the objects, not the target: hands to a random object", "ade_random_object"),
            ("knows the target: hands to its centre", "ade_text_oracle")]
    header = ["predictor"] + [column for task in tasks for column in (f"{task} ade", f"{task} / cv")]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]

    def cells(values):
        return [f"{value:.4f} | {value / reports[task]['ade_constant_velocity']:.2f}x"
                for task, value in zip(tasks, values)]

    for name, key in rows:
        lines.append(" | ".join([name] + cells([reports[task][key] for task in tasks])))
    for name, key in (("model", "ade"), ("model, shuffled questions", "shuffled/ade"),
                      ("model, shuffled frames", "shuffled_frames/ade")):
        if all(f"{task}/{key}" in metrics for task in tasks):
            lines.append(" | ".join([name] + cells([metrics[f"{task}/{key}"] for task in tasks])))
    return "\n".join(lines)


def main(argv=None) -> None:
    """``python -m synthkitchens.gap_report TREE [--metrics metrics.json]``: print the references,
    and with an evaluation's metrics.json the model against them (``references_table``)."""
    parser = argparse.ArgumentParser(prog="python -m synthkitchens.gap_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("tree", help="a SynthKitchens tree (python -m synthkitchens --out TREE)")
    parser.add_argument("--metrics", help="an evaluation's metrics.json (pipelines/evaluate.py)")
    parser.add_argument("--split", default="validation")
    args = parser.parse_args(argv)
    if args.metrics:
        metrics = json.loads(Path(args.metrics).read_text(encoding="utf-8"))["metrics"]
        print(f"SynthKitchens references ({args.split}) against the model:")
        print(references_table(args.tree, metrics, split=args.split))
    else:
        print(json.dumps(language_gap_report(args.tree, args.split), indent=2))


if __name__ == "__main__":
    main()
