"""Tests for the SynthKitchens generator (the synthkitchens package)."""

from __future__ import annotations

import ast
import csv
import io
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from handsonvlm.constants import EPIC_FRAME_HEIGHT, EPIC_FRAME_WIDTH
from preprocessing.window import frame_path, future_frame_indices, observation_frame_indices
from synthkitchens import generate as synth
from synthkitchens import scene as scene_lib
from synthkitchens.__main__ import main as synth_cli
from synthkitchens.gap_report import language_gap_report

REPO = Path(__file__).resolve().parents[1]
REAL_ANNOTATION_DIRS = [REPO / "shared" / "data" / "epic100_annotations",
                        Path("/work/shared/data/epic100_annotations")]
QUESTION_RE = re.compile(r'"([^"]*)"')
SMALL = dict(videos=3, seed=0, actions_per_video=4, fps=30.0, rgb_frames=1)
MEDIA_SUFFIXES = {".MP4", ".jpg"}


def real_annotation_file(name: str) -> Path:
    for root in REAL_ANNOTATION_DIRS:
        if (root / name).exists():
            return root / name
    pytest.skip(f"real EPIC annotation file {name} not available")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def non_media_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix not in MEDIA_SUFFIXES}


def load_label(root: Path, uid: int) -> dict:
    with open(root / "hoi_forecast" / "ek100" / "labels" / f"label_{uid}.pkl", "rb") as f:
        return pickle.load(f)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """3 videos x 4 actions, rgb_frames for the first video, rendered with 2 worker processes."""
    out = tmp_path_factory.mktemp("synth") / "small"
    summary = synth.generate(out, workers=2, **SMALL)
    return out, summary


@pytest.fixture(scope="module")
def meta(small):
    return json.loads((small[0] / synth.METADATA_FILE).read_text(encoding="utf-8"))


def all_actions(meta: dict):
    for video in meta["videos"]:
        for action in video["actions"]:
            yield video, action


# ----------------------------------------------------------------------------------------------
# Layout and annotation formats
# ----------------------------------------------------------------------------------------------
def test_split_rule():
    assert [synth.num_validation_videos(n) for n in (1, 2, 3, 5, 8, 24)] == [0, 1, 1, 1, 2, 5]
    assert synth.video_ids(4) == [("P01", "P01_01"), ("P01", "P01_02"), ("P01", "P01_03"), ("P02", "P02_01")]


def test_tree_layout(small, meta):
    out, summary = small
    assert summary["videos"] == {"train": 2, "validation": 1}
    assert summary["actions"] == {"train": 8, "validation": 4}
    for name in ("EPIC_100_train.csv", "EPIC_100_validation.csv", "EPIC_100_video_info.csv",
                 "EPIC_100_verb_classes.csv", "EPIC_100_noun_classes.csv"):
        assert (out / "annotations" / name).is_file(), name
    for name in ("ek100_questions.json", "ek100_questions_val.json", "rephrase_ek100.json"):
        assert (out / "handsonvlm_assets" / name).is_file(), name
    mp4s = sorted(p.relative_to(out).as_posix() for p in (out / "EPIC-KITCHENS").rglob("*.MP4"))
    assert mp4s == ["EPIC-KITCHENS/P01/videos/P01_01.MP4", "EPIC-KITCHENS/P01/videos/P01_02.MP4",
                    "EPIC-KITCHENS/P01/videos/P01_03.MP4"]
    rgb_dirs = sorted(p.name for p in (out / "EPIC-KITCHENS").glob("*/rgb_frames/*"))
    assert rgb_dirs == ["P01_01"] == summary["rgb_frame_videos"]
    first = meta["videos"][0]
    jpgs = sorted((out / "EPIC-KITCHENS/P01/rgb_frames/P01_01").glob("frame_*.jpg"))
    assert len(jpgs) == first["num_rgb_frames"] == int(first["num_frames"] / first["fps"] * 60 + 1e-9)
    assert jpgs[0].name == "frame_0000000001.jpg"
    labels = sorted((out / "hoi_forecast/ek100/labels").glob("label_*.pkl"))
    uids = json.loads((out / "hoi_forecast/ek100/video_info.json").read_text())
    assert uids == list(range(12)) and len(labels) == 12
    assert meta["splits"] == {"train": ["P01_01", "P01_02"], "validation": ["P01_03"]}


def test_annotation_csv_format(small, meta):
    out, _ = small
    real_header = real_annotation_file("EPIC_100_uda_source_train.csv").read_text().splitlines()[0]
    for name in ("EPIC_100_train.csv", "EPIC_100_validation.csv"):
        text = (out / "annotations" / name).read_text(encoding="utf-8")
        assert text.splitlines()[0] == real_header == ",".join(synth.ANNOTATION_COLUMNS)
        rows = read_csv(out / "annotations" / name)
        ids = [r["narration_id"] for r in rows]
        assert ids == sorted(ids)  # string order: P01_01_0, P01_01_1, P01_01_10, ...
        for r in rows:
            assert r["narration_id"].rsplit("_", 1)[0] == r["video_id"]
            assert r["video_id"].startswith(r["participant_id"] + "_")
            assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}", r["narration_timestamp"])
            for key in ("start", "stop"):
                stamp = r[f"{key}_timestamp"]
                assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d\d", stamp)
                h, m, s = stamp.split(":")
                seconds = int(h) * 3600 + int(m) * 60 + float(s)
                assert int(r[f"{key}_frame"]) == round(seconds * 60)
            assert int(r["stop_frame"]) > int(r["start_frame"]) >= round(scene_lib.FIRST_ACTION_MIN_S * 60)
            assert ast.literal_eval(r["all_nouns"]) == [r["noun"]]
            assert ast.literal_eval(r["all_noun_classes"]) == [int(r["noun_class"])]
            assert r["narration"] == scene_lib.VOCABULARY[r["noun"]].narration
    # real example of the frame convention: 00:00:49.15 -> 2949
    assert synth.format_centiseconds(4915) == "00:00:49.15"
    assert scene_lib.centiseconds_to_frame(4915) == 2949
    info = read_csv(out / "annotations" / "EPIC_100_video_info.csv")
    assert [r["video_id"] for r in info] == ["P01_01", "P01_02", "P01_03"]
    for r, video in zip(info, meta["videos"]):
        assert r["fps"] == "30.0" and r["resolution"] == "456x256"
        assert float(r["duration"]) == pytest.approx(video["num_frames"] / 30.0, abs=1e-6)


def test_class_tables_match_real_epic(small):
    out, _ = small
    for kind in ("verb", "noun"):
        name = f"EPIC_100_{kind}_classes.csv"
        real = {r["key"]: r for r in read_csv(real_annotation_file(name))}
        ours = read_csv(out / "annotations" / name)
        assert ours and list(ours[0]) == ["id", "key", "instances", "category"]
        for r in ours:
            assert r["id"] == real[r["key"]]["id"] and r["category"] == real[r["key"]]["category"], r
            assert set(ast.literal_eval(r["instances"])) <= set(ast.literal_eval(real[r["key"]]["instances"]))


def test_rows_match_class_tables_and_actions_are_spaced(small, meta):
    out, _ = small
    verbs = {r["key"]: int(r["id"]) for r in read_csv(out / "annotations" / "EPIC_100_verb_classes.csv")}
    nouns = {r["key"]: int(r["id"]) for r in read_csv(out / "annotations" / "EPIC_100_noun_classes.csv")}
    rows = {r["narration_id"]: r for name in ("EPIC_100_train.csv", "EPIC_100_validation.csv")
            for r in read_csv(out / "annotations" / name)}
    for video in meta["videos"]:
        previous_stop = 0
        for k, action in enumerate(video["actions"]):
            row = rows[action["narration_id"]]
            assert action["narration_id"] == f"{video['video_id']}_{k}"
            assert verbs[row["verb"]] == int(row["verb_class"]) and nouns[row["noun"]] == int(row["noun_class"])
            assert row["noun"] == video["objects"][action["target"]]["name"]
            # each action has its own observation window after the previous action ended
            assert action["obs_frame_indices"][0] > previous_stop
            previous_stop = int(row["stop_frame"])


def test_objects_inside_the_centre_crop(meta):
    x0, y0, x1, y1 = scene_lib.ACTIVE_REGION_PX
    for video in meta["videos"]:
        names = [o["name"] for o in video["objects"]]
        assert len(set(names)) == len(names) and 5 <= len(names) <= 6
        boxes = [o["bbox_px"] for o in video["objects"]]
        for bx0, by0, bx1, by1 in boxes:
            assert x0 - 1 <= bx0 < bx1 <= x1 + 1 and y0 - 1 <= by0 < by1 <= y1 + 1
        for i, a in enumerate(boxes):  # no overlap
            for b in boxes[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


# ----------------------------------------------------------------------------------------------
# Videos and frames
# ----------------------------------------------------------------------------------------------
def test_mp4_readable_by_decord(small, meta):
    decord = pytest.importorskip("decord")
    out, _ = small
    for video in meta["videos"]:
        reader = decord.VideoReader(str(out / "EPIC-KITCHENS" / video["participant_id"] / "videos"
                                        / f"{video['video_id']}.MP4"))
        assert len(reader) == video["num_frames"]
        assert reader.get_avg_fps() == pytest.approx(30.0)
        assert reader[0].asnumpy().shape == (256, 456, 3)


def _frame_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Visual difference: mean absolute difference of slightly blurred frames (drops codec and
    texture noise) after removing the per-channel mean offset (mp4v's YUV round trip shifts the
    colours by a few grey levels everywhere)."""
    diff = cv2.GaussianBlur(a.astype(np.float32), (0, 0), 2.0) - cv2.GaussianBlur(b.astype(np.float32), (0, 0), 2.0)
    return float(np.abs(diff - diff.mean(axis=(0, 1))).mean())


def test_rgb_frames_match_mp4_frames(small, meta):
    decord = pytest.importorskip("decord")
    out, _ = small
    video = meta["videos"][0]
    reader = decord.VideoReader(str(out / "EPIC-KITCHENS/P01/videos/P01_01.MP4"))
    rgb_dir = out / "EPIC-KITCHENS/P01/rgb_frames/P01_01"
    for action in video["actions"]:
        # rgb file n shows t = (n - 1) / 60, MP4 frame i shows t = i / 30: odd n <-> i = (n - 1) / 2
        n = action["start_frame"] - 30 | 1  # mid-reach, where the hand moves fastest
        jpeg = cv2.imread(str(rgb_dir / f"frame_{n:010d}.jpg"))[:, :, ::-1]
        same = reader[(n - 1) // 2].asnumpy()
        other = reader[(n - 1) // 2 - 10].asnumpy()  # 1/3 s earlier
        raw = float(np.abs(jpeg.astype(np.float32) - same.astype(np.float32)).mean())
        diff_same, diff_other = _frame_difference(jpeg, same), _frame_difference(jpeg, other)
        print(f"rgb frame {n}: mean abs diff to the MP4 frame at the same time {diff_same:.2f} "
              f"(raw {raw:.2f}), 1/3 s earlier {diff_other:.2f}")
        assert raw < 5.0 and diff_same < 1.0, (raw, diff_same)
        assert diff_other > 2 * diff_same, (diff_same, diff_other)


# ----------------------------------------------------------------------------------------------
# RBHP questions, paraphrases, labels
# ----------------------------------------------------------------------------------------------
def test_questions_format_and_keys(small, meta):
    out, _ = small
    stems = tuple(s.split("{")[0] for s in synth.QUESTION_STEMS)
    for split, name in (("train", "ek100_questions.json"), ("validation", "ek100_questions_val.json")):
        questions = json.loads((out / "handsonvlm_assets" / name).read_text(encoding="utf-8"))
        keys = {a["question_key"]: a for v, a in all_actions(meta) if a["split"] == split}
        assert set(questions) <= set(keys)
        for key, text in questions.items():
            action = keys[key]
            video = next(v for v in meta["videos"] if v["video_id"] == action["narration_id"].rsplit("_", 1)[0])
            assert key == frame_path(video["participant_id"], video["video_id"],
                                     observation_frame_indices(action["start_frame"])[-1])
            parsed = QUESTION_RE.findall(text)
            assert len(parsed) in (1, 3) and len(parsed) == action["num_questions"]
            assert text == synth.QUESTION_SEPARATOR.join(f'"{q}"' for q in parsed)
            for stem, question in zip(stems, parsed):
                assert question.startswith(stem) and question.endswith("?")
                assert action["target_name"].split(":")[0] not in question.lower()  # implied, not named
        without = [a for a in keys.values() if a["num_questions"] == 0]
        assert len(questions) + len(without) == len(keys)


def test_question_rates_and_unique_purposes(tmp_path):
    synth.generate(tmp_path, videos=10, seed=3, write_videos=False)
    meta = json.loads((tmp_path / synth.METADATA_FILE).read_text(encoding="utf-8"))
    counts = [a["num_questions"] for _, a in all_actions(meta)]
    assert set(counts) == {0, 1, 3}
    assert 0.8 <= np.mean([c > 0 for c in counts]) <= 0.97
    phrases = [p for kind in scene_lib.VOCABULARY.values() for pair in kind.purposes for p in pair]
    assert len(phrases) == len(set(phrases))
    nouns = {word for noun in scene_lib.VOCABULARY for word in noun.split(":")}
    for phrase in phrases:  # questions imply objects, they never name one
        assert not nouns & set(re.findall(r"[a-z]+", phrase.lower())), phrase
    rephrase = json.loads((tmp_path / "handsonvlm_assets" / "rephrase_ek100.json").read_text(encoding="utf-8"))
    narrations = {r["narration"] for name in ("EPIC_100_train.csv", "EPIC_100_validation.csv")
                  for r in read_csv(tmp_path / "annotations" / name)}
    assert set(rephrase) == narrations
    assert all(isinstance(v, list) and len(v) == 1 and v[0] for v in rephrase.values())


COVERAGE_TREE = dict(videos=6, seed=3, actions_per_video=12, write_videos=False)
QUESTION_FILE_PATHS = {f"handsonvlm_assets/{name}" for name in synth.QUESTION_FILES.values()}


def read_question_files(root: Path) -> dict[str, dict[str, str]]:
    return {split: json.loads((root / "handsonvlm_assets" / name).read_text(encoding="utf-8"))
            for split, name in synth.QUESTION_FILES.items()}


def test_rbhp_coverage(tmp_path):
    default = synth.generate(tmp_path / "default", **COVERAGE_TREE)
    # default: exactly the actions whose scene drew questions (today's ~90 %)
    ids = synth.video_ids(COVERAGE_TREE["videos"])
    scenes = [scene_lib.sample_scene(COVERAGE_TREE["seed"], i, vid, pid, COVERAGE_TREE["actions_per_video"], 30.0)
              for i, (pid, vid) in enumerate(ids)]
    drawn = sum(bool(a.question_purposes) for s in scenes for a in s.actions)
    assert sum(default["question_clips"].values()) == drawn

    trees = {}
    for coverage in (0.0, 0.2, 0.5, 1.0):
        summary = synth.generate(tmp_path / f"c{coverage}", rbhp_coverage=coverage, **COVERAGE_TREE)
        trees[coverage] = read_question_files(tmp_path / f"c{coverage}")
        for split in synth.SPLITS:
            actions = summary["actions"][split]
            # exactly round(F * N) actions: within half an action of F * N
            assert abs(summary["question_clips"][split] - coverage * actions) <= 0.5, (coverage, split)
            assert len(trees[coverage][split]) == summary["question_clips"][split]
    assert sum(default["actions"].values()) == sum(len(q) for q in trees[1.0].values())
    assert all(not q for q in trees[0.0].values())
    # nested: a lower coverage keeps a subset of a higher one's questions, with the same text
    for low, high in ((0.2, 0.5), (0.5, 1.0)):
        for split in synth.SPLITS:
            assert trees[low][split].items() <= trees[high][split].items()

    # only the question files and the metadata change with the coverage; reruns are identical
    base, covered = non_media_files(tmp_path / "default"), non_media_files(tmp_path / "c0.2")
    assert {name for name in base if base[name] != covered[name]} == QUESTION_FILE_PATHS | {synth.METADATA_FILE}
    synth.generate(tmp_path / "again", rbhp_coverage=0.2, **COVERAGE_TREE)
    assert non_media_files(tmp_path / "again") == covered
    meta = json.loads((tmp_path / "c0.2" / synth.METADATA_FILE).read_text(encoding="utf-8"))
    assert meta["arguments"]["rbhp_coverage"] == 0.2
    for _, action in all_actions(meta):
        text = trees[0.2][action["split"]].get(action["question_key"])
        assert action["num_questions"] == (len(QUESTION_RE.findall(text)) if text else 0)
        assert action["num_questions"] in (0, 1, 3)
    with pytest.raises(ValueError, match="rbhp_coverage"):
        synth.generate(tmp_path / "bad", rbhp_coverage=1.5, **COVERAGE_TREE)


def test_cli_rbhp_coverage(tmp_path, capsys):
    summary = synth_cli(["--out", str(tmp_path / "cli"), "--videos", "5", "--seed", "1", "--no-videos",
                    "--rbhp-coverage", "0.25"])
    assert summary["question_clips"]["train"] == round(0.25 * summary["actions"]["train"])
    assert "(25%)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        synth_cli(["--out", str(tmp_path / "bad"), "--no-videos", "--rbhp-coverage", "-0.1"])


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses every global except numpy's (array reconstruction): no custom classes inside."""

    def find_class(self, module, name):
        if module.split(".")[0] != "numpy":
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")
        return super().find_class(module, name)


def _only_builtins_and_arrays(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _only_builtins_and_arrays(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_only_builtins_and_arrays(v) for v in value)
    return type(value) in (int, float, bool, str, np.ndarray)


def test_label_pickles(small, meta):
    out, _ = small
    n_train = sum(len(v["actions"]) for v in meta["videos"] if v["split"] == "train")
    for name, offset in (("EPIC_100_train.csv", 0), ("EPIC_100_validation.csv", n_train)):
        for row_index, row in enumerate(read_csv(out / "annotations" / name)):
            uid = offset + row_index
            path = out / "hoi_forecast/ek100/labels" / f"label_{uid}.pkl"
            data = path.read_bytes()
            assert data[:2] == b"\x80\x04"  # protocol 4
            label = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
            assert _only_builtins_and_arrays(label)
            _, action = next((v, a) for v, a in all_actions(meta) if a["narration_id"] == row["narration_id"])
            assert action["hoi_uid"] == uid
            obs = observation_frame_indices(int(row["start_frame"]))
            assert label["frame_indices"][0] == obs[-1] == action["last_obs_frame"]
            assert label["frame_indices"] == future_frame_indices(obs[-1], 60.0, 20).tolist()
            assert len(label["homography"]) == 21 and all(np.array_equal(h, np.eye(3)) for h in label["homography"])
            assert label["contact"].dtype == bool and label["contact"].shape == (21,)
            assert label["contact"][-1] and not label["contact"][0]
            assert sorted(label["hand_trajs"]) == sorted(action["sides"])
            trajs = [label["hand_trajs"][s]["traj"] for s in label["hand_trajs"]] + [label["obj_trajs"]["traj"]]
            for traj in trajs:
                assert traj.shape == (21, 2) and traj.dtype == np.float32 and np.isfinite(traj).all()
                assert (traj >= 0).all() and (traj[:, 0] < 456).all() and (traj[:, 1] < 256).all()
            for side, track in label["hand_trajs"].items():
                assert track["fill_indices"] == list(range(21)) and len(track["centers"]) == 21
                # the hand ends on the object and was at its last observed position at t = 0
                x0, y0, x1, y1 = label["affordance"]["obj_bbox"]
                assert x0 <= track["traj"][-1, 0] <= x1 and y0 <= track["traj"][-1, 1] <= y1
                np.testing.assert_array_equal(track["traj"][0], label["past_hand_centers"][side][-1])
                assert label["affordance"][side].dtype == np.int64 and label["affordance"][side].shape == (4,)
            points = label["affordance"]["select_points"]
            assert points.dtype == np.float32 and 1 <= len(points) <= 5
            np.testing.assert_array_equal(points, label["affordance"]["select_points_homo"])
            x0, y0, x1, y1 = label["affordance"]["obj_bbox"]
            assert ((points[:, 0] >= x0) & (points[:, 0] <= x1) & (points[:, 1] >= y0) & (points[:, 1] <= y1)).all()
            for side in ("RIGHT", "LEFT"):
                past = label["past_hand_centers"][side]
                assert past.shape == (10, 2) and past.dtype == np.float32 and np.isfinite(past).all()


# ----------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------
def test_deterministic_across_runs_and_workers(small, tmp_path):
    decord = pytest.importorskip("decord")
    out, _ = small
    again = tmp_path / "again"
    synth.generate(again, workers=1, **SMALL)
    first, second = non_media_files(out), non_media_files(again)
    assert set(first) == set(second) and len(first) > 20
    for name in first:
        assert first[name] == second[name], name
    for mp4 in sorted((out / "EPIC-KITCHENS").rglob("*.MP4")):
        a = decord.VideoReader(str(mp4))
        b = decord.VideoReader(str(again / mp4.relative_to(out)))
        idx = list(range(0, len(a), 7))
        assert len(a) == len(b)
        np.testing.assert_array_equal(a.get_batch(idx).asnumpy(), b.get_batch(idx).asnumpy())
    jpgs = sorted((out / "EPIC-KITCHENS/P01/rgb_frames/P01_01").glob("*.jpg"))[::50]
    assert all(p.read_bytes() == (again / p.relative_to(out)).read_bytes() for p in jpgs)


def test_different_seed_differs(tmp_path):
    synth.generate(tmp_path / "s0", videos=3, seed=0, actions_per_video=4, write_videos=False)
    synth.generate(tmp_path / "s1", videos=3, seed=1, actions_per_video=4, write_videos=False)
    a, b = non_media_files(tmp_path / "s0"), non_media_files(tmp_path / "s1")
    assert set(a) == set(b)
    assert a["annotations/EPIC_100_train.csv"] != b["annotations/EPIC_100_train.csv"]
    assert a["synthkitchens.json"] != b["synthkitchens.json"]


def test_rerun_replaces_previous_output(tmp_path):
    synth.generate(tmp_path, videos=4, seed=0, actions_per_video=3, write_videos=False)
    synth.generate(tmp_path, videos=2, seed=0, actions_per_video=2, write_videos=False)
    assert len(list((tmp_path / "hoi_forecast/ek100/labels").glob("*.pkl"))) == 4


def test_cli(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "synthkitchens", "--out", str(tmp_path / "cli"), "--videos", "2",
         "--actions-per-video", "2", "--workers", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert "validation ADE" in result.stdout
    assert len(list((tmp_path / "cli" / "EPIC-KITCHENS").rglob("*.MP4"))) == 2


# ----------------------------------------------------------------------------------------------
# The point of the dataset: language must matter
# ----------------------------------------------------------------------------------------------
def test_language_matters(tmp_path):
    """On validation actions of a default-seed 8-video dataset, knowing the target object (text
    oracle) must cut the constant-velocity ADE by far more than knowing only the object layout,
    the question alone (no frames) must already beat constant velocity clearly, and the wrong
    question must cost several times the right one."""
    synth.generate(tmp_path, videos=8, seed=0, write_videos=False)
    report = language_gap_report(tmp_path)
    print(f"\nSynthKitchens design check on {report['actions']} validation actions "
          f"({report['hand_tracks']} active hands): ADE (a) constant velocity {report['ade_constant_velocity']:.4f}, "
          f"(b) text-free oracle {report['ade_text_free_oracle']:.4f} ({report['text_free_over_cv']:.2f} x a), "
          f"(c) text oracle {report['ade_text_oracle']:.4f} ({report['text_over_cv']:.2f} x a), "
          f"(d) question only {report['ade_question_only']:.4f} ({report['question_only_over_cv']:.2f} x a), "
          f"(e) shuffled question {report['ade_shuffled_question']:.4f} "
          f"({report['shuffled_over_question_only']:.2f} x d)")
    assert report["actions"] == 24
    assert report["ade_text_oracle"] <= 0.35 * report["ade_constant_velocity"]
    assert report["ade_text_free_oracle"] >= 0.85 * report["ade_constant_velocity"]
    assert report["ade_question_only"] <= 0.6 * report["ade_constant_velocity"]
    assert report["ade_shuffled_question"] >= 2.0 * report["ade_question_only"]


def test_objects_lie_near_their_layout_spots(meta):
    """Every object is within the layout jitter of its class's spot (plus the clip to the region)."""
    for video in meta["videos"]:
        for obj in video["objects"]:
            spot = np.asarray(scene_lib.KITCHEN_LAYOUT_PX[obj["name"]])
            centre = np.asarray(obj["centre"]) * (EPIC_FRAME_WIDTH, EPIC_FRAME_HEIGHT)
            assert np.abs(centre - spot).max() <= scene_lib.LAYOUT_JITTER_PX + 0.02, (obj, spot)


def test_observation_window_does_not_reveal_the_target(tmp_path):
    """During the observation window the active hand approaches the target no more than it
    approaches the other objects; during the anticipation second it clearly does. 96 videos
    (~1300 active hands) put the standard error of the observation mean near 0.7 px."""
    synth.generate(tmp_path, videos=96, seed=0, write_videos=False)
    meta = json.loads((tmp_path / synth.METADATA_FILE).read_text(encoding="utf-8"))
    observed, future = [], []
    for video, action in all_actions(meta):
        label = load_label(tmp_path, action["hoi_uid"])
        objects = np.array([o["centre"] for o in video["objects"]]) * (456, 256)
        others = np.arange(len(objects)) != action["target"]
        for side in action["sides"]:
            for path, store in ((label["past_hand_centers"][side], observed),
                                (label["hand_trajs"][side]["traj"], future)):
                approach = np.linalg.norm(path[0] - objects, axis=1) - np.linalg.norm(path[-1] - objects, axis=1)
                store.append(approach[action["target"]] - approach[others].mean())
    print(f"\napproach to target minus other objects (px): observation {np.mean(observed):+.2f}, "
          f"anticipation {np.mean(future):+.2f}")
    assert abs(np.mean(observed)) < 3.0
    assert np.mean(future) > 30.0


# ----------------------------------------------------------------------------------------------
# The random layout: objects anywhere, told apart by a frozen ImageNet CNN
# ----------------------------------------------------------------------------------------------
def test_random_layout_places_fewer_larger_objects_anywhere(tmp_path):
    synth.generate(tmp_path, videos=24, seed=0, actions_per_video=2, write_videos=False, layout="random")
    meta = json.loads((tmp_path / synth.METADATA_FILE).read_text(encoding="utf-8"))
    assert meta["arguments"]["layout"] == "random" and meta["version"] == synth.GENERATOR_VERSION
    x0, y0, x1, y1 = scene_lib.RANDOM_COUNTER_REGION_PX
    offsets = {name: [] for name in scene_lib.VOCABULARY}
    for video in meta["videos"]:
        lo, hi = scene_lib.RANDOM_OBJECTS_PER_VIDEO
        assert lo <= len(video["objects"]) <= hi
        for obj in video["objects"]:
            bx0, by0, bx1, by1 = obj["bbox_px"]
            assert x0 - 1 <= bx0 and bx1 <= x1 + 1 and y0 - 1 <= by0 and by1 <= y1 + 1, obj
            hw, _ = scene_lib.VOCABULARY[obj["name"]].half_size_px
            assert bx1 - bx0 == pytest.approx(2 * scene_lib.RANDOM_OBJECT_SCALE * hw, abs=1.01)
            offsets[obj["name"]].append(np.asarray(obj["centre"]) * (EPIC_FRAME_WIDTH, EPIC_FRAME_HEIGHT)
                                        - scene_lib.KITCHEN_LAYOUT_PX[obj["name"]])
    # no class keeps a spot: each one's positions spread over much of the counter
    spreads = [np.abs(np.asarray(v)).max() for v in offsets.values() if len(v) >= 3]
    assert len(spreads) >= 8 and min(spreads) > 4 * scene_lib.LAYOUT_JITTER_PX
    # the hands rest at the front, below the objects: a reach starts in the home box of its side
    for _, action in all_actions(meta):
        label = load_label(tmp_path, action["hoi_uid"])
        for side in action["sides"]:
            bx0, by0, bx1, by1 = scene_lib.HAND_MOTION["random"].boxes[side]
            start = label["past_hand_centers"][side][-1]
            assert bx0 - 1 <= start[0] <= bx1 + 1 and by0 - 1 <= start[1] <= by1 + 1, (action, start)
            assert start[1] > y1  # below every object
    # knowing the target (and the start) is what pays: the objects' median or a random object of
    # the scene is several times worse (seed 0, 24 videos x 2 actions: 0.09x, 0.46x, 0.61x cv)
    report = language_gap_report(tmp_path)
    assert report["layout"] == "random" and "ade_question_only" not in report
    assert report["text_over_cv"] < 0.2
    assert min(report["text_free_over_cv"], report["random_object_over_cv"]) > 3 * report["text_over_cv"]


def test_random_layout_objects_are_distinct_to_the_tower():
    """Every class drawn at the random layout's scale, at random spots on random counters, and the
    frozen ImageNet EfficientNet-Lite0 feature of the 7 x 7 cell under the object's centre (what a
    slow token of the demo holds) classifies it by nearest class mean (fit on half the renders, test
    on the other half) far above chance (1/11): measured 43 of 44 (0.977)."""
    torch = pytest.importorskip("torch")
    from handsonvlm.image import preprocess_frames
    from handsonvlm.vision import EfficientNetLiteTower
    from synthkitchens.render import render_static_layer

    tower = EfficientNetLiteTower()
    rng = np.random.default_rng(0)
    per_class, names = 8, list(scene_lib.VOCABULARY)
    frames, cells, labels = [], [], []
    scale = tower.image_size / EPIC_FRAME_HEIGHT  # the CLIP path: shortest side to 224, centre crop
    crop_x0 = (EPIC_FRAME_WIDTH * scale - tower.image_size) / 2
    cell_px = tower.image_size / tower.grid
    x0, y0, x1, y1 = scene_lib.RANDOM_COUNTER_REGION_PX
    for label, name in enumerate(names):
        for _ in range(per_class):
            hw, hh = (round(scene_lib.RANDOM_OBJECT_SCALE * h) for h in scene_lib.VOCABULARY[name].half_size_px)
            centre = (rng.uniform(x0 + hw, x1 - hw), rng.uniform(y0 + hh, y1 - hh))
            obj = scene_lib.PlacedObject(name, centre, (hw, hh), scene_lib.RANDOM_OBJECT_SCALE)
            scene = scene_lib.sample_scene(int(rng.integers(1000)), 0, "P01_01", "P01", 1, 30.0, layout="random")
            scene.objects = [obj]
            frames.append(cv2.cvtColor(render_static_layer(scene), cv2.COLOR_BGR2RGB))
            col = int((obj.centre[0] * scale - crop_x0) // cell_px)
            row = int(obj.centre[1] * scale // cell_px)
            cells.append(row * tower.grid + col)
            labels.append(label)
    with torch.no_grad():
        feats = tower(preprocess_frames(np.stack(frames), image_size=tower.image_size))  # [N, 49, 1280]
    x = feats[torch.arange(len(cells)), torch.as_tensor(cells)].numpy()  # [N, 1280]
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # cosine nearest class mean
    y = np.asarray(labels)
    fit = np.arange(len(y)) % per_class < per_class // 2
    means = np.stack([x[fit & (y == k)].mean(0) for k in range(len(names))])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    predicted = (x[~fit] @ means.T).argmax(1)
    accuracy = float((predicted == y[~fit]).mean())
    print(f"\ncosine nearest-class-mean accuracy on EfficientNet-Lite0 cell features: {accuracy:.3f} "
          f"(chance {1 / len(names):.3f})")
    assert accuracy >= 0.9
