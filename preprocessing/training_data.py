"""What training reads from the preprocessing output, in which order: the draw plan, rows, features.

The driver plans from the shards' light columns (:func:`plan_data`): the split's clips in a fixed
order, each task's pool, and the schedule (``samples_per_epoch`` draws rounded up to whole
optimizer steps). Every rank then draws the same epochs (:meth:`handsonvlm.mixture.Mixture.draw_epoch`,
a function of the seed and epoch) and trains on its own slice of each global batch
(:func:`rank_positions`). :class:`DrawStream` delivers those micro-batches for the whole run,
reading rows by clip index through a byte-bounded row-group cache (:class:`RowStore`) and
preparing them in a background thread, so epoch boundaries cost nothing and a resumed run starts
at its exact position without reading what it skips.

Why not Ray Data's ``streaming_split`` here (Ray Train's usual ``datasets=`` idiom): the mixture
draws clips with replacement from per-task pools (the release's sampling), which is random access
by row, and exact resume needs the same rows in the same micro-batches after a restart; a
streaming split neither repeats rows nor replays a position deterministically. The preprocessing
and evaluation stages do use Ray Data. With the features stage done, :class:`FeatureLookup`
supplies the cached frozen-vision features.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from handsonvlm.mixture import EpochDraws, dataset_of, drawn_rows
from preprocessing import layout, storage

TRAIN_COLUMNS = ["sample_id", "narration", "narration_paraphrases", "noun", "rbhp_questions",
                 "future_hands", "future_valid", "obs_jpeg"]
INDEX_COLUMNS = ["sample_id", "narration", "rbhp_questions"]  # what the task pools are built from
PATH_COLUMN = "path"  # each delivered row carries its shard's path (FeatureLookup keys on it)
MB = 1 << 20
PREFETCH_MICRO_BATCHES = 4  # micro-batches a rank's DrawStream prepares ahead of the step


def plan_data(samples_dir: str, world_size: int, micro_batch: int, accumulation: int, mixture,
              samples_per_epoch: int | None = None) -> dict[str, Any]:
    """The training plan of a split: its clips, the mixture's pools over them and the schedule.

    Reads only the shards' footers and :data:`INDEX_COLUMNS`. An epoch is ``samples_per_epoch``
    draws (default: one per clip) rounded up to whole optimizer steps of ``world_size`` x
    ``micro_batch`` x ``accumulation`` draws (the release's 48,296 on 8 x 16 gives 378 steps, as its
    sampler pads the last batch). Returns ``files`` (sorted shard URIs), ``row_groups`` (rows per row
    group, per file), ``clip_file``/``clip_row`` (each clip's file and row in it, clips in file
    order), ``pools`` (task -> clip indices), ``samples_per_epoch``, ``draws_per_epoch``,
    ``steps_per_epoch``, ``total_rows`` and ``world_size``/``micro_batch``/``accumulation``."""
    files = storage.list_files(samples_dir, layout.SHARD_SUFFIX)
    if not files:
        raise FileNotFoundError(f"no sample shards in {samples_dir}; run pipelines/preprocess.py first")
    row_groups, clip_file, clip_row, clips = [], [], [], []
    for f, uri in enumerate(files):
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            row_groups.append([parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
            table = parquet.read(columns=INDEX_COLUMNS)
        rows = table.to_pylist()
        clips.extend(rows)
        clip_file.extend([f] * len(rows))
        clip_row.extend(range(len(rows)))
    pools = mixture.pools(clips)
    mixture.drawn_probabilities(pools)  # fails here, on the driver, when no task can be drawn
    requested = samples_per_epoch or len(clips)
    per_step = world_size * micro_batch * accumulation
    steps_per_epoch = math.ceil(requested / per_step)
    return {"files": files, "row_groups": row_groups, "clip_file": clip_file, "clip_row": clip_row,
            "pools": {name: pool.tolist() for name, pool in pools.items()}, "samples_per_epoch": requested,
            "draws_per_epoch": steps_per_epoch * per_step, "steps_per_epoch": steps_per_epoch,
            "total_rows": len(clips), "world_size": world_size, "micro_batch": micro_batch,
            "accumulation": accumulation}


def plan_pools(plan: Mapping) -> dict[str, np.ndarray]:
    return {name: np.asarray(pool, dtype=np.int64) for name, pool in plan["pools"].items()}


def total_steps(steps_per_epoch: int, epochs: int, max_steps: int | None) -> int:
    """The optimizer steps a run trains: the planned ``epochs`` x ``steps_per_epoch``, or fewer with ``max_steps``."""
    planned = steps_per_epoch * epochs
    return min(max_steps or planned, planned)


def micro_batches_per_epoch(plan: Mapping) -> int:
    """Micro-batches each rank runs per epoch."""
    return plan["steps_per_epoch"] * plan["accumulation"]


def rank_positions(plan: Mapping, rank: int, micro: int) -> np.ndarray:
    """The draw positions (in the epoch) of micro-batch ``micro`` of ``rank``: global micro-batch
    ``micro`` is ``world_size`` consecutive runs of ``micro_batch`` draws, one per rank."""
    start = (micro * plan["world_size"] + rank) * plan["micro_batch"]
    return np.arange(start, start + plan["micro_batch"])


def read_shard(uri: str, columns: list[str], sample_ids: list[str] | None = None) -> pa.Table:
    """``columns`` of one sample shard as a pyarrow table, in shard order: every row, or only the rows
    of ``sample_ids``."""
    fs, path = storage.resolve(uri)
    table = pq.read_table(path, filesystem=fs, columns=columns)
    if sample_ids is not None:
        table = table.filter(pc.is_in(table.column("sample_id"), value_set=pa.array(sample_ids)))
    return table


class ByteLRU:
    """A mapping that drops its least recently used entries beyond ``budget`` bytes (the newest
    entry is always kept); ``size(value)`` gives an entry's bytes."""

    def __init__(self, budget: int, size: Callable[[Any], int]):
        self.budget, self.size = int(budget), size
        self.entries: OrderedDict = OrderedDict()
        self.used = 0

    def get(self, key, load: Callable[[], Any]):
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        value = load()
        self.entries[key] = value
        self.used += self.size(value)
        while self.used > self.budget and len(self.entries) > 1:
            _, dropped = self.entries.popitem(last=False)
            self.used -= self.size(dropped)
        return value


class RowStore:
    """Rows of the planned split by clip index, read a row group at a time and cached within
    ``cache_bytes`` (least recently used out); thread-safe for one reader at a time."""

    def __init__(self, plan: Mapping, cache_bytes: int, columns: Sequence[str] = TRAIN_COLUMNS):
        self.files, self.columns = plan["files"], list(columns)
        self.resolved = [storage.resolve(uri) for uri in self.files]  # (filesystem, path): made once, not per read
        self.clip_file = np.asarray(plan["clip_file"], dtype=np.int64)
        self.clip_row = np.asarray(plan["clip_row"], dtype=np.int64)
        self.group_starts = [np.cumsum([0, *sizes]) for sizes in plan["row_groups"]]
        self.cache = ByteLRU(cache_bytes, lambda table: table.nbytes)
        self.reads = 0  # row groups read from storage (a cache miss each)

    def _group(self, file: int, group: int) -> pa.Table:
        def load() -> pa.Table:
            self.reads += 1
            fs, path = self.resolved[file]
            with fs.open_input_file(path) as handle:
                return pq.ParquetFile(handle).read_row_group(group, columns=self.columns)
        return self.cache.get((file, group), load)

    def rows(self, clips: Sequence[int]) -> list[dict]:
        """The rows of ``clips`` (with duplicates), in that order, each with its shard :data:`PATH_COLUMN`."""
        out: list[dict | None] = [None] * len(clips)
        wanted: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i, clip in enumerate(clips):
            f, r = int(self.clip_file[clip]), int(self.clip_row[clip])
            g = int(np.searchsorted(self.group_starts[f], r, side="right")) - 1
            wanted.setdefault((f, g), []).append((i, r - int(self.group_starts[f][g])))
        for (f, g), places in sorted(wanted.items()):
            table = self._group(f, g).take(pa.array([r for _, r in places]))
            path = self.resolved[f][1]
            for (i, _), row in zip(places, table.to_pylist()):
                out[i] = {**row, PATH_COLUMN: path}
        return out  # type: ignore[return-value]


def shard_rows(uri: str, limit: int | None = None) -> list[dict]:
    """The training columns of one sample shard (its first ``limit`` rows), each row with its shard
    :data:`PATH_COLUMN` (what :class:`FeatureLookup` keys on)."""
    _, path = storage.resolve(uri)
    table = read_shard(uri, TRAIN_COLUMNS)
    if limit is not None:
        table = table.slice(0, limit)
    return [{**row, PATH_COLUMN: path} for row in table.to_pylist()]


class DrawStream:
    """One rank's micro-batches for the whole run, from position (``epoch``, ``micro``) on.

    Yields ``(epoch, micro, prepared)`` where ``prepared = prepare(rows, epoch)`` and ``rows`` are
    the micro-batch's drawn rows (:func:`handsonvlm.mixture.drawn_rows`); a background thread
    draws the epochs, reads the rows and runs ``prepare`` up to ``ahead`` micro-batches before
    they are needed, across epoch boundaries. Deterministic: the same plan, mixture and position
    give the same batches whatever the timing. An error in the thread is raised in the consumer."""

    _END = object()

    def __init__(self, plan: Mapping, mixture, rank: int, store: RowStore, prepare: Callable[[list[dict], int], Any],
                 epoch: int = 0, micro: int = 0, ahead: int = PREFETCH_MICRO_BATCHES):
        self.plan, self.mixture, self.rank, self.store, self.prepare = plan, mixture, rank, store, prepare
        self.position = (int(epoch), int(micro))
        self.pools = plan_pools(plan)
        self.waited_s = 0.0  # the consumer's total wait for prepared batches (the input pipeline's stall)
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._fill, name=f"draw-stream-rank{rank}", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        epoch, micro = self.position
        per_epoch = micro_batches_per_epoch(self.plan)
        try:
            while not self.stop.is_set():
                draws = self.mixture.draw_epoch(self.pools, self.plan["draws_per_epoch"], epoch)
                for m in range(micro, per_epoch):
                    rows = micro_batch_rows(self.plan, self.store, draws, self.rank, m)
                    if not self._put((epoch, m, self.prepare(rows, epoch))):
                        return
                epoch, micro = epoch + 1, 0
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put((self._END, exc, None))

    def __iter__(self) -> Iterator[tuple[int, int, Any]]:
        while True:
            start = time.perf_counter()
            epoch, micro, prepared = self.queue.get()
            self.waited_s += time.perf_counter() - start
            if epoch is self._END:
                raise RuntimeError(f"rank {self.rank}: preparing training batches failed: {micro!r}") from micro
            yield epoch, micro, prepared

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def micro_batch_rows(plan: Mapping, store: RowStore, draws: EpochDraws, rank: int, micro: int) -> list[dict]:
    """The drawn rows of micro-batch ``micro`` of ``rank`` in the epoch of ``draws``."""
    positions = rank_positions(plan, rank, micro)
    return drawn_rows(store.rows(draws.rows[positions].tolist()), draws, positions.tolist())


def fixed_rows(plan: Mapping, mixture, store: RowStore) -> list[dict]:
    """The fixed evaluation micro-batch: rank 0's first micro-batch of epoch 0 (the same on every rank)."""
    return micro_batch_rows(plan, store, mixture.draw_epoch(plan_pools(plan), plan["draws_per_epoch"], 0), 0, 0)


class FeatureLookup:
    """Cached frozen-vision features (``pipelines/preprocess.py --stage features``) for rows of the
    sample shards, read a shard at a time and kept within ``cache_bytes`` (least recently used out:
    the draws visit the shards in random order) in their stored dtype, with each shard's
    ``sample_id -> row`` index. A call converts only the rows it is asked for (O(batch), not O(shard))."""

    def __init__(self, out: str, key: str, split: str, cache_bytes: int = 256 * MB):
        self.out, self.key, self.split = out, key, split
        self.shards = ByteLRU(cache_bytes, lambda shard: shard[0].nbytes)

    def _shard(self, shard: str) -> tuple[pa.Table, dict[str, int]]:
        """(the feature table as stored, sample_id -> its row)."""
        from preprocessing.features import read_feature_table

        def load() -> tuple[pa.Table, dict[str, int]]:
            table = read_feature_table(self.out, self.key, self.split, shard)
            return table, {sid: i for i, sid in enumerate(table.column("sample_id").to_pylist())}
        return self.shards.get(shard, load)

    def __call__(self, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """rows (with their shard ``path``) -> frame_means [B, F, C], frame_grids [B, F, G, C] float32
        (exact: the stored values, see ``preprocessing.features.resolve_feature_dtype``)."""
        from preprocessing.schema import tensor_column

        means, grids = [None] * len(rows), [None] * len(rows)
        by_shard: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            by_shard.setdefault(layout.shard_id(row[PATH_COLUMN]), []).append(i)
        for shard, idx in by_shard.items():
            table, where = self._shard(shard)
            take = [where.get(rows[i]["sample_id"], -1) for i in idx]
            if min(take) < 0:
                raise KeyError(f"feature shard {shard} lacks {sum(t < 0 for t in take)} of its samples; "
                               f"re-run the features stage or set train.feature_cache=off")
            picked = table.take(pa.array(take, pa.int64()))  # the asked rows only, still in the stored dtype
            m, g = tensor_column(picked, "frame_means", np.float32), tensor_column(picked, "frame_grids", np.float32)
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


def describe_plan(plan: Mapping, mixture, epochs: int, max_steps: int | None) -> dict[str, Any]:
    """What a run of ``plan`` will train, without training: the schedule, the draws of the whole run
    counted per task (``samples_per_task``) and per dataset (``samples_per_source``), each task's
    pool and share, and ``batch_distinct_videos_mean``: the mean number of distinct videos (sample
    shards) in a rank's micro-batch over epoch 0."""
    pools = plan_pools(plan)
    world, micro_batch, accumulation = plan["world_size"], plan["micro_batch"], plan["accumulation"]
    per_step = world * micro_batch * accumulation
    steps = total_steps(plan["steps_per_epoch"], epochs, max_steps)
    per_task = dict.fromkeys(mixture.names, 0)
    left, epoch, distinct = steps * per_step, 0, None
    while left > 0:  # the draws a run consumes: whole epochs, then the first steps of the last one
        draws = mixture.draw_epoch(pools, plan["draws_per_epoch"], epoch)
        used = min(left, len(draws))
        for name, count in draws.counts(used).items():
            per_task[name] += count
        if epoch == 0:
            files = np.asarray(plan["clip_file"], dtype=np.int64)[draws.rows].reshape(-1, micro_batch)
            distinct = float(np.mean([len(np.unique(batch)) for batch in files]))
        left -= used
        epoch += 1
    per_source: dict[str, int] = {}
    for name, count in per_task.items():
        source = dataset_of(mixture.sources[name], name)
        per_source[source] = per_source.get(source, 0) + count
    total = sum(per_task.values())
    return {"world_size": world, "micro_batch": micro_batch, "gradient_accumulation": accumulation,
            "global_batch": per_step, "clips": plan["total_rows"], "samples_per_epoch": plan["samples_per_epoch"],
            "draws_per_epoch": plan["draws_per_epoch"], "steps_per_epoch": plan["steps_per_epoch"],
            "epochs": epochs, "total_steps": steps, "total_samples": total,
            "task_probabilities": mixture.drawn_probabilities(pools),
            "pool_sizes": {name: len(pool) for name, pool in pools.items()},
            "samples_per_task": per_task, "task_shares": {n: c / total for n, c in per_task.items()} if total else {},
            "samples_per_source": per_source, "batch_distinct_videos_mean": distinct}
