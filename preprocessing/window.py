"""The observation and anticipation windows of an EPIC-KITCHENS action, as hoi-forecast computes them.

HandsOnVLM observes 10 frames at 4 fps ending 1 s before the action starts and predicts the hands
at +0.25 ... +1.0 s after the last observed frame. The released RBHP question files and the
hoi-forecast labels are keyed by the *file numbers* this module produces, so the arithmetic
reproduces the reference code bit for bit, including two of its quirks:

* every video is treated as 60 fps (``fps_convention="hoi60"``), although EPIC-100 extension
  videos (``PXX_1YY``) were extracted at 50 fps;
* times are cast to float32 before ``floor(t * F)``, which makes ~1.7 % of indices one file
  lower than exact integer arithmetic would (docs/DATA.md, "Observation window").

``fps_convention="native"`` uses each video's true rgb_frames rate (60 or 50) instead; it is
physically correct but does not join with the released artefacts.
"""

from __future__ import annotations

import re

import numpy as np

from handsonvlm.constants import ANTICIPATION_SECONDS, NUM_FUTURE_POINTS, NUM_OBS_FRAMES, OBS_FPS

NUM_TRACK_POINTS = NUM_FUTURE_POINTS + 1  # 5 stored points per hand: the last observed one + the 4 future
REFERENCE_FPS = 60.0  # hoi-forecast's origin_fps, used for every video under "hoi60"
LABEL_FPS = 20.0  # rate of the 21-point hoi-forecast label trajectories
FPS_CONVENTIONS = ("hoi60", "native")

_EXTENSION_VIDEO = re.compile(r"^P\d+_1\d\d$")


def is_extension_video(video_id: str) -> bool:
    """EPIC-100 extension recordings have a three-digit suffix (``P01_101``)."""
    return bool(_EXTENSION_VIDEO.match(video_id))


def rgb_frames_fps(video_id: str) -> float:
    """The rate at which the official ``rgb_frames`` were extracted (and ``start_frame`` counted).

    60 fps for EPIC-55-era videos, 50 fps for extension videos, whatever the MP4's native rate.
    """
    return 50.0 if is_extension_video(video_id) else 60.0


def convention_fps(video_id: str, fps_convention: str = "hoi60") -> float:
    """The frame rate F used to turn action start frames into observation file numbers."""
    if fps_convention == "hoi60":
        return REFERENCE_FPS
    if fps_convention == "native":
        return rgb_frames_fps(video_id)
    raise ValueError(f"fps_convention must be one of {FPS_CONVENTIONS}, got {fps_convention!r}")


def action_is_observable(start_timestamp_s, anticipation_s: float = ANTICIPATION_SECONDS):
    """hoi-forecast drops actions that start less than ``anticipation_s`` into the video."""
    return np.asarray(start_timestamp_s, dtype=np.float64) - anticipation_s >= 0


def observation_frame_indices(start_frame, fps=REFERENCE_FPS) -> np.ndarray:
    """rgb file numbers of the 10 observed frames, oldest to newest.

    Args:
        start_frame: action start frame(s) (rgb file numbers), scalar or ``[N]``.
        fps: the convention frame rate F, scalar or ``[N]``.

    Returns:
        int32 ``[N, 10]`` (or ``[10]`` for a scalar), the reference formula
        ``floor(float32(max(0, (s-1)/F - 1 + (k-10)/4)) * float32(F)) + 1``.
    """
    scalar = np.ndim(start_frame) == 0
    start = np.atleast_1d(np.asarray(start_frame, dtype=np.float64))
    fps64 = np.broadcast_to(np.asarray(fps, dtype=np.float64), start.shape)
    anchor = (start - 1.0) / fps64 - ANTICIPATION_SECONDS  # last observation time, float64
    offsets = (np.arange(1, NUM_OBS_FRAMES + 1) - NUM_OBS_FRAMES) / OBS_FPS  # -2.25 ... 0
    times = np.clip(anchor[:, None] + offsets[None, :], 0.0, None)
    # The reference casts to float32 *before* multiplying by F; keep that order.
    idx = np.floor(times.astype(np.float32) * fps64.astype(np.float32)[:, None]).astype(np.int64) + 1
    idx = idx.astype(np.int32)
    return idx[0] if scalar else idx


def future_frame_indices(last_obs_frame, fps=REFERENCE_FPS, points_per_second: float = OBS_FPS) -> np.ndarray:
    """rgb file numbers of the anticipation window, starting at the last observed frame.

    With ``points_per_second=4`` this is the 5-point target grid (t = 0, 0.25, ..., 1.0 s);
    with 20 it is the 21-point grid of the hoi-forecast label pickles.
    Returns int32 ``[N, P]`` (or ``[P]`` for a scalar input).
    """
    scalar = np.ndim(last_obs_frame) == 0
    last = np.atleast_1d(np.asarray(last_obs_frame, dtype=np.int64))
    fps64 = np.broadcast_to(np.asarray(fps, dtype=np.float64), last.shape)
    n_points = int(round(ANTICIPATION_SECONDS * points_per_second)) + 1
    steps = np.arange(n_points) / points_per_second  # seconds after the last observed frame
    idx = (last[:, None] + np.round(steps[None, :] * fps64[:, None])).astype(np.int32)
    return idx[0] if scalar else idx


def frame_path(participant_id: str, video_id: str, frame_number: int) -> str:
    """Relative path of an rgb frame, the key format of the released RBHP question files."""
    return f"{participant_id}/rgb_frames/{video_id}/frame_{int(frame_number):010d}.jpg"


def frame_time_s(frame_number, fps) -> np.ndarray:
    """Time (s) of an rgb file number at rate ``fps`` (file 1 is t = 0)."""
    return (np.asarray(frame_number, dtype=np.float64) - 1.0) / np.asarray(fps, dtype=np.float64)
