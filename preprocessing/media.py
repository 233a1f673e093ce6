"""Reading observation frames from an EPIC tree: extracted ``rgb_frames`` JPEGs or the MP4 (decord).

File numbers (``obs_frame_idx``) count rgb frames at the video's rgb_frames rate (60 fps, 50 for
extension videos). For an MP4 they are mapped through time to the container's frame grid:
``video_frame = round((file_number - 1) / frames_fps * native_fps)``.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from preprocessing import storage

FPS_TOLERANCE = 0.01  # relative disagreement allowed between video_info's fps and the container's
DECODE_CHUNK = 32  # frames per decord get_batch call: bounds memory for 1080p sources
VIDEO_SUFFIXES = (".MP4", ".mp4")


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
    """Resize keeping the aspect ratio (``height=0``: unchanged). Width rounds like ffmpeg's -2."""
    h, w = image.shape[:2]
    if height <= 0 or h == height:
        return image
    width = int(round(w * height / h / 2.0)) * 2
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


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


class VideoFileReader:
    """An MP4 decoded with decord; frames re-encoded as JPEG."""

    source = "video"

    def __init__(self, local_path: str, frames_fps: float, native_fps: float, frame_height: int, jpeg_quality: int):
        import decord  # imported lazily: only MP4 sources need it

        self.path, self.frames_fps, self.native_fps = local_path, float(frames_fps), float(native_fps)
        self.frame_height, self.jpeg_quality = frame_height, jpeg_quality
        if os.path.getsize(local_path) == 0:
            raise FrameError("video_unreadable", f"{local_path} is empty (0 bytes)")
        try:
            self.reader = decord.VideoReader(local_path, ctx=decord.cpu(0), num_threads=1)
            self.num_frames = len(self.reader)
            container_fps = float(self.reader.get_avg_fps())
        except Exception as exc:  # decord raises its own DECORDError for truncated / non-video files
            raise FrameError("video_unreadable", f"{local_path}: {type(exc).__name__}: {str(exc)[:300]}") from exc
        if self.num_frames == 0:
            raise FrameError("video_unreadable", f"{local_path} has no frames")
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
                    out[int(number)] = FrameError("frame_corrupt", f"decode failed: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            for number, frame in zip(wanted_numbers[start:start + DECODE_CHUNK], frames):
                out[int(number)] = encode_jpeg(resize_to_height(frame, self.frame_height), self.jpeg_quality)
        return out
