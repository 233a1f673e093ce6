"""The samples stage's unit of work: one shard = up to ``shard_size`` actions of one video.

:func:`process_shard` is plain Python (no Ray): the Ray Data job maps it over shard specs, and a
benchmark can run it in a bare process pool. It is idempotent: outputs are written atomically in
the order samples -> quarantine -> done marker, and a shard whose done marker carries the same
fingerprint is not redone.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from handsonvlm.constants import EPIC_FRAME_HEIGHT
from preprocessing import layout, storage
from preprocessing.media import FrameError, RgbFramesReader, VideoFileReader, decode_jpeg, locate_source
from preprocessing.quarantine import Quarantine
from preprocessing.schema import INDEX_SCHEMA, SAMPLES_SCHEMA, tensor_array, tensor_column
from preprocessing.window import NUM_OBS_FRAMES


@dataclass(frozen=True)
class MediaConfig:
    epic_root: str
    out: str
    frame_height: int = EPIC_FRAME_HEIGHT  # 0 keeps the decoded resolution
    jpeg_quality: int = 90

    def fingerprint_salt(self) -> str:
        schema = SAMPLES_SCHEMA.metadata[b"schema_version"].decode()
        return f"h={self.frame_height};q={self.jpeg_quality};schema={schema}"


def table_to_ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def ipc_to_table(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(io.BytesIO(data)).read_all()


def shard_fingerprint(rows_ipc: bytes, media: MediaConfig) -> str:
    """Changes whenever the shard's index rows or the media settings change."""
    return hashlib.sha256(rows_ipc + media.fingerprint_salt().encode()).hexdigest()[:24]


def is_done(paths: dict[str, str], fingerprint: str, output: str = "samples") -> bool:
    """Whether a shard's ``output`` file and its done marker exist and the marker matches ``fingerprint``."""
    if not (storage.exists(paths["done"]) and storage.exists(paths[output])):
        return False
    try:
        return storage.read_json(paths["done"]).get("fingerprint") == fingerprint
    except (ValueError, OSError):
        return False


def _open_reader(rows: pa.Table, media: MediaConfig):
    participant_id = rows.column("participant_id")[0].as_py()
    video_id = rows.column("video_id")[0].as_py()
    located = locate_source(media.epic_root, participant_id, video_id)
    if located is None:
        raise FrameError("video_missing", f"no {participant_id}/rgb_frames/{video_id}/ and no "
                                          f"{participant_id}/videos/{video_id}.MP4 under {media.epic_root}")
    kind, uri = located
    if kind == "rgb_frames":
        return RgbFramesReader(uri, media.frame_height, media.jpeg_quality), None
    local = storage.local_copy(uri)
    path = local.__enter__()
    try:
        reader = VideoFileReader(path, rows.column("frames_fps")[0].as_py(), rows.column("native_fps")[0].as_py(),
                                 media.frame_height, media.jpeg_quality)
    except BaseException:
        local.__exit__(None, None, None)
        raise
    return reader, local


def process_shard(split: str, shard_id: str, rows_ipc: bytes, fingerprint: str, media: MediaConfig) -> dict:
    """Decode the observation frames of one shard's actions and write its sample Parquet file.

    Returns a summary: ``{split, shard_id, rows, written, quarantined: {reason: n}, frame_source,
    seconds, skipped}``.
    """
    t0 = time.perf_counter()
    paths = layout.sample_shard_paths(media.out, split, shard_id)
    rows = ipc_to_table(rows_ipc)
    quarantine = Quarantine("samples")
    video_id = rows.column("video_id")[0].as_py()
    obs_idx = tensor_column(rows, "obs_frame_idx")  # [N, 10]
    frames: dict[int, bytes | FrameError] = {}
    reader_kind = None
    try:
        reader, local = _open_reader(rows, media)
        reader_kind = reader.source
        try:
            frames = reader.read(obs_idx.reshape(-1))
        finally:
            if local is not None:
                local.__exit__(None, None, None)
    except FrameError as exc:  # the whole video is unusable: every action of the shard is quarantined
        for narration_id in rows.column("narration_id").to_pylist():
            quarantine.add(narration_id, exc.reason, exc.detail, split=split, video_id=video_id)

    keep = np.zeros(rows.num_rows, bool)
    jpegs = np.empty((rows.num_rows, NUM_OBS_FRAMES), dtype=object)
    if frames:
        for i, narration_id in enumerate(rows.column("narration_id").to_pylist()):
            errors = [frames[int(n)] for n in obs_idx[i] if isinstance(frames[int(n)], FrameError)]
            if errors:
                first = errors[0]
                quarantine.add(narration_id, first.reason,
                               f"{len(errors)} of {NUM_OBS_FRAMES} observation frames unreadable; "
                               f"first: {first.detail}",
                               split=split, video_id=video_id)
                continue
            jpegs[i] = [frames[int(n)] for n in obs_idx[i]]
            keep[i] = True

    kept = rows.filter(pa.array(keep))
    width = height = np.zeros(0, np.int16)
    if kept.num_rows:
        first_frame = decode_jpeg(jpegs[keep][0, -1])
        height, width = (np.full(kept.num_rows, s, np.int16) for s in first_frame.shape[:2])
    table = kept.select([f.name for f in INDEX_SCHEMA])
    obs_jpeg = tensor_array(jpegs[keep].reshape(-1, NUM_OBS_FRAMES), pa.binary())
    table = table.append_column(SAMPLES_SCHEMA.field("obs_jpeg"), obs_jpeg)
    frame_source = pa.array([reader_kind] * kept.num_rows, pa.string())
    table = table.append_column(SAMPLES_SCHEMA.field("frame_source"), frame_source)
    table = table.append_column(SAMPLES_SCHEMA.field("image_width"), pa.array(width, pa.int16()))
    table = table.append_column(SAMPLES_SCHEMA.field("image_height"), pa.array(height, pa.int16()))
    table = table.cast(SAMPLES_SCHEMA)

    storage.write_parquet_atomic(table, paths["samples"], row_group_size=layout.SAMPLES_ROW_GROUP_ROWS)
    quarantine.write(paths["quarantine"])
    summary = {
        "split": split, "shard_id": shard_id, "rows": rows.num_rows, "written": table.num_rows,
        "quarantined": quarantine.counts(), "frame_source": reader_kind, "skipped": False,
        "fingerprint": fingerprint, "seconds": round(time.perf_counter() - t0, 3),
    }
    storage.write_json_atomic(paths["done"], summary)
    return summary


def done_summary(paths: dict[str, str]) -> dict:
    summary = dict(storage.read_json(paths["done"]))
    summary["skipped"] = True
    return summary
