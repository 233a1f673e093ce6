"""SynthKitchens generation: writes a tree laid out exactly like EPIC-KITCHENS-100 + hoi-forecast + HandsOnVLM.

Output tree (all paths relative to the output root)::

    EPIC-KITCHENS/PXX/videos/PXX_YY.MP4                    mp4v, 456x256, native rate = ``fps``
    EPIC-KITCHENS/PXX/rgb_frames/PXX_YY/frame_%010d.jpg    first ``rgb_frames`` videos only, 60-fps numbering
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
decoded frames are identical too.

RBHP coverage: by default each action gets 0, 1 or 3 reasoning questions as its scene drew them
(``scene.QUESTION_PROBS``: about 90 % of the actions have some). ``rbhp_coverage=F`` (CLI
``--rbhp-coverage F``; the real EPIC-100 question files cover about 19 % of the actions) instead
gives questions to exactly ``round(F * N)`` of each split's N actions, chosen with a random stream
of their own (``seed``, :data:`RBHP_COVERAGE_STREAM`, split): actions whose scene drew questions
are kept first, so a lower coverage keeps a subset of a higher one's questions, and an action
added beyond those draws its 1 or 3 purposes from the same stream. Scenes, videos, labels and
annotations do not change with the coverage; only the question files and the metadata's
``num_questions`` do. The scenes come from :mod:`synthkitchens.scene`, the media from
:mod:`synthkitchens.render`.
"""

from __future__ import annotations

import csv
import json
import math
import pickle
import shutil
import time
from pathlib import Path

import numpy as np

from handsonvlm.constants import EPIC_FRAME_HEIGHT, EPIC_FRAME_WIDTH, HOI_FORECAST_SIDES
from preprocessing.window import (
    LABEL_FPS,
    REFERENCE_FPS,
    frame_path,
    frame_time_s,
    future_frame_indices,
    observation_frame_indices,
)
from synthkitchens.render import render_videos
from synthkitchens.scene import (
    ACTIVE_REGION_NORM,
    DEFAULT_LAYOUT,
    LAYOUTS,
    NOUN_CLASSES,
    QUESTION_PROBS,
    VERB_CLASSES,
    VOCABULARY,
    Action,
    ObjectKind,
    VideoScene,
    sample_scene,
)

GENERATOR_NAME = "SynthKitchens"
GENERATOR_VERSION = "1.2.0"  # 1.1: objects near fixed per-class spots; 1.2: layout "random" (fitted unchanged)
METADATA_FILE = "synthkitchens.json"

VIDEOS_PER_PARTICIPANT = 3  # P01_01, P01_02, P01_03, P02_01, ...
VALIDATION_FRACTION = 0.2  # the last ~20 % of the videos (by id) form the validation split
PICKLE_PROTOCOL = 4
JSON_FLOAT_DIGITS = 6
# A label point counts as "in contact" from the contact time T_c on; one rgb frame of slack
# covers the float32 quirk that can put the last label frame one file before start_frame.
CONTACT_TOLERANCE_S = 1.5 / REFERENCE_FPS
QUESTION_STEMS = (  # the three stems of the released RBHP files
    "Where should my hand move to if I want to {infinitive}?",
    "Can you provide the hand trajectory for {gerund}?",
    "What is the recommended hand movement for {gerund}?",
)
QUESTION_SEPARATOR = "  \n"  # two spaces + newline, as in the released files
# Seed-sequence entry that separates the coverage draw from the scenes' streams ([seed, video index]),
# so that choosing which actions keep questions never shifts any other random draw.
RBHP_COVERAGE_STREAM = 0x52424850  # "RBHP"

ANNOTATION_COLUMNS = [
    "narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp",
    "stop_timestamp", "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun",
    "noun_class", "all_nouns", "all_noun_classes",
]
SPLITS = ("train", "validation")
# pipelines/preprocess.py reads a tree through these parts (flag --epic-root for "epic_root", ...).
SOURCE_PARTS = ("epic_root", "annotations", "questions", "labels")
QUESTION_FILES = {"train": "ek100_questions.json", "validation": "ek100_questions_val.json"}


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


def _normalised(x: float, y: float) -> list[float]:
    """A pixel position or size -> [x / 456, y / 256], rounded for the metadata JSON."""
    return [_round(x / EPIC_FRAME_WIDTH), _round(y / EPIC_FRAME_HEIGHT)]


def question_string(kind: ObjectKind, purposes: list[int]) -> str:
    """1 or 3 double-quoted RBHP questions joined by '  \\n' (stem k uses purpose ``purposes[k]``)."""
    questions = []
    for stem, purpose in zip(QUESTION_STEMS, purposes):
        infinitive, gerund = kind.purposes[purpose]
        questions.append('"' + stem.format(infinitive=infinitive, gerund=gerund) + '"')
    return QUESTION_SEPARATOR.join(questions)


# ----------------------------------------------------------------------------------------------
# Per-action records
# ----------------------------------------------------------------------------------------------
def _action_record(scene: VideoScene, action: Action, split: str) -> dict:
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
        "verb_class": VERB_CLASSES[kind.verb][0],
        "noun": kind.noun,
        "noun_class": NOUN_CLASSES[kind.noun][0],
        "all_nouns": str([kind.noun]),
        "all_noun_classes": str([NOUN_CLASSES[kind.noun][0]]),
    }
    return {
        "row": row,
        "split": split,
        "scene": scene,
        "action": action,
        "obs_frames": obs,
        "question_key": frame_path(scene.participant_id, scene.video_id, last_obs),
        "question_purposes": list(action.question_purposes),
        "question": question_string(kind, action.question_purposes) if action.question_purposes else None,
    }


def _added_question_purposes(rng: np.random.Generator, kind: ObjectKind) -> list[int]:
    """Purposes for an action given questions beyond its scene's draw: 1 or 3 of them, with the
    scene's odds of one question among actions that have any (``QUESTION_PROBS``)."""
    p_none, p_one = QUESTION_PROBS
    count = 1 if rng.random() < p_one / (1.0 - p_none) else len(QUESTION_STEMS)
    return [int(i) for i in rng.permutation(len(kind.purposes))[:count]]


def apply_rbhp_coverage(records: dict[str, list[dict]], coverage: float, seed: int) -> None:
    """Give RBHP questions to exactly ``round(coverage * N)`` of each split's N action records
    (in place: ``question_purposes`` and ``question``), deterministic in (``seed``, the records).

    Actions whose scene drew questions are chosen first (in random order), then the others, so
    the chosen set grows with ``coverage`` and an action keeps its scene's questions when chosen.
    """
    if not 0.0 <= coverage <= 1.0:
        raise ValueError(f"rbhp_coverage must lie in [0, 1], got {coverage}")
    for split_index, split in enumerate(SPLITS):
        split_records = records[split]
        rng = np.random.default_rng([seed, RBHP_COVERAGE_STREAM, split_index])
        with_questions = [r for r in split_records if r["question_purposes"]]
        without = [r for r in split_records if not r["question_purposes"]]
        priority = ([with_questions[i] for i in rng.permutation(len(with_questions))]
                    + [without[i] for i in rng.permutation(len(without))])
        chosen_count = int(math.floor(coverage * len(split_records) + 0.5))  # round half up
        for rank, r in enumerate(priority):
            kind = VOCABULARY[r["row"]["noun"]]
            if rank >= chosen_count:
                r["question_purposes"] = []
            elif not r["question_purposes"]:
                r["question_purposes"] = _added_question_purposes(rng, kind)
            purposes = r["question_purposes"]
            r["question"] = question_string(kind, purposes) if purposes else None


def build_label(scene: VideoScene, action: Action, obs_frames: np.ndarray) -> dict:
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
        "hand_trajs": {side: trajectory(hands[side]) for side in HOI_FORECAST_SIDES if side in action.sides},
        "obj_trajs": trajectory(np.tile(np.asarray(obj.centre, dtype=np.float64), (num, 1))),
        "affordance": affordance,
        "past_hand_centers": {side: past[side].astype(np.float32) for side in HOI_FORECAST_SIDES},
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
    resolution = f"{EPIC_FRAME_WIDTH}x{EPIC_FRAME_HEIGHT}"
    _write_csv(ann_dir / "EPIC_100_video_info.csv", ["video_id", "duration", "fps", "resolution"],
               [[s.video_id, _round(s.duration), float(s.fps), resolution] for s in scenes])
    for name, table in (("EPIC_100_verb_classes.csv", VERB_CLASSES),
                        ("EPIC_100_noun_classes.csv", NOUN_CLASSES)):
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


def label_file(hoi_dir, uid: int) -> Path:
    """The label pickle of hoi uid ``uid`` under ``hoi_dir`` (``hoi_forecast/ek100``)."""
    return Path(hoi_dir) / "labels" / f"label_{uid}.pkl"


def write_labels(hoi_dir: Path, records: dict[str, list[dict]]) -> list[int]:
    """label_<uid>.pkl per action and video_info.json (the labelled uids). Returns the uids."""
    (hoi_dir / "labels").mkdir(parents=True, exist_ok=True)
    uids = []
    for split in SPLITS:
        for r in records[split]:
            label = build_label(r["scene"], r["action"], r["obs_frames"])
            with open(label_file(hoi_dir, r["uid"]), "wb") as f:
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
            "noun_class": NOUN_CLASSES[o.noun][0],
            "centre": _normalised(*o.centre),
            "size": _normalised(2 * o.half[0], 2 * o.half[1]),
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
                "grasp_norm": {s: _normalised(*p) for s, p in action.grasp.items()},
                "question_key": r["question_key"],
                "num_questions": len(r["question_purposes"]),
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
        "frame_size": [EPIC_FRAME_WIDTH, EPIC_FRAME_HEIGHT],
        "active_region_norm": list(ACTIVE_REGION_NORM),
        "splits": {split: [s.video_id for s in scenes if splits[s.video_id] == split] for split in SPLITS},
        "videos": videos,
    }


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------
def tree_paths(out_dir) -> dict[str, Path]:
    """Where the parts of a SynthKitchens tree written to ``out_dir`` lie (SOURCE_PARTS + metadata)."""
    out = Path(out_dir)
    return {
        "epic_root": out / "EPIC-KITCHENS",
        "annotations": out / "annotations",
        "questions": out / "handsonvlm_assets",
        "labels": out / "hoi_forecast" / "ek100",
        "metadata": out / METADATA_FILE,
    }


def preprocess_source_args(out_dir) -> list[str]:
    """The ``pipelines/preprocess.py`` source flags that read a SynthKitchens tree written to ``out_dir``."""
    paths = tree_paths(out_dir)
    return [arg for part in SOURCE_PARTS for arg in ("--" + part.replace("_", "-"), str(paths[part]))]


def _clear_previous_output(out: Path) -> None:
    """Remove the subtrees of an earlier SynthKitchens run in ``out`` (never anything else)."""
    paths = tree_paths(out)
    if not paths["metadata"].exists():
        return
    for subtree in sorted({paths[part].relative_to(out).parts[0] for part in SOURCE_PARTS}):
        shutil.rmtree(out / subtree, ignore_errors=True)
    paths["metadata"].unlink()


def generate(out_dir, videos: int = 24, seed: int = 0, actions_per_video: int = 12, fps: float = 30.0,
             rgb_frames: int = 0, workers: int = 2, *, write_videos: bool = True,
             rbhp_coverage: float | None = None, layout: str = DEFAULT_LAYOUT) -> dict:
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
        rbhp_coverage: the fraction of each split's actions that get RBHP questions (exactly
            ``round(F * N)``, see the module docstring); None keeps the scenes' own draw (~90 %).
        layout: where the objects lie (``scene.LAYOUTS``): ``fitted`` near per-class spots,
            ``random`` anywhere on the counter (fewer, larger objects); recorded in the metadata.

    Returns:
        dict with ``out_dir``, per-split ``videos``/``actions``/``question_clips`` counts,
        ``rgb_frame_videos``, ``paths`` and ``seconds``.
    """
    if videos < 1 or actions_per_video < 1 or fps <= 0:
        raise ValueError("videos and actions_per_video must be >= 1 and fps > 0")
    if rbhp_coverage is not None and not 0.0 <= rbhp_coverage <= 1.0:
        raise ValueError(f"rbhp_coverage must lie in [0, 1], got {rbhp_coverage}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear_previous_output(out)
    paths = tree_paths(out)
    arguments = {"videos": videos, "seed": seed, "actions_per_video": actions_per_video, "fps": float(fps),
                 "rgb_frames": rgb_frames, "write_videos": write_videos, "layout": layout}
    if rbhp_coverage is not None:  # recorded only when given, so a default tree's metadata stays as before
        arguments["rbhp_coverage"] = float(rbhp_coverage)

    ids = video_ids(videos)
    n_val = num_validation_videos(videos)
    splits = {vid: ("validation" if i >= videos - n_val else "train") for i, (_, vid) in enumerate(ids)}
    scenes = [sample_scene(seed, i, vid, pid, actions_per_video, fps, layout=layout)
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
    if rbhp_coverage is not None:
        apply_rbhp_coverage(records, rbhp_coverage, seed)

    rgb_videos = sorted(vid for _, vid in ids)[:max(0, rgb_frames)] if write_videos else []
    write_annotations(paths["annotations"], records, scenes)
    question_counts = write_questions(paths["questions"], records)
    write_labels(paths["labels"], records)
    _write_json(paths["metadata"], build_metadata(scenes, records, arguments, splits, rgb_videos))

    if write_videos:
        tasks = []
        for scene in scenes:
            root = paths["epic_root"] / scene.participant_id
            rgb_dir = root / "rgb_frames" / scene.video_id if scene.video_id in rgb_videos else None
            tasks.append((scene, str(root / "videos" / f"{scene.video_id}.MP4"), str(rgb_dir) if rgb_dir else None))
        render_videos(tasks, workers)

    return {
        "out_dir": str(out),
        "videos": {split: sum(1 for v in splits.values() if v == split) for split in SPLITS},
        "actions": {split: len(records[split]) for split in SPLITS},
        "question_clips": question_counts,
        "rgb_frame_videos": rgb_videos,
        "paths": {part: str(path) for part, path in paths.items()},
        "seconds": round(time.perf_counter() - started, 2),
    }
