"""Visual path: the release's tiled-100-frame encode (CLIP on 100 frames, project every patch, then
pool) vs the efficient path (CLIP on the 10 unique frames, pool, project 356 tokens).

Both are the library's own functions (:func:`handsonvlm.vision.video_tokens_literal` and
:func:`handsonvlm.vision.encode_video`, compared for equality in tests/test_vision.py), timed on
the tiny preset and on a ViT-L/14-sized tower with random weights (hidden 1024, 16 heads, 224 px,
patch 14; 24 layers unless ``sizes.vitl_layers`` says fewer) projecting to the 7B LM width.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bench.common import Sizes, compare, median, profile_top
from handsonvlm.config import load_model_config
from handsonvlm.model import build_vision_tower
from handsonvlm.vision import VisionTower, encode_video, num_video_tokens, video_tokens_literal

VITL14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
              image_size=224, patch_size=14)
VICUNA_7B_WIDTH = 4096  # the projector's output width in HandsOnVLM-7B
RELEASE_VIDEO_FRAMES = 100
NUM_SLOW = 4


def tiny_setup() -> tuple[VisionTower, nn.Module, int, int]:
    """(tower, projector, unique frames, video frames) of configs/tiny.yaml, tiled like the release.

    The tiny preset itself does not tile (num_video_frames = 10); here it is tiled to 100 so that
    both paths compute the release's 100 + 4 x 16 tokens with the tiny tower."""
    cfg = load_model_config("tiny")
    tower = build_vision_tower(cfg)
    torch.manual_seed(0)
    projector = nn.Linear(tower.hidden_size, cfg.lm.config["hidden_size"])
    return tower, projector, cfg.num_obs_frames, RELEASE_VIDEO_FRAMES


def vitl_setup(layers: int) -> tuple[VisionTower, nn.Module, int, int]:
    """A random CLIP ViT-L/14-224 tower (``layers`` deep) and a 1024 -> 4096 projector."""
    torch.manual_seed(0)
    tower = VisionTower(config={**VITL14, "num_hidden_layers": layers})
    projector = nn.Linear(tower.hidden_size, VICUNA_7B_WIDTH)
    return tower, projector, 10, RELEASE_VIDEO_FRAMES


def compare_paths(tower: VisionTower, projector: nn.Module, unique_frames: int, video_frames: int,
                  batch: int, reps: int) -> dict:
    """Median seconds of both paths on the same random clips [batch, F, 3, S, S], their speedup and
    the max abs difference of the visual tokens [batch, T + 4 G, D]."""
    frames = torch.randn(batch, unique_frames, 3, tower.image_size, tower.image_size,
                         generator=torch.Generator().manual_seed(1))

    def literal():
        with torch.no_grad():
            return video_tokens_literal(frames, tower, projector, video_frames, NUM_SLOW)

    def efficient():
        with torch.no_grad():
            return encode_video(frames, tower, projector, video_frames, NUM_SLOW)

    diff = (literal() - efficient()).abs().max().item()  # also the warm-up of both paths
    seconds = compare({"literal": literal, "efficient": efficient}, reps=reps, warmup=0)
    return {
        "clips": batch, "tokens": num_video_tokens(tower.grid, video_frames, NUM_SLOW),
        "vision_layers": tower.config.num_hidden_layers, "vision_hidden": tower.hidden_size,
        "image_size": tower.image_size, "projector_out": projector.out_features,
        "literal_s": seconds["literal"], "efficient_s": seconds["efficient"],
        "literal_clips_per_s": batch / median(seconds["literal"]),
        "efficient_clips_per_s": batch / median(seconds["efficient"]),
        "vision_speedup": median(seconds["literal"]) / median(seconds["efficient"]),
        "max_abs_diff": diff,
        "_profile_efficient": lambda: profile_top(efficient),
    }


def bench_vision(sizes: Sizes) -> dict:
    tiny = compare_paths(*tiny_setup(), batch=sizes.vision_batch, reps=sizes.vision_reps)
    vitl = compare_paths(*vitl_setup(sizes.vitl_layers), batch=sizes.vision_batch, reps=sizes.vision_reps)
    vitl["reduced_layers"] = sizes.vitl_layers != VITL14["num_hidden_layers"]
    tiny.pop("_profile_efficient")  # the target is judged on the ViT-L/14-sized tower: profile that one
    return {"tiny": tiny, "vitl14": vitl, "vision_speedup": vitl["vision_speedup"],
            "vision_speedup_tiny": tiny["vision_speedup"],
            "max_abs_diff": max(tiny["max_abs_diff"], vitl["max_abs_diff"])}
