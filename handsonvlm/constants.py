"""Facts of the task shared by every stage: the hands, the clip's time grid, the EPIC frame, the time tokens.

Each is defined once here; the model config's defaults, the data layout and the metrics read them
from this module. See docs/DATA.md (observation window) and docs/MODEL.md (tokens).
"""

from __future__ import annotations

# Hands: row order of every trajectory tensor ([..., 2, T, 2] has the right hand in row 0).
HANDS = ("right", "left")
NUM_HANDS = len(HANDS)
RIGHT_HAND, LEFT_HAND = range(NUM_HANDS)
HOI_FORECAST_SIDES = tuple(hand.upper() for hand in HANDS)  # hoi-forecast's label keys, same order
POINT_DIM = 2  # (x, y), normalised image coordinates

# The clip's time grid (hoi-forecast): 10 frames at 4 fps, then the hands at +0.25 ... +1.0 s.
OBS_FPS = 4.0
OBS_SECONDS = 2.5  # hoi-forecast's observation_seconds; floor(2.5 * 4) = 10 frames
NUM_OBS_FRAMES = int(OBS_SECONDS * OBS_FPS)
ANTICIPATION_SECONDS = 1.0  # from the last observed frame to the action start
NUM_FUTURE_POINTS = int(ANTICIPATION_SECONDS * OBS_FPS)  # 4 predicted points per hand
FUTURE_STEP_SECONDS = 1.0 / OBS_FPS  # 0.25 s between trajectory points

# EPIC-KITCHENS rgb_frames: every shard frame has this size; coordinates are x/W, y/H of it.
EPIC_FRAME_WIDTH = 456
EPIC_FRAME_HEIGHT = 256

# LITA's time tokens <t0> ... <t{N-1}>, added to the vocabulary before the hand token.
TIME_TOKEN_TEMPLATE = "<t{t}>"
NUM_TIME_TOKENS = 100


def time_token(t: int) -> str:
    """``3`` -> ``"<t3>"``."""
    return TIME_TOKEN_TEMPLATE.format(t=t)

# The two modes of the whole project: reproduce the release, or fix its defects (docs/MODEL.md).
MODES = ("release", "corrected")
# Trajectory decoder kinds and the released CVAE's sizes (TrajCVAE in the release).
DECODER_KINDS = ("cvae", "mlp")
RELEASE_DECODER_HIDDEN = 512
RELEASE_DECODER_LATENT = 256
RELEASE_Z_SCALE = 2.0  # the release samples the CVAE prior wider at inference than in training
