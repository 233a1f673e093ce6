"""handsonvlm.metrics on hand-computed cases (T = 4, weights 0.25/0.5/0.75/1.0)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from handsonvlm.metrics import metrics_by_group, trajectory_metrics

# 3-4-5 triangles: an offset (0.6 d, 0.8 d) has Euclidean length d exactly (up to rounding).
DIR = np.array([0.6, 0.8])


def offset(gt_hand, dists):
    """A predicted hand [T, 2] whose errors to gt_hand [T, 2] are ``dists`` [T]."""
    return np.asarray(gt_hand, float) + np.asarray(dists, float)[:, None] * DIR


GT_R = np.array([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3], [0.4, 0.4]])   # all in frame
GT_L = np.array([[0.5, 0.5], [0.6, 0.6], [0.7, 0.9], [0.8, 1.2]])   # last point below the frame
D_R = [0.05, 0.10, 0.0, 0.15]
D_L = [0.05, 0.05, 0.10, 0.50]


def clip0():
    gt = np.stack([GT_R, GT_L])[None]                                   # [1, 2, 4, 2]
    pred = np.stack([offset(GT_R, D_R), offset(GT_L, D_L)])[None]       # [1, 2, 4, 2]
    return pred, gt, np.array([[True, True]])


def test_one_clip_by_hand():
    pred, gt, valid = clip0()
    r = trajectory_metrics(pred, gt, valid)
    # RIGHT: ADE = (0.05+0.10+0+0.15)/4 = 0.075, FDE = 0.15,
    #        WDE = (0.25*0.05 + 0.5*0.10 + 0.75*0 + 1*0.15) / 2.5 = 0.2125/2.5 = 0.085
    # LEFT (point 4 out of frame): ADE = (0.05+0.05+0.10)/3 = 0.0667, FDE undefined,
    #        WDE = (0.25*0.05 + 0.5*0.05 + 0.75*0.10) / (0.25+0.5+0.75) = 0.1125/1.5 = 0.075
    assert r["ade"] == pytest.approx((0.075 + 0.2 / 3) / 2)
    assert r["fde"] == pytest.approx(0.15)
    assert r["wde"] == pytest.approx((0.085 + 0.075) / 2)
    assert r["min_ade"] == pytest.approx(r["ade"]) and r["min_fde"] == pytest.approx(r["fde"])
    assert (r["n_traj"], r["n_fde"], r["n_wde"], r["n_valid"]) == (2, 1, 2, 2)
    # release: "ADE" = m_4 d_4 = (0.15 + 0) / 2 ; "FDE" = (1/4) sum m d = (0.30/4 + 0.20/4) / 2
    # WDE = sum w m d / max(1, sum m): R 0.2125/4 = 0.053125, L 0.1125/3 = 0.0375, mean of 2 slots
    assert r["ade_paper"] == pytest.approx(0.075)
    assert r["fde_paper"] == pytest.approx(0.0625)
    assert r["wde_paper"] == pytest.approx((0.053125 + 0.0375) / 2)


def test_invalid_hands_are_ignored_except_in_release_wde():
    pred0, gt0, valid0 = clip0()
    # clip 1: RIGHT valid with error 0.1 everywhere; LEFT invalid, in frame, huge error (ignored)
    gt1 = np.stack([GT_R, GT_R])[None]
    pred1 = np.stack([offset(GT_R, [0.1] * 4), offset(GT_R, [1.0] * 4)])[None]
    pred, gt = np.concatenate([pred0, pred1]), np.concatenate([gt0, gt1])
    valid = np.array([[True, True], [True, False]])
    r = trajectory_metrics(pred, gt, valid)
    assert r["ade"] == pytest.approx((0.075 + 0.2 / 3 + 0.1) / 3)
    assert r["fde"] == pytest.approx((0.15 + 0.1) / 2)
    assert r["wde"] == pytest.approx((0.085 + 0.075 + 0.1) / 3)
    assert (r["n_traj"], r["n_fde"], r["n_valid"]) == (3, 2, 3)
    assert r["ade_paper"] == pytest.approx((0.15 + 0.0 + 0.1) / 3)
    assert r["fde_paper"] == pytest.approx((0.075 + 0.05 + 0.1) / 3)
    # release WDE averages over all 4 slots; clip 1 RIGHT: 0.1 * 2.5 / 4 = 0.0625, invalid LEFT: 0
    assert r["wde_paper"] == pytest.approx((0.053125 + 0.0375 + 0.0625 + 0.0) / 4)


def test_hand_entirely_out_of_frame():
    gt = np.full((1, 2, 4, 2), 0.5)
    gt[0, 1] = [0.25, 1.5]                       # LEFT placeholder below the frame, but "valid"
    pred = gt + 0.3
    r = trajectory_metrics(pred, gt, np.ones((1, 2), bool))
    d = 0.3 * math.sqrt(2)
    assert r["n_traj"] == 1 and r["ade"] == pytest.approx(d) and r["fde"] == pytest.approx(d)
    # the release counts the LEFT hand with error 0
    assert r["ade_paper"] == pytest.approx(d / 2) and r["fde_paper"] == pytest.approx(d / 2)


def test_min_over_k():
    gt = np.stack([GT_R, GT_R])[None]
    k0 = np.stack([offset(GT_R, [0.1] * 4), GT_R])
    k1 = np.stack([offset(GT_R, [0.05, 0.05, 0.05, 0.2]), GT_R])
    pred = np.stack([k0, k1])[None]                      # [1, K=2, 2, 4, 2]
    r = trajectory_metrics(pred, gt, np.array([[True, False]]))
    # ADE_k = [0.1, 0.0875], FDE_k = [0.1, 0.2]
    assert r["ade"] == pytest.approx(0.09375) and r["min_ade"] == pytest.approx(0.0875)
    assert r["fde"] == pytest.approx(0.15) and r["min_fde"] == pytest.approx(0.1)
    assert r["ade_paper"] == pytest.approx(0.15)           # mean over K of final-step errors
    assert r["fde_paper"] == pytest.approx(0.09375)
    # K = 1 given as [N, 2, T, 2] is the same as [N, 1, 2, T, 2]
    np.testing.assert_equal(trajectory_metrics(k0[None], gt, [[1, 0]]),
                            trajectory_metrics(k0[None, None], gt, [[1, 0]]))


def _random_case(seed, N=7, K=3):
    rng = np.random.default_rng(seed)
    gt = rng.uniform(-0.2, 1.2, (N, 2, 4, 2)).astype(np.float32)
    pred = rng.uniform(0, 1, (N, K, 2, 4, 2)).astype(np.float32)
    valid = rng.uniform(size=(N, 2)) < 0.7
    return pred, gt, valid


def test_numpy_and_torch_agree():
    pred, gt, valid = _random_case(0)
    a = trajectory_metrics(pred, gt, valid)
    b = trajectory_metrics(torch.from_numpy(pred), torch.from_numpy(gt), torch.from_numpy(valid))
    c = trajectory_metrics(torch.from_numpy(pred).double(), torch.from_numpy(gt), torch.from_numpy(valid).float())
    assert a == b == c
    assert all(isinstance(v, float) for v in a.values())


def _loop_reference(pred, gt, valid):
    """Straightforward per-(n, k, h) loops, written independently of the vectorised code."""
    N, K, _, T, _ = pred.shape
    w = np.arange(1, T + 1) / T
    ade, fde, wde, min_ade, rel_final, rel_mean, rel_w = [], [], [], [], [], [], []
    for n in range(N):
        for h in range(2):
            m = [(0 <= gt[n, h, t, 0] < 1) and (0 <= gt[n, h, t, 1] < 1) for t in range(T)]
            per_k = []
            for k in range(K):
                d = [float(np.hypot(*(pred[n, k, h, t] - gt[n, h, t]))) for t in range(T)]
                md = [d[t] if m[t] else 0.0 for t in range(T)]
                per_k.append((sum(md) / max(sum(m), 1), md[-1],
                              sum(w[t] * md[t] for t in range(T)) / max(sum(w[t] * m[t] for t in range(T)), 1e-300)))
                rel_w.append(sum(w[t] * md[t] for t in range(T)) / max(1, sum(m)) * valid[n, h])
                if valid[n, h]:
                    rel_final.append(md[-1])
                    rel_mean.append(sum(md) / T)
            if valid[n, h] and any(m):
                ade.append(np.mean([p[0] for p in per_k]))
                min_ade.append(min(p[0] for p in per_k))
                wde.append(np.mean([p[2] for p in per_k]))
            if valid[n, h] and m[-1]:
                fde.append(np.mean([p[1] for p in per_k]))
    return dict(ade=np.mean(ade), fde=np.mean(fde), wde=np.mean(wde), min_ade=np.mean(min_ade),
                ade_paper=np.mean(rel_final), fde_paper=np.mean(rel_mean), wde_paper=np.mean(rel_w))


@pytest.mark.parametrize("seed", [1, 2])
def test_vectorised_matches_loops(seed):
    pred, gt, valid = _random_case(seed)
    r = trajectory_metrics(pred, gt, valid)
    ref = _loop_reference(pred.astype(float), gt.astype(float), valid)
    for key, value in ref.items():
        assert r[key] == pytest.approx(value, rel=1e-9), key


def test_paper_names_are_swapped():
    # all GT in frame and all hands valid: the release's "ADE" is the corrected FDE and its "FDE" is
    # the corrected ADE; its WDE divides by 4 steps instead of sum(w) = 2.5
    pred, gt, _ = _random_case(3)
    gt = np.clip(gt, 0.0, 0.99)
    r = trajectory_metrics(pred, gt, np.ones((len(gt), 2), bool))
    assert r["ade_paper"] == pytest.approx(r["fde"]) and r["fde_paper"] == pytest.approx(r["ade"])
    assert r["wde_paper"] == pytest.approx(r["wde"] * 2.5 / 4)


def test_growing_errors_give_paper_ade_above_fde():
    # errors that grow with the horizon (the usual case) print as "ADE > FDE", as in published tables
    gt = np.stack([GT_R, GT_R])[None]
    pred = np.stack([offset(GT_R, [0.02, 0.04, 0.06, 0.08])] * 2)[None]
    r = trajectory_metrics(pred, gt, np.ones((1, 2), bool))
    assert r["ade_paper"] == pytest.approx(0.08) and r["fde_paper"] == pytest.approx(0.05)
    assert r["ade"] == pytest.approx(0.05) and r["fde"] == pytest.approx(0.08)


def test_custom_weights():
    pred, gt, valid = _random_case(4)
    r = trajectory_metrics(pred, gt, valid, weights=np.ones(4))
    assert r["wde"] == pytest.approx(r["ade"])


def test_nan_when_nothing_valid():
    pred, gt, _ = _random_case(5)
    r = trajectory_metrics(pred, gt, np.zeros((len(gt), 2), bool))
    assert r["n_traj"] == 0 and r["n_valid"] == 0
    assert all(math.isnan(r[k]) for k in ("ade", "fde", "wde", "min_ade", "min_fde",
                                          "ade_paper", "fde_paper", "wde_paper"))
    empty = trajectory_metrics(np.zeros((0, 1, 2, 4, 2)), np.zeros((0, 2, 4, 2)), np.zeros((0, 2)))
    assert math.isnan(empty["ade"]) and empty["n_traj"] == 0


def test_fde_nan_when_every_last_point_out_of_frame():
    pred, gt, valid = clip0()
    r = trajectory_metrics(pred[:, 1:], gt[:, 1:], valid[:, 1:])   # LEFT only: NaN fde, finite ade
    assert math.isnan(r["fde"]) and math.isnan(r["min_fde"]) and r["ade"] == pytest.approx(0.2 / 3)


def test_shape_errors():
    with pytest.raises(ValueError):
        trajectory_metrics(np.zeros((2, 2, 4, 2)), np.zeros((2, 2, 3, 2)), np.ones((2, 2)))
    with pytest.raises(ValueError):
        trajectory_metrics(np.zeros((2, 2, 4, 2)), np.zeros((2, 2, 4, 2)), np.ones((2,)))


def test_metrics_by_group():
    pred, gt, valid = _random_case(6, N=6)
    groups = np.array(["vhp", "rbhp"] * 3)
    out = metrics_by_group(pred, gt, valid, groups)
    assert set(out) == {"all", "vhp", "rbhp"}
    assert out["vhp"] == trajectory_metrics(pred[0::2], gt[0::2], valid[0::2])
    assert out["all"]["n_traj"] == out["vhp"]["n_traj"] + out["rbhp"]["n_traj"]
