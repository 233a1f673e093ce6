"""Non-learned baselines for future-hand prediction, in the model's output shape [N, 2, T, 2].

All work in hoi-forecast normalised coordinates (x/456, y/256) with one time step = 0.25 s (the
spacing of both the 10 observed frames and the future points). ``last_pos`` [N, 2, 2] is the hand
position at the last observed frame (= ``future_hands[:, :, 0]``); ``past`` [N, 2, P, 2] and
``past_valid`` [N, 2, P] are the hand track at the P = 10 observed frames (oldest -> newest; the
newest is at the same time as ``last_pos``). Real hoi-forecast labels carry no past track
(``past_hands_valid`` all false), and then every baseline reduces to ``last_position``.

Inputs may be numpy arrays or torch tensors; outputs are numpy arrays of ``last_pos``'s float
dtype (float32 for the shards).
"""

from __future__ import annotations

import numpy as np

from handsonvlm.constants import NUM_FUTURE_POINTS

HORIZON = NUM_FUTURE_POINTS  # future points at +0.25, +0.5, +0.75, +1.0 s
# Kalman filter defaults, in normalised units and 0.25 s steps (0.01 ~ 4.6 px of a 456 px width)
PROCESS_NOISE = 1e-4      # variance of the per-step velocity change (white-noise acceleration)
MEASUREMENT_NOISE = 1e-4  # variance of a measured hand centre
INITIAL_VELOCITY_VAR = 1.0  # prior variance of the velocity at the first measurement (~uninformative)


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu()
        x = x.float() if x.dtype.is_floating_point and x.dtype.itemsize < 4 else x
        x = x.numpy()
    return np.asarray(x)


def _out_dtype(last_pos: np.ndarray):
    return last_pos.dtype if np.issubdtype(last_pos.dtype, np.floating) else np.float32


def _extrapolate(pos: np.ndarray, vel: np.ndarray, horizon: int) -> np.ndarray:
    """pos, vel [N, 2, 2] -> pos + t * vel for t = 1..horizon: [N, 2, horizon, 2]."""
    t = np.arange(1, horizon + 1, dtype=np.float64)[:, None]
    return pos[:, :, None, :] + t * vel[:, :, None, :]


def last_position(last_pos, past=None, past_valid=None, horizon: int = HORIZON) -> np.ndarray:
    """Hands stay where they are: [N, 2, 2] -> [N, 2, horizon, 2] (past is ignored)."""
    last_pos = _np(last_pos)
    return np.repeat(last_pos[:, :, None, :], horizon, axis=2).astype(_out_dtype(last_pos))


def constant_velocity(last_pos, past=None, past_valid=None, horizon: int = HORIZON) -> np.ndarray:
    """Extrapolate from ``last_pos`` with the velocity of the last two valid past points.

    v = (past[i1] - past[i0]) / (i1 - i0) per 0.25 s step, with i1 the last valid index and i0
    the valid index before it; a hand with fewer than two valid past points gets v = 0.
    last_pos [N, 2, 2], past [N, 2, P, 2], past_valid [N, 2, P] -> [N, 2, horizon, 2].
    """
    last_pos = _np(last_pos)
    pos = last_pos.astype(np.float64)
    vel = np.zeros_like(pos)
    if past is not None:
        past = _np(past).astype(np.float64)
        P = past.shape[2]
        valid = np.ones(past.shape[:3], bool) if past_valid is None else _np(past_valid).astype(bool)
        idx = np.arange(P)
        i1 = np.where(valid, idx, -1).max(-1)                                # [N, 2]
        i0 = np.where(valid & (idx < i1[..., None]), idx, -1).max(-1)        # [N, 2]
        ok = i0 >= 0
        p1 = np.take_along_axis(past, np.maximum(i1, 0)[..., None, None], axis=2)[:, :, 0]
        p0 = np.take_along_axis(past, np.maximum(i0, 0)[..., None, None], axis=2)[:, :, 0]
        vel = np.where(ok[..., None], (p1 - p0) / np.maximum(i1 - i0, 1)[..., None], 0.0)
    return _extrapolate(pos, vel, horizon).astype(_out_dtype(last_pos))


def kalman_filter(last_pos, past=None, past_valid=None, horizon: int = HORIZON,
                  process_noise: float = PROCESS_NOISE, measurement_noise: float = MEASUREMENT_NOISE,
                  initial_velocity_var: float = INITIAL_VELOCITY_VAR) -> np.ndarray:
    """Constant-velocity Kalman filter over the valid past points, then its mean forecast.

    State s = (x, y, vx, vy), one step = 0.25 s: s' = F s + noise, z = H s + noise with
        F = [[I, I], [0, I]],  Q = q [[I/4, I/2], [I/2, I]] (white-noise acceleration),  R = r I.
    Each hand's filter starts at its first valid past point (position = measurement, velocity 0
    with variance ``initial_velocity_var``), predicts at every later step and updates only at
    valid steps. The forecast is F^t s at the last past step, t = 1..horizon. Hands without any
    valid past point (or ``past=None``) fall back to ``last_pos``.
    last_pos [N, 2, 2], past [N, 2, P, 2], past_valid [N, 2, P] -> [N, 2, horizon, 2].
    """
    last_pos = _np(last_pos)
    if past is None:
        return last_position(last_pos, horizon=horizon)
    N = last_pos.shape[0]
    past = _np(past).astype(np.float64).reshape(N * 2, -1, 2)           # batch B = N * 2 hands
    valid = (np.ones(past.shape[:2], bool) if past_valid is None
             else _np(past_valid).astype(bool).reshape(N * 2, -1))
    B, P, _ = past.shape

    I2, Z2 = np.eye(2), np.zeros((2, 2))
    F = np.block([[I2, I2], [Z2, I2]])
    H = np.block([I2, Z2])
    Q = process_noise * np.block([[I2 / 4, I2 / 2], [I2 / 2, I2]])
    R = measurement_noise * I2
    P0 = np.diag([measurement_noise, measurement_noise, initial_velocity_var, initial_velocity_var])

    s = np.zeros((B, 4))
    cov = np.tile(P0, (B, 1, 1))
    started = np.zeros(B, bool)
    for p in range(P):
        z, obs = past[:, p], valid[:, p]
        # predict (filters already running)
        s = np.where(started[:, None], s @ F.T, s)
        cov = np.where(started[:, None, None], F @ cov @ F.T + Q, cov)
        # update (running filters with a measurement at this step)
        upd = started & obs
        S = H @ cov @ H.T + R                                              # [B, 2, 2]
        gain = cov @ H.T @ np.linalg.inv(S)                                # [B, 4, 2]
        innov = z - s @ H.T                                                # [B, 2]
        s = np.where(upd[:, None], s + (gain @ innov[..., None])[..., 0], s)
        A, gain_t = np.eye(4) - gain @ H, gain.transpose(0, 2, 1)
        joseph = A @ cov @ A.transpose(0, 2, 1) + gain @ R @ gain_t        # = (I - KH) P, kept symmetric PSD
        cov = np.where(upd[:, None, None], joseph, cov)
        # start filters at their first valid point
        new = ~started & obs
        s = np.where(new[:, None], np.concatenate([z, np.zeros_like(z)], -1), s)
        cov = np.where(new[:, None, None], P0, cov)
        started |= new

    pos, vel = s[:, :2].reshape(N, 2, 2), s[:, 2:].reshape(N, 2, 2)
    forecast = _extrapolate(pos, vel, horizon)
    fallback = np.repeat(last_pos.astype(np.float64)[:, :, None, :], horizon, axis=2)
    out = np.where(started.reshape(N, 2)[:, :, None, None], forecast, fallback)
    return out.astype(_out_dtype(last_pos))


BASELINES = {
    "last_position": last_position,
    "constant_velocity": constant_velocity,
    "kalman": kalman_filter,
}


def run_baselines(future_hands, past_hands=None, past_hands_valid=None) -> dict[str, np.ndarray]:
    """Every baseline on shard arrays: future_hands [N, 2, 5, 2] (point 0 = last observed
    position), past_hands [N, 2, 10, 2], past_hands_valid [N, 2, 10] -> {name: [N, 2, 4, 2]}."""
    future_hands = _np(future_hands)
    last_pos, horizon = future_hands[:, :, 0], future_hands.shape[2] - 1
    return {name: fn(last_pos, past_hands, past_hands_valid, horizon=horizon) for name, fn in BASELINES.items()}
