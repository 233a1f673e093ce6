"""CLIP-style preprocessing of decoded video frames (docs/MODEL.md, "Architecture"), vectorised over frames.

The release feeds every frame through the ``openai/clip-vit-large-patch14`` image processor:
resize the shortest side to S = 224 (bicubic), centre crop S x S, scale to [0, 1], normalise with
the CLIP mean/std. ``preprocess_frames`` does the same for a whole clip: the resize is Pillow's
bicubic on the uint8 frames (the processor's own resize, antialiased when downscaling: bit-identical
to its resized image), the crop is on uint8 too, and only the cropped S x S pixels are converted to
float32 and normalised in torch. It runs in the training worker's data thread (``DrawStream``), in
the feature cache and in evaluation alike (``handsonvlm.data.clip_frames``), and Pillow's resize
releases the GIL.

Coordinate caveat: the centre crop drops the sides of a wide frame. A 456x256 EPIC frame is
resized to 399x224 and cropped to columns [87, 311) (offset floor((399 - 224) / 2), as HF's
processor), so only x in about [100, 356] px of the original is visible: normalised x in
[0.219, 0.781] (exactly [0.218, 0.779]); the full height stays visible. The hand trajectory labels
stay in full-frame coordinates (x/456, y/256) as in the release, so a target can lie outside what
the vision tower sees.

Other towers take the same CLIP-normalised pixels: EfficientNet-Lite0 maps them to its own
(v - 127) / 128 with ``renormalize`` (``LITE_MEAN``/``LITE_STD``), so every tower sees the same
resize and crop.

Agreement with transformers' PIL ``CLIPImageProcessor``: the same resized uint8 image; the
normalised values within float32 rounding (tests/test_vision.py). 10 frames of 456x256: 17 ms on
one CPU thread against 29 ms for the float32 torch bicubic resize used before.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from PIL import Image

CLIP_IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# EfficientNet-Lite's own normalisation, (v - 127) / 128 on 0..255 values (the official TF
# EfficientNet-Lite preprocessing, MEAN_RGB = 127, STDDEV_RGB = 128), as mean/std on [0, 1] values
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
PIXEL_MAX = 255.0
RGB_CHANNELS = 3


def decode_jpegs(jpegs: Sequence[bytes]) -> np.ndarray:
    """JPEG byte strings (e.g. one row's ``obs_jpeg``) -> uint8 RGB frames [F, H, W, 3].

    All frames must have the same size (true within a clip of the shards).
    """
    frames = []
    for i, data in enumerate(jpegs):
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"frame {i}: not a decodable JPEG ({len(data)} bytes)")
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    if not frames:
        raise ValueError("no frames to decode")
    if len({f.shape for f in frames}) != 1:
        raise ValueError(f"frames differ in size: {sorted({f.shape for f in frames})}")
    return np.stack(frames)


def resized_shape(height: int, width: int, image_size: int) -> tuple[int, int]:
    """(H, W) after scaling the shortest side to ``image_size`` (long side truncated, as HF's CLIP processor)."""
    short, long = min(height, width), max(height, width)
    long_new = int(image_size * long / short)
    return (image_size, long_new) if height <= width else (long_new, image_size)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 RGB [F, H, W, 3] -> uint8 [F, height, width, 3]: Pillow's bicubic on uint8, antialiased when
    downscaling (the resize of the release's ``CLIPImageProcessor``), frame by frame."""
    return np.stack([np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC))
                     for frame in frames])


def preprocess_frames(frames_rgb: np.ndarray, image_size: int = CLIP_IMAGE_SIZE,
                      mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """uint8 RGB frames [F, H, W, 3] -> normalised CLIP pixel values float32 [F, 3, S, S], S = image_size.

    Shortest side to S with :func:`resize_frames` (uint8 in, uint8 out, as the processor's
    intermediate image), centre crop, then /255 and normalise: the float work is on S x S only.
    """
    frames = np.asarray(frames_rgb)
    if frames.ndim != 4 or frames.shape[-1] != RGB_CHANNELS or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    new_h, new_w = resized_shape(height, width, image_size)
    if (new_h, new_w) != (height, width):
        frames = resize_frames(frames, new_h, new_w)

    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    cropped = np.ascontiguousarray(frames[:, top:top + image_size, left:left + image_size])
    x = torch.from_numpy(cropped).permute(0, 3, 1, 2).float()  # [F, 3, S, S]

    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, RGB_CHANNELS, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, RGB_CHANNELS, 1, 1)
    return ((x / PIXEL_MAX - mean_t) / std_t).contiguous()


def renormalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                from_mean: Sequence[float] = CLIP_MEAN, from_std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """Pixel values [..., 3, H, W] normalised with ``from_mean``/``from_std`` (the project's pixel
    format, what :func:`preprocess_frames` returns by default) -> the same pixels normalised with
    ``mean``/``std``: one per-channel affine map, in the dtype of ``pixels``.

    A tower with its own normalisation (EfficientNet-Lite) applies it to the CLIP pixel values that
    every caller makes, so that resizing, cropping and the feature cache stay one code path."""
    shape = (RGB_CHANNELS, 1, 1)
    to_mean, to_std, mean0, std0 = (torch.tensor(v, dtype=torch.float64).view(shape)
                                    for v in (mean, std, from_mean, from_std))
    scale, shift = std0 / to_std, (mean0 - to_mean) / to_std  # x * std0 + mean0 = y * to_std + to_mean
    return pixels * scale.to(pixels) + shift.to(pixels)
