"""Arrow schemas of the stage outputs: the contract between preprocessing and training (docs/DATA.md).

Plain Arrow types only (no Ray tensor extension types, no pickled objects), so pyarrow, pandas,
DuckDB, Polars and Ray Data all read the shards. Tensors are nested ``fixed_size_list`` columns;
each also carries its shape in the field metadata (``shape``) for readers that flatten them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from handsonvlm.constants import EPIC_FRAME_HEIGHT, EPIC_FRAME_WIDTH, HOI_FORECAST_SIDES, NUM_HANDS
from preprocessing.window import NUM_OBS_FRAMES, NUM_TRACK_POINTS

SCHEMA_VERSION = 1
HAND_SIDES = HOI_FORECAST_SIDES  # row 0 = RIGHT, row 1 = LEFT (hoi-forecast order)
# hoi-forecast's normalisation plane: labels are pixels of the 456x256 rgb_frames image.
LABEL_IMAGE_WIDTH = EPIC_FRAME_WIDTH
LABEL_IMAGE_HEIGHT = EPIC_FRAME_HEIGHT
COORD_SPACE = "last_obs_frame_norm_456x256"


def fixed_tensor(value_type: pa.DataType, shape: tuple[int, ...]) -> pa.DataType:
    """Nested fixed_size_list type for a row-major tensor of ``shape``."""
    t = value_type
    for n in reversed(shape):
        t = pa.list_(t, n)
    return t


def tensor_field(name: str, value_type: pa.DataType, shape: tuple[int, ...], nullable: bool = False) -> pa.Field:
    return pa.field(name, fixed_tensor(value_type, shape), nullable=nullable,
                    metadata={"shape": str(list(shape)), "layout": "row-major"})


def tensor_array(values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """Arrow array of nested fixed-size lists from an ``[N, *shape]`` numpy array (vectorised).

    Tensor columns are never null: a null nested fixed_size_list does not survive a Parquet
    round trip in pyarrow 25, so missing values are expressed by companion ``*_valid`` masks.
    """
    values = np.ascontiguousarray(values)
    n, shape = values.shape[0], values.shape[1:]
    arr: pa.Array = pa.array(values.reshape(-1), type=value_type)
    for size in reversed(shape):
        arr = pa.FixedSizeListArray.from_arrays(arr, size)
    assert len(arr) == n
    return arr


def tensor_column(table: pa.Table, name: str, dtype=None) -> np.ndarray:
    """Inverse of :func:`tensor_array`: ``[N, *shape]`` numpy array of a non-null tensor column."""
    col = table.column(name).combine_chunks()
    shape = []
    t = col.type
    while pa.types.is_fixed_size_list(t):
        shape.append(t.list_size)
        t = t.value_type
    flat = col
    for _ in shape:
        flat = flat.flatten()
    out = flat.to_numpy(zero_copy_only=False).reshape(len(col), *shape)
    return out.astype(dtype) if dtype is not None else out


# Columns of the index stage (one row per action with a valid observation window).
INDEX_FIELDS = [
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("schema_version", pa.int16(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("narration_id", pa.string(), nullable=False),
    pa.field("participant_id", pa.string(), nullable=False),
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("split_row", pa.int32(), nullable=False),
    pa.field("hoi_uid", pa.int64()),
    pa.field("narration_timestamp_s", pa.float64()),
    pa.field("start_timestamp_s", pa.float64(), nullable=False),
    pa.field("stop_timestamp_s", pa.float64(), nullable=False),
    pa.field("start_frame", pa.int32(), nullable=False),
    pa.field("stop_frame", pa.int32(), nullable=False),
    pa.field("narration", pa.string()),  # null for the test split (no narrations published)
    pa.field("verb", pa.string()),
    pa.field("verb_class", pa.int16()),
    pa.field("noun", pa.string()),
    pa.field("noun_class", pa.int16()),
    pa.field("action_class", pa.int32()),  # hoi-forecast/RULSTM action id (train + validation pairs)
    pa.field("all_nouns", pa.list_(pa.string())),
    pa.field("all_noun_classes", pa.list_(pa.int16())),
    pa.field("native_fps", pa.float64()),
    pa.field("frames_fps", pa.float32(), nullable=False),
    pa.field("fps_convention", pa.string(), nullable=False),
    tensor_field("obs_frame_idx", pa.int32(), (NUM_OBS_FRAMES,)),
    tensor_field("obs_time_s", pa.float64(), (NUM_OBS_FRAMES,)),
    tensor_field("obs_frame_path", pa.string(), (NUM_OBS_FRAMES,)),
    tensor_field("future_frame_idx", pa.int32(), (NUM_TRACK_POINTS,)),
    pa.field("narration_paraphrases", pa.list_(pa.string()), nullable=False),
    pa.field("rbhp_questions", pa.list_(pa.string()), nullable=False),
    pa.field("label_source", pa.string(), nullable=False),
    tensor_field("future_hands", pa.float32(), (NUM_HANDS, NUM_TRACK_POINTS, 2)),
    tensor_field("future_point_valid", pa.bool_(), (NUM_HANDS, NUM_TRACK_POINTS)),
    tensor_field("future_valid", pa.bool_(), (NUM_HANDS,)),
    pa.field("contact_points", pa.list_(pa.list_(pa.float32(), 2)), nullable=False),
    # Hand centres at the observed frames where a source provides them (all-false mask otherwise).
    tensor_field("past_hands", pa.float32(), (NUM_HANDS, NUM_OBS_FRAMES, 2)),
    tensor_field("past_hands_valid", pa.bool_(), (NUM_HANDS, NUM_OBS_FRAMES)),
    pa.field("coord_space", pa.string(), nullable=False),
]

# The samples stage adds the pixels; everything else is copied from the index row.
MEDIA_FIELDS = [
    tensor_field("obs_jpeg", pa.binary(), (NUM_OBS_FRAMES,)),
    pa.field("frame_source", pa.string(), nullable=False),
    pa.field("image_width", pa.int16(), nullable=False),
    pa.field("image_height", pa.int16(), nullable=False),
]

_META = {b"schema_version": str(SCHEMA_VERSION).encode(), b"producer": b"handsonvlm-ray preprocessing"}
INDEX_SCHEMA = pa.schema(INDEX_FIELDS, metadata={**_META, b"table": b"handtraj_index"})
SAMPLES_SCHEMA = pa.schema(INDEX_FIELDS + MEDIA_FIELDS, metadata={**_META, b"table": b"handtraj_samples"})

QUARANTINE_SCHEMA = pa.schema([
    pa.field("stage", pa.string(), nullable=False),  # index | samples
    pa.field("split", pa.string()),
    pa.field("item", pa.string(), nullable=False),  # narration_id, file path, hoi uid, question key ...
    pa.field("video_id", pa.string()),
    pa.field("reason", pa.string(), nullable=False),  # a stable code, see docs/DATA.md
    pa.field("detail", pa.string(), nullable=False),  # a readable explanation
    pa.field("source", pa.string()),  # the input file the item came from
])
