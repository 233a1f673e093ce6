"""Reading the EPIC-KITCHENS-100 annotation CSVs (narrations, video info) into validated tables.

Bad rows never raise: they are returned in a :class:`~preprocessing.quarantine.Quarantine` with a
reason, and every good row is kept. Column formats: docs/DATA.md, "Inputs".
"""

from __future__ import annotations

import ast
import io

import numpy as np
import pandas as pd

from preprocessing import storage
from preprocessing.quarantine import Quarantine

SPLIT_FILES = {
    "train": "EPIC_100_train.csv",
    "validation": "EPIC_100_validation.csv",
    "test": "EPIC_100_test_timestamps.csv",
}
# hoi-forecast numbers EK-100 actions by row: train rows first, then validation, then test.
# Used for the uid offset when an earlier split's CSV is not available.
OFFICIAL_SPLIT_ROWS = {"train": 67217, "validation": 9668, "test": 13092}
SPLIT_ORDER = ("train", "validation", "test")

REQUIRED_COLUMNS = ("narration_id", "participant_id", "video_id", "start_timestamp", "stop_timestamp",
                    "start_frame", "stop_frame")
LABEL_COLUMNS = ("narration_timestamp", "narration", "verb", "verb_class", "noun", "noun_class",
                 "all_nouns", "all_noun_classes")
VIDEO_INFO_COLUMNS = ("video_id", "duration", "fps", "resolution")

_TIMESTAMP = r"^\s*(\d+):(\d{1,2}):(\d{1,2}(?:\.\d+)?)\s*$"
DECODE_ERROR_MARK = "\ufffd"  # what decoding with errors="replace" leaves for invalid UTF-8
# 10^8 frames are 19 days at 60 fps: far beyond any video, and every index derived from a frame number
# (observation and future windows, seconds away) stays inside the int32 columns of the index.
MAX_FRAME_NUMBER = 10**8
MAX_CLASS_ID = int(np.iinfo(np.int16).max)  # verb/noun classes are int16 columns


def parse_timestamps(values: pd.Series) -> np.ndarray:
    """``HH:MM:SS.ss`` strings to seconds (float64); unparsable or empty entries become NaN."""
    parts = values.astype("string").str.extract(_TIMESTAMP)
    hours, minutes, seconds = (pd.to_numeric(parts[i], errors="coerce").to_numpy(np.float64) for i in range(3))
    secs = hours * 3600.0 + minutes * 60.0 + seconds
    secs[(minutes >= 60) | (seconds >= 60)] = np.nan
    return secs


def format_timestamp(seconds: float, decimals: int = 2) -> str:
    """Seconds to EPIC's ``HH:MM:SS.ss`` (``decimals=3`` for narration timestamps)."""
    total = round(float(seconds), decimals)
    hours, rem = divmod(total, 3600.0)
    minutes, secs = divmod(rem, 60.0)
    return f"{int(hours):02d}:{int(minutes):02d}:{secs:0{3 + decimals}.{decimals}f}"


def _parse_list_literal(text: str, item_type: type) -> list | None:
    """``"['salt', 'pan']"`` -> ``['salt', 'pan']`` (ast.literal_eval: no code runs); None if invalid.

    For ``item_type=int`` the items must be class ids (0..MAX_CLASS_ID; not bools)."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, item_type) for v in value):
        return None
    if item_type is int and not all(not isinstance(v, bool) and 0 <= v <= MAX_CLASS_ID for v in value):
        return None
    return list(value)


def _rows_containing(df: pd.DataFrame, text: str) -> np.ndarray:
    """Bool per row: whether any cell holds ``text`` (shape [rows] also for a frame without rows)."""
    found = np.zeros(len(df), bool)
    for column in df.columns:
        found |= df[column].str.contains(text, regex=False, na=False).to_numpy(bool)
    return found


def _read_csv_text(uri: str, quarantine: Quarantine, split: str | None) -> pd.DataFrame | None:
    try:
        text = storage.read_bytes(uri).decode("utf-8", errors="replace")
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=False)
    except Exception as exc:  # unreadable file: the whole file is one quarantine row
        quarantine.add(uri, "bad_csv", f"cannot read CSV: {type(exc).__name__}: {exc}", split=split, source=uri)
        return None


def read_actions(uri: str, split: str, quarantine: Quarantine) -> tuple[pd.DataFrame, int]:
    """Parse a narration CSV into one validated row per action.

    Returns ``(actions, rows_read)``. ``actions`` has the columns ``narration_id, participant_id,
    video_id, split, split_row, narration_timestamp_s, start_timestamp_s, stop_timestamp_s,
    start_frame, stop_frame, narration, verb, verb_class, noun, noun_class, all_nouns,
    all_noun_classes`` (label columns are null where the CSV has none, as in the test split).
    ``split_row`` is the 0-based row in the file, the basis of hoi-forecast's uid.
    """
    df = _read_csv_text(uri, quarantine, split)
    if df is None:
        return _empty_actions(), 0
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        quarantine.add(uri, "bad_csv", f"missing required columns {missing}; has {list(df.columns)}",
                       split=split, source=uri)
        return _empty_actions(), len(df)
    n = len(df)
    out = pd.DataFrame({
        "narration_id": df["narration_id"].str.strip(),
        "participant_id": df["participant_id"].str.strip(),
        "video_id": df["video_id"].str.strip(),
        "split": split,
        "split_row": np.arange(n, dtype=np.int32),
        "start_timestamp_s": parse_timestamps(df["start_timestamp"]),
        "stop_timestamp_s": parse_timestamps(df["stop_timestamp"]),
        "start_frame": pd.to_numeric(df["start_frame"], errors="coerce"),
        "stop_frame": pd.to_numeric(df["stop_frame"], errors="coerce"),
    })
    if "narration_timestamp" in df.columns:
        out["narration_timestamp_s"] = parse_timestamps(df["narration_timestamp"])
    else:
        out["narration_timestamp_s"] = np.nan
    for col in ("narration", "verb", "noun"):
        out[col] = df[col].where(df[col] != "", None) if col in df.columns else None
    for col in ("verb_class", "noun_class"):
        out[col] = pd.to_numeric(df[col], errors="coerce") if col in df.columns else np.nan

    problems = pd.Series([""] * n, index=df.index, dtype=object)

    def flag(mask, message):
        mask = np.asarray(mask, dtype=bool) & (problems.to_numpy() == "")
        problems[mask] = message

    flag(_rows_containing(df, DECODE_ERROR_MARK), "invalid UTF-8 in row")
    flag((out["narration_id"] == "") | (out["video_id"] == "") | (out["participant_id"] == ""), "empty id field")
    ids_nest = [video.startswith(participant + "_") and narration.startswith(video + "_")
                for participant, video, narration in zip(out["participant_id"], out["video_id"], out["narration_id"])]
    flag(~np.array(ids_nest, bool),
         "ids disagree (narration_id must extend video_id, which must extend participant_id)")
    flag(np.isnan(out["start_timestamp_s"]) | np.isnan(out["stop_timestamp_s"]), "unparsable start/stop timestamp")
    flag(out["stop_timestamp_s"] < out["start_timestamp_s"], "stop_timestamp before start_timestamp")
    frames_ok = out["start_frame"].notna() & out["stop_frame"].notna()
    flag(~frames_ok, "start_frame/stop_frame is not an integer")
    frames_ok &= (out["start_frame"] % 1 == 0) & (out["stop_frame"] % 1 == 0)
    flag(~frames_ok, "start_frame/stop_frame is not an integer")
    flag(frames_ok & ((out["start_frame"] < 1) | (out["stop_frame"] < out["start_frame"])
                      | (out["stop_frame"] > MAX_FRAME_NUMBER)),
         f"frame numbers out of range (1 <= start_frame <= stop_frame <= {MAX_FRAME_NUMBER})")
    if "narration" in df.columns:
        flag(df["narration"].str.strip() == "", "empty narration")
    for col in ("verb_class", "noun_class"):
        if col in df.columns:
            flag(out[col].isna() | (out[col] % 1 != 0) | (out[col] < 0) | (out[col] > MAX_CLASS_ID),
                 f"{col} is not an integer in 0..{MAX_CLASS_ID}")

    all_nouns, all_noun_classes = [None] * n, [None] * n
    if "all_nouns" in df.columns and "all_noun_classes" in df.columns:
        for i, (nouns_text, classes_text) in enumerate(zip(df["all_nouns"], df["all_noun_classes"])):
            nouns, classes = _parse_list_literal(nouns_text, str), _parse_list_literal(classes_text, int)
            if (nouns is None or classes is None or len(nouns) != len(classes)) and problems.iat[i] == "":
                problems.iat[i] = (
                    f"all_nouns/all_noun_classes are not matching list literals: {nouns_text!r} {classes_text!r}"
                )
            all_nouns[i], all_noun_classes[i] = nouns, classes
    out["all_nouns"] = all_nouns
    out["all_noun_classes"] = all_noun_classes

    bad = problems != ""
    for i in np.flatnonzero(bad.to_numpy()):
        quarantine.add(df["narration_id"].iat[i] or f"row {i}", "bad_row", f"row {i + 2}: {problems.iat[i]}",
                       split=split, video_id=df["video_id"].iat[i] or None, source=uri)
    out = out[~bad]
    dup = out["narration_id"].duplicated(keep="first")
    for _, row in out[dup].iterrows():
        quarantine.add(row.narration_id, "duplicate_narration_id",
                       f"row {row.split_row + 2}: narration_id already used by an earlier row", split=split,
                       video_id=row.video_id, source=uri)
    out = out[~dup].copy()
    for col in ("start_frame", "stop_frame"):
        out[col] = out[col].astype(np.int32)
    for col in ("verb_class", "noun_class"):
        out[col] = out[col].astype("Int16")
    return out.reset_index(drop=True), n


def _empty_actions() -> pd.DataFrame:
    cols = ["narration_id", "participant_id", "video_id", "split", "split_row", "narration_timestamp_s",
            "start_timestamp_s", "stop_timestamp_s", "start_frame", "stop_frame", *LABEL_COLUMNS[1:]]
    return pd.DataFrame({c: [] for c in cols})


def read_video_info(uri: str, quarantine: Quarantine) -> pd.DataFrame:
    """``EPIC_100_video_info.csv`` indexed by video_id with float ``duration``/``fps`` (native) and
    ``width``/``height``. Rows with a non-positive or non-finite fps/duration are quarantined."""
    df = _read_csv_text(uri, quarantine, None)
    empty = pd.DataFrame(columns=["duration", "fps", "width", "height"], index=pd.Index([], name="video_id"))
    if df is None:
        return empty
    missing = [c for c in VIDEO_INFO_COLUMNS if c not in df.columns]
    if missing:
        quarantine.add(uri, "bad_csv", f"missing required columns {missing}", source=uri)
        return empty
    info = pd.DataFrame({
        "video_id": df["video_id"].str.strip(),
        "duration": pd.to_numeric(df["duration"], errors="coerce"),
        "fps": pd.to_numeric(df["fps"], errors="coerce"),
    })
    size = df["resolution"].str.extract(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
    info["width"] = pd.to_numeric(size[0], errors="coerce")
    info["height"] = pd.to_numeric(size[1], errors="coerce")
    ok = np.isfinite(info["fps"]) & (info["fps"] > 0) & np.isfinite(info["duration"]) & (info["duration"] > 0)
    for _, row in info[~ok].iterrows():
        quarantine.add(row.video_id, "bad_video_info",
                       f"fps={row.fps} duration={row.duration}: both must be positive numbers",
                       video_id=row.video_id, source=uri)
    info = info[ok].drop_duplicates("video_id", keep="first")
    return info.set_index("video_id")


def read_class_vocab(uri: str) -> dict[int, set[str]]:
    """``EPIC_100_{verb,noun}_classes.csv`` -> {class id: {key, *instances}} (the words of a class)."""
    df = pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype={"id": int, "key": str, "instances": str})
    return {cid: {key, *(_parse_list_literal(inst, str) or [])}
            for cid, key, inst in zip(df["id"], df["key"], df["instances"])}


def quarantine_class_mismatches(actions: pd.DataFrame, classes: dict[str, dict[int, set[str]]], split: str,
                                quarantine: Quarantine) -> pd.DataFrame:
    """Drop rows whose verb/noun text is not a word of their class id (a corrupted row)."""
    bad = np.zeros(len(actions), bool)
    details = [""] * len(actions)
    for kind, keys in classes.items():
        ids, texts = actions[f"{kind}_class"], actions[kind]
        for i, (cid, text) in enumerate(zip(ids, texts)):
            if pd.isna(cid) or text is None or bad[i]:
                continue
            words = keys.get(int(cid), set())
            if text not in words:
                bad[i] = True
                details[i] = f"{kind} {text!r} is not a word of {kind}_class {int(cid)} ({sorted(words)[:5]}...)"
    for i in np.flatnonzero(bad):
        row = actions.iloc[i]
        quarantine.add(row.narration_id, "bad_row", details[i], split=split, video_id=row.video_id)
    return actions[~bad].reset_index(drop=True)


def action_classes(actions: list[pd.DataFrame]) -> dict[tuple[int, int], int]:
    """hoi-forecast's action ids: the (verb_class, noun_class) pairs of train + validation, sorted
    by the *string* ``f"{verb}_{noun}"`` and numbered from 0 (checked against RULSTM's actions.csv)."""
    pairs = set()
    for df in actions:
        ok = df["verb_class"].notna() & df["noun_class"].notna()
        pairs.update(zip(df.loc[ok, "verb_class"].astype(int), df.loc[ok, "noun_class"].astype(int)))
    return {pair: i for i, pair in enumerate(sorted(pairs, key=lambda p: f"{p[0]}_{p[1]}"))}
