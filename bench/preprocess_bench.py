"""Preprocessing: the Ray Data samples stage vs a bare ``multiprocessing.Pool`` doing the same work.

Both sides run :func:`preprocessing.samples.process_shard` (decode the 10 observation frames of
every action of a shard, JPEG-encode them, write the shard's Parquet file and done marker) on the
same shard plan (:func:`preprocessing.stages.plan_shards` of the same index), with the same
number of processes. The Ray side is the real stage, :func:`preprocessing.stages.run_samples_stage`
(stale-shard check, fingerprints, Ray Data ``map`` with ``num_cpus=1``, manifest); the bare side
is the loop a script would write without Ray.

Besides wall time, each shard's done marker records the seconds spent inside ``process_shard``;
their sum over ``processes x wall`` is the fraction of the CPUs doing the actual work, so the
remainder is the orchestration overhead of each side.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.common import Sizes, compare, median
from preprocessing import layout
from preprocessing.index import IndexConfig
from preprocessing.layout import index_path
from preprocessing.samples import MediaConfig, process_shard, shard_fingerprint, table_to_ipc
from preprocessing.stages import plan_shards, run_index_stage, run_samples_stage
from synthkitchens.generate import METADATA_FILE, generate

SPLITS = ("train", "validation")
SYNTH_SEED = 0


def synthetic_tree(root: Path, sizes: Sizes) -> Path:
    """A SynthKitchens tree for ``sizes`` under ``root``, reused when an identical one is there."""
    tree = root / f"synth-v{sizes.videos}-a{sizes.actions_per_video}-s{SYNTH_SEED}"
    metadata = tree / METADATA_FILE
    if metadata.exists():
        arguments = json.loads(metadata.read_text()).get("arguments", {})
        if (arguments.get("videos"), arguments.get("actions_per_video"), arguments.get("seed")) == \
                (sizes.videos, sizes.actions_per_video, SYNTH_SEED):
            return tree
    generate(str(tree), videos=sizes.videos, actions_per_video=sizes.actions_per_video, seed=SYNTH_SEED, workers=2)
    return tree


def index_config(tree: Path) -> IndexConfig:
    return IndexConfig(annotations=str(tree / "annotations"), splits=SPLITS, questions=str(tree / "handsonvlm_assets"),
                       labels=str(tree / "hoi_forecast" / "ek100"))


def clear_samples(out: Path) -> None:
    """Remove sample shards, their done markers and quarantine files so the next run redoes every shard."""
    for split in SPLITS:
        shutil.rmtree(layout.samples_dir(out, split), ignore_errors=True)
        shutil.rmtree(layout.samples_state_dir(out, split), ignore_errors=True)
        for path in Path(layout.quarantine_dir(out)).glob(f"{layout.sample_quarantine_prefix(split)}*"):
            path.unlink()


def shard_specs(out: Path, media: MediaConfig, shard_size: int = 256) -> list[tuple]:
    """The stage's shard plan as ``process_shard`` arguments: labelled actions, one video per shard."""
    specs = []
    for split in SPLITS:
        index = pq.read_table(index_path(str(out), split))
        index = index.filter(pc.not_equal(index.column("label_source"), "none"))
        for shard_id, rows in plan_shards(index, shard_size):
            rows_ipc = table_to_ipc(rows)
            specs.append((split, shard_id, rows_ipc, shard_fingerprint(rows_ipc, media), media))
    return specs


def shard_seconds(out: Path) -> tuple[int, float]:
    """(clips written, seconds spent inside process_shard) summed over the done markers of ``out``."""
    written, seconds = 0, 0.0
    for marker in (out / "_state" / "samples").rglob("*.json"):
        summary = json.loads(marker.read_text())
        written += summary["written"]
        seconds += summary["seconds"]
    return written, seconds


def limit_threads_like_ray(threads: int = 1) -> None:
    """Pool initializer: the thread limit Ray gives a ``num_cpus=1`` worker (OMP_NUM_THREADS=1).

    Runs before the worker imports the decoding libraries (they are imported when the first task
    is unpickled), so both sides decode and encode with the same threading."""
    os.environ["OMP_NUM_THREADS"] = str(threads)


class BarePool:
    """The no-Ray baseline: one process pool, reused across repetitions like Ray's worker pool."""

    def __init__(self, processes: int):
        # spawn: the driver holds Ray's threads, which a fork would copy in an undefined state.
        self.pool = multiprocessing.get_context("spawn").Pool(processes, initializer=limit_threads_like_ray)

    def run(self, out: Path, media: MediaConfig) -> list[dict]:
        clear_samples(out)
        return self.pool.starmap(process_shard, shard_specs(out, media), chunksize=1)

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


def run_ray_stage(out: Path, media: MediaConfig) -> dict:
    clear_samples(out)
    return run_samples_stage(str(out), SPLITS, media, progress=False)


def bench_preprocess(workdir: Path, sizes: Sizes, processes: int) -> dict:
    """clips/s of the Ray Data samples stage and of the bare pool; ``preprocess_ratio`` = Ray / bare."""
    tree = synthetic_tree(workdir, sizes)
    outs = {"ray": workdir / "prep-ray", "bare": workdir / "prep-bare"}
    media = {}
    for name, out in outs.items():
        shutil.rmtree(out, ignore_errors=True)
        run_index_stage(index_config(tree), str(out))
        media[name] = MediaConfig(epic_root=str(tree / "EPIC-KITCHENS"), out=str(out))

    bare = BarePool(processes)
    busy: dict[str, list[float]] = {"ray": [], "bare": []}

    def side(name, fn):
        def run():
            fn(outs[name], media[name])
            busy[name].append(shard_seconds(outs[name])[1])
        return run

    try:
        seconds = compare({"ray": side("ray", run_ray_stage), "bare": side("bare", bare.run)},
                          reps=sizes.preprocess_reps, warmup=1)
    finally:
        bare.close()
    clips = {name: shard_seconds(out)[0] for name, out in outs.items()}
    if clips["ray"] != clips["bare"]:
        raise RuntimeError(f"the two sides wrote different numbers of clips: {clips}")
    n_clips = clips["ray"]
    result = {"clips": n_clips, "shards": len(shard_specs(outs["bare"], media["bare"])), "processes": processes,
              "reps": sizes.preprocess_reps}
    for name in outs:
        wall = median(seconds[name])
        in_task = median(busy[name][-sizes.preprocess_reps:])
        result[name] = {"seconds": seconds[name], "median_s": wall, "clips_per_s": n_clips / wall,
                        "in_task_s": in_task, "cpu_utilisation": in_task / (processes * wall)}
    result["preprocess_ratio"] = result["ray"]["clips_per_s"] / result["bare"]["clips_per_s"]
    result["ray_overhead_s"] = result["ray"]["median_s"] - result["bare"]["median_s"]
    return result
