"""One dtype story (issue 18): the frozen vision tower lives outside the DeepSpeed engine, in
``model.vision.dtype``, and the three places that run it compute bit-identical features.

With the real tiny model and a real DeepSpeed engine in bf16 mode on one gloo rank (CPU, no Ray
runtime), for a float32 tower under ZeRO-3 and a bfloat16 tower under ZeRO-2:

* after ``deepspeed.initialize`` the tower's parameters keep the configured dtype (the LM, projector
  and decoder are bf16: the engine did cast what it owns), the engine's module does not list them,
  the ZeRO optimizer does not hold them and ZeRO-3 did not partition them (no ``ds_id``);
* the pooled features computed inside the engine's forward (the online training path), the feature
  cache's (``process_feature_shard`` with the default ``auto`` storage, read back by
  ``FeatureLookup`` as training reads it) and the evaluation path's (the export loaded in bf16 by
  ``inference.load_model``, its tower on decoded clips as ``pipelines/evaluate.py`` feeds it) are
  equal bit for bit;
* the trajectory decoder follows the engine (bf16 weights) and returns float32 predictions and losses
  (docs/MODEL.md, "Precision").

About 25 s on 2 CPUs, most of it importing DeepSpeed.
"""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import init_gloo_from_env, rendezvous_env

from handsonvlm.config import ModelConfig, TrainConfig, load_preset
from handsonvlm.constants import NUM_FUTURE_POINTS, NUM_HANDS, NUM_OBS_FRAMES, POINT_DIM

SPLIT, SHARD = "train", "P01_01-0"
FRAME_HEIGHT, FRAME_WIDTH = 48, 80  # small frames; the tower resizes them to its own size
ROWS, MICRO_BATCH = 2, 2
JPEG_QUALITY = 90


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """torch.distributed with one gloo rank from the environment variables Ray Train sets (DeepSpeed's
    zero.Init reads LOCAL_RANK), met through a file rendezvous (conftest.rendezvous_env: no port to
    race for), torn down afterwards."""
    import torch.distributed as dist

    with pytest.MonkeyPatch.context() as env:
        variables = {**rendezvous_env(tmp_path_factory.mktemp("rendezvous"), world=1), "RANK": "0", "LOCAL_RANK": "0"}
        for name, value in variables.items():
            env.setenv(name, value)
        init_gloo_from_env()
        yield
        dist.destroy_process_group()


def _sample_shard(path) -> list[dict]:
    """A sample shard of ROWS clips of noise JPEGs (the columns the features stage and training read);
    returns its rows as the row store delivers them (with the shard ``path``), before the draw."""
    from preprocessing.training_data import PATH_COLUMN

    rng = np.random.default_rng(0)
    rows = []
    for n in range(ROWS):
        jpegs = [cv2.imencode(".jpg", rng.integers(0, 256, (FRAME_HEIGHT, FRAME_WIDTH, 3), dtype=np.uint8),
                              [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1].tobytes() for _ in range(NUM_OBS_FRAMES)]
        rows.append({"sample_id": f"s{n}", "video_id": "P01_01", "narration": "take cup", "noun": "cup",
                     "narration_paraphrases": ["pick up the cup"], "rbhp_questions": ["Where do I drink from?"],
                     "future_hands": rng.random((NUM_HANDS, NUM_FUTURE_POINTS + 1, POINT_DIM)).tolist(),
                     "future_valid": [True, True], "obs_jpeg": jpegs})
    table = pa.table({"sample_id": [r["sample_id"] for r in rows], "video_id": [r["video_id"] for r in rows],
                      "obs_jpeg": pa.array([r["obs_jpeg"] for r in rows], pa.list_(pa.binary(), NUM_OBS_FRAMES))})
    pq.write_table(table, path)
    return [{**row, PATH_COLUMN: str(path)} for row in rows]


@pytest.mark.parametrize("tower_dtype, zero_stage", [("float32", 3), ("bfloat16", 2)])
def test_tower_outside_the_engine_and_bit_identical_features(tmp_path, one_rank, tower_dtype, zero_stage):
    import deepspeed

    from handsonvlm.data import clip_frames
    from handsonvlm.inference import load_model
    from handsonvlm.mixture import drawn_rows
    from handsonvlm.training import Zero3Init, build_training, rows_to_batch
    from pipelines.train_worker import deepspeed_config
    from preprocessing import layout
    from preprocessing.features import feature_key, process_feature_shard, read_feature_table
    from preprocessing.training_data import FeatureLookup

    preset = load_preset("tiny")
    preset["model"]["vision"]["dtype"] = tower_dtype
    train, cfg = TrainConfig.from_dict(preset["train"]), ModelConfig.from_dict(preset["model"])
    configured = getattr(torch, tower_dtype)
    ds_config = deepspeed_config(zero_stage, MICRO_BATCH, 1, 1, True, train.max_grad_norm)
    parts = build_training(train, cfg, 5, init=Zero3Init(ds_config) if zero_stage == 3 else None)
    model = parts.model
    engine, *_ = deepspeed.initialize(model=model, optimizer=parts.optimizer, lr_scheduler=parts.scheduler,
                                      config=ds_config)

    # the engine cast what it owns to bf16, and not the tower
    tower_params = list(model.vision.parameters())
    assert tower_params and {p.dtype for p in tower_params} == {configured}
    assert model.projector.weight.dtype == next(model.lm.parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in model.traj_decoder.parameters()} == {torch.bfloat16}
    tower_ids = {id(p) for p in tower_params}
    assert not tower_ids & {id(p) for p in engine.module.parameters()}
    assert not any(name.startswith("vision.") for name, _ in engine.module.named_parameters())
    optimised = {id(p) for group in getattr(engine.optimizer, "fp16_groups", None)
                 or getattr(engine.optimizer, "bit16_groups", []) for p in group}
    assert optimised and not tower_ids & optimised
    assert not any(hasattr(p, "ds_id") for p in tower_params)  # never partitioned (ZeRO-3)
    assert all(hasattr(p, "ds_id") for p in engine.module.parameters()) == (zero_stage == 3)

    # online: the features computed inside the engine's forward (frame_features, spied on, runs for real)
    clips = _sample_shard(tmp_path / f"{SHARD}.parquet")
    draws = parts.mixture.draw_epoch(parts.mixture.pools(clips), MICRO_BATCH, 0)
    rows = drawn_rows([clips[r] for r in draws.rows.tolist()], draws, range(MICRO_BATCH))
    batch, _ = rows_to_batch(rows, model, parts.mixture, 0, torch.device("cpu"))
    computed = []
    real_frame_features = model.frame_features
    model.frame_features = lambda frames: computed.append(real_frame_features(frames)) or computed[-1]
    out = engine(**batch, generator=torch.Generator().manual_seed(0))
    del model.frame_features
    (online_means, online_grids), = computed
    assert online_means.dtype == online_grids.dtype == configured
    assert out["pred"].dtype == out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])

    # the feature cache, stored exactly (auto: float32 for both towers) and read as training reads it
    data = tmp_path / "out"
    key = feature_key(cfg)
    spec = {"split": SPLIT, "shard_id": SHARD, "samples": str(tmp_path / f"{SHARD}.parquet")}
    summary = process_feature_shard(spec, cfg, str(data), tower=model.vision)
    assert summary["dtype"] == "float32" and summary["written"] == ROWS
    assert read_feature_table(str(data), key, SPLIT, SHARD).schema.field("frame_means").metadata[b"computed_dtype"] \
        == tower_dtype.encode()
    cached_means, cached_grids = FeatureLookup(str(data), key, SPLIT)(rows)
    assert layout.shard_id(rows[0]["path"]) == SHARD
    assert torch.equal(cached_means, online_means.float()) and torch.equal(cached_grids, online_grids.float())

    # evaluation: the export loaded in bf16 (tower in its configured dtype), clips decoded as evaluate.py does
    export = tmp_path / "export"
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        model.save_pretrained(export)
    evaluated, _ = load_model(export, device="cpu", dtype="bf16")
    assert {p.dtype for p in evaluated.vision.parameters()} == {configured}
    assert evaluated.projector.weight.dtype == torch.bfloat16
    clips = torch.stack([clip_frames(list(row["obs_jpeg"]), evaluated.vision.image_size) for row in rows])
    assert torch.equal(clips, batch["frames"])  # one input preprocessing
    eval_means, eval_grids = evaluated.frame_features(clips)
    assert torch.equal(eval_means, online_means) and torch.equal(eval_grids, online_grids)
    # and the visual tokens the LM sees: the engine's bf16 projector on cached features = the evaluated model's
    with torch.no_grad(), deepspeed.zero.GatheredParameters(list(model.projector.parameters())):
        torch.testing.assert_close(evaluated.visual_tokens(clips),
                                   model.visual_tokens(frame_means=cached_means, frame_grids=cached_grids),
                                   rtol=0, atol=0)


def test_init_weights_under_zero3_fill_the_partitions_with_the_exported_values(tmp_path, one_rank):
    """``train.init_weights`` with ZeRO-3's partitioned construction (``Zero3Init``): each parameter is
    gathered on its own while it is written, and the partitions then hold the export's values. Then
    the other way round, as a user changing the world size does (docs/RELIABILITY.md): the engine's
    ZeRO-3 checkpoint, consolidated by DeepSpeed's own ``zero_to_fp32`` into safetensors and into a
    torch .bin, starts a plain run holding the same values."""
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

    from handsonvlm.training import Zero3Init, build_training
    from pipelines.train_worker import deepspeed_config

    preset = load_preset("tiny")
    train, cfg = TrainConfig.from_dict(preset["train"]), ModelConfig.from_dict(preset["model"])
    with torch.random.fork_rng(devices=[]):
        source = build_training(train, cfg, 5).model
        with torch.no_grad():
            for param in source.parameters():
                param.add_(torch.randn_like(param) * 0.1)
    source.save_pretrained(tmp_path / "export")
    expected = {k: p.detach().clone() for k, p in source.named_parameters()}

    ds_config = deepspeed_config(3, MICRO_BATCH, 1, 1, False, train.max_grad_norm)  # fp32: exact values
    resumed = TrainConfig.from_dict({**preset["train"], "seed": 1, "init_weights": str(tmp_path / "export")})
    with torch.random.fork_rng(devices=[]):
        parts = build_training(resumed, cfg, 5, init=Zero3Init(ds_config))
    model = parts.model
    params = dict(model.named_parameters())
    assert all(hasattr(p, "ds_id") for p in params.values())  # partitioned as they were created
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for key, value in expected.items():
            assert torch.equal(params[key].data, value), key

    engine, *_ = deepspeed.initialize(model=model, optimizer=parts.optimizer, lr_scheduler=parts.scheduler,
                                      config=ds_config)
    engine.save_checkpoint(str(tmp_path / "checkpoint"), tag="step")
    for safe in (True, False):
        consolidated = tmp_path / f"fp32-{safe}"
        convert_zero_checkpoint_to_fp32_state_dict(str(tmp_path / "checkpoint"), str(consolidated), tag="step",
                                                   safe_serialization=safe)
        assert [p.name for p in consolidated.iterdir()] == ["model.safetensors" if safe else "pytorch_model.bin"]
        fresh = TrainConfig.from_dict({**preset["train"], "seed": 2, "init_weights": str(consolidated)})
        with torch.random.fork_rng(devices=[]):
            plain = dict(build_training(fresh, cfg, 5).model.named_parameters())
        for key, value in expected.items():
            assert torch.equal(plain[key].data, value), (safe, key)
