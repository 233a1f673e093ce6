"""Reading observation frames: from an EPIC tree for the shards, and from a user's clip for predict.py.

EPIC tree: extracted ``rgb_frames`` JPEGs or the MP4 (decord). File numbers (``obs_frame_idx``)
count rgb frames at the video's rgb_frames rate (60 fps, 50 for extension videos). For an MP4 they
are mapped through time to the container's frame grid:
``video_frame = round((file_number - 1) / frames_fps * native_fps)``.

A user's clip (:func:`read_video`, :func:`read_frames_dir`): the 10-frame, 4 fps window the model
was trained on. Both paths resize with :func:`resize_to_height`, so the model sees frames of the
size the shards hold (456x256 for 16:9 input).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from handsonvlm.constants import EPIC_FRAME_HEIGHT, NUM_OBS_FRAMES, OBS_FPS
from preprocessing import storage

FPS_TOLERANCE = 0.01  # relative disagreement allowed between video_info's fps and the container's
DECODE_CHUNK = 32  # frames per decord get_batch call: bounds memory for 1080p sources
VIDEO_SUFFIXES = (".MP4", ".mp4")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # what a frames directory of a user's clip may hold
EVEN = 2  # widths are rounded to a multiple of this, as ffmpeg's scale=-2 (and so EPIC's rgb_frames)
MESSAGE_CHARS = 200  # a decoder's message is cut to its first line and this many characters
TIME_DIGITS = 6  # times in an Observation's JSON-ready fields: to the microsecond
END_TOLERANCE_S = 1e-6  # an ``at`` this far past a video's end still means its end (typed-in rounding)


class FrameError(Exception):
    """A frame (or a whole video) that cannot be read; ``reason`` is a quarantine code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def locate_source(epic_root: str, participant_id: str, video_id: str) -> tuple[str, str] | None:
    """``("rgb_frames", dir)`` if extracted frames exist, else ``("video", mp4)``, else None."""
    frames_dir = storage.join(epic_root, participant_id, "rgb_frames", video_id)
    if storage.is_dir(frames_dir):
        return "rgb_frames", frames_dir
    for suffix in VIDEO_SUFFIXES:
        uri = storage.join(epic_root, participant_id, "videos", video_id + suffix)
        if storage.exists(uri):
            return "video", uri
    return None


def resize_to_height(image: np.ndarray, height: int) -> np.ndarray:
    """``[H, W, 3]`` -> ``[height, W', 3]``, aspect kept (``height=0``: unchanged).

    W' is rounded to the nearest even width, as ffmpeg's ``scale=-2:256`` that made EPIC's
    rgb_frames: 1920x1080 -> 456x256 (455.1 rounded up), the size of EPIC's own frames."""
    h, w = image.shape[:2]
    if height <= 0 or h == height:
        return image
    width = int(round(w * height / h / EVEN)) * EVEN
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def model_frames(frames: np.ndarray, height: int = EPIC_FRAME_HEIGHT) -> np.ndarray:
    """uint8 RGB ``[F, H, W, 3]`` -> ``[F, height, W', 3]``: the frames as the samples stage stores them."""
    return np.stack([resize_to_height(frame, height) for frame in frames])


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise FrameError("frame_corrupt", "JPEG encoding failed")
    return buf.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> RGB uint8 ``[H, W, 3]``."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FrameError("frame_corrupt", "not a decodable image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class RgbFramesReader:
    """``frame_%010d.jpg`` files. Bytes are kept as they are unless a resize is asked for."""

    source = "rgb_frames"

    def __init__(self, frames_dir: str, frame_height: int, jpeg_quality: int):
        self.frames_dir, self.frame_height, self.jpeg_quality = frames_dir, frame_height, jpeg_quality

    def read(self, frame_numbers: np.ndarray) -> dict[int, bytes | FrameError]:
        out: dict[int, bytes | FrameError] = {}
        for number in np.unique(frame_numbers):
            uri = storage.join(self.frames_dir, f"frame_{int(number):010d}.jpg")
            try:
                data = storage.read_bytes(uri)
            except (FileNotFoundError, OSError):
                out[int(number)] = FrameError("frame_missing", f"{uri} does not exist")
                continue
            try:
                image = decode_jpeg(data)
                if self.frame_height > 0 and image.shape[0] != self.frame_height:
                    data = encode_jpeg(resize_to_height(image, self.frame_height), self.jpeg_quality)
                out[int(number)] = data
            except FrameError as exc:
                out[int(number)] = FrameError("frame_corrupt", f"{uri}: {exc.detail}")
        return out


def open_video(path: str):
    """``(decord reader, number of frames, average fps)`` of a video file.

    Raises FrameError("video_unreadable") for an empty, undecodable or frameless file."""
    import decord  # imported lazily: only MP4 sources need it

    if os.path.getsize(path) == 0:
        raise FrameError("video_unreadable", f"{path} is empty (0 bytes)")
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        num_frames, fps = len(reader), float(reader.get_avg_fps())
    except Exception as exc:  # decord raises its own DECORDError for truncated / non-video files
        raise FrameError("video_unreadable", f"{path}: {type(exc).__name__}: {str(exc)[:300]}") from exc
    if num_frames == 0:
        raise FrameError("video_unreadable", f"{path} has no frames")
    return reader, num_frames, fps


class VideoFileReader:
    """An MP4 decoded with decord; frames re-encoded as JPEG."""

    source = "video"

    def __init__(self, local_path: str, frames_fps: float, native_fps: float, frame_height: int, jpeg_quality: int):
        self.path, self.frames_fps, self.native_fps = local_path, float(frames_fps), float(native_fps)
        self.frame_height, self.jpeg_quality = frame_height, jpeg_quality
        self.reader, self.num_frames, container_fps = open_video(local_path)
        if abs(container_fps - self.native_fps) > FPS_TOLERANCE * self.native_fps:
            raise FrameError("fps_mismatch", f"video_info says {self.native_fps:.3f} fps, the container has "
                                             f"{container_fps:.3f} fps; frame mapping would pick wrong frames")

    def video_frame(self, frame_numbers: np.ndarray) -> np.ndarray:
        """rgb file numbers -> 0-based container frame indices."""
        times = (np.asarray(frame_numbers, np.float64) - 1.0) / self.frames_fps
        return np.round(times * self.native_fps).astype(np.int64)

    def read(self, frame_numbers: np.ndarray) -> dict[int, bytes | FrameError]:
        numbers = np.unique(frame_numbers)
        targets = self.video_frame(numbers)
        # A file number at the very end may round one past the container's last frame.
        targets = np.where(targets == self.num_frames, self.num_frames - 1, targets)
        out: dict[int, bytes | FrameError] = {}
        readable = targets < self.num_frames
        for number, target in zip(numbers[~readable], targets[~readable]):
            out[int(number)] = FrameError("frame_past_end", f"file {number} -> video frame {target}, "
                                                            f"the video has {self.num_frames} frames")
        wanted_numbers, wanted = numbers[readable], targets[readable]
        for start in range(0, len(wanted), DECODE_CHUNK):
            chunk = wanted[start:start + DECODE_CHUNK]
            try:
                frames = self.reader.get_batch(chunk.tolist()).asnumpy()
            except Exception as exc:
                for number in wanted_numbers[start:start + DECODE_CHUNK]:
                    out[int(number)] = FrameError("frame_corrupt",
                                                  f"decode failed: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            for number, frame in zip(wanted_numbers[start:start + DECODE_CHUNK], frames):
                out[int(number)] = encode_jpeg(resize_to_height(frame, self.frame_height), self.jpeg_quality)
        return out


# --------------------------------------------------------------------------------- a user's clip
class InputError(ValueError):
    """A user's clip that cannot give an observation window (missing, unreadable, bad time): one line."""


def first_line(message: str) -> str:
    """A decoder's (multi-line) message cut to one short line, for a one-line error."""
    lines = str(message).splitlines()
    return lines[0][:MESSAGE_CHARS] if lines else ""


@dataclass
class Observation:
    """The observed window of a user's clip.

    frames: uint8 RGB ``[F, H, W, 3]`` at the input's resolution; times_s: ``[F]`` time of each
    frame; source: where they came from (JSON-ready); notes: what the user should know."""

    frames: np.ndarray
    times_s: list[float]
    source: dict
    notes: list[str] = field(default_factory=list)


def window_times(at: float, num_frames: int = NUM_OBS_FRAMES, fps: float = OBS_FPS) -> np.ndarray:
    """``[F]`` times (s) of the frames ending at ``at``: t_k = at - (F-1-k)/fps, clamped to >= 0.

    Clamped as hoi-forecast clamps windows that start before the video: its first frame repeats."""
    k = np.arange(num_frames, dtype=np.float64)
    return np.clip(at - (num_frames - 1 - k) / fps, 0.0, None)


def nearest_frames(times: np.ndarray, frame_starts: np.ndarray) -> np.ndarray:
    """``[N]`` index of the frame whose start is nearest to each time (ties go to the earlier frame)."""
    starts = np.asarray(frame_starts, np.float64)
    right = np.searchsorted(starts, times, side="left").clip(0, len(starts) - 1)
    left = (right - 1).clip(0, len(starts) - 1)
    take_left = np.abs(times - starts[left]) <= np.abs(starts[right] - times)
    return np.where(take_left, left, right).astype(np.int64)


def frame_timestamps(reader, fps: float) -> tuple[np.ndarray, float]:
    """``([N] start time of every frame, duration)`` in seconds of a decord reader.

    The container's timestamps when they are usable (variable frame rate), else index / fps."""
    n = len(reader)
    try:
        stamps = np.asarray(reader.get_frame_timestamp(list(range(n))), np.float64).reshape(n, 2)
    except Exception:  # decord builds without timestamps: fall back to the average rate
        stamps = None
    if stamps is not None and np.isfinite(stamps).all() and (stamps >= 0).all() and (np.diff(stamps[:, 0]) >= 0).all():
        return stamps[:, 0], float(max(stamps[-1, 1], stamps[-1, 0]))
    if not fps > 0:
        raise InputError("the video reports no frame rate and no timestamps")
    return np.arange(n) / fps, n / fps


def read_video(path: str | Path, at: float | None = None, num_frames: int = NUM_OBS_FRAMES) -> Observation:
    """The window of a video (any container decord reads) whose last frame is at ``at`` s (default: its last frame).

    Each window time is mapped to the video frame nearest to it; ``at`` may not exceed the duration."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"video not found: {path}")
    try:
        reader, n, fps = open_video(str(path))
    except FrameError as exc:
        raise InputError(f"cannot read video: {first_line(exc.detail)}") from exc
    starts, duration = frame_timestamps(reader, fps)
    last = float(starts[-1])
    if at is None:
        at = last
    elif at < 0:
        raise InputError(f"--at must be >= 0 s, got {at}")
    elif at > duration + END_TOLERANCE_S:
        raise InputError(f"--at {at:g} s is past the end of {path} ({duration:.3f} s long, {n} frames "
                         f"at {fps:.3f} fps; its last frame is at {last:.3f} s)")
    times = window_times(at, num_frames)
    notes = []
    span = (num_frames - 1) / OBS_FPS
    if at < span:
        notes.append(f"the {span:g} s window ending at {at:g} s starts before the video: "
                     f"{int((times == 0).sum())} observed frames are its first frame")
    index = nearest_frames(times, starts)
    try:
        frames = reader.get_batch(index.tolist()).asnumpy()
    except Exception as exc:  # decord's DECORDError on a corrupt packet
        raise InputError(f"cannot decode frames {index.tolist()} of {path}: {first_line(exc)}") from exc
    return Observation(frames=np.ascontiguousarray(frames, dtype=np.uint8),
                       times_s=[round(float(t), TIME_DIGITS) for t in starts[index]],
                       source={"video": str(path), "at_s": round(float(at), TIME_DIGITS),
                               "frame_indices": index.tolist(), "fps": round(fps, TIME_DIGITS), "num_frames": n,
                               "duration_s": round(duration, TIME_DIGITS)},
                       notes=notes)


def natural_key(name: str) -> list[tuple]:
    """Sort key comparing digit runs as numbers: ``f2`` < ``f10`` (zero-padded names sort as plain text)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def read_frames_dir(directory: str | Path, num_frames: int = NUM_OBS_FRAMES) -> Observation:
    """The last ``num_frames`` images of a directory, taken as consecutive frames at 4 fps.

    With fewer images the first is repeated at the front (one image: repeated, as the release's
    chat did). All images must have the same size."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"frames directory not found: {directory}")
    files = sorted((p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: natural_key(p.name))
    if not files:
        raise InputError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {directory}")
    notes = []
    chosen = files[-num_frames:]
    if len(chosen) < num_frames:
        pad = num_frames - len(chosen)
        notes.append(f"{len(chosen)} image(s) for a {num_frames}-frame window: the first image "
                     f"({chosen[0].name}) is repeated {pad} more time(s) at the start")
        chosen = [chosen[0]] * pad + chosen
    decoded: dict[Path, np.ndarray] = {}
    for p in dict.fromkeys(chosen):
        bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if bgr is None:
            raise InputError(f"cannot read image {p}")
        decoded[p] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    sizes = {img.shape[:2] for img in decoded.values()}
    if len(sizes) != 1:
        raise InputError(f"images in {directory} differ in size: {sorted((w, h) for h, w in sizes)} (W, H)")
    return Observation(frames=np.stack([decoded[p] for p in chosen]),
                       times_s=[round(k / OBS_FPS, TIME_DIGITS) for k in range(num_frames)],
                       source={"frames": str(directory), "files": [p.name for p in chosen], "assumed_fps": OBS_FPS},
                       notes=notes)
