"""The library side of predict.py: the observation window of a user's clip, its one resize path, drawing choices."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from handsonvlm.constants import EPIC_FRAME_HEIGHT, EPIC_FRAME_WIDTH, NUM_OBS_FRAMES
from handsonvlm.inference import choose_drawn, overlay_size
from preprocessing.media import (
    VideoFileReader,
    decode_jpeg,
    encode_jpeg,
    model_frames,
    natural_key,
    nearest_frames,
    read_video,
    resize_to_height,
    window_times,
)
from preprocessing.samples import MediaConfig

EPIC_SIZE = (EPIC_FRAME_WIDTH, EPIC_FRAME_HEIGHT)
FULL_HD = (1920, 1080)
FPS, NUM_VIDEO_FRAMES = 30, 90  # a 3 s clip


def write_video(path, num_frames: int = NUM_VIDEO_FRAMES, size: tuple[int, int] = EPIC_SIZE, fps: float = FPS):
    """An mp4v clip of ``size`` (W, H): a moving orange disc on grey, so that frames differ."""
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert writer.isOpened()
    scale = h / EPIC_FRAME_HEIGHT  # the disc moves alike at every resolution
    for i in range(num_frames):
        frame = np.full((h, w, 3), 40, np.uint8)
        centre = (int(scale * (40 + 4 * i)), int(scale * (128 + int(40 * np.sin(i / 10)))))
        cv2.circle(frame, centre, int(scale * 24), (40, 160, 240), -1)  # BGR
        writer.write(frame)
    writer.release()
    return path


def test_window_times_and_nearest_frames():
    np.testing.assert_allclose(window_times(2.5), np.arange(1, 11) * 0.25)
    np.testing.assert_allclose(window_times(1.0), [0, 0, 0, 0, 0, 0, 0.25, 0.5, 0.75, 1.0])  # clamped at 0
    starts = np.arange(90) / 30
    assert nearest_frames(window_times(2.5), starts).tolist() == [7, 15, 22, 30, 37, 45, 52, 60, 67, 75]
    assert nearest_frames(np.array([0.0, 2.98, 5.0]), starts).tolist() == [0, 89, 89]
    assert sorted(["f10.jpg", "f2.jpg", "f1.jpg"], key=natural_key) == ["f1.jpg", "f2.jpg", "f10.jpg"]


@pytest.mark.parametrize(("size", "expected"), [(FULL_HD, EPIC_SIZE), ((1280, 720), EPIC_SIZE),
                                                (EPIC_SIZE, EPIC_SIZE), ((640, 480), (342, 256))])
def test_resize_to_height_rounds_the_width_like_epic(size, expected):
    """16:9 input becomes EPIC's 456x256 (455.1 rounds to the even 456, as ffmpeg's scale=-2)."""
    w, h = size
    image = np.zeros((h, w, 3), np.uint8)
    assert resize_to_height(image, EPIC_FRAME_HEIGHT).shape == (expected[1], expected[0], 3)
    assert resize_to_height(image, 0) is image
    if size == EPIC_SIZE:  # SynthKitchens videos: their frames are kept as decoded
        assert resize_to_height(image, EPIC_FRAME_HEIGHT) is image


def test_full_hd_video_reaches_the_model_as_the_shards_store_it(tmp_path):
    """predict's path (read_video + model_frames) and the samples stage's VideoFileReader give the
    same 456x256 frames for the same video and times."""
    fps = 10  # few 1080p frames keep the test fast
    video = write_video(tmp_path / "full_hd.mp4", num_frames=3 * fps, size=FULL_HD, fps=fps)
    observation = read_video(video, at=2.5)
    assert observation.frames.shape == (NUM_OBS_FRAMES, 1080, 1920, 3)
    frames = model_frames(observation.frames)
    assert frames.shape == (NUM_OBS_FRAMES, EPIC_FRAME_HEIGHT, EPIC_FRAME_WIDTH, 3) and frames.dtype == np.uint8

    media = MediaConfig(epic_root=str(tmp_path), out=str(tmp_path / "out"))
    reader = VideoFileReader(str(video), frames_fps=fps, native_fps=fps, frame_height=media.frame_height,
                             jpeg_quality=media.jpeg_quality)
    file_numbers = np.asarray(observation.source["frame_indices"]) + 1  # rgb file k+1 is video frame k at equal fps
    assert reader.video_frame(file_numbers).tolist() == observation.source["frame_indices"]
    jpegs = reader.read(file_numbers)
    for number, frame in zip(file_numbers, frames):
        stored = jpegs[int(number)]
        assert decode_jpeg(stored).shape == frame.shape
        # Equal JPEG bytes from the same encoder: the stage resized the decoded frame to the same pixels.
        assert encode_jpeg(frame, media.jpeg_quality) == stored


def test_epic_sized_video_is_not_resized(tmp_path):
    video = write_video(tmp_path / "epic.mp4", num_frames=30)
    frames = read_video(video).frames
    np.testing.assert_array_equal(model_frames(frames), frames)


def test_choose_drawn_skips_incomplete_samples():
    traj = np.stack([np.full((2, 4, 2), np.nan), np.full((2, 4, 2), 0.2), np.full((2, 4, 2), 0.4)])
    complete = np.array([False, True, True])
    mean, info = choose_drawn(traj, complete, "mean")
    np.testing.assert_allclose(mean, 0.3)
    assert info == {"mode": "mean", "samples": [1, 2]}
    first, info = choose_drawn(traj, complete, "first")
    np.testing.assert_allclose(first, 0.2)
    assert info == {"mode": "first", "samples": [1]}
    assert choose_drawn(traj, np.zeros(3, bool), "mean") == (None, None)
    assert overlay_size(456, 256) == (960, 540) and overlay_size(1080, 1920) == (960, 1706)
