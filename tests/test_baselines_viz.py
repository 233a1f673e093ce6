"""handsonvlm.baselines (exact answers on lines, gaps, fallbacks) and handsonvlm.viz (PNG, MP4)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from handsonvlm.baselines import BASELINES, constant_velocity, kalman_filter, last_position, run_baselines
from handsonvlm.viz import HAND_COLORS, draw_trajectories, overlay_image, overlay_video, save_png

P, T = 10, 4


def line_case(n=3, seed=0):
    """Hands moving on straight lines at constant velocity: past at steps -9..0, future at 1..4."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.3, 0.7, (n, 2, 2))        # position at the last observed frame
    b = rng.uniform(-0.03, 0.03, (n, 2, 2))     # velocity per 0.25 s step
    steps = np.arange(-(P - 1), 1)[:, None]
    past = a[:, :, None] + steps * b[:, :, None]                      # [n, 2, P, 2]
    future = a[:, :, None] + np.arange(1, T + 1)[:, None] * b[:, :, None]
    return a, b, past, np.ones((n, 2, P), bool), future


def test_last_position():
    a, *_ = line_case()
    out = last_position(a)
    assert out.shape == (3, 2, T, 2)
    np.testing.assert_array_equal(out, np.repeat(a[:, :, None], T, axis=2))


def test_cv_and_kf_recover_a_line():
    a, _, past, valid, future = line_case()
    np.testing.assert_allclose(constant_velocity(a, past, valid), future, atol=1e-12)
    np.testing.assert_allclose(kalman_filter(a, past, valid), future, atol=1e-6)
    cv = constant_velocity(a, past, valid, horizon=6)
    assert cv.shape == (3, 2, 6, 2)


def test_kf_close_to_cv_with_low_measurement_noise():
    a, _, past, valid, future = line_case(seed=1)
    kf = kalman_filter(a, past, valid, measurement_noise=1e-8)
    np.testing.assert_allclose(kf, constant_velocity(a, past, valid), atol=1e-6)


def test_kf_smooths_noisy_tracks():
    a, _, past, valid, future = line_case(n=64, seed=3)
    noisy = past + np.random.default_rng(0).normal(0, 0.01, past.shape)
    last = noisy[:, :, -1]
    err_cv = np.abs(constant_velocity(last, noisy, valid) - future).mean()
    err_kf = np.abs(kalman_filter(last, noisy, valid) - future).mean()
    assert err_kf < 0.7 * err_cv


def test_gaps_in_the_past_track():
    a, _, past, valid, future = line_case()
    valid[:, :, [1, 2, 7, 9]] = False            # last valid = 8, previous valid = 6
    np.testing.assert_allclose(constant_velocity(a, past, valid), future, atol=1e-12)
    np.testing.assert_allclose(kalman_filter(a, past, valid), future, atol=1e-6)
    # off a line: velocity = (p8 - p6) / 2, extrapolated from last_pos
    bent = np.random.default_rng(2).uniform(0, 1, past.shape)
    v = (bent[:, :, 8] - bent[:, :, 6]) / 2
    expected = a[:, :, None] + np.arange(1, T + 1)[:, None] * v[:, :, None]
    np.testing.assert_allclose(constant_velocity(a, bent, valid), expected, atol=1e-12)


def test_fallbacks_without_a_track():
    a, _, past, valid, _ = line_case()
    valid[0] = False                                  # clip 0: no track for either hand
    valid[1, 0] = False
    valid[1, 0, 9] = True                             # clip 1 RIGHT: a single point (= last_pos)
    stay = last_position(a)
    for fn in (constant_velocity, kalman_filter):
        out = fn(a, past, valid)
        np.testing.assert_allclose(out[0], stay[0], atol=1e-12)
        np.testing.assert_allclose(out[1, 0], stay[1, 0], atol=1e-12)
        assert np.abs(out[2] - stay[2]).max() > 1e-3  # clip 2 still moves
        np.testing.assert_array_equal(fn(a, None, None), stay)


def test_run_baselines_shapes_dtypes_and_torch():
    a, _, past, valid, future = line_case(n=5)
    future_hands = np.concatenate([a[:, :, None], future], axis=2).astype(np.float32)  # [5, 2, 5, 2]
    out = run_baselines(future_hands, past.astype(np.float32), valid)
    assert set(out) == set(BASELINES) == {"last_position", "constant_velocity", "kalman"}
    for name, traj in out.items():
        assert traj.shape == (5, 2, T, 2) and traj.dtype == np.float32, name
    np.testing.assert_allclose(out["constant_velocity"], future, atol=1e-6)
    np.testing.assert_array_equal(out["last_position"], np.repeat(future_hands[:, :, :1], T, axis=2))
    # torch inputs, float64 in -> float64 out; no past -> every baseline is last_position
    out_t = run_baselines(torch.from_numpy(future_hands).double(), torch.from_numpy(past), torch.from_numpy(valid))
    assert all(v.dtype == np.float64 for v in out_t.values())
    np.testing.assert_allclose(out_t["kalman"], out["kalman"], atol=1e-6)
    for traj in run_baselines(future_hands).values():
        np.testing.assert_array_equal(traj, out["last_position"])


# --------------------------------------------------------------------------------------------- viz
GREY = 100
PRED = np.array([[[0.55, 0.5], [0.6, 0.45], [0.65, 0.4], [0.7, 0.35]],       # RIGHT, up-right
                 [[0.35, 0.5], [0.3, 0.45], [0.25, 0.4], [0.2, 1.5]]])        # LEFT, last point off-frame
GT = PRED + np.array([0.0, 0.1])
START = np.array([[0.5, 0.55], [0.4, 0.55]])


def frames(n=10, h=256, w=456):
    return np.full((n, h, w, 3), GREY, np.uint8)


def has_color(img, rgb, region=None):
    img = img if region is None else img[region]
    return np.all(img == np.array(rgb, np.uint8), axis=-1)


def test_png_written_with_hand_colours(tmp_path):
    img = overlay_image(frames(), PRED, GT, [True, True], START)
    path = save_png(img, tmp_path / "sub" / "overlay.png")
    back = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)
    assert back.shape == (540, 960, 3)
    np.testing.assert_array_equal(back, img)
    for h, rgb in enumerate(HAND_COLORS):
        # the midpoint of the predicted segment p1 -> p2 lies on a 10 px line of the hand's colour
        x, y = ((PRED[h, 0] + PRED[h, 1]) / 2 * [960, 540]).round().astype(int)
        assert has_color(back, rgb, (slice(y - 2, y + 3), slice(x - 2, x + 3))).any()
        assert has_color(back, rgb).sum() > 500
    # the background is the grey frame blended 50 % with white
    assert tuple(back[530, 950]) == (178, 178, 178)


def test_native_size_invalid_and_off_frame_hands():
    img = overlay_image(frames(), None, GT, [True, False], None, size=None)
    assert img.shape == (256, 456, 3)
    scene = (slice(None), slice(100, None))  # right of the legend (which shows both colours)
    assert has_color(img, HAND_COLORS[0], scene).any() and not has_color(img, HAND_COLORS[1], scene).any()
    wild = PRED.copy()
    wild[0, 3] = [1.5, 1.5]
    wild[1, 2] = [np.nan, 0.2]
    img = draw_trajectories(frames(1)[0], wild, np.full((2, 4, 2), 1.4), None, START, legend=False)
    assert img.shape == (256, 456, 3) and has_color(img, HAND_COLORS[1]).any()


def test_mp4_readable_with_decord(tmp_path):
    decord = pytest.importorskip("decord")
    path = overlay_video(frames(), PRED, GT, [True, True], START, tmp_path / "traj.mp4")
    vr = decord.VideoReader(str(path))
    assert len(vr) == 10 + T
    last = vr[len(vr) - 1].asnumpy()
    assert last.shape == (540, 960, 3)
    x, y = ((PRED[0, 2] + PRED[0, 3]) / 2 * [960, 540]).round().astype(int)
    r, g, b = last[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(0)
    assert r > 150 and g < 110 and b < 110                      # reddish where the RIGHT arrow runs
    assert abs(int(vr[0].asnumpy()[300, 480, 0]) - GREY) < 10   # observed frames come first, unblended
    held = overlay_video(frames(3), PRED, None, None, None, tmp_path / "held.mp4", fps=10, hold=2)
    assert len(decord.VideoReader(str(held))) == 3 + 2 * T
