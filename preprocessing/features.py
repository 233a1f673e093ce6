"""The ``features`` stage: the frozen vision tower runs once over the sample shards and its pooled
per-frame features are cached, so training can skip CLIP.

For every sample row: decode the ``obs_jpeg`` frames -> ``preprocess_frames(image_size=S)`` ->
tower -> ``pool_frames(patch_features, spatial_pool)`` -> ``frame_means`` [F, C] and
``frame_grids`` [F, G, C], exactly what ``HandsOnVLM.frame_features`` computes for the clip.

Output layout under ``OUT`` (documented in docs/DATA.md, "Feature cache")::

    features/<key>/vision_config.json                  what <key> stands for (+ feature sizes)
    features/<key>/<split>/<shard_id>.parquet          one feature shard per sample shard
    quarantine/features-<key>-<split>-<shard_id>.parquet   rows whose frames cannot be decoded
    _state/features/<key>/<split>/<shard_id>.json      done markers (fingerprint + counts)
    manifest.json                                      section "features"

``<key>`` = :func:`feature_key`, a hash of the vision part of the model config (``cfg.vision``, its
``kind`` included, + ``spatial_pool`` + :data:`FEATURE_VERSION`), so caches of different towers
never mix. The tower comes from ``handsonvlm.model.build_vision_tower`` (CLIP or EfficientNet-Lite0
by ``model.vision.kind``); both take the same CLIP-normalised 224/S px frames, so decoding and
preprocessing here are the same for every kind.

Row contract: a feature shard holds the rows of its sample shard, IN THE SAME ORDER, minus the
rows quarantined here (undecodable frames). Each row carries ``sample_id`` and ``sample_row`` (its
0-based row in the sample shard), so a reader joins by ``sample_id`` (or ``sample_row``), never by
position alone; :func:`align_features` does that and reports which sample rows have no features.

:func:`process_feature_shard` is plain Python (no Ray) for tests and benchmarks; the Ray Data job
(:func:`run_features_stage`) maps an actor class over shard specs: each actor builds the tower
once and processes one whole shard per call, the driver only holds the specs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from preprocessing import layout, storage
from preprocessing.layout import (
    FEATURES_DIR,
    SHARD_SUFFIX,
    STATE_DIR,
    feature_root,
    feature_shard_paths,
    sample_shard_paths,
)
from preprocessing.quarantine import Quarantine
from preprocessing.samples import is_done
from preprocessing.schema import SCHEMA_VERSION, fixed_tensor, tensor_array, tensor_column
from preprocessing.stages import disable_progress_bars

log = logging.getLogger(__name__)

VISION_CONFIG_FILE = "vision_config.json"
# Bump when the computation behind a key changes (decoding, CLIP preprocessing, pooling): a new
# version gives new keys, so old caches are never read as current. 2: the resize is Pillow's uint8 bicubic.
FEATURE_VERSION = 2
AUTO_FEATURE_DTYPE = "auto"  # store exactly what the tower computes (see EXACT_STORAGE)
FEATURE_DTYPES = (AUTO_FEATURE_DTYPE, "float16", "float32")
DEFAULT_FEATURE_DTYPE = AUTO_FEATURE_DTYPE
# tower dtype (model.vision.dtype) -> the Parquet dtype that holds its features exactly: Arrow has no
# bfloat16, and bfloat16 -> float16 loses the small and the large values, so bfloat16 is stored as float32
EXACT_STORAGE = {"float16": "float16", "float32": "float32", "bfloat16": "float32"}
ROW_GROUP_ROWS = 32  # rows per Parquet row group (a row of real CLIP features is ~1.3 MB in fp16)
FEATURES_TABLE = b"handtraj_features"


# ---------------------------------------------------------------------------------------------
# key, paths, schema

def vision_spec(cfg) -> dict:
    """The part of a ``ModelConfig`` that determines the cached features (what the key hashes).

    ``vision.kind`` (the tower: ``clip`` or ``efficientnet_lite0``) is part of it, so the caches of
    two towers never mix; the default ``clip`` is left out, so that the keys of CLIP caches written
    before the field existed (same computation) stay valid."""
    vision = asdict(cfg.vision)
    if vision.get("kind") == "clip":
        del vision["kind"]
    return {"vision": vision, "spatial_pool": int(cfg.spatial_pool), "feature_version": FEATURE_VERSION}


def feature_key(cfg) -> str:
    """Short stable hash (12 hex) of :func:`vision_spec`; names the cache directory of one tower."""
    blob = json.dumps(vision_spec(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def resolve_feature_dtype(dtype: str, cfg) -> str:
    """``auto`` -> the storage dtype that keeps the tower's features bit for bit (:data:`EXACT_STORAGE` of
    ``model.vision.dtype``), so that training from the cache sees what the online path computes; an
    explicit ``float16``/``float32`` is kept (``float16`` of a float32 tower rounds the features)."""
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature dtype must be one of {FEATURE_DTYPES}, got {dtype!r}")
    if dtype != AUTO_FEATURE_DTYPE:
        return dtype
    tower_dtype = _model_config(cfg).vision.dtype
    if tower_dtype not in EXACT_STORAGE:
        raise ValueError(f"model.vision.dtype {tower_dtype!r} has no exact feature storage; "
                         f"one of {sorted(EXACT_STORAGE)}")
    return EXACT_STORAGE[tower_dtype]


def feature_fingerprint(sample_fingerprint: str, key: str, dtype: str) -> str:
    """Changes when the sample shard (its done-marker fingerprint), the tower or the storage dtype changes."""
    salt = f"samples={sample_fingerprint};key={key};dtype={dtype};v={FEATURE_VERSION};schema={SCHEMA_VERSION}"
    return hashlib.sha256(salt.encode()).hexdigest()[:24]


def feature_schema(num_frames: int, channels: int, grid_tokens: int, dtype: str = "float16",
                   key: str = "", computed_dtype: str = "float32") -> pa.Schema:
    """Schema of one feature shard (``handtraj_features``); tensors are nested fixed_size_lists of ``dtype``
    (``float16`` or ``float32``, resolved: :func:`resolve_feature_dtype`)."""
    if dtype not in FEATURE_DTYPES or dtype == AUTO_FEATURE_DTYPE:
        raise ValueError(f"feature dtype must be one of {FEATURE_DTYPES}, got {dtype!r}")
    value_type = pa.float16() if dtype == "float16" else pa.float32()

    def tensor(name, shape):
        return pa.field(name, fixed_tensor(value_type, shape), nullable=False,
                        metadata={"shape": str(list(shape)), "layout": "row-major", "dtype": dtype,
                                  "computed_dtype": computed_dtype})

    return pa.schema([
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("schema_version", pa.int16(), nullable=False),
        pa.field("sample_row", pa.int32(), nullable=False),  # 0-based row in the sample shard
        tensor("frame_means", (num_frames, channels)),
        tensor("frame_grids", (num_frames, grid_tokens, channels)),
    ], metadata={b"schema_version": str(SCHEMA_VERSION).encode(), b"producer": b"handsonvlm-ray preprocessing",
                 b"table": FEATURES_TABLE, b"vision_key": key.encode(), b"feature_dtype": dtype.encode(),
                 b"feature_version": str(FEATURE_VERSION).encode()})


# ---------------------------------------------------------------------------------------------
# computing features (no Ray)

def _model_config(cfg):
    from handsonvlm.config import ModelConfig

    return ModelConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg


def build_tower(cfg, device: str | None = None):
    """The frozen tower exactly as the model builds it (``handsonvlm.model.build_vision_tower``)."""
    from handsonvlm.model import build_vision_tower

    tower = build_vision_tower(_model_config(cfg))
    return tower.to(device) if device else tower


def tower_dims(tower, spatial_pool: int) -> tuple[int, int]:
    """(C, G): feature width and pooled grid tokens per frame (G = (g // k)^2, as ``spatial_pool``)."""
    return tower.hidden_size, (tower.grid // spatial_pool) ** 2


def clip_features(frames, tower, spatial_pool: int):
    """frames [B, F, 3, S, S] -> (means [B, F, C], grids [B, F, G, C]) as float32 numpy (exact for every
    tower dtype): ``handsonvlm.vision.tower_features``, the function ``HandsOnVLM.frame_features`` calls."""
    from handsonvlm.vision import tower_features

    means, grids = tower_features(tower, frames, spatial_pool)
    return means.float().cpu().numpy(), grids.float().cpu().numpy()


def decode_clip(jpegs: Sequence[bytes], image_size: int):
    """One row's JPEGs -> CLIP pixel values [F, 3, S, S] (= ``handsonvlm.data.clip_frames``).

    Raises ``ValueError`` for an undecodable frame or frames of different sizes."""
    import cv2

    from handsonvlm.image import decode_jpegs, preprocess_frames

    try:
        return preprocess_frames(decode_jpegs(jpegs), image_size=image_size)
    except cv2.error as exc:  # e.g. an empty buffer
        raise ValueError(f"not a decodable JPEG: {str(exc).strip().splitlines()[-1]}") from exc


def _to_storage(values: np.ndarray, dtype: str) -> np.ndarray:
    stored = values.astype(np.float16 if dtype == "float16" else np.float32)
    if dtype == "float16" and not np.isfinite(stored).all() and np.isfinite(values).all():
        raise OverflowError("features overflow float16; rerun with --feature-dtype float32")
    return stored


class _ShardWriter:
    """Streams row chunks into one in-memory Parquet file (row groups of ``ROW_GROUP_ROWS``), so
    only the compressed file and one row group are held; :meth:`commit` writes it atomically."""

    def __init__(self, schema: pa.Schema):
        self.schema = schema
        value_type = schema.field("frame_means").type
        while pa.types.is_fixed_size_list(value_type):
            value_type = value_type.value_type
        self.value_type = value_type
        self.sink = io.BytesIO()
        self.writer = pq.ParquetWriter(self.sink, schema, compression="zstd")
        self.buffer: list[dict] = []
        self.buffered = 0
        self.rows = 0

    def add(self, sample_ids: list[str], sample_rows: list[int], means: np.ndarray, grids: np.ndarray) -> None:
        self.buffer.append({"sample_id": sample_ids, "sample_row": sample_rows, "frame_means": means,
                            "frame_grids": grids})
        self.buffered += len(sample_ids)
        if self.buffered >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        ids = [s for c in self.buffer for s in c["sample_id"]]
        n = len(ids)
        batch = pa.record_batch([
            pa.array(ids, pa.string()),
            pa.array(np.full(n, SCHEMA_VERSION, np.int16), pa.int16()),
            pa.array(np.concatenate([np.asarray(c["sample_row"], np.int32) for c in self.buffer]), pa.int32()),
            tensor_array(np.concatenate([c["frame_means"] for c in self.buffer]), self.value_type),
            tensor_array(np.concatenate([c["frame_grids"] for c in self.buffer]), self.value_type),
        ], schema=self.schema)
        self.writer.write_batch(batch)
        self.rows += n
        self.buffer, self.buffered = [], 0

    def commit(self, uri: str) -> int:
        """Close the file, write it atomically to ``uri``; returns the row count."""
        self._flush()
        if self.rows == 0:  # an empty shard still gets a file with the schema
            self.writer.write_table(self.schema.empty_table())
        self.writer.close()
        storage.write_bytes_atomic(uri, self.sink.getvalue())
        return self.rows


def process_feature_shard(spec: dict, cfg, out: str, dtype: str = DEFAULT_FEATURE_DTYPE, tower=None,
                          rows_per_call: int = 1, device: str | None = None) -> dict:
    """Compute and write the feature shard of one sample shard (plain Python, no Ray).

    ``spec``: ``{split, shard_id, samples (URI of the sample shard), sample_fingerprint, key,
    fingerprint}`` (see :func:`plan_feature_shards`; ``key``/``fingerprint`` default from ``cfg``).
    ``cfg``: a ``ModelConfig`` (or its dict). ``dtype``: the storage dtype (``auto``: exact for the
    tower's dtype, :func:`resolve_feature_dtype`). ``tower``: a prebuilt tower (built from ``cfg`` if
    None). ``rows_per_call``: rows whose frames go through the tower together; 1 (default) makes
    every row's features bit-identical to ``model.frame_features(clip[None])``, more is faster on
    GPUs and equal up to float rounding. Outputs are written atomically in the order features ->
    quarantine -> done marker. Returns the summary stored in the done marker.
    """
    t0 = time.perf_counter()
    cfg = _model_config(cfg)
    dtype = resolve_feature_dtype(dtype, cfg)
    if rows_per_call < 1:
        raise ValueError("rows_per_call must be >= 1")
    key = spec.get("key") or feature_key(cfg)
    split, shard_id = spec["split"], spec["shard_id"]
    fingerprint = spec.get("fingerprint") or feature_fingerprint(spec.get("sample_fingerprint", ""), key, dtype)
    if tower is None:
        tower = build_tower(cfg, device)
    channels, grid_tokens = tower_dims(tower, cfg.spatial_pool)
    paths = feature_shard_paths(out, key, split, shard_id)

    fs, path = storage.resolve(spec["samples"])
    table = pq.read_table(path, filesystem=fs, columns=["sample_id", "video_id", "obs_jpeg"])
    sample_ids = table.column("sample_id").to_pylist()
    video_ids = table.column("video_id").to_pylist()
    jpeg_col = table.column("obs_jpeg").combine_chunks() if table.num_rows else None
    num_frames = table.schema.field("obs_jpeg").type.list_size
    jpegs = jpeg_col.flatten().to_pylist() if jpeg_col is not None else []
    del table, jpeg_col

    schema = feature_schema(num_frames, channels, grid_tokens, dtype, key, str(tower.dtype).replace("torch.", ""))
    quarantine = Quarantine("features")
    writer = _ShardWriter(schema)
    pending_rows: list[int] = []
    pending_frames: list = []

    def flush():
        import torch

        if not pending_rows:
            return
        means, grids = clip_features(torch.stack(pending_frames), tower, cfg.spatial_pool)
        writer.add([sample_ids[i] for i in pending_rows], list(pending_rows), _to_storage(means, dtype),
                   _to_storage(grids, dtype))
        pending_rows.clear()
        pending_frames.clear()

    for i, sample_id in enumerate(sample_ids):
        try:
            frames = decode_clip(jpegs[i * num_frames:(i + 1) * num_frames], tower.image_size)
        except ValueError as exc:
            quarantine.add(sample_id, "frame_corrupt", f"features: {exc}", split=split, video_id=video_ids[i],
                           source=spec["samples"])
            continue
        pending_rows.append(i)
        pending_frames.append(frames)
        if len(pending_rows) >= rows_per_call:
            flush()
    flush()

    written = writer.commit(paths["features"])
    quarantine.write(paths["quarantine"])
    summary = {
        "split": split, "shard_id": shard_id, "key": key, "dtype": dtype, "rows": len(sample_ids),
        "written": written, "quarantined": quarantine.counts(),
        "missing_sample_ids": [r.item for r in quarantine.rows],
        "dims": {"num_frames": num_frames, "channels": channels, "grid_tokens": grid_tokens},
        "fingerprint": fingerprint, "sample_fingerprint": spec.get("sample_fingerprint"),
        "samples": spec["samples"], "skipped": False, "seconds": round(time.perf_counter() - t0, 3),
    }
    storage.write_json_atomic(paths["done"], summary)
    return summary


# ---------------------------------------------------------------------------------------------
# reading (for training)

def read_feature_table(out: str, key: str, split: str, shard_id: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.resolve(feature_shard_paths(out, key, split, shard_id)["features"])
    return pq.read_table(path, filesystem=fs, columns=columns)


def feature_arrays(table: pa.Table, dtype=np.float32) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(sample_ids, means [N, F, C], grids [N, F, G, C]) of a feature table, vectorised.

    ``dtype=None`` keeps the stored dtype (float16 by default)."""
    return (table.column("sample_id").to_pylist(), tensor_column(table, "frame_means", dtype),
            tensor_column(table, "frame_grids", dtype))


def load_feature_shard(out: str, key: str, split: str, shard_id: str,
                       dtype=np.float32) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``sample_id -> (means [F, C], grids [F, G, C])`` of one feature shard (float32 by default)."""
    ids, means, grids = feature_arrays(read_feature_table(out, key, split, shard_id), dtype)
    return {sid: (means[i], grids[i]) for i, sid in enumerate(ids)}


def align_features(table: pa.Table, sample_ids: Sequence[str], dtype=np.float32):
    """Features in the order of ``sample_ids`` (e.g. the rows of the sample shard).

    Returns ``(means [N, F, C], grids [N, F, G, C], present bool [N])``; rows without features
    (quarantined here, or a cache of another sample shard) are zeros with ``present`` False."""
    ids, means, grids = feature_arrays(table, dtype)
    where = {sid: i for i, sid in enumerate(ids)}
    take = np.array([where.get(sid, -1) for sid in sample_ids], np.int64)
    present = take >= 0
    out_means = np.zeros((len(take), *means.shape[1:]), means.dtype)
    out_grids = np.zeros((len(take), *grids.shape[1:]), grids.dtype)
    out_means[present] = means[take[present]]
    out_grids[present] = grids[take[present]]
    return out_means, out_grids, present


def feature_shard_current(out: str, key: str, split: str, shard_id: str) -> bool:
    """Whether the feature shard exists and was computed from the sample shard as it is now
    (its done marker names the sample shard's current done-marker fingerprint)."""
    paths = feature_shard_paths(out, key, split, shard_id)
    sample_done = sample_shard_paths(out, split, shard_id)["done"]
    if not (storage.exists(paths["features"]) and storage.exists(paths["done"]) and storage.exists(sample_done)):
        return False
    try:
        marker = storage.read_json(paths["done"])
        return marker.get("sample_fingerprint") == storage.read_json(sample_done).get("fingerprint")
    except (ValueError, OSError):
        return False


# ---------------------------------------------------------------------------------------------
# the Ray Data job

def _shard_ids(uri: str, suffix: str) -> set[str]:
    return {f.rsplit("/", 1)[-1][: -len(suffix)] for f in storage.list_files(uri, suffix)}  # done markers too


def plan_feature_shards(out: str, split: str, key: str, dtype: str) -> tuple[list[dict], list[str]]:
    """Specs of the split's completed sample shards, and the ids of sample shards without a done
    marker (unfinished; not processed, and any feature shard of theirs is treated as stale)."""
    samples_dir = layout.samples_dir(out, split)
    if not storage.is_dir(samples_dir):
        raise FileNotFoundError(f"no sample shards for split {split!r} at {samples_dir}; run --stage samples first")
    specs, not_ready = [], []
    for shard_id in sorted(_shard_ids(samples_dir, SHARD_SUFFIX)):
        spaths = sample_shard_paths(out, split, shard_id)
        try:
            sample_fp = storage.read_json(spaths["done"]).get("fingerprint") if storage.exists(spaths["done"]) else None
        except (ValueError, OSError):
            sample_fp = None
        if not sample_fp:
            not_ready.append(shard_id)
            continue
        specs.append({"split": split, "shard_id": shard_id, "samples": spaths["samples"], "key": key,
                      "sample_fingerprint": sample_fp, "fingerprint": feature_fingerprint(sample_fp, key, dtype)})
    return specs, not_ready


def _remove_stale(out: str, key: str, split: str, current: set[str]) -> int:
    """Delete feature outputs of shards that are not (or no longer) completed sample shards."""
    ids = (_shard_ids(storage.join(feature_root(out, key), split), SHARD_SUFFIX)
           | _shard_ids(storage.join(out, STATE_DIR, FEATURES_DIR, key, split), ".json"))
    removed = 0
    for shard_id in sorted(ids - current):
        for uri in feature_shard_paths(out, key, split, shard_id).values():
            if storage.exists(uri):
                fs, p = storage.resolve(uri)
                fs.delete_file(p)
        removed += 1
    return removed


class FeatureWorker:
    """Ray Data actor: builds the tower once, then computes one whole feature shard per call."""

    def __init__(self, cfg: dict, out: str, dtype: str, rows_per_call: int = 1, device: str | None = None):
        import torch

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.cfg = _model_config(cfg)
        self.out, self.dtype, self.rows_per_call, self.device = out, dtype, rows_per_call, device
        self.tower = build_tower(self.cfg, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        summaries = []
        for spec_json in batch["spec"]:
            summary = process_feature_shard(json.loads(spec_json), self.cfg, self.out, self.dtype, self.tower,
                                            self.rows_per_call, self.device)
            summary.pop("missing_sample_ids", None)  # in the done marker; the driver needs counts only
            # JSON keeps per-reason counts (different keys per shard) out of Ray Data's type inference.
            summaries.append(json.dumps(summary, sort_keys=True))
        return {"summary": np.array(summaries, dtype=object)}


def map_batches_without_restarts(ds, fn, **kwargs):
    """``ds.map_batches(fn, **kwargs)`` for an actor pool whose actors Ray does not restart.

    Ray Data hands its actors their UDF as an object ref, which Ray core reports as an ERROR line
    for restartable actors (core_worker.cc, ray-project/ray#53727), and Ray Data's default
    (restart forever, retry forever) would retry a batch that kills its actor, e.g. out of memory,
    without end. Without restarts a dead actor fails the job instead, with its error."""
    from ray.util.annotations import RayDeprecationWarning

    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for max_restarts: the extra keyword that Ray Data's actor pool
        # documents for turning restarts off is also what 2.60 flags as deprecated `ray_remote_args`.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=RayDeprecationWarning)
        return ds.map_batches(fn, max_restarts=0, **kwargs)


def _write_vision_config(out: str, cfg, key: str, dtype: str, dims: dict | None) -> dict:
    doc = {"key": key, **vision_spec(cfg), "stored_dtype": dtype,
           "computation": "decode obs_jpeg -> handsonvlm.image.preprocess_frames(image_size) -> "
                          f"handsonvlm.model.build_vision_tower(cfg) ({cfg.vision.kind} tower) -> "
                          "handsonvlm.vision.pool_frames(spatial_pool)"}
    if dims:
        doc["dims"] = dims
    storage.write_json_atomic(storage.join(feature_root(out, key), VISION_CONFIG_FILE), doc)
    return doc


def run_features_stage(out: str, splits: Sequence[str], cfg, dtype: str = DEFAULT_FEATURE_DTYPE, actors: int = 2,
                       num_gpus: float = 0.0, rows_per_call: int = 1, progress: bool = True) -> dict:
    """Compute the feature cache of every completed sample shard of ``splits`` with Ray Data.

    Returns the per-split counts (also merged into ``OUT/manifest.json`` under ``features``)."""
    import ray
    from tqdm import tqdm

    from preprocessing.stages import update_manifest

    cfg = _model_config(cfg)
    dtype = resolve_feature_dtype(dtype, cfg)
    t0 = time.perf_counter()
    key = feature_key(cfg)
    _write_vision_config(out, cfg, key, dtype, None)
    pending, summaries, split_stats = [], [], {}
    for split in splits:
        specs, not_ready = plan_feature_shards(out, split, key, dtype)
        if not_ready:
            log.warning("features %s: %d sample shard(s) have no done marker (samples stage unfinished); "
                        "skipped: %s", split, len(not_ready), not_ready[:5])
        removed = _remove_stale(out, key, split, {s["shard_id"] for s in specs})
        split_stats[split] = {"key": key, "dtype": dtype, "shards": len(specs), "shards_not_ready": len(not_ready),
                              "stale_shards_removed": removed}
        for spec in specs:
            paths = feature_shard_paths(out, key, split, spec["shard_id"])
            if is_done(paths, spec["fingerprint"], output="features"):
                summary = dict(storage.read_json(paths["done"]))
                summary["skipped"] = True
                summaries.append(summary)
            else:
                pending.append(spec)

    n_reused = len(summaries)
    if pending:
        log.info("features %s: %d shards to process, %d already done", key, len(pending), n_reused)
        ctx = ray.data.DataContext.get_current()
        disable_progress_bars(ctx)
        pool = max(1, min(actors, len(pending)))
        ds = ray.data.from_items([{"spec": json.dumps(s)} for s in pending], override_num_blocks=len(pending))
        # a dead worker fails the stage; a rerun keeps the shards already done (done markers)
        ds = map_batches_without_restarts(ds, FeatureWorker, batch_size=1, batch_format="numpy",
                                          compute=ray.data.ActorPoolStrategy(size=pool), num_cpus=1,
                                          num_gpus=num_gpus or None, udf_modifying_row_count=False,
                                          fn_constructor_kwargs={"cfg": cfg.to_dict(), "out": out, "dtype": dtype,
                                                                 "rows_per_call": rows_per_call,
                                                                 "device": "cuda" if num_gpus else "cpu"})
        bar = tqdm(total=len(pending), unit="shard", desc=f"features {key}", disable=not progress, mininterval=1.0)
        for row in ds.iter_rows():
            summaries.append(json.loads(row["summary"]))
            bar.update(1)
        bar.close()
    else:
        log.info("features %s: all %d shards already done", key, n_reused)

    dims = next((s.get("dims") for s in summaries if s.get("dims")), None)
    _write_vision_config(out, cfg, key, dtype, dims)
    for split, stats in split_stats.items():
        mine = [s for s in summaries if s["split"] == split]
        quarantined = Counter()
        for s in mine:
            quarantined.update(s["quarantined"])
        stats.update({"read": sum(s["rows"] for s in mine), "written": sum(s["written"] for s in mine),
                      "quarantined": dict(quarantined), "shards_processed": sum(not s["skipped"] for s in mine),
                      "shards_reused": sum(s["skipped"] for s in mine)})

    manifest_uri = layout.manifest_path(out)
    previous = storage.read_json(manifest_uri) if storage.exists(manifest_uri) else {}
    keys = dict(previous.get("stages", {}).get("features", {}).get("keys", {}))
    keys[key] = {"vision": vision_spec(cfg), "dtype": dtype, "dims": dims, "splits": sorted(split_stats)}
    config = {"key": key, "dtype": dtype, "splits": list(splits), "actors": actors, "num_gpus": num_gpus,
              "rows_per_call": rows_per_call, **vision_spec(cfg)}
    update_manifest(out, "features", config, split_stats,
                    {"seconds": round(time.perf_counter() - t0, 2), "keys": keys,
                     "state_dir": f"{STATE_DIR}/{FEATURES_DIR}/{key}"})
    return split_stats
