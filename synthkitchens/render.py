"""SynthKitchens rendering: draws a sampled scene's frames and writes its MP4 and 60-fps rgb_frames JPEGs.

Frames are a pure function of the scene and a time in seconds (MP4 frame i shows t = i / fps,
rgb file n shows t = (n - 1) / 60), so both media show the same motion and decode identically
whatever the number of worker processes.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from handsonvlm.constants import EPIC_FRAME_HEIGHT, EPIC_FRAME_WIDTH
from preprocessing.window import REFERENCE_FPS
from synthkitchens.scene import ARM_ANCHOR_NORM, HAND_AXES_PX, VOCABULARY, VideoScene, palm_geometry

DRAW_SHIFT = 4  # cv2 fixed-point bits: sub-pixel (1/16 px) drawing keeps motion smooth
DRAW_SCALE = 1 << DRAW_SHIFT
TEXTURE_AMPLITUDE = 6.0  # std of the (blurred) counter texture noise, grey levels
TEXTURE_BLUR_SIGMA = 1.5
BACKSPLASH_HEIGHT_NORM = 0.09  # tiled wall strip at the top of the frame
BACKSPLASH_TILE_PX = 24
THUMB_AXES_PX = (4.0, 7.0)
THUMB_TILT_DEG = 25.0
FOREARM_WIDTH_PX = 16
SLEEVE_WIDTH_PX = 22
SLEEVE_FRACTION = 0.45  # the sleeve covers this fraction of the arm from the frame edge
JPEG_QUALITY = 90


# ----------------------------------------------------------------------------------------------
# Drawing primitives (cv2 fixed point) and the objects: ``_draw_<noun>(img, cx, cy, colour, scale)``
# draws at ``scale`` times the vocabulary's size (1.0: the fitted layout's, pixel for pixel as in 1.1)
# ----------------------------------------------------------------------------------------------
def _fx(value: float) -> int:
    """Pixel coordinate -> cv2 fixed point (DRAW_SHIFT fractional bits)."""
    return int(round(value * DRAW_SCALE))


def _pt(x: float, y: float) -> tuple[int, int]:
    return _fx(x), _fx(y)


def _circle(img, centre, radius, colour, thickness=-1) -> None:
    cv2.circle(img, _pt(*centre), _fx(radius), colour, thickness, cv2.LINE_AA, DRAW_SHIFT)


def _rect(img, x0, y0, x1, y1, colour) -> None:
    pts = np.array([_pt(x0, y0), _pt(x1, y0), _pt(x1, y1), _pt(x0, y1)], dtype=np.int32)
    cv2.fillPoly(img, [pts], colour, cv2.LINE_AA, DRAW_SHIFT)


def _shade(colour, factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in colour)


def _draw_cup(img, cx, cy, col, s) -> None:
    cv2.circle(img, _pt(cx + 13 * s, cy), _fx(5.5 * s), col, max(1, round(3 * s)), cv2.LINE_AA, DRAW_SHIFT)  # handle
    _circle(img, (cx - 6 * s, cy), 13 * s, col)
    _circle(img, (cx - 6 * s, cy), 9 * s, _shade(col, 0.45))  # coffee inside


def _draw_plate(img, cx, cy, col, s) -> None:
    _circle(img, (cx, cy), 26 * s, col)
    cv2.circle(img, _pt(cx, cy), _fx(18 * s), _shade(col, 0.82), max(1, round(s)), cv2.LINE_AA, DRAW_SHIFT)


def _draw_knife(img, cx, cy, col, s) -> None:
    _rect(img, cx - 31 * s, cy - 3 * s, cx + 9 * s, cy + 3 * s, col)
    _rect(img, cx + 9 * s, cy - 5 * s, cx + 31 * s, cy + 5 * s, (40, 40, 45))


def _draw_pan(img, cx, cy, col, s) -> None:
    _rect(img, cx + 6 * s, cy - 3 * s, cx + 33 * s, cy + 3 * s, (30, 45, 70))  # handle
    _circle(img, (cx - 12 * s, cy), 21 * s, col)
    _circle(img, (cx - 12 * s, cy), 16 * s, _shade(col, 1.7))


def _draw_bottle(img, cx, cy, col, s) -> None:
    _rect(img, cx - 8 * s, cy - 14 * s, cx + 8 * s, cy + 26 * s, col)
    _rect(img, cx - 4 * s, cy - 22 * s, cx + 4 * s, cy - 14 * s, _shade(col, 0.75))
    _rect(img, cx - 5 * s, cy - 26 * s, cx + 5 * s, cy - 21 * s, (230, 230, 230))  # cap


def _draw_sponge(img, cx, cy, col, s) -> None:
    _rect(img, cx - 16 * s, cy - 11 * s, cx + 16 * s, cy + 11 * s, col)
    _rect(img, cx - 16 * s, cy - 11 * s, cx + 16 * s, cy - 4 * s, (50, 140, 40))


def _draw_bowl(img, cx, cy, col, s) -> None:
    _circle(img, (cx, cy), 19 * s, col)
    _circle(img, (cx, cy), 12 * s, (235, 175, 100))


def _draw_kettle(img, cx, cy, col, s) -> None:
    spout = np.array([_pt(cx + 5 * s, cy - 5 * s), _pt(cx + 25 * s, cy - 9 * s), _pt(cx + 25 * s, cy - 4 * s),
                      _pt(cx + 5 * s, cy + 5 * s)], np.int32)
    cv2.fillPoly(img, [spout], _shade(col, 0.8), cv2.LINE_AA, DRAW_SHIFT)
    _circle(img, (cx - 7 * s, cy), 18 * s, col)
    _rect(img, cx - 19 * s, cy - 3 * s, cx + 5 * s, cy + 3 * s, (30, 30, 30))  # handle across the lid


def _draw_jar(img, cx, cy, col, s) -> None:
    _rect(img, cx - 11 * s, cy - 9 * s, cx + 11 * s, cy + 15 * s, col)
    _rect(img, cx - 12 * s, cy - 15 * s, cx + 12 * s, cy - 8 * s, (40, 170, 210))  # golden lid


def _draw_board(img, cx, cy, col, s) -> None:
    _rect(img, cx - 29 * s, cy - 18 * s, cx + 29 * s, cy + 18 * s, _shade(col, 0.75))
    _rect(img, cx - 27 * s, cy - 16 * s, cx + 27 * s, cy + 16 * s, col)
    _circle(img, (cx + 21 * s, cy - 10 * s), 3 * s, _shade(col, 0.5))


def _draw_towel(img, cx, cy, col, s) -> None:
    _rect(img, cx - 17 * s, cy - 11 * s, cx + 17 * s, cy + 11 * s, col)
    for dx in (-8, 2):
        _rect(img, cx + dx * s, cy - 11 * s, cx + (dx + 4) * s, cy + 11 * s, (245, 245, 245))


_DRAWERS = {
    "cup": _draw_cup, "plate": _draw_plate, "knife": _draw_knife, "pan": _draw_pan,
    "bottle": _draw_bottle, "sponge": _draw_sponge, "bowl": _draw_bowl, "kettle": _draw_kettle,
    "jar": _draw_jar, "board:chopping": _draw_board, "towel": _draw_towel,
}


# ----------------------------------------------------------------------------------------------
# Frames
# ----------------------------------------------------------------------------------------------
def render_static_layer(scene: VideoScene) -> np.ndarray:
    """Counter (colour + fixed texture + tiled backsplash) with the objects: uint8 [256, 456, 3] BGR."""
    rng = np.random.default_rng(scene.texture_seed)
    noise = rng.normal(0.0, 1.0, size=(EPIC_FRAME_HEIGHT, EPIC_FRAME_WIDTH)).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), TEXTURE_BLUR_SIGMA)
    noise *= TEXTURE_AMPLITUDE / max(float(noise.std()), 1e-6)
    img = np.asarray(scene.counter_bgr, np.float32)[None, None, :] + noise[:, :, None]
    splash_h = int(round(BACKSPLASH_HEIGHT_NORM * EPIC_FRAME_HEIGHT))
    tile = _shade(scene.counter_bgr, 1.35)
    img[:splash_h] = tile
    img[:splash_h, ::BACKSPLASH_TILE_PX] = _shade(tile, 0.8)
    img[splash_h - 1:splash_h + 1] = _shade(scene.counter_bgr, 0.6)
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    for obj in scene.objects:
        _DRAWERS[obj.noun](img, obj.centre[0], obj.centre[1], VOCABULARY[obj.noun].colour_bgr, obj.scale)
    return img


def _draw_arm(img, scene: VideoScene, side: str, centre) -> None:
    """Forearm (skin, sleeve near the frame edge) from the side's anchor below the frame, then
    the palm ellipse centred on the hand centre and a thumb on the inner side."""
    ax, ay = ARM_ANCHOR_NORM[side]
    anchor = np.array([ax * EPIC_FRAME_WIDTH, ay * EPIC_FRAME_HEIGHT])
    centre = np.asarray(centre, dtype=np.float64)
    skin_dark = _shade(scene.skin_bgr, 0.88)
    cv2.line(img, _pt(*anchor), _pt(*centre), skin_dark, FOREARM_WIDTH_PX, cv2.LINE_AA, DRAW_SHIFT)
    cuff = anchor + SLEEVE_FRACTION * (centre - anchor)
    cv2.line(img, _pt(*anchor), _pt(*cuff), scene.sleeve_bgr, SLEEVE_WIDTH_PX, cv2.LINE_AA, DRAW_SHIFT)
    angle, _ = palm_geometry(side, centre)
    # Thumb on the inner side (toward the body midline), slightly toward the fingertips.
    direction = (centre - anchor) / max(float(np.linalg.norm(centre - anchor)), 1e-6)
    inward = np.array([-direction[1], direction[0]]) * (1.0 if side == "RIGHT" else -1.0)
    thumb = centre + inward * (HAND_AXES_PX[0] + 1.0) + direction * 3.0
    thumb_angle = angle + (THUMB_TILT_DEG if side == "RIGHT" else -THUMB_TILT_DEG)
    cv2.ellipse(img, _pt(*thumb), (_fx(THUMB_AXES_PX[0]), _fx(THUMB_AXES_PX[1])), thumb_angle, 0, 360,
                skin_dark, -1, cv2.LINE_AA, DRAW_SHIFT)
    cv2.ellipse(img, _pt(*centre), (_fx(HAND_AXES_PX[0]), _fx(HAND_AXES_PX[1])), angle, 0, 360,
                scene.skin_bgr, -1, cv2.LINE_AA, DRAW_SHIFT)


def render_frames(scene: VideoScene, static: np.ndarray, times):
    """Yield one uint8 [256, 456, 3] BGR frame per time in ``times`` (s)."""
    times = np.asarray(times, dtype=np.float64)
    hands = scene.hand_positions(times)
    for i in range(len(times)):
        img = static.copy()
        for side in ("LEFT", "RIGHT"):  # the right arm is drawn over the left one
            _draw_arm(img, scene, side, hands[side][i])
        yield img


# ----------------------------------------------------------------------------------------------
# Files (multiprocessing over videos)
# ----------------------------------------------------------------------------------------------
def init_render_worker() -> None:
    """Pool initializer: one OpenCV thread per process (parallelism comes from the processes)."""
    cv2.setNumThreads(1)


def write_video_files(scene: VideoScene, mp4_path, rgb_dir=None, jpeg_quality: int = JPEG_QUALITY) -> None:
    """Encode the MP4 (mp4v, native fps, t = i / fps) and, if ``rgb_dir`` is given, every 60-fps
    rgb frame as ``frame_%010d.jpg`` (file n shows t = (n - 1) / 60), like ``ffmpeg -r 60``."""
    static = render_static_layer(scene)
    mp4_path = Path(mp4_path)
    mp4_path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(mp4_path), cv2.VideoWriter_fourcc(*"mp4v"), scene.fps,
                             (EPIC_FRAME_WIDTH, EPIC_FRAME_HEIGHT))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot open an mp4v writer for {mp4_path}")
    try:
        for img in render_frames(scene, static, np.arange(scene.num_frames) / scene.fps):
            writer.write(img)
    finally:
        writer.release()
    if rgb_dir is None:
        return
    rgb_dir = Path(rgb_dir)
    rgb_dir.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)]
    times = np.arange(scene.num_rgb_frames) / REFERENCE_FPS
    for number, img in enumerate(render_frames(scene, static, times), start=1):
        ok, buf = cv2.imencode(".jpg", img, params)
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for frame {number} of {scene.video_id}")
        (rgb_dir / f"frame_{number:010d}.jpg").write_bytes(buf.tobytes())


def _render_task(task: tuple) -> str:
    """Render one ``(scene, mp4_path, rgb_dir or None)`` task (picklable for the pool)."""
    scene, mp4_path, rgb_dir = task
    write_video_files(scene, Path(mp4_path), Path(rgb_dir) if rgb_dir else None)
    return scene.video_id


def render_videos(tasks: list[tuple], workers: int) -> None:
    """Render and encode every ``(scene, mp4_path, rgb_dir or None)`` task in ``workers`` processes;
    a tqdm bar counts finished videos."""
    bar = tqdm(total=len(tasks), desc="SynthKitchens videos", unit="video")
    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                _render_task(task)
                bar.update()
        else:
            # spawn: no fork of a process that may hold OpenCV / tqdm threads.
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(min(workers, len(tasks)), initializer=init_render_worker) as pool:
                for _ in pool.imap_unordered(_render_task, tasks):
                    bar.update()
    finally:
        bar.close()
