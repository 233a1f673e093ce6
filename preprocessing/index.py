"""The index stage: annotations + language assets + labels -> one row per observable action.

No media is read. The result is a table per split (``INDEX_SCHEMA``) that the samples stage turns
into self-contained training shards by adding the pixels of the 10 observed frames.
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from preprocessing import epic, storage
from preprocessing.labels import HandTargets, HoiLabels, LabelError, future_point_valid, missing_targets
from preprocessing.quarantine import Quarantine
from preprocessing.questions import PARAPHRASE_FILE, QUESTION_FILES, load_paraphrases, load_questions
from preprocessing.schema import COORD_SPACE, INDEX_SCHEMA, NUM_HANDS, SCHEMA_VERSION, tensor_array
from preprocessing.window import (
    NUM_OBS_FRAMES,
    NUM_TRACK_POINTS,
    action_is_observable,
    convention_fps,
    frame_path,
    frame_time_s,
    future_frame_indices,
    observation_frame_indices,
    rgb_frames_fps,
)

log = logging.getLogger(__name__)
LABEL_IO_THREADS = 16  # label pickles are many small reads (object stores reward concurrency)


@dataclass
class IndexConfig:
    annotations: str  # directory with the EPIC_100_*.csv files
    splits: tuple[str, ...] = ("train", "validation")
    questions: str | None = None  # directory with ek100_questions*.json and rephrase_ek100.json
    labels: str | None = None  # hoi-forecast data/ek100 directory (video_info.json, labels/)
    fps_convention: str = "hoi60"
    csv_overrides: dict[str, str] = field(default_factory=dict)  # split -> CSV path

    def csv_uri(self, split: str) -> str:
        return self.csv_overrides.get(split) or storage.join(self.annotations, epic.SPLIT_FILES[split])


@dataclass
class IndexResult:
    tables: dict[str, pa.Table]
    quarantine: Quarantine
    stats: dict[str, dict]  # per split: read / written / skipped / quarantined counts


def _split_uid_ranges(cfg: IndexConfig, rows_read: dict[str, int]) -> dict[str, tuple[int, int]]:
    """hoi-forecast uid = row + number of rows of the earlier splits (train, validation, test).

    Returns split -> [first uid, end uid). Splits not being processed count with their CSV's rows
    when the file is there, else with the official EPIC-100 row counts.
    """
    ranges, total = {}, 0
    for split in epic.SPLIT_ORDER:
        if split in rows_read:
            count = rows_read[split]
        elif storage.exists(cfg.csv_uri(split)):
            count = len(pd.read_csv(io.BytesIO(storage.read_bytes(cfg.csv_uri(split))), usecols=[0]))
        else:
            count = epic.OFFICIAL_SPLIT_ROWS[split]
        ranges[split] = (total, total + count)
        total += count
    return ranges


def _fetch_labels(labels: HoiLabels, uids: list[int], split: str) -> list[HandTargets | LabelError | None]:
    def one(uid):
        try:
            return labels.get(uid, split)
        except LabelError as exc:
            return exc

    with ThreadPoolExecutor(LABEL_IO_THREADS) as pool:
        return list(pool.map(one, uids))


def _stack(arrays: list[np.ndarray], shape: tuple[int, ...], dtype) -> np.ndarray:
    """``[N, *shape]``; an empty list gives a ``[0, *shape]`` array (a split with no rows)."""
    return np.stack(arrays).astype(dtype, copy=False) if arrays else np.zeros((0, *shape), dtype)


def build_index(cfg: IndexConfig) -> IndexResult:
    quarantine = Quarantine("index")
    video_info = epic.read_video_info(storage.join(cfg.annotations, "EPIC_100_video_info.csv"), quarantine)
    questions: dict[str, list[str]] = {}
    paraphrases: dict[str, list[str]] = {}
    if cfg.questions:
        for split, name in QUESTION_FILES.items():
            uri = storage.join(cfg.questions, name)
            if storage.exists(uri):
                questions.update(load_questions(uri, quarantine, split))
        if storage.exists(storage.join(cfg.questions, PARAPHRASE_FILE)):
            paraphrases = load_paraphrases(storage.join(cfg.questions, PARAPHRASE_FILE), quarantine)
    labels = HoiLabels(cfg.labels) if cfg.labels else None

    classes = {kind: epic.read_class_vocab(uri) for kind in ("verb", "noun")
               if storage.exists(uri := storage.join(cfg.annotations, f"EPIC_100_{kind}_classes.csv"))}
    actions, rows_read = {}, {}
    for split in cfg.splits:
        actions[split], rows_read[split] = epic.read_actions(cfg.csv_uri(split), split, quarantine)
        actions[split] = epic.quarantine_class_mismatches(actions[split], classes, split, quarantine)
    ranges = _split_uid_ranges(cfg, rows_read)
    # Action ids number the pairs of train + validation, so read the split not being processed too.
    labelled_splits = [actions[s] if s in actions else epic.read_actions(cfg.csv_uri(s), s, Quarantine("unused"))[0]
                       for s in ("train", "validation") if s in actions or storage.exists(cfg.csv_uri(s))]
    action_ids = epic.action_classes(labelled_splits)

    tables, stats = {}, {}
    for split in cfg.splits:
        df = actions[split]
        df["hoi_uid"] = df["split_row"].astype(np.int64) + ranges[split][0]
        df["action_class"] = [action_ids.get((int(v), int(n))) if pd.notna(v) and pd.notna(n) else None
                              for v, n in zip(df["verb_class"], df["noun_class"])]
        tables[split], stats[split] = _index_split(df, split, rows_read[split], cfg, video_info, questions,
                                                   paraphrases, labels, quarantine)
    if labels is not None and labels.labelled_uids is not None:
        _quarantine_orphan_labels(labels, ranges, quarantine)
    for split in cfg.splits:
        stats[split]["quarantined"] = quarantine.counts(split, actions_only=True)
    return IndexResult(tables, quarantine, stats)


def _quarantine_orphan_labels(labels: HoiLabels, ranges: dict[str, tuple[int, int]], quarantine: Quarantine):
    """Labels whose uid is no row of any split: they belong to no action at all."""
    end = max(hi for _, hi in ranges.values())
    for uid in sorted(labels.labelled_uids):
        if not 0 <= uid < end:
            quarantine.add(f"uid {uid}", "orphan_label",
                           f"label uid {uid} matches no annotation row (the splits hold uids 0..{end - 1})",
                           source=labels.root)


def _index_split(df, split, n_read, cfg, video_info, questions, paraphrases, labels, quarantine):
    stats = {"read": int(n_read), "skipped": {}}
    known = df["video_id"].isin(video_info.index)
    for _, row in df[~known].iterrows():
        quarantine.add(row.narration_id, "unknown_video", f"video {row.video_id} is not in EPIC_100_video_info.csv",
                       split=split, video_id=row.video_id)
    df = df[known]
    duration = video_info.loc[df["video_id"], "duration"].to_numpy()
    late = df["start_timestamp_s"].to_numpy() > duration
    for (_, row), dur in zip(df[late].iterrows(), duration[late]):
        quarantine.add(row.narration_id, "action_past_video_end",
                       f"starts at {row.start_timestamp_s:.2f} s, video lasts {dur:.2f} s", split=split,
                       video_id=row.video_id)
    df = df[~late]
    observable = action_is_observable(df["start_timestamp_s"].to_numpy())
    if (~observable).any():
        stats["skipped"]["starts_before_1s"] = int((~observable).sum())
    df = df[observable].reset_index(drop=True)

    fps = np.array([convention_fps(v, cfg.fps_convention) for v in df["video_id"]], dtype=np.float64)
    obs_idx = observation_frame_indices(df["start_frame"].to_numpy(), fps).reshape(-1, NUM_OBS_FRAMES)
    obs_time = frame_time_s(obs_idx, fps[:, None])
    # explicit width: a split left with no action (e.g. its CSV lacks columns) must still index
    future_idx = future_frame_indices(obs_idx[:, -1], fps).reshape(len(df), NUM_TRACK_POINTS)
    obs_paths = [[frame_path(p, v, i) for i in idx] for p, v, idx in zip(df["participant_id"], df["video_id"], obs_idx)]

    targets: list[HandTargets] = [missing_targets() for _ in range(len(df))]
    keep = np.ones(len(df), bool)
    if labels is not None:
        fetched = _fetch_labels(labels, [int(u) for u in df["hoi_uid"]], split)
        for i, result in enumerate(fetched):
            row = df.iloc[i]
            if isinstance(result, LabelError):
                quarantine.add(row.narration_id, result.reason, f"label uid {row.hoi_uid}: {result.detail}",
                               split=split, video_id=row.video_id, source=labels.pickle_uri(int(row.hoi_uid)))
                keep[i] = False
            elif result is not None:
                if result.first_frame is not None and result.first_frame != obs_idx[i, -1]:
                    quarantine.add(row.narration_id, "label_window_mismatch",
                                   f"label uid {row.hoi_uid} starts at frame {result.first_frame}, the last observed "
                                   f"frame is {obs_idx[i, -1]} (fps_convention={cfg.fps_convention})",
                                   split=split, video_id=row.video_id, source=labels.pickle_uri(int(row.hoi_uid)))
                    keep[i] = False
                else:
                    targets[i] = result
    df, targets = df[keep].reset_index(drop=True), [t for t, k in zip(targets, keep) if k]
    obs_idx, obs_time, future_idx, fps = obs_idx[keep], obs_time[keep], future_idx[keep], fps[keep]
    obs_paths = [p for p, k in zip(obs_paths, keep) if k]

    n = len(df)
    no_past = np.zeros((NUM_HANDS, NUM_OBS_FRAMES, 2), np.float32)  # real hoi-forecast labels carry no past track
    no_past_valid = np.zeros((NUM_HANDS, NUM_OBS_FRAMES), bool)
    future_hands = _stack([t.future_hands for t in targets], (NUM_HANDS, NUM_TRACK_POINTS, 2), np.float32)
    future_valid = _stack([t.future_valid for t in targets], (NUM_HANDS,), bool)
    past = _stack([no_past if t.past_hands is None else t.past_hands for t in targets], no_past.shape, np.float32)
    past_valid = _stack([no_past_valid if t.past_hands_valid is None else t.past_hands_valid for t in targets],
                        no_past_valid.shape, bool)
    frames_fps = np.array([rgb_frames_fps(v) for v in df["video_id"]], dtype=np.float32)
    last_paths = [p[-1] for p in obs_paths]

    columns = {
        "sample_id": pa.array(df["narration_id"], pa.string()),
        "schema_version": pa.array(np.full(n, SCHEMA_VERSION, np.int16)),
        "split": pa.array([split] * n, pa.string()),
        "narration_id": pa.array(df["narration_id"], pa.string()),
        "participant_id": pa.array(df["participant_id"], pa.string()),
        "video_id": pa.array(df["video_id"], pa.string()),
        "split_row": pa.array(df["split_row"].astype(np.int32)),
        "hoi_uid": pa.array(df["hoi_uid"].astype(np.int64)),
        "narration_timestamp_s": pa.array(df["narration_timestamp_s"].astype(np.float64), from_pandas=True),
        "start_timestamp_s": pa.array(df["start_timestamp_s"].astype(np.float64)),
        "stop_timestamp_s": pa.array(df["stop_timestamp_s"].astype(np.float64)),
        "start_frame": pa.array(df["start_frame"].astype(np.int32)),
        "stop_frame": pa.array(df["stop_frame"].astype(np.int32)),
        "narration": pa.array(df["narration"].tolist(), pa.string()),
        "verb": pa.array(df["verb"].tolist(), pa.string()),
        "verb_class": pa.array(df["verb_class"].astype("Int16"), pa.int16(), from_pandas=True),
        "noun": pa.array(df["noun"].tolist(), pa.string()),
        "noun_class": pa.array(df["noun_class"].astype("Int16"), pa.int16(), from_pandas=True),
        "action_class": pa.array(df["action_class"].tolist(), pa.int32()),
        "all_nouns": pa.array(df["all_nouns"].tolist(), pa.list_(pa.string())),
        "all_noun_classes": pa.array(df["all_noun_classes"].tolist(), pa.list_(pa.int16())),
        "native_fps": pa.array(video_info.loc[df["video_id"], "fps"].to_numpy(np.float64)),
        "frames_fps": pa.array(frames_fps),
        "fps_convention": pa.array([cfg.fps_convention] * n, pa.string()),
        "obs_frame_idx": tensor_array(obs_idx.astype(np.int32), pa.int32()),
        "obs_time_s": tensor_array(obs_time.astype(np.float64), pa.float64()),
        "obs_frame_path": tensor_array(np.array(obs_paths, dtype=object).reshape(n, NUM_OBS_FRAMES), pa.string()),
        "future_frame_idx": tensor_array(future_idx.astype(np.int32), pa.int32()),
        "narration_paraphrases": pa.array([paraphrases.get(x, []) if x else [] for x in df["narration"]],
                                          pa.list_(pa.string())),
        "rbhp_questions": pa.array([questions.get(p, []) for p in last_paths], pa.list_(pa.string())),
        "label_source": pa.array([t.source for t in targets], pa.string()),
        "future_hands": tensor_array(future_hands.astype(np.float32), pa.float32()),
        "future_point_valid": tensor_array(future_point_valid(future_hands, future_valid), pa.bool_()),
        "future_valid": tensor_array(future_valid.astype(bool), pa.bool_()),
        "contact_points": pa.array([t.contact_points.tolist() for t in targets], pa.list_(pa.list_(pa.float32(), 2))),
        "past_hands": tensor_array(past.astype(np.float32), pa.float32()),
        "past_hands_valid": tensor_array(past_valid, pa.bool_()),
        "coord_space": pa.array([COORD_SPACE] * n, pa.string()),
    }
    table = pa.Table.from_arrays([columns[f.name] for f in INDEX_SCHEMA], schema=INDEX_SCHEMA)
    stats.update({
        "written": n,
        "labelled": int(sum(t.source != "none" for t in targets)),
        "with_questions": int(sum(bool(questions.get(p)) for p in last_paths)),
        "with_paraphrases": int(sum(bool(x and paraphrases.get(x)) for x in df["narration"])),
    })
    return table, stats
