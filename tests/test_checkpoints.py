"""Checkpoints sized for 7B/13B (handsonvlm/checkpoints.py, pipelines/train_worker.rank_checkpoint_dir):
which files a rank restores, the layout a resume checks, and a real per-rank restore.

The restore test runs this file as a script on two CPU ranks (gloo, ``torch.distributed`` environment
variables, no Ray runtime; marked ``ray`` like the other DeepSpeed integration tests): each rank wraps
a small MLP with DeepSpeed (ZeRO-2, then ZeRO-3), takes a step, saves with the training's
``handsonvlm.checkpoints.save_rank`` into one folder (as Ray Train's upload merges the ranks' folders), takes a second
step, then a freshly built engine restores from that folder through a non-local pyarrow file system
(so the copy path runs, as from S3) and takes the same second step: its weights must equal the
original's bit for bit (weights, Adam moments, RNG restored), and each rank must have copied its own
partition and no other rank's."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from handsonvlm import checkpoints
from handsonvlm.checkpoints import CheckpointLayout, CheckpointMismatch

WORLD = 2
HIDDEN = 16  # the MLP's width: large enough for ZeRO-3 to partition, small enough to be instant
STEPS_BEFORE_SAVE = 1
ZERO3_TWO_RANKS = [  # DeepSpeed 0.19.8's names for a ZeRO-3 checkpoint of 2 ranks (tag "ckpt"), and ours
    "ckpt/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "ckpt/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
    "ckpt/zero_pp_rank_0_mp_rank_00_model_states.pt", "ckpt/zero_pp_rank_1_mp_rank_00_model_states.pt",
    "handsonvlm_checkpoint.json", "latest", "rank_0_state.pt", "rank_1_state.pt", "zero_to_fp32.py"]


# ---------------------------------------------------------------- file selection and layout, no DeepSpeed
def test_each_rank_takes_its_own_partition_and_the_shared_files():
    own, shared = checkpoints.files_for_rank(ZERO3_TWO_RANKS, 1)
    assert own == ["ckpt/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                   "ckpt/zero_pp_rank_1_mp_rank_00_model_states.pt", "rank_1_state.pt"]
    assert shared == ["handsonvlm_checkpoint.json", "latest", "zero_to_fp32.py"]
    # rank 1 of 12 is not rank 11's (names are matched whole, not by prefix); ZeRO-2's module file is shared
    assert checkpoints.rank_of("ckpt/zero_pp_rank_11_mp_rank_00_optim_states.pt") == 11
    assert checkpoints.rank_of("ckpt/mp_rank_00_model_states.pt") is None


def test_a_world_size_change_stops_with_what_to_do(tmp_path):
    import pyarrow.fs as pafs

    checkpoints.write_layout(str(tmp_path), CheckpointLayout(world_size=8, zero_stage=3, step=500))
    layout = checkpoints.read_layout(pafs.LocalFileSystem(), str(tmp_path))
    assert layout == CheckpointLayout(world_size=8, zero_stage=3, step=500)
    checkpoints.check_layout(layout, 8, 3, "here")  # the same layout resumes
    with pytest.raises(CheckpointMismatch) as raised:
        checkpoints.check_layout(layout, 16, 3, "s3://b/run/checkpoint_x")
    message = str(raised.value)
    for part in ("s3://b/run/checkpoint_x", "8 ranks with ZeRO-3", "16 ranks", "train.num_workers=8",
                 "zero_to_fp32.py", "new --run-name"):
        assert part in message, part
    with pytest.raises(CheckpointMismatch, match="ZeRO-2"):
        checkpoints.check_layout(layout, 8, 2, "here")


def test_a_checkpoint_without_its_layout_file_is_read_from_its_names(tmp_path):
    import pyarrow.fs as pafs

    for name in ZERO3_TWO_RANKS:
        if name != checkpoints.META_FILE:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(b"x")
    layout = checkpoints.read_layout(pafs.LocalFileSystem(), str(tmp_path))
    assert (layout.world_size, layout.zero_stage) == (2, 3)


# ---------------------------------------------------------------- where the export goes, how MLflow records it
def test_an_auto_export_goes_beside_the_checkpoints_on_a_cluster(tmp_path, monkeypatch):
    from pipelines.train import export_path_for

    monkeypatch.chdir(tmp_path)
    # a Ray this command started, local storage: the demo's runs/models/<run>
    assert export_path_for("auto", "run-a", "runs/ray_results") == str(tmp_path / "runs" / "models" / "run-a")
    # storage on S3, or a cluster this command connected to (its storage is shared): beside the checkpoints
    assert export_path_for("auto", "run-a", "s3://bucket/ray_results") == "s3://bucket/ray_results/run-a/export"
    assert export_path_for("auto", "run-a", "/mnt/shared/ray_results", on_cluster=True) == \
        "/mnt/shared/ray_results/run-a/export"
    assert export_path_for("/mnt/shared/models", "run-a", "s3://b/r", on_cluster=True) == "/mnt/shared/models/run-a"


def test_log_model_auto_uploads_only_a_small_local_export(tmp_path):
    from pipelines.train import AUTO_UPLOAD_MAX_BYTES, log_model_mode

    small, big = tmp_path / "small", tmp_path / "big"
    small.mkdir()
    big.mkdir()
    (small / "model.safetensors").write_bytes(b"x" * 1024)
    with open(big / "model.safetensors", "wb") as f:  # sparse: the size of a big export, no disk used
        f.truncate(AUTO_UPLOAD_MAX_BYTES + 1)
    assert log_model_mode("auto", str(small)) == "upload"
    assert log_model_mode("auto", str(big)) == "uri"
    assert log_model_mode("auto", "s3://bucket/run/export") == "uri"  # not listed: a URI is never streamed
    assert log_model_mode("upload", str(big)) == "upload" and log_model_mode("uri", str(small)) == "uri"


# ---------------------------------------------------------------- the two-rank restore (script mode)
def _engine(stage: int, seed: int):
    import deepspeed
    import torch

    from handsonvlm.config import CONFIG_DIR

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # the presets' configs/deepspeed/zero{2,3}.json, with the batch sizes filled in as the training does
    # (pipelines/train_worker.deepspeed_config: that module imports Ray and the model, ~15 s on 2 CPUs)
    config = json.loads((CONFIG_DIR / "deepspeed" / f"zero{stage}.json").read_text())
    config.update({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": WORLD,
                   "bf16": {"enabled": False}, "fp16": {"enabled": False}})
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _step(engine, rank: int, step: int) -> None:
    import torch

    inputs = torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(100 * step + rank))
    engine.backward(engine(inputs).pow(2).sum() + torch.rand(()) * 0)  # the global RNG is part of the state
    engine.step()


def _weights(engine) -> list[list[float]]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        return [p.detach().flatten().tolist() for p in engine.module.parameters()]


def _main(shared: str, out: str) -> None:
    import pyarrow.fs as pafs
    import torch
    from conftest import init_gloo_from_env

    init_gloo_from_env()
    rank = torch.distributed.get_rank()

    result = {}
    for stage in (2, 3):
        folder = os.path.join(shared, f"zero{stage}")
        original = _engine(stage, seed=0)
        generator = torch.Generator().manual_seed(rank)
        for step in range(STEPS_BEFORE_SAVE):
            _step(original, rank, step)
        checkpoints.save_rank(original, folder, rank, {"step": STEPS_BEFORE_SAVE}, generator, WORLD)
        torch.distributed.barrier()
        _step(original, rank, STEPS_BEFORE_SAVE)
        expected = _weights(original)

        restored = _engine(stage, seed=1)  # other initial weights: the restore must replace them all
        # a file system that is not LocalFileSystem (as S3 is not): the restore copies instead of reading in place
        remote = pafs.SubTreeFileSystem(shared, pafs.LocalFileSystem())
        logged = {}
        # each rank as local rank 0 of a node of its own (its own staging folder): what a node copies
        node_staging = os.path.join(shared, f"staging-node{rank}")
        with checkpoints.rank_checkpoint_dir(remote, f"zero{stage}", rank, 0, WORLD, stage, node_staging,
                                 lambda metrics, step, logged=logged: logged.update(metrics)) as local:
            copied = sorted(str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file())
            progress = checkpoints.load_rank(restored, local, rank, torch.Generator())
        _step(restored, rank, STEPS_BEFORE_SAVE)
        result[stage] = {"copied": copied, "step": progress["step"], "equal": _weights(restored) == expected,
                         "differs_from_fresh": _weights(_engine(stage, seed=1)) != expected,
                         "bytes": logged.get("restore/rank0_bytes"),
                         "removed": not os.path.exists(local)}
        torch.distributed.barrier()
    Path(out).write_text(json.dumps(result))


@pytest.mark.ray
def test_each_rank_restores_only_its_own_shards_and_resumes_exactly(tmp_path):
    import pyarrow.fs as pafs
    from conftest import isolated_env, rendezvous_env, run_to_completion

    env = isolated_env(OMP_NUM_THREADS="1", **rendezvous_env(tmp_path, WORLD))
    run_to_completion([([sys.executable, __file__, str(tmp_path), str(tmp_path / f"rank{rank}.json")],
                        {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, tmp_path / f"rank{rank}.log")
                       for rank in range(WORLD)], timeout=300)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    for stage in ("2", "3"):
        for rank, result in enumerate(results):
            got = result[stage]
            assert got["equal"] and got["differs_from_fresh"], (stage, rank)  # resumed exactly, not by luck
            assert got["step"] == STEPS_BEFORE_SAVE and got["removed"]
        saved = checkpoints.list_checkpoint(pafs.LocalFileSystem(), str(tmp_path / f"zero{stage}"))
        partitions = [f for f in saved if "zero_pp_rank_" in f]
        assert len(partitions) == WORLD * (1 if stage == "2" else 2), saved  # ZeRO-3 partitions the weights too
        for rank, result in enumerate(results):  # each node got its rank's files and the shared ones, no others
            own, shared = checkpoints.files_for_rank(saved, rank)
            assert result[stage]["copied"] == sorted(own + shared), (stage, rank)
            assert own and all(checkpoints.rank_of(f) == rank for f in own)
            assert result[stage]["bytes"] < sum((tmp_path / f"zero{stage}" / f).stat().st_size for f in saved)
        assert "ckpt/mp_rank_00_model_states.pt" in shared or stage == "3"
        # the layout the resume checked; a world of 1 is refused
        layout = checkpoints.read_layout(pafs.LocalFileSystem(), str(tmp_path / f"zero{stage}"))
        assert (layout.world_size, layout.zero_stage, layout.step) == (WORLD, int(stage), STEPS_BEFORE_SAVE)
        with pytest.raises(CheckpointMismatch):
            checkpoints.check_layout(layout, 1, int(stage), "x")


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
