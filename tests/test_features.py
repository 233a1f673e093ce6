"""The features stage on SynthKitchens: layout, row contract, values equal to the model's own
``frame_features``, reuse, stale removal, key separation, quarantine of undecodable frames."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from handsonvlm.config import load_model_config
from handsonvlm.data import clip_frames
from handsonvlm.model import HandsOnVLM
from pipelines import preprocess
from preprocessing import storage
from preprocessing.features import (
    VISION_CONFIG_FILE,
    align_features,
    feature_key,
    feature_shard_current,
    load_feature_shard,
    plan_feature_shards,
    process_feature_shard,
    read_feature_table,
)
from preprocessing.layout import feature_shard_paths as feature_paths
from preprocessing.layout import sample_shard_paths as shard_paths
from preprocessing.schema import tensor_column
from synthkitchens.generate import generate, preprocess_source_args

pytestmark = pytest.mark.ray

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
SPLITS = ("train", "validation")
SEED1 = ["model.vision.init_seed=1"]


def run_job(tree, out, *extra):
    return preprocess.main([*preprocess_source_args(tree), "--out", str(out), "--no-progress", *extra])


def run_features(out, *extra):
    return preprocess.main(["--stage", "features", "--out", str(out), "--model-config", TINY,
                            "--feature-actors", "1", "--no-progress", *extra])


def sample_shards(out, split):
    return sorted(p.stem for p in (out / "samples" / split).glob("*.parquet"))


def read_samples(out, split, shard_id):
    return pq.read_table(out / "samples" / split / f"{shard_id}.parquet", columns=["sample_id", "obs_jpeg"])


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


def reference_features(model, samples):
    """The model's own per-clip features of every row: (means [N, F, C], grids [N, F, G, C]) float32."""
    means, grids = [], []
    for row in samples.to_pylist():
        frames = clip_frames(row["obs_jpeg"], model.vision.image_size)
        m, g = model.frame_features(frames[None])
        means.append(m[0].numpy())
        grids.append(g[0].numpy())
    return np.stack(means), np.stack(grids)


@pytest.fixture(scope="module")
def processed(tmp_path_factory, ray_local):
    tree = tmp_path_factory.mktemp("synth")
    generate(str(tree), videos=2, actions_per_video=3, seed=0, workers=1)
    out = tmp_path_factory.mktemp("out")
    assert run_job(tree, out) == 0
    assert run_features(out) == 0
    return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(123)  # the tower must not depend on the global RNG (cfg.vision.init_seed)
    return HandsOnVLM(load_model_config("tiny")).eval()


def test_layout_and_row_contract(processed):
    key = feature_key(load_model_config("tiny"))
    root = processed / "features" / key
    vision = json.loads((root / VISION_CONFIG_FILE).read_text())
    assert vision["key"] == key and vision["vision"]["init_seed"] == 0 and vision["spatial_pool"] == 2
    assert vision["dims"] == {"num_frames": 10, "channels": 32, "grid_tokens": 16}
    m = manifest(processed)
    for split in SPLITS:
        shards = sample_shards(processed, split)
        assert shards and sorted(p.stem for p in (root / split).glob("*.parquet")) == shards  # 1:1
        stats = m["splits"][split]["features"]
        assert stats["key"] == key and stats["shards"] == stats["shards_processed"] == len(shards)
        assert stats["read"] == stats["written"] > 0 and stats["quarantined"] == {}
        for shard_id in shards:
            samples = read_samples(processed, split, shard_id)
            table = read_feature_table(str(processed), key, split, shard_id)
            assert table.column("sample_id").to_pylist() == samples.column("sample_id").to_pylist()  # same order
            assert table.column("sample_row").to_pylist() == list(range(samples.num_rows))
            assert set(table.column("schema_version").to_pylist()) == {1}
            field = table.schema.field("frame_grids")
            # the default storage (auto) of the tiny float32 tower: float32, what the tower computes
            assert field.metadata[b"dtype"] == b"float32" and field.metadata[b"shape"] == b"[10, 16, 32]"
            assert field.metadata[b"computed_dtype"] == b"float32"
            assert table.schema.metadata[b"vision_key"] == key.encode()
            assert tensor_column(table, "frame_means").dtype == np.float32
            assert feature_shard_current(str(processed), key, split, shard_id)


def test_values_equal_the_models_frame_features(processed, model):
    key = feature_key(model.cfg)
    for split in SPLITS:
        for shard_id in sample_shards(processed, split):
            ref_means, ref_grids = reference_features(model, read_samples(processed, split, shard_id))
            table = read_feature_table(str(processed), key, split, shard_id)
            # the default (auto) storage holds the model's features bit for bit
            np.testing.assert_array_equal(tensor_column(table, "frame_means"), ref_means)
            np.testing.assert_array_equal(tensor_column(table, "frame_grids"), ref_grids)
            loaded = load_feature_shard(str(processed), key, split, shard_id)
            sid = table.column("sample_id")[0].as_py()
            assert loaded[sid][0].dtype == np.float32 and loaded[sid][1].shape == (10, 16, 32)
            np.testing.assert_array_equal(loaded[sid][0], ref_means[0])


def test_rerun_reuses_shards_and_removes_stale_ones(processed):
    key = feature_key(load_model_config("tiny"))
    root = processed / "features" / key
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.parquet")}
    stale = root / "train" / "P99_99-0000.parquet"
    shutil.copy(next(iter(before)), stale)
    assert run_features(processed) == 0
    assert not stale.exists()
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.parquet")} == before
    for split in SPLITS:
        stats = manifest(processed)["splits"][split]["features"]
        assert stats["shards_reused"] == stats["shards"] and stats["shards_processed"] == 0
    assert manifest(processed)["splits"]["train"]["features"]["stale_shards_removed"] == 1

    # a sample shard redone with another fingerprint makes its feature shard out of date
    split, shard_id = "train", sample_shards(processed, "train")[0]
    done = shard_paths(str(processed), split, shard_id)["done"]
    marker = storage.read_json(done)
    try:
        storage.write_json_atomic(done, {**marker, "fingerprint": "changed"})
        assert not feature_shard_current(str(processed), key, split, shard_id)
        specs, _ = plan_feature_shards(str(processed), split, key, "float16")
        spec = next(s for s in specs if s["shard_id"] == shard_id)
        done_marker = storage.read_json(feature_paths(str(processed), key, split, shard_id)["done"])
        assert spec["fingerprint"] != done_marker["fingerprint"]  # the next run redoes this shard
    finally:
        storage.write_json_atomic(done, marker)


def test_vision_change_gives_a_new_key_and_float16_rounds_once(processed):
    key0 = feature_key(load_model_config("tiny"))
    cfg1 = load_model_config("tiny", SEED1)
    key1 = feature_key(cfg1)
    assert key1 != key0
    old = {p: p.stat().st_mtime_ns for p in (processed / "features" / key0).rglob("*")}
    assert run_features(processed, "--set", SEED1[0], "--feature-dtype", "float16") == 0
    assert {p: p.stat().st_mtime_ns for p in (processed / "features" / key0).rglob("*")} == old  # untouched
    assert json.loads((processed / "features" / key1 / VISION_CONFIG_FILE).read_text())["vision"]["init_seed"] == 1
    model1 = HandsOnVLM(cfg1).eval()
    for split in SPLITS:
        for shard_id in sample_shards(processed, split):
            ref_means, ref_grids = reference_features(model1, read_samples(processed, split, shard_id))
            table = read_feature_table(str(processed), key1, split, shard_id)
            assert table.schema.field("frame_means").metadata[b"dtype"] == b"float16"
            # float16 storage of a float32 tower (asked for) = the exact features rounded once to float16
            np.testing.assert_array_equal(tensor_column(table, "frame_means"), ref_means.astype(np.float16))
            np.testing.assert_array_equal(tensor_column(table, "frame_grids"), ref_grids.astype(np.float16))
            seed0 = tensor_column(read_feature_table(str(processed), key0, split, shard_id), "frame_means", np.float32)
            assert not np.allclose(seed0, ref_means, atol=1e-2)  # really another tower


def test_undecodable_frame_is_quarantined_and_the_rest_written(processed, model, tmp_path):
    """The pure-Python shard function (no Ray) on a sample shard with one broken JPEG."""
    split, shard_id = "train", sample_shards(processed, "train")[0]
    samples = pq.read_table(processed / "samples" / split / f"{shard_id}.parquet")
    assert samples.num_rows >= 3
    rows = samples.to_pylist()
    bad_id = rows[1]["sample_id"]
    rows[1]["obs_jpeg"][4] = b"not a jpeg"
    out = tmp_path / "out"
    storage.write_parquet_atomic(samples.from_pylist(rows, schema=samples.schema),
                                 str(out / "samples" / split / f"{shard_id}.parquet"))
    spec = {"split": split, "shard_id": shard_id, "samples": str(out / "samples" / split / f"{shard_id}.parquet"),
            "sample_fingerprint": "fp"}
    summary = process_feature_shard(spec, model.cfg, str(out), dtype="float32")
    assert summary["rows"] == len(rows) and summary["written"] == len(rows) - 1
    assert summary["quarantined"] == {"frame_corrupt": 1} and summary["missing_sample_ids"] == [bad_id]

    key = feature_key(model.cfg)
    table = read_feature_table(str(out), key, split, shard_id)
    ids = [r["sample_id"] for r in rows]
    assert table.column("sample_id").to_pylist() == [s for s in ids if s != bad_id]  # order kept, bad row absent
    assert table.column("sample_row").to_pylist() == [i for i in range(len(rows)) if i != 1]
    quarantine = pq.read_table(feature_paths(str(out), key, split, shard_id)["quarantine"]).to_pylist()
    assert [(q["stage"], q["item"], q["reason"]) for q in quarantine] == [("features", bad_id, "frame_corrupt")]

    means, grids, present = align_features(table, ids)
    assert present.tolist() == [i != 1 for i in range(len(rows))]
    assert not means[1].any() and not grids[1].any()
    good = samples.take([0])
    ref_means, ref_grids = reference_features(model, good)
    np.testing.assert_array_equal(means[0], ref_means[0])
    np.testing.assert_array_equal(grids[0], ref_grids[0])
    assert storage.read_json(feature_paths(str(out), key, split, shard_id)["done"])["written"] == len(rows) - 1


def test_cli_validation(tmp_path):
    with pytest.raises(SystemExit):  # the features stage needs a model config
        preprocess.parse_args(["--stage", "features", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # a bad override is a configuration error
        preprocess.parse_args(["--stage", "features", "--out", str(tmp_path), "--model-config", "tiny",
                               "--set", "model.vision.nonsense=1"])
    args = preprocess.parse_args(["--stage", "features", "--out", str(tmp_path), "--model-config", TINY,
                                  "--set", SEED1[0]])
    assert args.model_cfg.vision.init_seed == 1 and args.feature_dtype == "auto"
    with pytest.raises(SystemExit):  # other stages keep requiring their inputs
        preprocess.parse_args(["--stage", "samples", "--out", str(tmp_path)])


EFFICIENTNET = ["model.vision.kind=efficientnet_lite0", "model.vision.config=null"]


def test_efficientnet_tower_has_its_own_key_and_exact_float32_cache(processed, tmp_path):
    """The same stage with the pretrained EfficientNet-Lite0 tower (model.vision.kind): its own key, 1280-d
    features on a 3 x 3 pooled grid, float32 rows bit-identical to the model's ``frame_features``."""
    args = preprocess.parse_args(["--stage", "features", "--out", str(tmp_path), "--model-config", TINY,
                                  *(x for s in EFFICIENTNET for x in ("--set", s))])
    cfg = args.model_cfg
    assert cfg.vision.kind == "efficientnet_lite0" and cfg.vision.config is None
    key, clip_key = feature_key(cfg), feature_key(load_model_config("tiny"))
    assert key != clip_key
    torch.manual_seed(5)
    model = HandsOnVLM(cfg).eval()
    split, shard_id = "train", sample_shards(processed, "train")[0]
    samples = read_samples(processed, split, shard_id)
    spec = {"split": split, "shard_id": shard_id, "samples": str(processed / "samples" / split / f"{shard_id}.parquet"),
            "sample_fingerprint": "fp"}
    out = tmp_path / "out"
    summary = process_feature_shard(spec, cfg, str(out), dtype="float32")
    assert summary["key"] == key and summary["written"] == samples.num_rows
    assert summary["dims"] == {"num_frames": 10, "channels": 1280, "grid_tokens": 9}
    assert not (out / "features" / clip_key).exists()  # nothing written under the CLIP tower's key
    table = read_feature_table(str(out), key, split, shard_id)
    assert table.schema.metadata[b"vision_key"] == key.encode()
    assert table.schema.field("frame_grids").metadata[b"shape"] == b"[10, 9, 1280]"
    ref_means, ref_grids = reference_features(model, samples)
    np.testing.assert_array_equal(tensor_column(table, "frame_means"), ref_means)  # bit-exact
    np.testing.assert_array_equal(tensor_column(table, "frame_grids"), ref_grids)
    clip_means = tensor_column(read_feature_table(str(processed), clip_key, split, shard_id), "frame_means")
    assert clip_means.shape[-1] == 32  # the CLIP cache of the same shard is another tower's


def test_auto_storage_holds_every_tower_dtype_exactly():
    """``auto`` stores what the tower computes bit for bit: float16 for a float16 tower, float32 for float32
    and bfloat16 ones (Arrow has no bfloat16, and float16 loses bfloat16's small and large values)."""
    from preprocessing.features import resolve_feature_dtype

    expected = {"float16": "float16", "float32": "float32", "bfloat16": "float32"}
    for tower_dtype, stored in expected.items():
        cfg = load_model_config("tiny", [f"model.vision.dtype={tower_dtype}"])
        assert resolve_feature_dtype("auto", cfg) == stored
        assert resolve_feature_dtype("float16", cfg) == "float16"  # an explicit choice is kept
        values = (torch.randn(4096) * torch.logspace(-8, 6, 4096)).to(getattr(torch, tower_dtype))
        roundtrip = torch.from_numpy(values.float().numpy().astype(stored)).to(values.dtype)
        assert torch.equal(roundtrip, values)
    bf16 = torch.tensor([1e-6, 7e4], dtype=torch.bfloat16)  # below float16's normal range, above its max
    assert not torch.equal(bf16.half().to(torch.bfloat16), bf16)
    with pytest.raises(ValueError, match="feature dtype must be one of"):
        resolve_feature_dtype("bfloat16", load_model_config("tiny"))


def test_feature_lookup_converts_only_the_rows_asked_for(tmp_path):
    """FeatureLookup picks the rows from the cached (stored-dtype) shard and converts only those: the memory a
    call allocates grows with the rows asked for, not with the shard (it used to convert the whole shard
    to float32 on every batch), and the values are the stored ones."""
    import tracemalloc

    from preprocessing.features import _ShardWriter, feature_schema
    from preprocessing.training_data import PATH_COLUMN, FeatureLookup

    key, split, shard, rows, frames, channels, grid = "k", "train", "P01_01-0", 64, 10, 32, 16
    rng = np.random.default_rng(0)
    means = rng.standard_normal((rows, frames, channels)).astype(np.float16)
    grids = rng.standard_normal((rows, frames, grid, channels)).astype(np.float16)
    writer = _ShardWriter(feature_schema(frames, channels, grid, "float16", key))
    writer.add([f"s{i}" for i in range(rows)], list(range(rows)), means, grids)
    writer.commit(feature_paths(str(tmp_path), key, split, shard)["features"])
    lookup = FeatureLookup(str(tmp_path), key, split)
    path = f"/data/samples/{split}/{shard}.parquet"

    def peak_bytes(picked: list[int]) -> int:
        tracemalloc.start()
        try:
            got_means, got_grids = lookup([{"sample_id": f"s{i}", PATH_COLUMN: path} for i in picked])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        np.testing.assert_array_equal(got_means.numpy(), means[picked].astype(np.float32))
        np.testing.assert_array_equal(got_grids.numpy(), grids[picked].astype(np.float32))
        return peak

    peak_bytes([0])  # reads the shard into the cache
    row_fp32 = (frames * channels + frames * grid * channels) * np.dtype(np.float32).itemsize
    few, many = peak_bytes([5, 40]), peak_bytes(list(range(0, rows, 2)))
    assert few < 0.1 * rows * row_fp32  # converting the shard alone would take rows * row_fp32
    assert many > (rows // 2) * row_fp32 and many > 8 * few  # the measure sees the conversion; it scales with rows


def test_feature_lookup_keeps_the_shards_its_cache_holds_and_rereads_the_others(tmp_path, monkeypatch):
    """train.feature_cache_mb sizes FeatureLookup's shard cache: with room for every shard each is read
    once however often its rows are asked for; with room for one, alternating between two shards rereads
    them on every call (what a too small cache costs every batch)."""
    import preprocessing.features as features_module
    from preprocessing.features import _ShardWriter, feature_schema
    from preprocessing.training_data import MB, PATH_COLUMN, FeatureLookup

    key, split, frames, channels, grid, rows = "k", "train", 10, 32, 16, 8
    rng = np.random.default_rng(0)
    shards = ["P01_01-0", "P01_02-0"]
    for shard in shards:
        writer = _ShardWriter(feature_schema(frames, channels, grid, "float32", key))
        writer.add([f"{shard}/{i}" for i in range(rows)], list(range(rows)),
                   rng.standard_normal((rows, frames, channels)).astype(np.float32),
                   rng.standard_normal((rows, frames, grid, channels)).astype(np.float32))
        writer.commit(feature_paths(str(tmp_path), key, split, shard)["features"])
    reads = []
    real_read = features_module.read_feature_table
    monkeypatch.setattr(features_module, "read_feature_table", lambda *a, **k: reads.append(a[3]) or real_read(*a, **k))
    shard_bytes = rows * (frames * channels + frames * grid * channels) * 4

    def ask(lookup, shard):
        lookup([{"sample_id": f"{shard}/{i}", PATH_COLUMN: f"/d/samples/{split}/{shard}.parquet"} for i in (1, 5)])

    roomy = FeatureLookup(str(tmp_path), key, split, cache_bytes=1 * MB)
    assert 2 * shard_bytes < MB
    for _ in range(3):
        for shard in shards:
            ask(roomy, shard)
    assert reads == shards  # each shard read once
    reads.clear()
    tight = FeatureLookup(str(tmp_path), key, split, cache_bytes=int(1.5 * shard_bytes))
    for _ in range(3):
        for shard in shards:
            ask(tight, shard)
    assert reads == shards * 3  # one shard fits: every call rereads
