"""Hand-point <-> hidden-state plumbing around the `<hand_traj>` tokens (docs/MODEL.md, "Architecture").

Two hands share one D-dimensional token. The release interleaves them: hidden/embedding dimension
2i belongs to the RIGHT hand (hand 0) and 2i+1 to the LEFT hand (hand 1). Both directions use the
same layout:

    input side  (2.5): points [B, 2, T, 2] --encode each hand in D/2 dims--> interleave -> [B, T, D],
                       added to the input embedding of the k-th `<hand_traj>` token;
    output side (2.6): hidden state [.., D] --split even/odd--> right [.., D/2], left [.., D/2],
                       the condition of the trajectory decoder.

Point encoding (release ``handsonvlm.py::prepare_inputs_labels_for_multimodal`` ->
``process_traj_positional_embedding``), for one point (x, y) and an output width ``dim``:

    C   = dim / 2
    w_j = 10000 ** (-2j / C),                      j = 0 .. C/2 - 1     (C/2 frequencies)
    e   = concat[sin(x w), cos(y w), sin(x w), cos(y w)]  in R^dim

i.e. sin only of x, cos only of y, the pair repeated twice, and no time-step index (the order of
the waypoints comes from the token positions). With dim = D/2 this is the release's C = D/4.

Difference from the release: the release computes the encoding in the points' dtype (bf16 during
training, fp16 at inference), which quantises both the coordinates and the frequencies. We always
compute in float32 and cast the result to the requested dtype.
"""

from __future__ import annotations

import torch

from handsonvlm.constants import LEFT_HAND, NUM_HANDS, POINT_DIM, RIGHT_HAND

POSITION_BASE = 10000.0  # frequency base of the sinusoidal encoding
ENCODING_BLOCKS = 4  # [sin(x w), cos(y w), sin(x w), cos(y w)]


def hand_point_encoding(points: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Release sinusoidal encoding of 2D points: points [..., 2] -> [..., dim].

    ``dim`` must be divisible by 4 (four blocks of dim/4 frequencies). Computed in float32; the
    result is cast to ``dtype`` (default: the points' dtype if floating point, else float32).
    """
    if dim <= 0 or dim % ENCODING_BLOCKS:
        raise ValueError(f"encoding dim must be a positive multiple of {ENCODING_BLOCKS}, got {dim}")
    if points.shape[-1] != POINT_DIM:
        raise ValueError(f"expected points [..., {POINT_DIM}], got {tuple(points.shape)}")
    if dtype is None:
        dtype = points.dtype if points.is_floating_point() else torch.float32

    channels = dim // 2  # the release's C
    exponents = torch.arange(0, channels, 2, device=points.device, dtype=torch.float32) / channels  # 2j / C
    inv_freq = 1.0 / (POSITION_BASE ** exponents)  # [C/2]

    points = points.to(torch.float32)
    x_angles = points[..., 0:1] * inv_freq  # [..., C/2]
    y_angles = points[..., 1:2] * inv_freq  # [..., C/2]
    sin_x, cos_y = torch.sin(x_angles), torch.cos(y_angles)
    encoding = torch.cat([sin_x, cos_y, sin_x, cos_y], dim=-1)  # [..., 2C] = [..., dim]
    return encoding.to(dtype)


def interleave_hands(right: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """right [..., H], left [..., H] -> [..., 2H] with out[..., 2i] = right[i], out[..., 2i+1] = left[i]."""
    if right.shape != left.shape:
        raise ValueError(f"right and left must have the same shape, got {tuple(right.shape)} and {tuple(left.shape)}")
    return torch.stack([right, left], dim=-1).flatten(-2)


def split_hands(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """states [..., 2H] -> (right = even dims [..., H], left = odd dims [..., H]); inverse of ``interleave_hands``."""
    if states.shape[-1] % NUM_HANDS:
        raise ValueError(f"last dim must be even to split into two hands, got {states.shape[-1]}")
    return states[..., RIGHT_HAND::NUM_HANDS], states[..., LEFT_HAND::NUM_HANDS]


def hand_conditions(states: torch.Tensor) -> torch.Tensor:
    """Decoder conditions from the hidden states read at the hand tokens.

    states [B, T, D] (the final-layer, post-norm state that PREDICTS each `<hand_traj>`)
    -> [B, 2, T, D/2] with hand 0 = right = even dims, hand 1 = left = odd dims.
    """
    right, left = split_hands(states)
    return torch.stack([right, left], dim=-3)


def hand_token_embeddings(points: torch.Tensor, hidden_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Vectors added to the input embeddings of the `<hand_traj>` tokens.

    points [B, 2, T, 2] (hand 0 = right, hand 1 = left; T waypoints) -> [B, T, D], D = ``hidden_size``:
    each hand's point is encoded in D/2 dims and the two hands are interleaved (right = even dims).
    ``hidden_size`` must be divisible by 8.
    """
    if points.ndim != 4 or points.shape[1] != NUM_HANDS or points.shape[-1] != POINT_DIM:
        raise ValueError(f"expected points [B, {NUM_HANDS}, T, {POINT_DIM}], got {tuple(points.shape)}")
    if hidden_size % (NUM_HANDS * ENCODING_BLOCKS):
        raise ValueError(f"hidden_size must be a multiple of {NUM_HANDS * ENCODING_BLOCKS}, got {hidden_size}")
    encoding = hand_point_encoding(points, hidden_size // NUM_HANDS, dtype=dtype)  # [B, 2, T, D/2]
    return interleave_hands(encoding[:, RIGHT_HAND], encoding[:, LEFT_HAND])  # [B, T, D]
