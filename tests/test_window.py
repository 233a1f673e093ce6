"""Observation-window arithmetic against hoi-forecast's worked examples and the released question keys."""

import json

import numpy as np
import pytest
from conftest import EPIC_ANNOTATIONS, HANDSONVLM_ASSETS, require

from preprocessing import epic
from preprocessing.quarantine import Quarantine
from preprocessing.window import (
    convention_fps,
    frame_path,
    future_frame_indices,
    is_extension_video,
    observation_frame_indices,
    rgb_frames_fps,
)


def test_worked_examples_from_the_spec():
    # validation P01_11_10, start_frame 2949
    assert observation_frame_indices(2949).tolist() == list(range(2754, 2890, 15))
    assert future_frame_indices(2889).tolist() == [2889, 2904, 2919, 2934, 2949]
    # train P01_01_52, start_frame 16887: last observed 16827, future window ends at the action
    assert observation_frame_indices(16887)[[0, -1]].tolist() == [16692, 16827]
    assert future_frame_indices(16827)[-1] == 16887
    # early actions clamp to file 1
    assert observation_frame_indices(100).tolist() == [1, 1, 1, 1, 1, 1, 1, 10, 25, 40]
    # the 21-point label grid at 20 fps
    assert future_frame_indices(2889, points_per_second=20).tolist() == list(range(2889, 2950, 3))


def test_vectorised_matches_scalar_and_extension_fps():
    starts = np.array([100, 2949, 16887, 1000])
    batch = observation_frame_indices(starts)
    assert batch.shape == (4, 10) and batch.dtype == np.int32
    for s, row in zip(starts, batch):
        assert row.tolist() == observation_frame_indices(int(s)).tolist()
    # hoi60 treats extension videos as 60 fps; native uses their real 50 fps (docs/DATA.md, "Observation window")
    assert is_extension_video("P07_106") and not is_extension_video("P01_11")
    assert rgb_frames_fps("P07_106") == 50.0 and convention_fps("P07_106", "hoi60") == 60.0
    assert observation_frame_indices(1000, 60.0).tolist() == list(range(805, 941, 15))
    assert observation_frame_indices(1000, 50.0).tolist() == [837, 850, 862, 875, 887, 900, 912, 925, 937, 950]
    with pytest.raises(ValueError):
        convention_fps("P01_01", "pal")


def test_float32_rounding_is_reproduced():
    """Some start frames give s-61 (not s-60) as the last index only because of float32."""
    starts = np.arange(61, 200_000)
    last = observation_frame_indices(starts)[:, -1]
    exact = starts - 60
    lower = last != exact
    assert 0.005 < lower.mean() < 0.05  # ~1.7 % of actions (docs/DATA.md, "Observation window")
    assert np.all(last[lower] == exact[lower] - 1)


def test_released_question_keys_are_reproduced_for_every_matched_video():
    """Every ek100_questions.json key whose video is in the real train subset is an action's last frame."""
    csv = require(EPIC_ANNOTATIONS / "EPIC_100_uda_source_train.csv")
    questions = json.loads(require(HANDSONVLM_ASSETS / "ek100_questions.json").read_text())
    actions, _ = epic.read_actions(str(csv), "train", Quarantine("index"))
    actions = actions[actions["start_timestamp_s"] >= 1.0]
    last = observation_frame_indices(actions["start_frame"].to_numpy())[:, -1]
    computed = {frame_path(p, v, i) for p, v, i in zip(actions["participant_id"], actions["video_id"], last)}
    videos = set(actions["video_id"])
    keys = [k for k in questions if k.split("/")[2] in videos]
    assert len(keys) > 2000
    missing = [k for k in keys if k not in computed]
    assert missing == []
    # exact integer arithmetic would miss some of them: the float32 cast matters
    exact = {frame_path(p, v, s - 60) for p, v, s in zip(actions["participant_id"], actions["video_id"],
                                                          actions["start_frame"])}
    assert sum(k not in exact for k in keys) > 0
