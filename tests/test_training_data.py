"""The training input path without Ray (preprocessing.training_data): plan, row store, draw stream.

Shards are real Parquet files in the samples schema's training columns, with small row groups so
that reads cross row-group and file boundaries.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from handsonvlm.config import load_model_config
from handsonvlm.mixture import DRAW_INDEX, DRAW_TASK, Mixture
from pipelines import train as train_job
from preprocessing.training_data import (
    PATH_COLUMN,
    TRAIN_COLUMNS,
    ByteLRU,
    DrawStream,
    RowStore,
    describe_plan,
    fixed_rows,
    micro_batch_rows,
    plan_data,
    plan_pools,
    rank_positions,
)

VIDEOS = {"P01_01": 7, "P01_02": 5, "P02_01": 9}  # clips per shard (one shard per video)
ROW_GROUP = 3


def write_shards(directory, with_questions=lambda i: i % 4 == 0, videos=VIDEOS) -> list[dict]:
    """Shards of ``videos`` under ``directory``; returns every row in file order (sorted shard names)."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for video, count in sorted(videos.items()):
        shard = []
        for k in range(count):
            i = len(rows) + len(shard)
            shard.append({"sample_id": f"{video}_{k}", "narration": f"take thing {i}",
                          "narration_paraphrases": [f"grab thing {i}"], "noun": "thing",
                          "rbhp_questions": [f"Where for {i}?"] if with_questions(i) else [],
                          "future_hands": np.full((2, 5, 2), i / 100, np.float32).tolist(),
                          "future_valid": [True, bool(i % 2)], "obs_jpeg": [bytes([i % 256]) * 10] * 10})
        pq.write_table(pa.Table.from_pylist(shard), directory / f"{video}-0.parquet", row_group_size=ROW_GROUP)
        rows.extend(shard)
    return rows


@pytest.fixture()
def split(tmp_path):
    rows = write_shards(tmp_path / "samples" / "train")
    return tmp_path / "samples" / "train", rows


@pytest.fixture(scope="module")
def mixture():
    return Mixture.from_config({"seed": 3}, load_model_config("tiny"))


def test_plan_pools_and_schedule(split, mixture):
    directory, rows = split
    plan = plan_data(str(directory), world_size=2, micro_batch=2, accumulation=2, mixture=mixture)
    assert plan["total_rows"] == 21 and plan["samples_per_epoch"] == 21
    assert plan["steps_per_epoch"] == 3 and plan["draws_per_epoch"] == 24  # 21 rounded up to whole steps of 8
    assert plan["row_groups"] == [[3, 3, 1], [3, 2], [3, 3, 3]]
    assert plan["pools"]["rbhp"] == [i for i in range(21) if i % 4 == 0] and plan["pools"]["vhp"] == list(range(21))
    assert [rows[i]["sample_id"] for i in range(21)] == [
        f"{v}_{k}" for v, n in sorted(VIDEOS.items()) for k in range(n)]
    release = plan_data(str(directory), 8, 16, 1, mixture, samples_per_epoch=48296)
    assert release["steps_per_epoch"] == 378 and release["draws_per_epoch"] == 378 * 128
    with pytest.raises(FileNotFoundError, match="no sample shards"):
        plan_data(str(directory / "missing"), 1, 1, 1, mixture)


def test_row_store_reads_any_clips_in_order_and_caches_row_groups(split, mixture):
    directory, rows = split
    plan = plan_data(str(directory), 1, 1, 1, mixture)
    store = RowStore(plan, cache_bytes=1 << 30)
    wanted = [20, 0, 7, 7, 12, 3, 19]
    got = store.rows(wanted)
    assert [r["sample_id"] for r in got] == [rows[i]["sample_id"] for i in wanted]
    assert all(set(r) == {*TRAIN_COLUMNS, PATH_COLUMN} for r in got)
    assert got[0]["future_hands"] == rows[20]["future_hands"] and got[2]["obs_jpeg"] == rows[7]["obs_jpeg"]
    assert got[0][PATH_COLUMN].endswith("P02_01-0.parquet")
    reads = store.reads
    # (file, row group) of clips 20, 0, 7, 7, 12, 3, 19: (2,2) (0,0) (1,0) (1,0) (2,0) (0,1) (2,2): 5 distinct
    assert reads == 5
    store.rows(wanted)
    assert store.reads == reads  # all cached
    tiny = RowStore(plan, cache_bytes=0)  # keeps only the newest row group
    assert [r["sample_id"] for r in tiny.rows(wanted)] == [rows[i]["sample_id"] for i in wanted]


def test_byte_lru_drops_the_least_recently_used():
    cache = ByteLRU(10, size=len)
    cache.get("a", lambda: "aaaa")
    cache.get("b", lambda: "bbbb")
    cache.get("a", lambda: "never")  # a is now the most recent
    cache.get("c", lambda: "cccc")  # 12 bytes > 10: b goes
    assert list(cache.entries) == ["a", "c"] and cache.used == 8
    cache.get("d", lambda: "d" * 20)  # larger than the budget: kept alone
    assert list(cache.entries) == ["d"]


def test_ranks_split_each_global_batch(split, mixture):
    directory, _ = split
    plan = plan_data(str(directory), 3, 2, 1, mixture)
    positions = [rank_positions(plan, rank, micro).tolist() for micro in range(2) for rank in range(3)]
    assert positions == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]


def prepared(rows, epoch):
    return epoch, [(r["sample_id"], r[DRAW_TASK], r[DRAW_INDEX]) for r in rows]


def take(stream, n):
    out = []
    for item in stream:
        out.append(item)
        if len(out) == n:
            break
    stream.close()
    return out


def test_draw_stream_crosses_epochs_and_resumes_exactly(split, mixture):
    directory, _ = split
    plan = plan_data(str(directory), 2, 2, 1, mixture)  # 21 clips -> 6 steps of 4 draws per epoch
    store = RowStore(plan, 1 << 30)
    whole = take(DrawStream(plan, mixture, 1, store, prepared), 15)
    assert [(e, m) for e, m, _ in whole] == [(e, m) for e in range(3) for m in range(6)][:15]
    draws0 = mixture.draw_epoch(plan_pools(plan), plan["draws_per_epoch"], 0)
    assert [x[1] for x in whole[0][2][1]] == [draws0.names[t] for t in draws0.tasks[[2, 3]]]
    # resuming at (epoch 1, micro 4) gives exactly the batches the whole run had there
    resumed = take(DrawStream(plan, mixture, 1, RowStore(plan, 0), prepared, epoch=1, micro=4), 5)
    assert resumed == whole[10:15]
    # every rank sees another slice; together they cover the epoch's draws
    rank0 = take(DrawStream(plan, mixture, 0, store, prepared), 6)
    indices = sorted(i for batch in (rank0 + whole[:6]) for _, _, i in batch[2][1])
    assert indices == list(range(24))
    assert micro_batch_rows(plan, store, draws0, 0, 0)[0]["sample_id"] == rank0[0][2][1][0][0]
    assert [r["sample_id"] for r in fixed_rows(plan, mixture, store)] == [x[0] for x in rank0[0][2][1]]


def test_draw_stream_raises_errors_of_its_thread_and_stops(split, mixture):
    directory, _ = split
    plan = plan_data(str(directory), 1, 2, 1, mixture)

    def broken(rows, epoch):
        raise ValueError("bad row")

    stream = DrawStream(plan, mixture, 0, RowStore(plan, 0), broken)
    with pytest.raises(RuntimeError, match="preparing training batches failed") as info:
        next(iter(stream))
    assert isinstance(info.value.__cause__, ValueError)
    stream.close()
    def slow(rows, epoch):
        time.sleep(0.05)
        return prepared(rows, epoch)

    live = DrawStream(plan, mixture, 0, RowStore(plan, 0), slow, ahead=1)
    next(iter(live))
    assert live.waited_s >= 0.04  # the consumer waited for the first batch, and it is on record
    live.close()
    assert not live.thread.is_alive()
    assert not [t for t in threading.enumerate() if t.name.startswith("draw-stream") and t.is_alive()]


def test_describe_plan_counts_the_run(split, mixture):
    directory, _ = split
    plan = plan_data(str(directory), 2, 2, 1, mixture, samples_per_epoch=40)
    report = describe_plan(plan, mixture, epochs=3, max_steps=25)
    assert report["steps_per_epoch"] == 10 and report["total_steps"] == 25 and report["total_samples"] == 100
    assert sum(report["samples_per_task"].values()) == 100 == report["samples_per_source"]["epic"]
    by_epoch = [mixture.draw_epoch(plan_pools(plan), 40, e).counts() for e in range(3)]
    assert report["samples_per_task"]["rbhp"] == by_epoch[0]["rbhp"] + by_epoch[1]["rbhp"] + \
        mixture.draw_epoch(plan_pools(plan), 40, 2).counts(20)["rbhp"]
    assert report["pool_sizes"] == {"rbhp": 6, "vhp": 21}
    assert 1.0 <= report["batch_distinct_videos_mean"] <= 2.0


def test_dry_run_reports_the_release_share_of_rbhp_under_partial_coverage(tmp_path, capsys):
    """20 % of the clips have reasoning questions (EPIC: ~19 %): RBHP still gets half of the draws."""
    videos = {f"P{p:02d}_{v:02d}": 10 for p in range(1, 5) for v in range(1, 6)}  # 200 clips
    write_shards(tmp_path / "samples" / "train", with_questions=lambda i: i % 5 == 0, videos=videos)
    argv = ["--config", "tiny", "--data", str(tmp_path), "--set", "model.mode=release", "--dry-run"]
    assert train_job.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "release" and report["pool_sizes"] == {"rbhp": 40, "vhp": 200}
    assert report["steps_per_epoch"] == 25 and report["total_steps"] == 500 and report["total_samples"] == 4000
    assert abs(report["task_shares"]["rbhp"] - 0.5) < 0.03
    assert report["samples_per_source"] == {"epic": 4000}
    assert report["batch_distinct_videos_mean"] >= 0.75 * report["micro_batch"]
    # the release's schedule on 8 workers, whatever the data: 378 steps x 40 epochs
    assert train_job.main(["--config", "vicuna-7b", "--num-workers", "8", "--data", str(tmp_path), "--dry-run"]) == 0
    release = json.loads(capsys.readouterr().out)
    assert (release["steps_per_epoch"], release["total_steps"], release["warmup_steps"]) == (378, 15120, 454)
    assert any("vicuna-7b-v1.3 does not exist" in w for w in release["warnings"])


def test_gpu_presets_never_fall_back_to_cpu(tmp_path, capsys):
    """train.device: auto follows the cluster, cuda requests GPUs (an autoscaler may add them) and fails
    at once where nothing can, cpu never asks."""
    from pipelines.common import DeviceError, resolve_use_gpu

    assert resolve_use_gpu("auto", 8, 8, can_autoscale=False) and not resolve_use_gpu("auto", 4, 8, False)
    assert resolve_use_gpu("cuda", 0, 8, can_autoscale=True)  # the autoscaler's GPU group starts at 0 nodes
    assert not resolve_use_gpu("cpu", 8, 8, can_autoscale=False)
    with pytest.raises(DeviceError, match=r"needs 8 GPUs .* has 2: .* --set train.device=cpu"):
        resolve_use_gpu("cuda", 2, 8, can_autoscale=False)
    # the 7B preset on this CPU machine: an error in seconds, before Ray starts, naming the override
    write_shards(tmp_path / "samples" / "train")
    start = time.perf_counter()
    assert train_job.main(["--config", "vicuna-7b", "--data", str(tmp_path), "--no-mlflow"]) == 2
    assert time.perf_counter() - start < 30
    err = capsys.readouterr().err
    assert "train.device=cuda needs 8 GPUs" in err and "this machine has 0" in err and "train.device=cpu" in err
    assert train_job.main(["--config", "vicuna-7b", "--data", str(tmp_path), "--dry-run"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["device"], report["backend"]) == ("cuda", "nccl")
