"""SynthKitchens: a synthetic dataset laid out exactly like EPIC-KITCHENS-100 + hoi-forecast + HandsOnVLM.

Usage::

    python -m preprocessing.synthetic --out DIR [--videos 24] [--seed 0] [--actions-per-video 12]
        [--fps 30.0] [--rgb-frames 0] [--workers 2] [--no-videos]

Output tree (all paths relative to DIR)::

    EPIC-KITCHENS/PXX/videos/PXX_YY.MP4                    mp4v, 456x256, native fps = --fps
    EPIC-KITCHENS/PXX/rgb_frames/PXX_YY/frame_%010d.jpg    first K videos only (--rgb-frames K), 60-fps numbering
    annotations/EPIC_100_{train,validation}.csv            the real 15 columns, sorted by narration_id strings
    annotations/EPIC_100_video_info.csv                    video_id,duration,fps,resolution
    annotations/EPIC_100_{verb,noun}_classes.csv           real EPIC ids/keys/categories of the classes used
    handsonvlm_assets/ek100_questions.json                 train RBHP questions (last observed frame path -> str)
    handsonvlm_assets/ek100_questions_val.json             validation RBHP questions
    handsonvlm_assets/rephrase_ek100.json                  narration -> [paraphrase]
    hoi_forecast/ek100/video_info.json                     list of labelled hoi uids
    hoi_forecast/ek100/labels/label_<uid>.pkl              hoi-forecast label dict (+ past_hand_centers)
    synthkitchens.json                                     generator metadata (objects, targets, sides, splits)

Every file except the MP4/JPEG bytes is byte-identical for the same arguments, whatever ``workers``;
decoded frames are identical too. The scene model (objects, hand motion, rendering) lives in
:mod:`preprocessing.synthetic_scene`; see its docstring for why the dataset needs language.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from preprocessing import safe_pickle
from preprocessing import synthetic_scene as scene_lib
from preprocessing.synthetic_scene import FRAME_H, FRAME_W, SIDES, VOCABULARY, VideoScene
from preprocessing.window import (
    LABEL_FPS,
    OBS_FPS,
    REFERENCE_FPS,
    frame_path,
    frame_time_s,
    future_frame_indices,
    observation_frame_indices,
)

GENERATOR_NAME = "SynthKitchens"
GENERATOR_VERSION = "1.1.0"  # 1.1: objects lie near fixed per-class layout spots
METADATA_FILE = "synthkitchens.json"

VIDEOS_PER_PARTICIPANT = 3  # P01_01, P01_02, P01_03, P02_01, ...
VALIDATION_FRACTION = 0.2  # the last ~20 % of the videos (by id) form the validation split
JPEG_QUALITY = 90
PICKLE_PROTOCOL = 4
JSON_FLOAT_DIGITS = 6
# A label point counts as "in contact" from the contact time T_c on; one rgb frame of slack
# covers the float32 quirk that can put the last label frame one file before start_frame.
CONTACT_TOLERANCE_S = 1.5 / REFERENCE_FPS
QUESTION_PROBS = (0.1, 0.3)  # P(no question), P(one question); otherwise three questions
QUESTION_STEMS = (  # the three stems of the released RBHP files
    "Where should my hand move to if I want to {infinitive}?",
    "Can you provide the hand trajectory for {gerund}?",
    "What is the recommended hand movement for {gerund}?",
)
QUESTION_SEPARATOR = "  \n"  # two spaces + newline, as in the released files

ANNOTATION_COLUMNS = [
    "narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp",
    "stop_timestamp", "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun",
    "noun_class", "all_nouns", "all_noun_classes",
]
SPLITS = ("train", "validation")
QUESTION_FILES = {"train": "ek100_questions.json", "validation": "ek100_questions_val.json"}

# Future points used by HandsOnVLM: t = +0.25, +0.5, +0.75, +1.0 s in the 21-point label grid.
FUTURE_POINT_STEP = int(round(LABEL_FPS / OBS_FPS))  # 5
FUTURE_POINTS = np.arange(1, 5) * FUTURE_POINT_STEP  # [5, 10, 15, 20]
FUTURE_TIMES_S = FUTURE_POINTS / LABEL_FPS  # [0.25, 0.5, 0.75, 1.0]
FRAME_SIZE = np.array([FRAME_W, FRAME_H], dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# Ids, splits, formatting
# ----------------------------------------------------------------------------------------------
def video_ids(count: int) -> list[tuple[str, str]]:
    """(participant_id, video_id) for video indices 0..count-1, e.g. ('P01', 'P01_02')."""
    out = []
    for i in range(count):
        pid = f"P{i // VIDEOS_PER_PARTICIPANT + 1:02d}"
        out.append((pid, f"{pid}_{i % VIDEOS_PER_PARTICIPANT + 1:02d}"))
    return out


def num_validation_videos(count: int) -> int:
    """The last ~20 % of the videos, at least one when there are two or more."""
    if count < 2:
        return 0
    return min(count - 1, max(1, int(round(VALIDATION_FRACTION * count))))


def format_centiseconds(cs: int) -> str:
    """4915 -> '00:00:49.15' (EPIC start/stop timestamp format)."""
    return f"{cs // 360000:02d}:{cs // 6000 % 60:02d}:{cs // 100 % 60:02d}.{cs % 100:02d}"


def format_milliseconds(ms: int) -> str:
    """48500 -> '00:00:48.500' (EPIC narration timestamp format)."""
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


def _round(value: float) -> float:
    return round(float(value), JSON_FLOAT_DIGITS)


def question_string(kind: scene_lib.ObjectKind, purposes: list[int]) -> str:
    """1 or 3 double-quoted RBHP questions joined by '  \\n' (stem k uses purpose ``purposes[k]``)."""
    questions = []
    for stem, purpose in zip(QUESTION_STEMS, purposes):
        infinitive, gerund = kind.purposes[purpose]
        questions.append('"' + stem.format(infinitive=infinitive, gerund=gerund) + '"')
    return QUESTION_SEPARATOR.join(questions)


# ----------------------------------------------------------------------------------------------
# Per-action records
# ----------------------------------------------------------------------------------------------
def _action_record(scene: VideoScene, action: scene_lib.Action, split: str) -> dict:
    """Everything the writers need about one action (CSV row, question, label, metadata)."""
    obj = scene.objects[action.target]
    kind = VOCABULARY[obj.noun]
    obs = observation_frame_indices(action.start_frame, REFERENCE_FPS)
    last_obs = int(obs[-1])
    row = {
        "narration_id": f"{scene.video_id}_{action.index}",
        "participant_id": scene.participant_id,
        "video_id": scene.video_id,
        "narration_timestamp": format_milliseconds(action.narration_ms),
        "start_timestamp": format_centiseconds(action.start_cs),
        "stop_timestamp": format_centiseconds(action.stop_cs),
        "start_frame": action.start_frame,
        "stop_frame": action.stop_frame,
        "narration": kind.narration,
        "verb": kind.verb,
        "verb_class": scene_lib.VERB_CLASSES[kind.verb][0],
        "noun": kind.noun,
        "noun_class": scene_lib.NOUN_CLASSES[kind.noun][0],
        "all_nouns": str([kind.noun]),
        "all_noun_classes": str([scene_lib.NOUN_CLASSES[kind.noun][0]]),
    }
    return {
        "row": row,
        "split": split,
        "scene": scene,
        "action": action,
        "obs_frames": obs,
        "question_key": frame_path(scene.participant_id, scene.video_id, last_obs),
        "question": question_string(kind, action.question_purposes) if action.question_purposes else None,
    }


def build_label(scene: VideoScene, action: scene_lib.Action, obs_frames: np.ndarray) -> dict:
    """The hoi-forecast label dict of one action (pixels of the 456x256 frame).

    Shapes: frame_indices 21, homography 21 x [3, 3], contact bool [21], hand/obj traj float32
    [21, 2], affordance boxes int64 [4], select_points float32 [N, 2], past_hand_centers
    float32 [10, 2] per side (a SynthKitchens extension).
    """
    frames = future_frame_indices(int(obs_frames[-1]), REFERENCE_FPS, LABEL_FPS)
    times = frame_time_s(frames, REFERENCE_FPS)
    num = len(frames)
    obj = scene.objects[action.target]
    hands = scene.hand_positions(times)
    past = scene.hand_positions(frame_time_s(obs_frames, REFERENCE_FPS))

    def trajectory(points: np.ndarray) -> dict:
        return {
            "traj": points.astype(np.float32),
            "fill_indices": list(range(num)),
            "centers": [(float(x), float(y)) for x, y in points],
        }

    select_points = np.asarray(action.contact_points, dtype=np.float32).reshape(-1, 2)
    affordance = {side: np.asarray(action.hand_bbox[side], dtype=np.int64) for side in action.sides}
    affordance.update({
        "select_points": select_points,
        "select_points_homo": select_points.copy(),
        "obj_bbox": np.asarray(obj.bbox, dtype=np.int64),
    })
    return {
        "frame_indices": [int(f) for f in frames],
        "homography": [np.eye(3, dtype=np.float64) for _ in range(num)],
        "contact": times >= action.contact_time - CONTACT_TOLERANCE_S,
        "hand_trajs": {side: trajectory(hands[side]) for side in SIDES if side in action.sides},
        "obj_trajs": trajectory(np.tile(np.asarray(obj.centre, dtype=np.float64), (num, 1))),
        "affordance": affordance,
        "past_hand_centers": {side: past[side].astype(np.float32) for side in SIDES},
    }


# ----------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------
def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_json(path: Path, obj, indent: int | None = 4) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent, sort_keys=True)
        f.write("\n")


def write_annotations(ann_dir: Path, records: dict[str, list[dict]], scenes: list[VideoScene]) -> None:
    """EPIC_100_{train,validation}.csv, video_info and the verb/noun class tables."""
    ann_dir.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "EPIC_100_train.csv"), ("validation", "EPIC_100_validation.csv")):
        _write_csv(ann_dir / name, ANNOTATION_COLUMNS,
                   [[r["row"][c] for c in ANNOTATION_COLUMNS] for r in records[split]])
    _write_csv(ann_dir / "EPIC_100_video_info.csv", ["video_id", "duration", "fps", "resolution"],
               [[s.video_id, _round(s.duration), float(s.fps), f"{FRAME_W}x{FRAME_H}"] for s in scenes])
    for name, table in (("EPIC_100_verb_classes.csv", scene_lib.VERB_CLASSES),
                        ("EPIC_100_noun_classes.csv", scene_lib.NOUN_CLASSES)):
        rows = sorted([[cid, key, str(instances), category] for key, (cid, category, instances) in table.items()])
        _write_csv(ann_dir / name, ["id", "key", "instances", "category"], rows)


def write_questions(asset_dir: Path, records: dict[str, list[dict]]) -> dict[str, int]:
    """RBHP question files per split and the narration paraphrases. Returns clips with questions."""
    asset_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in SPLITS:
        questions = {r["question_key"]: r["question"] for r in records[split] if r["question"]}
        _write_json(asset_dir / QUESTION_FILES[split], questions)
        counts[split] = len(questions)
    used = {r["row"]["noun"] for split in SPLITS for r in records[split]}
    rephrase = {VOCABULARY[n].narration: [VOCABULARY[n].paraphrase] for n in used}
    _write_json(asset_dir / "rephrase_ek100.json", rephrase)
    return counts


def write_labels(hoi_dir: Path, records: dict[str, list[dict]]) -> list[int]:
    """label_<uid>.pkl per action and video_info.json (the labelled uids). Returns the uids."""
    label_dir = hoi_dir / "labels"
    label_dir.mkdir(parents=True, exist_ok=True)
    uids = []
    for split in SPLITS:
        for r in records[split]:
            label = build_label(r["scene"], r["action"], r["obs_frames"])
            with open(label_dir / f"label_{r['uid']}.pkl", "wb") as f:
                pickle.dump(label, f, protocol=PICKLE_PROTOCOL)
            uids.append(r["uid"])
    _write_json(hoi_dir / "video_info.json", uids, indent=None)
    return uids


def build_metadata(scenes: list[VideoScene], records: dict[str, list[dict]], arguments: dict,
                   splits: dict[str, str], rgb_videos: list[str]) -> dict:
    """Generator metadata: per video its objects, per action target / hands / window / split."""
    by_id = {r["row"]["narration_id"]: r for split in SPLITS for r in records[split]}
    videos = []
    for scene in scenes:
        objects = [{
            "name": o.noun,
            "noun_class": scene_lib.NOUN_CLASSES[o.noun][0],
            "centre": [_round(o.centre[0] / FRAME_W), _round(o.centre[1] / FRAME_H)],
            "size": [_round(2 * o.half[0] / FRAME_W), _round(2 * o.half[1] / FRAME_H)],
            "bbox_px": list(o.bbox),
        } for o in scene.objects]
        actions = []
        for action in scene.actions:
            nid = f"{scene.video_id}_{action.index}"
            r = by_id[nid]
            actions.append({
                "narration_id": nid,
                "narration": r["row"]["narration"],
                "target": action.target,
                "target_name": scene.objects[action.target].noun,
                "sides": list(action.sides),
                "bimanual": len(action.sides) == 2,
                "start_frame": action.start_frame,
                "stop_frame": action.stop_frame,
                "obs_frame_indices": [int(f) for f in r["obs_frames"]],
                "last_obs_frame": int(r["obs_frames"][-1]),
                "grasp_norm": {s: [_round(p[0] / FRAME_W), _round(p[1] / FRAME_H)] for s, p in action.grasp.items()},
                "question_key": r["question_key"],
                "num_questions": len(action.question_purposes),
                "split": r["split"],
                "hoi_uid": r["uid"],
            })
        videos.append({
            "video_id": scene.video_id,
            "participant_id": scene.participant_id,
            "split": splits[scene.video_id],
            "fps": float(scene.fps),
            "num_frames": scene.num_frames,
            "duration": _round(scene.duration),
            "num_rgb_frames": scene.num_rgb_frames,
            "has_rgb_frames": scene.video_id in rgb_videos,
            "objects": objects,
            "actions": actions,
        })
    return {
        "generator": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "seed": arguments["seed"],
        "arguments": arguments,
        "frame_size": [FRAME_W, FRAME_H],
        "active_region_norm": list(scene_lib.ACTIVE_REGION_NORM),
        "splits": {split: [s.video_id for s in scenes if splits[s.video_id] == split] for split in SPLITS},
        "videos": videos,
    }


# ----------------------------------------------------------------------------------------------
# Rendering (multiprocessing over videos)
# ----------------------------------------------------------------------------------------------
def _render_task(task: tuple) -> str:
    scene, mp4_path, rgb_dir = task
    scene_lib.write_video_files(scene, Path(mp4_path), Path(rgb_dir) if rgb_dir else None, JPEG_QUALITY)
    return scene.video_id


def render_videos(tasks: list[tuple], workers: int) -> None:
    """Render and encode every video; a tqdm bar counts finished videos."""
    bar = tqdm(total=len(tasks), desc="SynthKitchens videos", unit="video")
    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                _render_task(task)
                bar.update()
        else:
            # spawn: no fork of a process that may hold OpenCV / tqdm threads.
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(workers, len(tasks)), initializer=scene_lib.init_render_worker) as pool:
                for _ in pool.imap_unordered(_render_task, tasks):
                    bar.update()
    finally:
        bar.close()


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def _clear_previous_output(out: Path) -> None:
    """Remove the subtrees of an earlier SynthKitchens run in ``out`` (never anything else)."""
    if not (out / METADATA_FILE).exists():
        return
    for sub in ("EPIC-KITCHENS", "annotations", "handsonvlm_assets", "hoi_forecast"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / METADATA_FILE).unlink()


def preprocess_source_args(out_dir) -> list[str]:
    """The ``pipelines/preprocess.py`` source flags that read a SynthKitchens tree written to ``out_dir``."""
    out = Path(out_dir)
    return ["--epic-root", str(out / "EPIC-KITCHENS"), "--annotations", str(out / "annotations"),
            "--questions", str(out / "handsonvlm_assets"), "--labels", str(out / "hoi_forecast" / "ek100")]


def generate(out_dir, videos: int = 24, seed: int = 0, actions_per_video: int = 12, fps: float = 30.0,
             rgb_frames: int = 0, workers: int = 2, *, write_videos: bool = True) -> dict:
    """Generate a SynthKitchens dataset under ``out_dir`` and return a summary.

    Args:
        out_dir: output root (created; the subtrees of an earlier SynthKitchens run are replaced).
        videos: number of videos (3 per participant: P01_01, P01_02, P01_03, P02_01, ...).
        seed: dataset seed; video i uses ``np.random.default_rng([seed, i])``.
        actions_per_video: annotated actions per video.
        fps: native frame rate of the MP4s.
        rgb_frames: extract 60-fps JPEG rgb_frames for the first K videos (sorted by id).
        workers: processes for rendering/encoding (outputs do not depend on it).
        write_videos: False skips MP4s and rgb_frames (annotations, labels and questions only).

    Returns:
        dict with ``out_dir``, per-split ``videos``/``actions``/``question_clips`` counts,
        ``rgb_frame_videos``, ``paths`` and ``seconds``.
    """
    if videos < 1 or actions_per_video < 1 or fps <= 0:
        raise ValueError("videos and actions_per_video must be >= 1 and fps > 0")
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous_output(out)
    arguments = {"videos": videos, "seed": seed, "actions_per_video": actions_per_video, "fps": float(fps),
                 "rgb_frames": rgb_frames, "write_videos": write_videos}

    ids = video_ids(videos)
    n_val = num_validation_videos(videos)
    splits = {vid: ("validation" if i >= videos - n_val else "train") for i, (_, vid) in enumerate(ids)}
    scenes = [scene_lib.sample_scene(seed, i, vid, pid, actions_per_video, fps, QUESTION_PROBS)
              for i, (pid, vid) in enumerate(ids)]

    records: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for scene in scenes:
        split = splits[scene.video_id]
        records[split].extend(_action_record(scene, a, split) for a in scene.actions)
    uid = 0  # hoi uid: train rows first, then validation rows (each sorted by narration_id strings)
    for split in SPLITS:
        records[split].sort(key=lambda r: r["row"]["narration_id"])
        for r in records[split]:
            r["uid"] = uid
            uid += 1

    rgb_videos = sorted(vid for _, vid in ids)[:max(0, rgb_frames)] if write_videos else []
    write_annotations(out / "annotations", records, scenes)
    question_counts = write_questions(out / "handsonvlm_assets", records)
    write_labels(out / "hoi_forecast" / "ek100", records)
    _write_json(out / METADATA_FILE, build_metadata(scenes, records, arguments, splits, rgb_videos))

    if write_videos:
        tasks = []
        for scene in scenes:
            root = out / "EPIC-KITCHENS" / scene.participant_id
            rgb_dir = root / "rgb_frames" / scene.video_id if scene.video_id in rgb_videos else None
            tasks.append((scene, str(root / "videos" / f"{scene.video_id}.MP4"), str(rgb_dir) if rgb_dir else None))
        render_videos(tasks, workers)

    return {
        "out_dir": str(out),
        "videos": {split: sum(1 for v in splits.values() if v == split) for split in SPLITS},
        "actions": {split: len(records[split]) for split in SPLITS},
        "question_clips": question_counts,
        "rgb_frame_videos": rgb_videos,
        "paths": {
            "epic_root": str(out / "EPIC-KITCHENS"),
            "annotations": str(out / "annotations"),
            "questions": str(out / "handsonvlm_assets"),
            "labels": str(out / "hoi_forecast" / "ek100"),
            "metadata": str(out / METADATA_FILE),
        },
        "seconds": round(time.perf_counter() - started, 2),
    }


# ----------------------------------------------------------------------------------------------
# Design check: how much does knowing the target object help?
# ----------------------------------------------------------------------------------------------
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
    fraction = scene_lib.min_jerk_profile(FUTURE_TIMES_S / scene_lib.REACH_S)
    return start[None, :] + fraction[:, None] * (goal - start)[None, :]


def _constant_velocity(past: np.ndarray) -> np.ndarray:
    """[4, 2] extrapolation of the last two observed points (0.25 s apart) [10, 2]."""
    step = past[-1] - past[-2]
    return past[-1][None, :] + np.arange(1, 5)[:, None] * step[None, :]


def language_gap_report(out_dir, split: str = "validation", seed: int = 0) -> dict:
    """ADE (normalised coordinates, 4 future points, active hands only) of reference predictors.

    * ``ade_constant_velocity`` (a): extrapolate the last two observed hand positions.
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
    out = Path(out_dir)
    meta = json.loads((out / METADATA_FILE).read_text(encoding="utf-8"))
    rng = np.random.default_rng(seed)
    errors = {"cv": [], "text_free": [], "text": [], "question_only": [], "shuffled_question": []}
    num_actions = 0
    for video in meta["videos"]:
        if video["split"] != split:
            continue
        centres = np.array([o["centre"] for o in video["objects"]], dtype=np.float64)  # normalised
        median = geometric_median(centres * FRAME_SIZE) / FRAME_SIZE
        names = [o["name"] for o in video["objects"]]
        for action in video["actions"]:
            with open(out / "hoi_forecast" / "ek100" / "labels" / f"label_{action['hoi_uid']}.pkl", "rb") as f:
                label = safe_pickle.loads(f.read())
            num_actions += 1
            past = {s: label["past_hand_centers"][s].astype(np.float64) / FRAME_SIZE for s in SIDES}
            nearest = min(SIDES, key=lambda s: np.linalg.norm((past[s][-1] - median) * FRAME_SIZE))
            target = centres[action["target"]]
            others = [n for i, n in enumerate(names) if i != action["target"]]
            spot = np.asarray(scene_lib.KITCHEN_LAYOUT_PX[names[action["target"]]]) / FRAME_SIZE
            wrong_spot = np.asarray(scene_lib.KITCHEN_LAYOUT_PX[others[int(rng.integers(len(others)))]]) / FRAME_SIZE
            for side in label["hand_trajs"]:
                truth = label["hand_trajs"][side]["traj"][FUTURE_POINTS].astype(np.float64) / FRAME_SIZE
                cv = _constant_velocity(past[side])
                home = np.asarray(scene_lib.HAND_HOME_NORM[side])
                preds = {
                    "cv": cv,
                    "text_free": _min_jerk_path(past[side][-1], median) if side == nearest else cv,
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output root directory")
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--actions-per-video", type=int, default=12)
    parser.add_argument("--fps", type=float, default=30.0, help="native MP4 frame rate")
    parser.add_argument("--rgb-frames", type=int, default=0, metavar="K",
                        help="also extract 60-fps rgb_frames JPEGs for the first K videos")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-videos", action="store_true", help="annotations, questions and labels only")
    args = parser.parse_args(argv)
    summary = generate(args.out, videos=args.videos, seed=args.seed, actions_per_video=args.actions_per_video,
                       fps=args.fps, rgb_frames=args.rgb_frames, workers=args.workers,
                       write_videos=not args.no_videos)
    print(f"SynthKitchens {GENERATOR_VERSION} -> {summary['out_dir']} ({summary['seconds']} s)")
    for split in SPLITS:
        print(f"  {split:<10} videos {summary['videos'][split]:>3}  actions {summary['actions'][split]:>4}"
              f"  clips with questions {summary['question_clips'][split]:>4}")
    if summary["rgb_frame_videos"]:
        print(f"  rgb_frames for {', '.join(summary['rgb_frame_videos'])}")
    if summary["actions"]["validation"]:
        gap = language_gap_report(args.out)
        print(f"  validation ADE: constant velocity {gap['ade_constant_velocity']:.4f}, "
              f"text-free oracle {gap['ade_text_free_oracle']:.4f}, text oracle {gap['ade_text_oracle']:.4f}, "
              f"question only {gap['ade_question_only']:.4f} (shuffled {gap['ade_shuffled_question']:.4f})")
    return summary


if __name__ == "__main__":
    main()
