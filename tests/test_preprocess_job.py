"""The preprocessing job end to end on SynthKitchens, on a local Ray: outputs, resumption, bad input."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest

from pipelines import preprocess
from preprocessing import storage
from preprocessing.media import decode_jpeg
from preprocessing.schema import INDEX_SCHEMA, SAMPLES_SCHEMA, tensor_column
from synthkitchens.generate import generate, preprocess_source_args

pytestmark = pytest.mark.ray


def run_job(tree, out, *extra):
    return preprocess.main([*preprocess_source_args(tree), "--out", str(out), "--no-progress", *extra])


def read_split(out, stage, split):
    return storage.read_parquet_dir(str(out / stage / split))


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    tree = tmp_path_factory.mktemp("synth")
    generate(str(tree), videos=3, actions_per_video=4, seed=0, rgb_frames=1, workers=1)
    return tree


@pytest.fixture(scope="module")
def processed(synth, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("out")
    assert run_job(synth, out) == 0
    return out


def csv_rows(tree, split):
    import pandas as pd

    name = {"train": "EPIC_100_train.csv", "validation": "EPIC_100_validation.csv"}[split]
    return pd.read_csv(tree / "annotations" / name)


def test_outputs_follow_the_contract(synth, processed):
    m = manifest(processed)
    for split in ("train", "validation"):
        rows = csv_rows(synth, split)
        index = read_split(processed, "index", split)
        samples = read_split(processed, "samples", split)
        assert index.schema.remove_metadata().equals(INDEX_SCHEMA.remove_metadata())
        assert samples.schema.remove_metadata().equals(SAMPLES_SCHEMA.remove_metadata())
        assert index.num_rows == len(rows) and samples.num_rows == len(rows)  # every synthetic action is good
        assert sorted(samples.column("narration_id").to_pylist()) == sorted(rows["narration_id"])
        stats = m["splits"][split]
        assert stats["index"]["read"] == stats["index"]["written"] == len(rows)
        assert stats["samples"]["written"] == len(rows) and stats["samples"]["quarantined"] == {}
        # every action was labelled by the generator, with questions for most
        assert set(samples.column("label_source").to_pylist()) == {"hoi_forecast_auto"}
        assert sum(bool(q) for q in samples.column("rbhp_questions").to_pylist()) >= 0.5 * len(rows)
    samples = read_split(processed, "samples", "train")
    assert set(samples.column("frame_source").to_pylist()) == {"rgb_frames", "video"}
    # the quarantine files exist and are empty
    q = storage.read_parquet_dir(str(processed / "quarantine"))
    assert q is not None and q.num_rows == 0


def test_sample_values_match_the_sources(synth, processed):
    samples = read_split(processed, "samples", "train")
    row = samples.slice(0, 1).to_pylist()[0]
    frames = [decode_jpeg(j) for j in row["obs_jpeg"]]
    assert all(f.shape == (256, 456, 3) for f in frames)
    assert (row["image_width"], row["image_height"]) == (456, 256)
    # targets equal the label pickle, subsampled at t = 0, 0.25, ..., 1 s and normalised
    label = pickle.loads((synth / "hoi_forecast/ek100/labels" / f"label_{row['hoi_uid']}.pkl").read_bytes())
    assert label["frame_indices"][0] == row["obs_frame_idx"][-1]
    future = np.asarray(row["future_hands"], np.float32)
    for h, side in enumerate(("RIGHT", "LEFT")):
        if side in label["hand_trajs"]:
            np.testing.assert_allclose(future[h], label["hand_trajs"][side]["traj"][::5] / [456, 256], rtol=1e-6)
            assert row["future_valid"][h]
        else:
            assert not row["future_valid"][h]
    # rgb_frames are stored byte for byte
    rgb = next(r for r in samples.to_pylist() if r["frame_source"] == "rgb_frames")
    on_disk = synth / "EPIC-KITCHENS" / rgb["obs_frame_path"][-1]
    assert rgb["obs_jpeg"][-1] == on_disk.read_bytes()
    # the questions are the ones keyed by the last observed frame
    questions = json.loads((synth / "handsonvlm_assets/ek100_questions.json").read_text())
    for r in samples.to_pylist():
        if r["obs_frame_path"][-1] in questions:
            assert r["rbhp_questions"] and r["rbhp_questions"][0] in questions[r["obs_frame_path"][-1]]
    # vectorised tensor reader agrees with to_pylist
    np.testing.assert_array_equal(tensor_column(samples, "future_hands")[0], future)


def test_rerun_is_idempotent_and_resumes_missing_shards(synth, processed, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(processed, out)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "samples" / "train").iterdir()}
    reference = read_split(out, "samples", "train")
    assert run_job(synth, out, "--stage", "samples") == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "samples" / "train").iterdir()} == before
    stats = manifest(out)["splits"]["train"]["samples"]
    assert stats["shards_reused"] == stats["shards"] and stats["shards_processed"] == 0

    # simulate a job killed mid-way: one shard lost, another written but without its done marker
    shards = sorted((out / "samples" / "train").iterdir())
    lost, unmarked = shards[0], shards[1]
    lost.unlink()
    (out / "_state" / "samples" / "train" / unmarked.name.replace(".parquet", ".json")).unlink()
    assert run_job(synth, out, "--stage", "samples") == 0
    stats = manifest(out)["splits"]["train"]["samples"]
    assert stats["shards_processed"] == 2 and stats["shards_reused"] == stats["shards"] - 2
    after = read_split(out, "samples", "train")
    assert after.equals(reference)  # same shards, no duplicates, none missing
    untouched = [s for s in shards[2:]]
    assert all(s.stat().st_mtime_ns == before[s.name] for s in untouched)


def corrupt_tree(tree):
    """Break a SynthKitchens tree in every way the job must survive. Returns the expected quarantine."""
    epic = tree / "EPIC-KITCHENS"
    videos = sorted(epic.glob("P*/videos/*.MP4"))
    expected = {}

    def actions_of(video_id):
        rows = []
        for split in ("train", "validation"):
            rows += [n for n in csv_rows(tree, split)["narration_id"] if n.rsplit("_", 1)[0] == video_id]
        return rows

    vid = [v.stem for v in videos]
    # 0: truncated MP4 (its index box is at the end, so the file is unreadable)
    data = videos[0].read_bytes()
    videos[0].write_bytes(data[: len(data) // 2])
    expected.update({n: "video_unreadable" for n in actions_of(vid[0])})
    # 1: zero-byte file
    videos[1].write_bytes(b"")
    expected.update({n: "video_unreadable" for n in actions_of(vid[1])})
    # 2: not a video at all
    videos[2].write_text("this is not an mp4\n")
    expected.update({n: "video_unreadable" for n in actions_of(vid[2])})
    # 3: missing
    videos[3].unlink()
    expected.update({n: "video_missing" for n in actions_of(vid[3])})
    # 4: wrong fps in video_info
    info_path = tree / "annotations" / "EPIC_100_video_info.csv"
    info = info_path.read_text().splitlines()
    info = [",".join([line.split(",")[0], line.split(",")[1], "59.94", line.split(",")[3]])
            if line.startswith(vid[4] + ",") else line for line in info]
    # 5: video_info claims a longer video: an extra (unlabelled) action whose frames lie past the end
    duration5 = None
    for i, line in enumerate(info):
        if line.startswith(vid[5] + ","):
            fields = line.split(",")
            duration5 = float(fields[1])
            fields[1] = str(duration5 + 60.0)
            info[i] = ",".join(fields)
    info_path.write_text("\n".join(info) + "\n")
    expected.update({n: "fps_mismatch" for n in actions_of(vid[4])})

    # extra rows go to the *last* split's CSV: rows added to train would shift every validation uid
    val_csv = tree / "annotations" / "EPIC_100_validation.csv"
    pid5 = vid[5].split("_")[0]
    start = duration5 + 30.0

    def ts(s):
        return f"{int(s // 3600):02d}:{int(s % 3600 // 60):02d}:{s % 60:05.2f}"

    extra = [
        f"{vid[5]}_900,{pid5},{vid[5]},,{ts(start)},{ts(start + 1)},{round(start * 60)},{round(start * 60) + 60},"
        f"take cup,take,0,cup,13,['cup'],[13]",
        f"{vid[5]}_901,{pid5},{vid[5]},,00:00:1x.00,00:00:12.00,600,700,take cup,take,0,cup,13,['cup'],[13]",
        "P99_01_0,P99,P99_01,,00:00:10.00,00:00:11.00,600,660,take cup,take,0,cup,13,['cup'],[13]",
    ]
    first_row = val_csv.read_text().splitlines()[1]
    val_csv.write_text(val_csv.read_text() + "\n".join(extra + [first_row]) + "\n")
    expected[f"{vid[5]}_900"] = "frame_past_end"
    expected[f"{vid[5]}_901"] = "bad_row"
    expected["P99_01_0"] = "unknown_video"
    expected[first_row.split(",")[0] + "#dup"] = "duplicate_narration_id"

    # labels: one NaN trajectory, one pickle that would run code, one orphan
    labels = tree / "hoi_forecast" / "ek100"
    uid_of = {}
    for i, n in enumerate(csv_rows(tree, "train")["narration_id"]):
        uid_of.setdefault(n, i)  # hoi uid = first row of the narration in the train CSV
    good_train = [n for n in uid_of if n not in expected and n.rsplit("_", 1)[0] in vid[5:]
                  and (labels / "labels" / f"label_{uid_of[n]}.pkl").exists()]
    nan_action, evil_action = good_train[0], good_train[1]
    label = pickle.loads((labels / "labels" / f"label_{uid_of[nan_action]}.pkl").read_bytes())
    side = next(iter(label["hand_trajs"]))
    label["hand_trajs"][side]["traj"][4, 1] = np.nan
    (labels / "labels" / f"label_{uid_of[nan_action]}.pkl").write_bytes(pickle.dumps(label))
    (labels / "labels" / f"label_{uid_of[evil_action]}.pkl").write_bytes(pickle.dumps(EvilPayload()))
    expected[nan_action] = "bad_trajectory"
    expected[evil_action] = "unsafe_pickle"
    uids = json.loads((labels / "video_info.json").read_text())
    (labels / "video_info.json").write_text(json.dumps(uids + [10**7]))
    expected["uid 10000000"] = "orphan_label"

    # a question file with malformed entries
    qpath = tree / "handsonvlm_assets" / "ek100_questions.json"
    questions = json.loads(qpath.read_text())
    questions["P01/rgb_frames/P01_01/frame_0000000007.jpg"] = 42
    questions["P01/rgb_frames/P01_01/frame_0000000008.jpg"] = '""'
    qpath.write_text(json.dumps(questions))
    expected["P01/rgb_frames/P01_01/frame_0000000007.jpg"] = "malformed_question"
    expected["P01/rgb_frames/P01_01/frame_0000000008.jpg"] = "malformed_question"
    return expected


class EvilPayload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/handsonvlm-pwned",))


def test_bad_input_is_quarantined_and_good_input_kept(tmp_path, ray_local):
    tree = tmp_path / "bad"
    generate(str(tree), videos=8, actions_per_video=3, seed=1, rgb_frames=0, workers=1)
    all_actions = set(csv_rows(tree, "train")["narration_id"]) | set(csv_rows(tree, "validation")["narration_id"])
    expected = corrupt_tree(tree)
    out = tmp_path / "out"
    assert run_job(tree, out, "--unlabelled", "keep") == 0
    assert not os.path.exists("/tmp/handsonvlm-pwned")

    quarantine = storage.read_parquet_dir(str(out / "quarantine")).to_pylist()
    got = {}
    for row in quarantine:
        key = row["item"] + ("#dup" if row["reason"] == "duplicate_narration_id" else "")
        got[key] = row["reason"]
        assert row["detail"]
    assert got == expected

    written = set()
    for split in ("train", "validation"):
        samples = read_split(out, "samples", split)
        written |= set(samples.column("narration_id").to_pylist())
    bad = {k for k in expected if k in all_actions or k.endswith("#dup")}
    good = all_actions - {k for k in bad}
    assert written == good  # every good action landed, no bad one did
    m = manifest(out)
    for split in ("train", "validation"):
        idx, smp = m["splits"][split]["index"], m["splits"][split]["samples"]
        assert idx["read"] == idx["written"] + sum(idx["skipped"].values()) + sum(idx["quarantined"].values())
        assert smp["read"] == smp["written"] + sum(smp["quarantined"].values()) + smp["unlabelled_skipped"]
