"""Drawing predicted and ground-truth hand trajectories on frames (PNG and MP4).

Follows the release's ``create_trajectory_video``: frames resized to 960x540, the last
observed frame blended 50 % with white, RIGHT hand RGB (220, 50, 32), LEFT (0, 90, 181), 10 px
lines, a start circle of radius 16 and a 15 px arrow head at 30 degrees on the last segment, mp4v.
Additions: the ground truth (thin dashed lines, hollow markers), the current hand position as the
start of the predicted path, and a legend. Sizes scale with the canvas width (given for 960 px).

Images are RGB uint8 [H, W, 3]; trajectories are normalised to the full frame (x * W, y * H);
hands are rows RIGHT, LEFT; values outside [0, 1) (up to 1.5 for missing hands) are legal.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

HAND_COLORS = ((220, 50, 32), (0, 90, 181))  # RGB of RIGHT, LEFT (the release's)
HAND_LABELS = ("R", "L")
RELEASE_SIZE = (960, 540)  # (width, height) the release draws at
REFERENCE_WIDTH = 960  # the sizes below are in pixels of a 960-wide canvas
LINE_PX, START_RADIUS_PX, ARROW_PX, ARROW_DEG = 10, 16, 15, 30
GT_LINE_PX, GT_MARKER_PX, DASH_PX = 3, 9, 14
WHITE_BLEND = 0.5  # the last frame is 50 % frame + 50 % white
COORD_LIMIT = 4.0  # pixel coordinates are clamped to [-4, 5] x canvas, so cv2 never overflows


def _to_px(points, size) -> np.ndarray:
    """Normalised [..., 2] -> float pixel coordinates [..., 2] on a canvas of size (W, H)."""
    pts = np.asarray(points, np.float64) * np.asarray(size, np.float64)
    lim = COORD_LIMIT * np.asarray(size, np.float64)
    return np.clip(pts, -lim, np.asarray(size) + lim)


def _pt(p) -> tuple[int, int]:
    return int(round(p[0])), int(round(p[1]))


def _dashed_line(img, p0, p1, color, thickness, dash) -> None:
    """Dashes of length ``dash`` separated by gaps of the same length, from p0 to p1."""
    p0, p1 = np.asarray(p0, np.float64), np.asarray(p1, np.float64)
    length = float(np.linalg.norm(p1 - p0))
    for a in np.arange(0.0, length, 2 * dash):
        b = min(a + dash, length)
        cv2.line(img, _pt(p0 + (p1 - p0) * a / length), _pt(p0 + (p1 - p0) * b / length), color, thickness)


def _arrow_head(img, p0, p1, color, thickness, length, angle_deg) -> None:
    """Two strokes at +-angle_deg back from p1, pointing along p0 -> p1."""
    angle = np.arctan2(p1[1] - p0[1], p1[0] - p0[0])
    for side in (+1, -1):
        a = angle + side * np.deg2rad(angle_deg)
        tip = (p1[0] - length * np.cos(a), p1[1] - length * np.sin(a))
        cv2.line(img, _pt(p1), _pt(tip), color, thickness)


def _legend(img, scale: float) -> None:
    """Box in the top-left corner: solid = pred, dashed = gt; red = R, blue = L."""
    font, fs, th = cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, max(1, round(2 * scale))
    row, pad, swatch = max(8, round(26 * scale)), max(3, round(8 * scale)), max(8, round(34 * scale))
    x0, y0 = pad, pad
    w, h = swatch + round(95 * scale), 4 * row + pad
    box = img[y0:y0 + h, x0:x0 + w]
    box[:] = (0.3 * box + 0.7 * 255).astype(np.uint8)  # translucent white
    cv2.rectangle(img, (x0, y0), (x0 + w, y0 + h), (60, 60, 60), 1)
    entries = [("pred", (40, 40, 40), "solid"), ("gt", (40, 40, 40), "dashed"),
               (HAND_LABELS[0], HAND_COLORS[0], "solid"), (HAND_LABELS[1], HAND_COLORS[1], "solid")]
    for i, (text, color, style) in enumerate(entries):
        y = y0 + pad // 2 + row * i + row // 2
        a, b = (x0 + pad, y), (x0 + pad + swatch, y)
        if style == "solid":
            cv2.line(img, a, b, color, max(1, round(LINE_PX * scale / 2)))
        else:
            _dashed_line(img, a, b, color, max(1, round(GT_LINE_PX * scale)), max(2, round(DASH_PX * scale / 2)))
        cv2.putText(img, text, (b[0] + pad, y + round(7 * scale)), font, fs, (20, 20, 20), th, cv2.LINE_AA)


def draw_trajectories(frame_rgb, pred=None, gt=None, valid=None, start=None,
                      legend: bool = True) -> np.ndarray:
    """Draw both hands on a copy of ``frame_rgb`` [H, W, 3] uint8.

    pred [2, T, 2]: solid lines start -> p_1 -> ... -> p_T, an arrow head on the last segment and a
    filled circle at the start (``start[h]`` when given, else p_1 as in the release).
    gt [2, T, 2]: thin dashed lines from the start through the GT points, hollow circles at the
    in-frame GT points. valid [2]: hands whose GT (and start) is skipped when False.
    start [2, 2]: the last observed positions (future_hands[:, :, 0]). Off-frame points are clipped
    by the canvas. Returns the new RGB image.
    """
    img = np.ascontiguousarray(frame_rgb, dtype=np.uint8).copy()
    H, W = img.shape[:2]
    size, scale = (W, H), W / REFERENCE_WIDTH

    def px(v: float) -> int:  # a release pixel size at this frame's width, at least 1
        return max(1, round(v * scale))

    valid = np.ones(2, bool) if valid is None else np.asarray(valid).astype(bool).reshape(2)

    def path(points, h):
        pts = _to_px(points[h], size)
        if start is not None and valid[h]:
            pts = np.concatenate([_to_px(start, size)[h][None], pts])
        return pts[np.all(np.isfinite(pts), axis=-1)]

    for h, color in enumerate(HAND_COLORS):
        if pred is not None:
            pts = path(np.asarray(pred, np.float64), h)
            for a, b in zip(pts[:-1], pts[1:]):
                cv2.line(img, _pt(a), _pt(b), color, px(LINE_PX))
            if len(pts) > 1:
                _arrow_head(img, pts[-2], pts[-1], color, px(LINE_PX), px(ARROW_PX), ARROW_DEG)
            if len(pts):
                cv2.circle(img, _pt(pts[0]), px(START_RADIUS_PX), color, -1)
        if gt is not None and valid[h]:
            gt_h = np.asarray(gt, np.float64)[h]
            pts = path(np.asarray(gt, np.float64), h)
            for a, b in zip(pts[:-1], pts[1:]):
                _dashed_line(img, a, b, color, px(GT_LINE_PX), px(DASH_PX))
            inside = np.all((gt_h >= 0) & (gt_h < 1), axis=-1)
            for p in _to_px(gt_h[inside], size):
                cv2.circle(img, _pt(p), px(GT_MARKER_PX), (255, 255, 255), px(GT_LINE_PX) + 2)
                cv2.circle(img, _pt(p), px(GT_MARKER_PX), color, px(GT_LINE_PX))
    if legend:
        _legend(img, scale)
    return img


def _frames(frames) -> np.ndarray:
    frames = np.asarray(frames, dtype=np.uint8)
    return frames[None] if frames.ndim == 3 else frames


def _resize(frame, size):
    return frame if size is None or tuple(frame.shape[1::-1]) == tuple(size) else \
        cv2.resize(frame, tuple(size), interpolation=cv2.INTER_AREA)


def _whiten(frame) -> np.ndarray:
    """The release's last-frame look: 50 % frame + 50 % white."""
    return cv2.addWeighted(frame, WHITE_BLEND, np.full_like(frame, 255), 1 - WHITE_BLEND, 0)


def overlay_image(frames, pred=None, gt=None, valid=None, start=None,
                  size: tuple[int, int] | None = RELEASE_SIZE) -> np.ndarray:
    """The last of ``frames`` [F, H, W, 3] (or one frame [H, W, 3]) resized to ``size`` = (W, H)
    (None keeps it), blended with white, with the trajectories drawn: RGB uint8 image."""
    last = _whiten(_resize(_frames(frames)[-1], size))
    return draw_trajectories(last, pred, gt, valid, start)


def save_png(image, path) -> str:
    """Write an RGB uint8 image as PNG (parent folders created); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not cv2.imwrite(path, cv2.cvtColor(np.asarray(image, np.uint8), cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path


def overlay_video(frames, pred=None, gt=None, valid=None, start=None, path="trajectory.mp4",
                  fps: float = 4, size: tuple[int, int] | None = RELEASE_SIZE, hold: int = 1) -> str:
    """MP4 (mp4v) of the observed ``frames`` [F, H, W, 3] in order, then the whitened last frame
    with the first t points of pred/gt [2, T, 2] drawn, t = 1..T, each shown ``hold`` times
    (the release: hold 2 at 10 fps). F + T * hold frames in all; returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    frames = [_resize(f, size) for f in _frames(frames)]
    H, W = frames[-1].shape[:2]
    T = max([np.asarray(a).shape[1] for a in (pred, gt) if a is not None], default=0)
    last = _whiten(frames[-1])
    reveal = [draw_trajectories(last,
                                None if pred is None else np.asarray(pred)[:, :t],
                                None if gt is None else np.asarray(gt)[:, :t], valid, start)
              for t in range(1, T + 1)]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (W, H))
    if not writer.isOpened():
        raise OSError(f"could not open a video writer for {path}")
    try:
        for f in frames + [r for r in reveal for _ in range(hold)]:
            writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return path
