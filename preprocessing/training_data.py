"""What training reads from the preprocessing output, in which order: shards per rank, rows, features.

The driver plans from Parquet footers alone (:func:`plan_data`). Each rank reads its shards in a
seeded per-epoch order (:func:`epoch_files`): the Ray Train workers through Ray Data
(:func:`iter_rows`, the only Ray here, imported there), the benchmark's plain loop with pyarrow
(:func:`shard_rows`); with the features stage done, :class:`FeatureLookup` supplies the cached
frozen-vision features.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from preprocessing import layout, storage

TRAIN_COLUMNS = ["sample_id", "narration", "narration_paraphrases", "noun", "rbhp_questions",
                 "future_hands", "future_valid", "obs_jpeg"]
RAY_DATA_LOGGER = "ray.data"
PATH_COLUMN = "path"  # include_paths=True: the shard each row came from (FeatureLookup)
READ_TASK_CPUS = 0.25  # Ray Data read tasks share the CPUs of the training workers that consume them
SHUFFLE_BUFFER_MICRO_BATCHES = 4  # local shuffle buffer of a rank's row stream


def plan_data(samples_dir: str, world_size: int, micro_batch: int, accumulation: int) -> dict[str, Any]:
    """Assign sample shards to ranks, balancing rows (largest file to the lightest rank).

    Reads only Parquet footers. Every rank runs the same number of micro-batches per epoch (the
    smallest rank's), so collectives never wait for a rank that ran out of data. Returns
    ``files`` (per rank, sorted), ``rows`` (per rank), ``steps_per_epoch``, ``total_rows`` and
    ``fixed_batch_file`` (the first shard, whose first rows are the fixed evaluation batch)."""
    files = storage.list_files(samples_dir, layout.SHARD_SUFFIX)
    if not files:
        raise FileNotFoundError(f"no sample shards in {samples_dir}; run pipelines/preprocess.py first")
    rows = {}
    for uri in files:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            rows[uri] = pq.ParquetFile(f).metadata.num_rows
    assignment = [[] for _ in range(world_size)]
    load = [0] * world_size
    for uri in sorted(files, key=lambda u: (-rows[u], u)):
        r = int(np.argmin(load))
        assignment[r].append(uri)
        load[r] += rows[uri]
    micro_steps = min(load) // micro_batch
    steps_per_epoch = micro_steps // accumulation
    if steps_per_epoch == 0:
        raise ValueError(f"too little data: {min(load)} rows on the smallest of {world_size} ranks "
                         f"({len(files)} shards; shards are assigned whole, one video each) for "
                         f"micro-batch {micro_batch} x accumulation {accumulation}")
    return {"files": [sorted(a) for a in assignment], "rows": load, "steps_per_epoch": steps_per_epoch,
            "total_rows": sum(rows.values()), "fixed_batch_file": sorted(files)[0]}


def total_steps(steps_per_epoch: int, epochs: int, max_steps: int | None) -> int:
    """The optimizer steps a run trains: the planned ``epochs`` x ``steps_per_epoch``, or fewer with ``max_steps``."""
    planned = steps_per_epoch * epochs
    return min(max_steps or planned, planned)


def read_shard(uri: str, columns: list[str], sample_ids: list[str] | None = None) -> pa.Table:
    """``columns`` of one sample shard as a pyarrow table, in shard order: every row, or only the rows
    of ``sample_ids``."""
    fs, path = storage.resolve(uri)
    table = pq.read_table(path, filesystem=fs, columns=columns)
    if sample_ids is not None:
        table = table.filter(pc.is_in(table.column("sample_id"), value_set=pa.array(sample_ids)))
    return table


def shard_rows(uri: str, limit: int | None = None) -> list[dict]:
    """The training columns of one sample shard (its first ``limit`` rows), each row with its shard
    ``path`` as Ray Data's ``include_paths`` gives it (what :class:`FeatureLookup` keys on)."""
    _, path = storage.resolve(uri)
    table = read_shard(uri, TRAIN_COLUMNS)
    if limit is not None:
        table = table.slice(0, limit)
    return [{**row, PATH_COLUMN: path} for row in table.to_pylist()]


def epoch_files(files: list[str], seed: int, epoch: int, rank: int) -> list[str]:
    """The order in which ``rank`` reads its shard files in ``epoch``: re-drawn per epoch from the seed."""
    order = np.random.default_rng([seed, epoch, rank]).permutation(len(files))
    return [files[i] for i in order]


def shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the within-epoch row shuffle of ``rank`` (a stream apart from :func:`epoch_files`')."""
    return int(np.random.default_rng([seed, epoch, rank, 1]).integers(2**31))


def iter_rows(files: list[str], micro_batch: int, seed: int, epoch: int, rank: int) -> Iterator[list[dict]]:
    """Micro-batches of rows (lists of dicts) of this rank's files for one epoch, deterministic.

    Ray Data reads the files in the epoch's order (order preserved) and shuffles locally with a
    seeded buffer, so a resumed run sees exactly the same batches."""
    import ray

    # One dataset per epoch and rank: Ray Data's INFO lines about starting, planning and finishing each
    # execution would fill the training log (40 of each in `make demo`); its warnings still show.
    logging.getLogger(RAY_DATA_LOGGER).setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ds = ray.data.read_parquet(epoch_files(files, seed, epoch, rank), include_paths=True, num_cpus=READ_TASK_CPUS)
    ds = ds.select_columns([*TRAIN_COLUMNS, PATH_COLUMN])  # projected into the read; `columns=` is deprecated
    for batch in ds.iter_batches(batch_size=micro_batch, batch_format="pyarrow", drop_last=True,
                                 local_shuffle_buffer_size=SHUFFLE_BUFFER_MICRO_BATCHES * micro_batch,
                                 local_shuffle_seed=shuffle_seed(seed, epoch, rank)):
        yield batch.to_pylist()


class FeatureLookup:
    """Cached frozen-vision features (``pipelines/preprocess.py --stage features``) for rows of the
    sample shards, read a shard at a time and kept for the last few shards (files are read in order)."""

    KEEP_SHARDS = 2

    def __init__(self, out: str, key: str, split: str):
        self.out, self.key, self.split = out, key, split
        self.tables: dict[str, Any] = {}

    def __call__(self, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """rows (with their shard ``path``) -> frame_means [B, F, C], frame_grids [B, F, G, C] float32."""
        from preprocessing.features import align_features, read_feature_table

        means, grids = [None] * len(rows), [None] * len(rows)
        by_shard: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            by_shard.setdefault(layout.shard_id(row[PATH_COLUMN]), []).append(i)
        for shard, idx in by_shard.items():
            if shard not in self.tables:
                if len(self.tables) >= self.KEEP_SHARDS:
                    self.tables.pop(next(iter(self.tables)))
                self.tables[shard] = read_feature_table(self.out, self.key, self.split, shard)
            m, g, present = align_features(self.tables[shard], [rows[i]["sample_id"] for i in idx])
            if not present.all():
                raise KeyError(f"feature shard {shard} lacks {int((~present).sum())} of its samples; "
                               f"re-run the features stage or set train.feature_cache=off")
            for j, i in enumerate(idx):
                means[i], grids[i] = m[j], g[j]
        return torch.from_numpy(np.stack(means)), torch.from_numpy(np.stack(grids))


def feature_cache_plan(data_root: str, split: str, files: list[str], model_cfg: dict, mode: str) -> dict | None:
    """Use the feature cache when every sample shard has a current feature shard (mode "auto"),
    insist on it ("on"), or ignore it ("off"). Returns :class:`FeatureLookup`'s arguments, or None."""
    if mode == "off":
        return None
    from handsonvlm.config import ModelConfig
    from preprocessing.features import feature_key, feature_shard_current

    key = feature_key(ModelConfig.from_dict(model_cfg))
    stale = [f for f in files if not feature_shard_current(data_root, key, split, layout.shard_id(f))]
    if stale:
        if mode == "on":
            raise FileNotFoundError(f"train.feature_cache=on but {len(stale)} of {len(files)} shards have no current "
                                    f"features under {layout.feature_root(data_root, key)}; run --stage features")
        return None
    return {"out": data_root, "key": key, "split": split}
