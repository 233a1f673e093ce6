"""Bad input is never fatal and never silently dropped: it becomes a quarantine row with a reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import pyarrow as pa

from preprocessing import storage
from preprocessing.schema import QUARANTINE_SCHEMA

# Stable reason codes (documented in docs/DATA.md). Each quarantine row carries one of these
# plus a free-text detail.
REASONS = {
    "bad_csv": "an annotation CSV is unreadable or lacks required columns",
    "bad_row": "an annotation row has an unparsable or out-of-range field",
    "duplicate_narration_id": "a narration_id seen earlier in the same split",
    "unknown_video": "the action's video is not in EPIC_100_video_info.csv",
    "bad_video_info": "a video_info row has an unusable fps or duration",
    "action_past_video_end": "the action starts after the video's duration",
    "unsafe_pickle": "a pickle references a type outside the allow-list",
    "label_unreadable": "a label file is corrupt or has an unexpected structure",
    "label_window_mismatch": "the label's first frame is not the last observed frame",
    "bad_trajectory": "a trajectory holds NaN/inf or has the wrong shape",
    "orphan_label": "a label whose hoi uid matches no action of the processed splits",
    "malformed_question": "an RBHP question entry that is not a usable string",
    "video_missing": "neither rgb_frames nor an MP4 exist for the video",
    "video_unreadable": "the video file is empty, truncated or not a video",
    "fps_mismatch": "video_info's fps disagrees with the container's fps",
    "frame_past_end": "an observation frame lies past the end of the video",
    "frame_missing": "an rgb_frames JPEG is missing",
    "frame_corrupt": "a frame could not be decoded",
}

# Reasons that reject a file, a video_info row, a label or a question rather than one action;
# they are left out of the per-split action counts (read = written + skipped + quarantined).
NON_ACTION_REASONS = frozenset({"bad_csv", "bad_video_info", "orphan_label", "malformed_question"})


@dataclass
class QuarantineRow:
    stage: str
    item: str
    reason: str
    detail: str
    split: str | None = None
    video_id: str | None = None
    source: str | None = None

    def __post_init__(self):
        if self.reason not in REASONS:
            raise ValueError(f"unknown quarantine reason {self.reason!r}")


class Quarantine:
    """Collects quarantine rows of one stage/unit of work and writes them as one Parquet file."""

    def __init__(self, stage: str):
        self.stage = stage
        self.rows: list[QuarantineRow] = []

    def add(self, item: str, reason: str, detail: str, **kw) -> None:
        self.rows.append(QuarantineRow(stage=self.stage, item=str(item), reason=reason, detail=str(detail), **kw))

    def counts(self, split: str | None = None, actions_only: bool = False) -> dict[str, int]:
        return dict(Counter(r.reason for r in self.rows if (split is None or r.split == split)
                            and not (actions_only and r.reason in NON_ACTION_REASONS)))

    def to_table(self) -> pa.Table:
        return pa.Table.from_pylist([asdict(r) for r in self.rows], schema=QUARANTINE_SCHEMA)

    def write(self, uri: str) -> None:
        """Write the rows (an empty file too, so a re-run replaces stale rows)."""
        storage.write_parquet_atomic(self.to_table(), uri)

    def __len__(self) -> int:
        return len(self.rows)
