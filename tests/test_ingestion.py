"""Annotation CSVs, language assets, labels and untrusted pickles (no Ray, no media)."""

import io
import json
import os
import pickle

import numpy as np
import pytest
from conftest import EPIC_ANNOTATIONS, HANDSONVLM_ASSETS, require

from preprocessing import epic, safe_pickle
from preprocessing.labels import HoiLabels, LabelError, future_point_valid, targets_from_label_pickle
from preprocessing.quarantine import Quarantine
from preprocessing.questions import load_paraphrases, load_questions, parse_question_string

HEADER = ("narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,start_frame,"
          "stop_frame,narration,verb,verb_class,noun,noun_class,all_nouns,all_noun_classes\n")
GOOD = "P01_11_10,P01,P01_11,00:00:48.500,00:00:49.15,00:00:50.95,2949,3057,take paper,take,0,paper,49,['paper'],[49]\n"


def write(tmp_path, name, text, mode="w"):
    path = tmp_path / name
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text, encoding="utf-8")
    return str(path)


def test_timestamps():
    import pandas as pd

    secs = epic.parse_timestamps(pd.Series(["00:00:49.15", "01:02:03.5", "", "12:xx", "00:61:00.00"]))
    assert secs[0] == pytest.approx(49.15) and secs[1] == pytest.approx(3723.5)
    assert np.isnan(secs[2:]).all()
    assert epic.format_timestamp(49.15) == "00:00:49.15" and epic.format_timestamp(3723.5, 3) == "01:02:03.500"


def test_real_csvs_parse_without_quarantine():
    q = Quarantine("index")
    actions, n = epic.read_actions(str(require(EPIC_ANNOTATIONS / "EPIC_100_uda_source_train.csv")), "train", q)
    assert n == 16115 and len(actions) == 16115 and len(q) == 0
    row = actions[actions.narration_id == "P01_01_0"].iloc[0]
    assert (row.start_frame, row.stop_frame, row.verb_class, row.noun, row.all_nouns) == (8, 202, 3, "door", ["door"])
    assert row.start_timestamp_s == pytest.approx(0.14) and row.narration_timestamp_s == pytest.approx(1.089)
    info = epic.read_video_info(str(EPIC_ANNOTATIONS / "EPIC_100_video_info.csv"), q)
    assert len(info) == 700 and len(q) == 0
    assert info.loc["P01_01", "fps"] == pytest.approx(59.94, abs=1e-2) and info.loc["P01_01", "width"] == 1920


def test_bad_rows_are_quarantined_and_good_rows_kept(tmp_path):
    rows = [
        GOOD,
        "P01_11_11,P01,P01_11,00:00:50.000,00:00:5x.00,00:00:52.00,3001,3100,open tap,open,3,tap,0,['tap'],[0]\n",
        "P01_11_12,P01,P01_11,00:00:50.000,00:00:52.00,00:00:51.00,3121,3200,open tap,open,3,tap,0,['tap'],[0]\n",
        "P01_11_13,P01,P01_11,,00:00:53.00,00:00:54.00,abc,3300,open tap,open,3,tap,0,['tap'],[0]\n",
        "P01_11_14,P01,P01_11,,00:00:55.00,00:00:56.00,3300,3360,open tap,open,3,tap,0,\"['tap'\",[0]\n",
        GOOD,  # duplicate id
        ("P01_11_15,P01,P01_11,,00:00:57.00,00:00:58.00,3420,3480,"
         "öffne den Kühlschrank ☃,open,3,fridge,12,['fridge'],[12]\n"),
        "P02_11_16,P01,P01_11,,00:00:59.00,00:01:00.00,3540,3600,open tap,open,3,tap,0,['tap'],[0]\n",
    ]
    q = Quarantine("index")
    actions, n = epic.read_actions(write(tmp_path, "a.csv", HEADER + "".join(rows)), "validation", q)
    assert n == 8
    assert actions.narration_id.tolist() == ["P01_11_10", "P01_11_15"]  # unicode narration survives
    assert actions.narration.iloc[1] == "öffne den Kühlschrank ☃"
    reasons = {r.item: r.reason for r in q.rows}
    assert reasons == {"P01_11_11": "bad_row", "P01_11_12": "bad_row", "P01_11_13": "bad_row",
                       "P01_11_14": "bad_row", "P01_11_10": "duplicate_narration_id", "P02_11_16": "bad_row"}
    assert all(r.detail and r.split == "validation" for r in q.rows)


def test_missing_columns_and_unreadable_files(tmp_path):
    q = Quarantine("index")
    actions, n = epic.read_actions(write(tmp_path, "b.csv", "narration_id,video_id\nP01_01_0,P01_01\n"), "train", q)
    assert len(actions) == 0 and n == 1 and q.rows[0].reason == "bad_csv" and "start_frame" in q.rows[0].detail
    actions, n = epic.read_actions(str(tmp_path / "absent.csv"), "train", q)
    assert len(actions) == 0 and q.rows[-1].reason == "bad_csv"
    info = epic.read_video_info(write(tmp_path, "vi.csv", "video_id,duration,fps,resolution\nP01_01,10.0,0,1x1\n"
                                      "P01_02,10.0,59.94,1920x1080\n"), q)
    assert list(info.index) == ["P01_02"] and q.rows[-1].reason == "bad_video_info"
    # invalid UTF-8 bytes are replaced and the row quarantined, not the file
    raw = (HEADER + GOOD).encode() + (b"P01_11_20,P01,P01_11,,00:00:58.00,00:00:59.00,3480,3540,"
                                      b"\xff\xfe,open,3,tap,0,['tap'],[0]\n")
    actions, _ = epic.read_actions(write(tmp_path, "c.csv", raw), "train", q)
    assert actions.narration_id.tolist() == ["P01_11_10"] and q.rows[-1].item == "P01_11_20"


def test_question_strings_and_files(tmp_path):
    text = '"Where should my hand move to if I want to drink?"  \n"Can you provide the hand trajectory for x?"'
    assert parse_question_string(text) == ["Where should my hand move to if I want to drink?",
                                           "Can you provide the hand trajectory for x?"]
    assert parse_question_string("Where should my hand move?") == ["Where should my hand move?"]
    assert parse_question_string('""') == []
    path = write(tmp_path, "q.json", json.dumps({"a": text, "b": 3, "c": '""', "d": ["x"]}))
    q = Quarantine("index")
    assert list(load_questions(path, q, "train")) == ["a"]
    assert sorted(r.item for r in q.rows) == ["b", "c", "d"] and {r.reason for r in q.rows} == {"malformed_question"}
    assert (load_questions(write(tmp_path, "bad.json", "{not json"), q) == {}
            and q.rows[-1].reason == "malformed_question")


def test_real_language_assets():
    q = Quarantine("index")
    questions = load_questions(str(require(HANDSONVLM_ASSETS / "ek100_questions.json")), q, "train")
    assert len(questions) == 4627 and len(q) == 0  # 27 unquoted entries are kept as one question each
    assert sum(len(v) for v in questions.values()) == 10794 + 27
    paraphrases = load_paraphrases(str(HANDSONVLM_ASSETS / "rephrase_ek100.json"), q)
    assert len(paraphrases) == 15968 and len(q) == 0
    assert paraphrases["add banana to jug"] == ["put the yellow fruit into the container"]
    assert paraphrases["open drawers"] == paraphrases["open drawer"]  # alias resolved to a list of strings
    assert all(isinstance(v, str) for v in paraphrases["open drawers"])


class Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_restricted_unpickler_admits_data_and_refuses_code():
    data = {"traj": np.arange(42, dtype=np.float32).reshape(21, 2), "idx": [1, 2], "s": {1}, "t": (1.5, None)}
    for protocol in (0, 2, 4, 5):
        out = safe_pickle.loads(pickle.dumps(data, protocol=protocol))
        assert np.array_equal(out["traj"], data["traj"]) and out["s"] == {1}
    with pytest.raises(safe_pickle.UnsafePickleError, match="system"):
        safe_pickle.loads(pickle.dumps(Evil()))
    with pytest.raises(safe_pickle.UnsafePickleError):
        safe_pickle.loads(pickle.dumps({"x": [Evil()]}))
    buf = io.BytesIO()
    np.save(buf, np.array({7: {"future_hands": np.ones((2, 5, 2), np.float32)}}, dtype=object), allow_pickle=True)
    assert safe_pickle.load_npy(buf.getvalue())[7]["future_hands"].shape == (2, 5, 2)


def test_scipy_splines_in_real_labels_load_inert():
    # A hand-written pickle naming scipy's spline class: it must come back as inert data.
    payload = (b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x18scipy.interpolate._cubic\x94"
               b"\x8c\x12CubicHermiteSpline\x94\x93\x94)\x81\x94}\x94\x8c\x01c\x94K\x01sb.")
    obj = safe_pickle.loads(payload)
    assert isinstance(obj, safe_pickle.InertObject) and obj.state == {"c": 1}


def label_dict(first_frame=2889, right=True, left=False, nan=False):
    t = np.linspace(0, 1, 21, dtype=np.float32)[:, None]
    traj = np.concatenate([100 + 200 * t, 200 - 100 * t], axis=1).astype(np.float32)  # pixels
    if nan:
        traj[3, 0] = np.nan
    trajs = {}
    if right:
        trajs["RIGHT"] = {"traj": traj, "fill_indices": list(range(21)), "centers": [tuple(p) for p in traj]}
    if left:
        trajs["LEFT"] = {"traj": traj - 50, "fill_indices": list(range(21)), "centers": []}
    return {"frame_indices": list(range(first_frame, first_frame + 61, 3)), "homography": [np.eye(3)] * 21,
            "contact": np.ones(21, bool), "hand_trajs": trajs,
            "affordance": {"select_points_homo": np.array([[228.0, 128.0]], np.float32)}}


def test_label_pickle_to_targets():
    targets = targets_from_label_pickle(label_dict(right=True, left=False))
    assert targets.future_hands.shape == (2, 5, 2) and targets.future_valid.tolist() == [True, False]
    np.testing.assert_allclose(targets.future_hands[0, :, 0], (100 + 200 * np.array([0, .25, .5, .75, 1])) / 456,
                               rtol=1e-6)
    np.testing.assert_allclose(targets.future_hands[1], [[0.25, 1.5]] * 5)  # missing LEFT placeholder
    np.testing.assert_allclose(targets.contact_points, [[0.5, 0.5]])
    assert targets.first_frame == 2889
    assert future_point_valid(targets.future_hands, targets.future_valid).tolist() == [[True] * 5, [False] * 5]
    with pytest.raises(LabelError) as err:
        targets_from_label_pickle(label_dict(nan=True))
    assert err.value.reason == "bad_trajectory"


def test_label_store_lookup_and_quarantine_reasons(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    (tmp_path / "video_info.json").write_text(json.dumps([1, 2, 3, 4]))
    (labels / "label_1.pkl").write_bytes(pickle.dumps(label_dict()))
    (labels / "label_2.pkl").write_bytes(pickle.dumps(Evil()))
    (labels / "label_3.pkl").write_bytes(b"not a pickle at all")
    buf = io.BytesIO()
    np.save(buf, np.array({4: {"future_hands": np.full((2, 5, 2), 0.5, np.float32), "contact_point": np.zeros(2),
                               "future_valid": np.array([1, 0])}}, dtype=object), allow_pickle=True)
    (labels / "ek100_train_labels.npy").write_bytes(buf.getvalue())
    store = HoiLabels(str(tmp_path))
    assert store.get(1, "train").source == "hoi_forecast_auto"
    assert store.get(4, "train").source == "hoi_forecast_cache"
    assert store.get(5, "train") is None  # not listed in video_info.json
    for uid, reason in ((2, "unsafe_pickle"), (3, "label_unreadable")):
        with pytest.raises(LabelError) as err:
            store.get(uid, "train")
        assert err.value.reason == reason


def test_action_classes_and_class_key_check():
    import pandas as pd

    df = pd.DataFrame({"verb_class": [0, 1, 0, 10, 0, 0], "noun_class": [0, 0, 10, 0, 2, 0]})
    ids = epic.action_classes([df])
    # numbered by the *string* "verb_noun": 0_0 < 0_10 < 0_2 < 10_0 < 1_0
    assert ids == {(0, 0): 0, (0, 10): 1, (0, 2): 2, (10, 0): 3, (1, 0): 4}

    q = Quarantine("index")
    actions, _ = epic.read_actions(str(require(EPIC_ANNOTATIONS / "EPIC_100_uda_source_train.csv")), "train", q)
    classes = {k: epic.read_class_vocab(str(EPIC_ANNOTATIONS / f"EPIC_100_{k}_classes.csv")) for k in ("verb", "noun")}
    assert len(epic.quarantine_class_mismatches(actions, classes, "train", q)) == len(actions) and len(q) == 0
    broken = actions.head(3).copy()
    broken.loc[1, "noun"] = "spaceship"
    kept = epic.quarantine_class_mismatches(broken, classes, "train", q)
    assert len(kept) == 2 and q.rows[0].item == broken.narration_id[1] and "spaceship" in q.rows[0].detail
