"""hoi-forecast future-hand labels -> HandsOnVLM targets.

Two sources, looked up by hoi uid (docs/DATA.md, "Inputs"):

* per-action pickles ``labels/label_<uid>.pkl`` (21-point trajectories in pixels of the 456x256
  last-observation frame), with ``video_info.json`` listing the labelled uids;
* HandsOnVLM's cache ``labels/ek100_<split>_labels.npy`` (uid -> ``future_hands`` [2,5,2],
  ``contact_point`` [2], ``future_valid`` [2]), used when the pickles are absent.

Both are untrusted pickles and load through :mod:`preprocessing.safe_pickle`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np

from preprocessing import safe_pickle, storage
from preprocessing.schema import HAND_SIDES, LABEL_IMAGE_HEIGHT, LABEL_IMAGE_WIDTH, NUM_HANDS
from preprocessing.window import NUM_OBS_FRAMES, NUM_TRACK_POINTS

log = logging.getLogger(__name__)
IMAGE_SIZE = np.array([LABEL_IMAGE_WIDTH, LABEL_IMAGE_HEIGHT], dtype=np.float32)
# hoi-forecast's fill value for a hand without a trajectory: "below the image", on its side.
MISSING_HAND_POINT = np.array([[0.75, 1.5], [0.25, 1.5]], dtype=np.float32)  # [RIGHT, LEFT]


class LabelError(Exception):
    """A label that exists but cannot be used; ``reason`` is a quarantine code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class HandTargets:
    """Targets of one action, in hoi-forecast normalised coordinates (x/456, y/256).

    future_hands [2, 5, 2] (RIGHT, LEFT; point 0 = last observed frame), future_valid [2],
    contact_points [N, 2], past_hands [2, 10, 2] or None, past_hands_valid [2, 10] or None,
    first_frame: the label's rgb file number for point 0 (None when the source does not say).
    """

    future_hands: np.ndarray
    future_valid: np.ndarray
    contact_points: np.ndarray
    source: str
    past_hands: np.ndarray | None = None
    past_hands_valid: np.ndarray | None = None
    first_frame: int | None = None


def missing_targets() -> HandTargets:
    """Targets of an unlabelled action: both hands absent (placeholders, valid = False)."""
    future = np.repeat(MISSING_HAND_POINT[:, None, :], NUM_TRACK_POINTS, axis=1)
    return HandTargets(future, np.zeros(NUM_HANDS, bool), np.zeros((0, 2), np.float32), "none")


def future_point_valid(future_hands: np.ndarray, future_valid: np.ndarray) -> np.ndarray:
    """Evaluation mask ``[..., 2, 5]``: the hand has a trajectory and 0 <= x, y < 1."""
    inside = np.all((future_hands >= 0) & (future_hands < 1), axis=-1)
    return inside & np.asarray(future_valid, bool)[..., None]


def _finite_points(value, n_points: int, what: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float32)
    if arr.shape != (n_points, 2):
        raise LabelError("bad_trajectory", f"{what} has shape {arr.shape}, expected ({n_points}, 2)")
    if not np.all(np.isfinite(arr)):
        raise LabelError("bad_trajectory", f"{what} holds NaN or inf")
    return arr


def targets_from_label_pickle(label: dict) -> HandTargets:
    """Convert a hoi-forecast ``label_<uid>.pkl`` dict to :class:`HandTargets`.

    Keeps points ``[0, g, 2g, 3g, 4g]`` of the T-point trajectories (g = (T-1)//4; T = 21 for
    the released labels: t = 0, 0.25, ..., 1.0 s) and divides by 456x256, as hoi-forecast does.
    """
    if not isinstance(label, dict) or "hand_trajs" not in label or "frame_indices" not in label:
        raise LabelError("label_unreadable", "label dict lacks 'hand_trajs' or 'frame_indices'")
    frame_indices = list(label["frame_indices"])
    n_points = len(frame_indices)
    gap = (n_points - 1) // (NUM_TRACK_POINTS - 1)
    if gap < 1:
        raise LabelError("bad_trajectory", f"label has only {n_points} frames")
    keep = np.arange(NUM_TRACK_POINTS) * gap
    targets = missing_targets()
    targets.source = "hoi_forecast_auto"
    targets.first_frame = int(frame_indices[0])
    hand_trajs = label["hand_trajs"] or {}
    for h, side in enumerate(HAND_SIDES):
        if side in hand_trajs:
            traj = _finite_points(hand_trajs[side]["traj"], n_points, f"{side} trajectory")
            targets.future_hands[h] = traj[keep] / IMAGE_SIZE
            targets.future_valid[h] = True
    affordance = label.get("affordance") or {}
    points = affordance.get("select_points_homo")
    if points is not None and len(points):
        pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
        targets.contact_points = pts[np.all(np.isfinite(pts), axis=1)] / IMAGE_SIZE
    past = label.get("past_hand_centers")  # SynthKitchens extension: hand centres at the 10 observed frames
    if isinstance(past, dict):
        targets.past_hands = np.repeat(MISSING_HAND_POINT[:, None, :], NUM_OBS_FRAMES, axis=1).copy()
        targets.past_hands_valid = np.zeros((NUM_HANDS, NUM_OBS_FRAMES), bool)
        for h, side in enumerate(HAND_SIDES):
            if side in past:
                targets.past_hands[h] = _finite_points(past[side], NUM_OBS_FRAMES, f"{side} past track") / IMAGE_SIZE
                targets.past_hands_valid[h] = True
    return targets


def targets_from_cache_entry(entry: dict) -> HandTargets:
    """Convert one entry of HandsOnVLM's ``ek100_<split>_labels.npy`` cache."""
    try:
        future = np.asarray(entry["future_hands"], dtype=np.float32)
        valid = np.asarray(entry["future_valid"]).astype(bool)
        contact = np.asarray(entry.get("contact_point", np.zeros(0)), dtype=np.float32).reshape(-1, 2)
    except (KeyError, TypeError, ValueError) as exc:
        raise LabelError("label_unreadable", f"cache entry unusable: {exc}") from exc
    if future.shape != (NUM_HANDS, NUM_TRACK_POINTS, 2) or valid.shape != (NUM_HANDS,):
        raise LabelError("bad_trajectory", f"cache entry shapes {future.shape}/{valid.shape}")
    if not np.all(np.isfinite(future)):
        raise LabelError("bad_trajectory", "cached future_hands holds NaN or inf")
    return HandTargets(future, valid, contact, "hoi_forecast_cache")


class HoiLabels:
    """Look up hoi-forecast labels by uid in a ``data/ek100`` directory (local or URI)."""

    def __init__(self, root: str):
        self.root = root
        self.labels_dir = storage.join(root, "labels")
        info_uri = storage.join(root, "video_info.json")
        self.labelled_uids: set[int] | None = None
        if storage.exists(info_uri):
            self.labelled_uids = _read_uid_list(info_uri)
        self._caches: dict[str, dict | LabelError] = {}

    def pickle_uri(self, uid: int) -> str:
        return storage.join(self.labels_dir, f"label_{uid}.pkl")

    def _cache(self, split: str):
        if split not in self._caches:
            uri = storage.join(self.labels_dir, f"ek100_{split}_labels.npy")
            try:
                self._caches[split] = safe_pickle.load_npy(storage.read_bytes(uri)) if storage.exists(uri) else {}
            except safe_pickle.UnsafePickleError as exc:
                self._caches[split] = LabelError("unsafe_pickle", f"{uri}: {exc}")
            except Exception as exc:
                self._caches[split] = LabelError("label_unreadable", f"{uri}: {type(exc).__name__}: {exc}")
        return self._caches[split]

    def get(self, uid: int, split: str) -> HandTargets | None:
        """The targets for ``uid``, None if it has no label; raises :class:`LabelError` if unusable."""
        if self.labelled_uids is not None and uid not in self.labelled_uids:
            return None
        uri = self.pickle_uri(uid)
        try:
            data = storage.read_bytes(uri)
        except (FileNotFoundError, OSError):
            data = None
        if data is not None:
            try:
                label = safe_pickle.loads(data)
            except safe_pickle.UnsafePickleError as exc:
                raise LabelError("unsafe_pickle", str(exc)) from exc
            except Exception as exc:
                raise LabelError("label_unreadable", f"{type(exc).__name__}: {exc}") from exc
            try:
                return targets_from_label_pickle(label)
            except LabelError:
                raise
            except Exception as exc:  # a dict of another structure (a field of the wrong type or shape)
                raise LabelError("label_unreadable", f"unexpected label structure: {type(exc).__name__}: {exc}") \
                    from exc
        cache = self._cache(split)
        if isinstance(cache, LabelError):
            raise cache
        entry = cache.get(uid) if isinstance(cache, dict) else None
        return targets_from_cache_entry(entry) if entry is not None else None


def _read_uid_list(uri: str) -> set[int] | None:
    """The labelled uids of ``video_info.json`` (a JSON list of integers); None, with a warning, when
    the file is anything else: then every uid's pickle is looked up, so no label is lost to it."""
    try:
        uids = json.loads(storage.read_bytes(uri))
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s: %s); looking up every uid's label instead", uri, type(exc).__name__, exc)
        return None
    if not isinstance(uids, list) or not all(isinstance(u, int) and not isinstance(u, bool) for u in uids):
        log.warning("%s is not a JSON list of integer uids; looking up every uid's label instead", uri)
        return None
    return set(uids)
