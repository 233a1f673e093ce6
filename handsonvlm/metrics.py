"""Trajectory metrics for future-hand prediction: corrected ADE/FDE/WDE and the release's numbers.

Coordinates are hoi-forecast's normalised image coordinates (x/456, y/256 of the last observed
frame), so errors are fractions of the frame size, not pixels and not isotropic.
A ground-truth point is scored only where it lies in frame (0 <= x < 1 and 0 <= y < 1).

Shapes: pred [N, K, 2, T, 2] (K samples per clip; [N, 2, T, 2] means K = 1), gt [N, 2, T, 2],
valid [N, 2]; hands are rows RIGHT, LEFT; T = 4 future points (+0.25 ... +1.0 s), i.e.
``gt = future_hands[:, :, 1:, :]``. See docs/METRICS.md for the definitions and the naming swap
of the released evaluator (hoi-forecast ``evaluation/traj_eval.py``).
"""

from __future__ import annotations

import numpy as np


def _as_numpy(x, dtype=np.float64) -> np.ndarray:
    """numpy or torch (any device, any float dtype) -> numpy array of ``dtype``."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu()
        x = x.float() if x.dtype.is_floating_point and x.dtype.itemsize < 4 else x  # bf16/fp16 -> fp32
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def in_frame(points: np.ndarray) -> np.ndarray:
    """[..., 2] -> [...] bool: 0 <= x < 1 and 0 <= y < 1 (the evaluation mask)."""
    return np.all((points >= 0) & (points < 1), axis=-1)


def _prepare(pred, gt, valid):
    pred, gt = _as_numpy(pred), _as_numpy(gt)
    valid = _as_numpy(valid) > 0
    if pred.ndim == 4:
        pred = pred[:, None]  # K = 1
    if (pred.ndim != 5 or gt.ndim != 4 or pred.shape[2:] != gt.shape[1:] or pred.shape[0] != gt.shape[0]
            or pred.shape[1] == 0):
        raise ValueError(f"expected pred [N,K,2,T,2] and gt [N,2,T,2], got {pred.shape} and {gt.shape}")
    if valid.shape != gt.shape[:2]:
        raise ValueError(f"expected valid {gt.shape[:2]}, got {valid.shape}")
    return pred, gt, valid


def _masked_mean(x: np.ndarray, ok: np.ndarray) -> float:
    """Mean of x [N, 2] over the entries where ok [N, 2]; NaN when there are none."""
    n = ok.sum()
    return float(np.where(ok, x, 0.0).sum() / n) if n > 0 else float("nan")


def trajectory_metrics(pred, gt, valid, weights=None) -> dict[str, float]:
    """Corrected and release-compatible trajectory errors (all values are Python floats).

    pred [N, K, 2, T, 2] or [N, 2, T, 2], gt [N, 2, T, 2], valid [N, 2]; numpy or torch.
    weights [T] for WDE (default w_t = t / T, t = 1..T).

    Corrected, per (n, h) with valid and >= 1 in-frame GT point, m_t = in-frame mask, d_t = error:
        ade = mean_{m_t} d_t          fde = d_T (only where m_T)
        wde = sum_t w_t m_t d_t / sum_t w_t m_t
    each averaged over K, then over the (n, h) where it is defined; min_ade / min_fde take the
    min over K instead. n_traj / n_fde / n_wde count those (n, h); n_valid counts valid hands.
    Release (``*_paper``), bug for bug: ade_paper = final-step error m_T d_T, fde_paper =
    (1/T) sum_t m_t d_t, both averaged over K and valid (n, h); wde_paper = sum_t (t/T) m_t d_t /
    max(1, sum_t m_t) averaged over all N*K*2 slots, invalid hands counting as 0.
    Metrics with nothing to average over are NaN.
    """
    pred, gt, valid = _prepare(pred, gt, valid)
    N, K, _, T, _ = pred.shape
    w = np.arange(1, T + 1) / T if weights is None else _as_numpy(weights).reshape(T)

    m = in_frame(gt)                                            # [N, 2, T]
    d = np.linalg.norm(pred - gt[:, None], axis=-1)             # [N, K, 2, T]
    dm = np.where(m[:, None], d, 0.0)                           # out-of-frame points -> 0
    n_in = m.sum(-1)                                            # [N, 2]

    # corrected: average only over the points that exist
    ade_k = dm.sum(-1) / np.maximum(n_in, 1)[:, None]           # [N, K, 2]
    fde_k = dm[..., -1]                                         # [N, K, 2]
    wm = w * m                                                  # [N, 2, T]
    wsum = wm.sum(-1)                                           # [N, 2]
    wde_k = (wm[:, None] * dm).sum(-1) / np.where(wsum > 0, wsum, 1.0)[:, None]
    ade_ok = valid & (n_in > 0)
    fde_ok = valid & m[..., -1]
    wde_ok = valid & (wsum > 0)

    # release: the same per-point errors, zeros kept, names swapped
    final_step = dm[..., -1]                                    # printed as "ADE"
    step_mean = dm.mean(-1)                                     # printed as "FDE"
    w_rel = np.arange(1, T + 1) / T
    wde_rel = np.where(valid[:, None], (w_rel * dm).sum(-1) / np.maximum(n_in, 1)[:, None], 0.0)  # [N, K, 2]
    n_valid = int(valid.sum())

    def paper_mean(x):  # mean over K and valid (n, h)
        return float(np.where(valid[:, None], x, 0.0).sum() / (K * n_valid)) if n_valid else float("nan")

    return {
        "ade": _masked_mean(ade_k.mean(1), ade_ok),
        "fde": _masked_mean(fde_k.mean(1), fde_ok),
        "wde": _masked_mean(wde_k.mean(1), wde_ok),
        "min_ade": _masked_mean(ade_k.min(1), ade_ok),
        "min_fde": _masked_mean(fde_k.min(1), fde_ok),
        "ade_paper": paper_mean(final_step),
        "fde_paper": paper_mean(step_mean),
        "wde_paper": float(wde_rel.mean()) if n_valid else float("nan"),
        "n_traj": float(ade_ok.sum()),
        "n_fde": float(fde_ok.sum()),
        "n_wde": float(wde_ok.sum()),
        "n_valid": float(n_valid),
    }


def metrics_by_group(pred, gt, valid, groups, weights=None) -> dict[str, dict[str, float]]:
    """:func:`trajectory_metrics` on all clips ("all") and on each subset of ``groups`` [N]
    (e.g. "vhp"/"rbhp", or participant ids). Keys of the result are ``str(group)``."""
    pred, gt, valid = _prepare(pred, gt, valid)
    groups = np.asarray(groups)
    out = {"all": trajectory_metrics(pred, gt, valid, weights)}
    for g in np.unique(groups):
        sel = groups == g
        out[str(g)] = trajectory_metrics(pred[sel], gt[sel], valid[sel], weights)
    return out
