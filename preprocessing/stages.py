"""The preprocessing stages as Ray jobs: ``index`` (annotations -> action table) and ``samples``
(index + media -> self-contained training shards), with the quarantine and ``manifest.json``.

Where each output lives: :mod:`preprocessing.layout`; schemas and guarantees: docs/DATA.md.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections import Counter
from dataclasses import asdict

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from preprocessing import layout, storage
from preprocessing.index import IndexConfig, build_index
from preprocessing.samples import (
    MediaConfig,
    done_summary,
    is_done,
    process_shard,
    shard_fingerprint,
    table_to_ipc,
)
from preprocessing.schema import SCHEMA_VERSION

log = logging.getLogger(__name__)
DEFAULT_SHARD_SIZE = 256  # actions per sample shard (~50 MB of 456x256 JPEGs): one Ray Data task each


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def update_manifest(
    out: str, stage: str, config: dict, split_stats: dict[str, dict], extra: dict | None = None
) -> dict:
    """Merge one stage's counts into ``OUT/manifest.json`` (read-modify-write in the driver)."""
    uri = layout.manifest_path(out)
    manifest = storage.read_json(uri) if storage.exists(uri) else {"schema_version": SCHEMA_VERSION, "splits": {}}
    manifest["updated_at"] = _now()
    manifest.setdefault("stages", {})[stage] = {"config": config, "finished_at": _now(), **(extra or {})}
    for split, stats in split_stats.items():
        manifest["splits"].setdefault(split, {})[stage] = stats
    storage.write_json_atomic(uri, manifest)
    return manifest


def run_index_stage(cfg: IndexConfig, out: str) -> dict:
    """Build and write the index of every split; returns the per-split counts."""
    t0 = time.perf_counter()
    result = build_index(cfg)
    for split, table in result.tables.items():
        order = pc.sort_indices(table, [("video_id", "ascending"), ("start_frame", "ascending"),
                                        ("narration_id", "ascending")])
        storage.write_parquet_atomic(table.take(order), layout.index_path(out, split))
        log.info("index %s: %d actions -> %s", split, table.num_rows, layout.index_path(out, split))
    result.quarantine.write(layout.index_quarantine_path(out))
    extra = {"quarantined_total": result.quarantine.counts(), "seconds": round(time.perf_counter() - t0, 2)}
    config = {k: v for k, v in asdict(cfg).items()}
    config["splits"] = list(cfg.splits)
    update_manifest(out, "index", config, result.stats, extra)
    return result.stats


def plan_shards(index: pa.Table, shard_size: int) -> list[tuple[str, pa.Table]]:
    """Split a (video-sorted) index into shards of <= ``shard_size`` actions of one video each."""
    shards = []
    videos = index.column("video_id").to_pylist()
    start = 0
    while start < len(videos):
        video = videos[start]
        end = start
        while end < len(videos) and videos[end] == video:
            end += 1
        for k, chunk_start in enumerate(range(start, end, shard_size)):
            chunk_end = min(chunk_start + shard_size, end)
            shards.append((f"{video}-{k:04d}", index.slice(chunk_start, chunk_end - chunk_start)))
        start = end
    return shards


def _remove_stale_shards(out: str, split: str, current: set[str]) -> int:
    """Delete outputs of shards that the current index no longer produces (idempotent re-runs)."""
    removed = 0
    for uri in storage.list_files(layout.samples_dir(out, split), layout.SHARD_SUFFIX):
        shard_id = layout.shard_id(uri)
        if shard_id not in current:
            for path in layout.sample_shard_paths(out, split, shard_id).values():
                if storage.exists(path):
                    fs, p = storage.resolve(path)
                    fs.delete_file(p)
            removed += 1
    return removed


def _remove_partial_writes(out: str, split: str) -> int:
    """Delete the temporary files of writes that a killed run left behind (``<file>.tmp-<id>``, see
    ``storage.write_bytes_atomic``); readers ignore them, but they would pile up over preemptions."""
    removed = 0
    for directory, prefix in ((layout.samples_dir(out, split), ""),
                              (layout.samples_state_dir(out, split), ""),
                              (layout.quarantine_dir(out), layout.sample_quarantine_prefix(split))):
        for uri in storage.list_files(directory):
            name = uri.rsplit("/", 1)[-1]
            if name.startswith(prefix) and storage.PARTIAL_WRITE_MARK in name:
                fs, path = storage.resolve(uri)
                fs.delete_file(path)
                removed += 1
    return removed


def _process_shard_row(row: dict, media: MediaConfig) -> dict:
    summary = process_shard(row["split"], row["shard_id"], row["rows_ipc"], row["fingerprint"], media)
    # JSON keeps the per-reason counts (different keys per shard) out of Ray Data's type inference.
    return {"split": summary["split"], "shard_id": summary["shard_id"], "summary": json.dumps(summary, sort_keys=True)}


def run_samples_stage(out: str, splits: tuple[str, ...], media: MediaConfig, shard_size: int = DEFAULT_SHARD_SIZE,
                      unlabelled: str = "skip", progress: bool = True) -> dict:
    """Decode the observation frames of every indexed action into sample shards with Ray Data."""
    import ray

    if unlabelled not in ("skip", "keep"):
        raise ValueError("unlabelled must be 'skip' or 'keep'")
    t0 = time.perf_counter()
    pending, reused, split_stats = [], [], {}
    for split in splits:
        index_uri = layout.index_path(out, split)
        if not storage.exists(index_uri):
            raise FileNotFoundError(f"no index for split {split!r} at {index_uri}; run --stage index first")
        fs, path = storage.resolve(index_uri)
        index = pq.read_table(path, filesystem=fs)
        labelled = pc.not_equal(index.column("label_source"), "none")
        n_unlabelled = index.num_rows - int(pc.sum(labelled).as_py() or 0)
        if unlabelled == "skip":
            index = index.filter(labelled)
        shards = plan_shards(index, shard_size)
        removed = _remove_stale_shards(out, split, {sid for sid, _ in shards})
        split_stats[split] = {"read": index.num_rows + (n_unlabelled if unlabelled == "skip" else 0),
                              "unlabelled_skipped": n_unlabelled if unlabelled == "skip" else 0,
                              "shards": len(shards), "stale_shards_removed": removed,
                              "partial_writes_removed": _remove_partial_writes(out, split)}
        for shard_id, rows in shards:
            rows_ipc = table_to_ipc(rows)
            fingerprint = shard_fingerprint(rows_ipc, media)
            paths = layout.sample_shard_paths(out, split, shard_id)
            if is_done(paths, fingerprint):
                reused.append(done_summary(paths))
            else:
                pending.append({"split": split, "shard_id": shard_id, "rows_ipc": rows_ipc,
                                "fingerprint": fingerprint, "n": rows.num_rows})

    summaries = list(reused)
    if pending:
        n_actions = sum(p.pop("n") for p in pending)
        log.info("samples: %d shards to process (%d actions), %d already done", len(pending), n_actions, len(reused))
        ctx = ray.data.DataContext.get_current()
        disable_progress_bars(ctx)  # one readable bar below instead of per-operator bars
        ds = ray.data.from_items(pending, override_num_blocks=len(pending))
        ds = ds.map(_process_shard_row, fn_kwargs={"media": media}, num_cpus=1)
        bar = tqdm(total=n_actions, unit="action", desc="samples", disable=not progress, mininterval=1.0)
        for row in ds.iter_rows():
            summary = json.loads(row["summary"])
            summaries.append(summary)
            bar.update(summary["rows"])
            bar.set_postfix(shards=f"{len(summaries) - len(reused)}/{len(pending)}")
        bar.close()
    else:
        log.info("samples: all %d shards already done", len(reused))

    for split, stats in split_stats.items():
        mine = [s for s in summaries if s["split"] == split]
        quarantined = Counter()
        for s in mine:
            quarantined.update(s["quarantined"])
        stats.update({
            "written": sum(s["written"] for s in mine),
            "quarantined": dict(quarantined),
            "shards_processed": sum(not s["skipped"] for s in mine),
            "shards_reused": sum(s["skipped"] for s in mine),
            "frame_sources": dict(Counter(s["frame_source"] for s in mine if s["frame_source"])),
        })
    config = {**asdict(media), "splits": list(splits), "shard_size": shard_size, "unlabelled": unlabelled}
    update_manifest(out, "samples", config, split_stats, {"seconds": round(time.perf_counter() - t0, 2),
                                                          "state_dir": layout.STATE_DIR})
    return split_stats


# ---------------------------------------------------------------------------------------------
# splits a stage wrote nothing for: why, and what fixes it

OUTPUT_UNITS = {"index": "actions", "samples": "samples", "features": "feature rows"}


def _reason_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))


def _empty_index_cause(stats: dict, out: str) -> str:
    dropped = {**stats.get("skipped", {}), **stats.get("quarantined", {})}
    if not stats["read"]:
        return (f"its annotation CSV holds no usable row (empty, unreadable or missing columns: "
                f"{layout.index_quarantine_path(out)}); check the CSV that --annotations or --csv SPLIT=FILE names")
    return (f"all {stats['read']} actions were skipped or quarantined ({_reason_counts(dropped)}); "
            f"see {layout.index_quarantine_path(out)}")


def _empty_samples_cause(stats: dict, out: str) -> str:
    unlabelled, quarantined = stats.get("unlabelled_skipped", 0), stats.get("quarantined", {})
    if not stats["read"]:
        return "the index holds no action; see the index stage's counts in " + layout.manifest_path(out)
    if unlabelled == stats["read"]:
        return (f"none of its {unlabelled} indexed actions has a trajectory label and --unlabelled skip drops "
                f"them; pass --labels DIR (hoi-forecast labels) to the index stage, or --unlabelled keep")
    parts = [f"{unlabelled} have no trajectory label (pass --labels DIR, or --unlabelled keep)"] if unlabelled else []
    parts.append(f"{sum(quarantined.values())} were quarantined ({_reason_counts(quarantined)}; "
                 f"see {layout.quarantine_dir(out)})")
    return f"of its {stats['read']} indexed actions " + " and ".join(parts)


def _empty_features_cause(stats: dict, out: str) -> str:
    if not stats.get("shards"):
        if stats.get("shards_not_ready"):
            return f"its {stats['shards_not_ready']} sample shards are unfinished; rerun --stage samples"
        return "it has no sample shard; run --stage samples first"
    if not stats.get("read"):
        return "its sample shards hold no sample; see the samples stage's counts in " + layout.manifest_path(out)
    return (f"the frames of all {stats['read']} samples are undecodable "
            f"({_reason_counts(stats.get('quarantined', {}))}); see {layout.quarantine_dir(out)}")


EMPTY_OUTPUT_CAUSES = {"index": _empty_index_cause, "samples": _empty_samples_cause,
                       "features": _empty_features_cause}


def empty_output_warnings(report: dict[str, dict[str, dict]], out: str) -> list[str]:
    """One line per stage and cause where a stage of ``report`` ({stage: {split: stats}}, as the
    stage functions return them) wrote nothing for a split: the splits, the cause and the flag or
    file that helps. Empty when every split got output."""
    lines = []
    for stage, split_stats in report.items():
        splits_by_cause: dict[str, list[str]] = {}
        for split, stats in split_stats.items():
            if stats.get("written", 0) == 0:
                splits_by_cause.setdefault(EMPTY_OUTPUT_CAUSES[stage](stats, out), []).append(split)
        lines += [f"{stage} wrote 0 {OUTPUT_UNITS[stage]} for {', '.join(splits)}: {cause}"
                  for cause, splits in splits_by_cause.items()]
    return lines


RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"


def disable_progress_bars(ctx) -> None:
    """Turn Ray Data's own progress bars off in ``ctx`` (a ``DataContext``), without its warning that
    says how to turn them on again (once per process: once per stage of a run)."""
    ctx.enable_progress_bars = False
    logging.getLogger(RAY_DATA_PROGRESS_LOGGER).setLevel(logging.ERROR)
