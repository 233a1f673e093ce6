"""Vision tower, LITA temporal_spatial_pool tokens and CLIP preprocessing (tiny random CLIP, CPU, fp32)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
from transformers import CLIPConfig, CLIPModel

from handsonvlm.image import CLIP_MEAN, CLIP_STD, LITE_MEAN, LITE_STD, decode_jpegs, preprocess_frames, renormalize
from handsonvlm.vision import (
    VisionTower,
    build_tower,
    encode_video,
    num_video_tokens,
    pool_frames,
    slow_frame_indices,
    video_tokens,
    video_tokens_literal,
)

# image 64 / patch 8 -> g = 8 -> 4x4 = 16 pooled tokens per slow frame (avg_pool2d(2) exercised)
TINY_CLIP = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 image_size=64, patch_size=8)
PROJ_DIM = 24
NUM_EPIC_FRAMES = 10
NUM_VIDEO_FRAMES = 100
NUM_SLOW = 4
POOL_KERNEL = 2
EQUIV_TOL = 1e-5
EPIC_H, EPIC_W = 256, 456


@pytest.fixture(scope="module")
def tower() -> VisionTower:
    torch.manual_seed(0)
    return VisionTower(config=TINY_CLIP)


@pytest.fixture(scope="module")
def projector(tower) -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(tower.hidden_size, PROJ_DIM)


def random_frames(batch: int, num_frames: int, size: int, seed: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_frames, 3, size, size, generator=gen)


def test_tower_shapes(tower):
    assert (tower.hidden_size, tower.image_size, tower.grid, tower.num_patches) == (32, 64, 8, 64)
    feats = tower(torch.randn(3, 3, 64, 64))
    assert feats.shape == (3, tower.num_patches, tower.hidden_size)
    assert VisionTower(config=TINY_CLIP, select_feature="cls_patch")(torch.randn(2, 3, 64, 64)).shape == (2, 65, 32)
    assert tower(torch.randn(0, 3, 64, 64)).shape == (0, 64, 32)


def test_tower_selects_penultimate_layer(tower):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        hidden = tower.encoder(pixel_values=x, output_hidden_states=True).hidden_states
    assert len(hidden) == TINY_CLIP["num_hidden_layers"] + 1
    torch.testing.assert_close(tower(x), hidden[-2][:, 1:])


def test_tower_is_frozen(tower, projector):
    assert all(not p.requires_grad for p in tower.parameters())
    tower.train()
    assert not tower.training and not tower.encoder.training
    assert all(not m.training for m in tower.modules())
    wrapper = nn.ModuleDict(dict(tower=tower, projector=projector)).train()
    assert projector.training and not tower.training
    out = tower(torch.randn(2, 3, 64, 64, requires_grad=True))
    assert not out.requires_grad
    # the projector still trains through the pooled tokens
    tokens = encode_video(random_frames(1, NUM_EPIC_FRAMES, 64), tower, projector)
    tokens.sum().backward()
    assert projector.weight.grad is not None and all(p.grad is None for p in tower.parameters())
    projector.zero_grad(set_to_none=True)
    wrapper.eval()


def test_chunked_equals_unchunked(tower):
    x = torch.randn(7, 3, 64, 64)
    torch.testing.assert_close(tower(x, chunk_size=3), tower(x, chunk_size=64), atol=1e-6, rtol=1e-6)


def test_tower_casts_to_its_dtype():
    tower = VisionTower(config=TINY_CLIP, dtype=torch.bfloat16)
    out = tower(torch.randn(2, 3, 64, 64, dtype=torch.float32))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 64, 32)


def test_slow_frame_indices():
    assert slow_frame_indices(NUM_VIDEO_FRAMES, NUM_SLOW) == [0, 33, 66, 99]
    assert slow_frame_indices(NUM_EPIC_FRAMES, NUM_SLOW) == [0, 3, 6, 9]
    assert num_video_tokens(grid=16) == 356  # CLIP ViT-L/14-224


@pytest.mark.parametrize("batch,num_frames", [(2, NUM_EPIC_FRAMES), (1, NUM_VIDEO_FRAMES), (1, 1)])
def test_efficient_equals_literal(tower, projector, batch, num_frames):
    frames = random_frames(batch, num_frames, tower.image_size)
    with torch.no_grad():
        fast = encode_video(frames, tower, projector, NUM_VIDEO_FRAMES, NUM_SLOW, POOL_KERNEL)
        literal = video_tokens_literal(frames, tower, projector, NUM_VIDEO_FRAMES, NUM_SLOW, POOL_KERNEL)
    expected_tokens = NUM_VIDEO_FRAMES + NUM_SLOW * (tower.grid // POOL_KERNEL) ** 2
    assert expected_tokens == num_video_tokens(tower.grid, NUM_VIDEO_FRAMES, NUM_SLOW, POOL_KERNEL) == 164
    assert fast.shape == literal.shape == (batch, expected_tokens, PROJ_DIM)
    diff = (fast - literal).abs().max().item()
    print(f"F={num_frames}: efficient vs literal tiled-{NUM_VIDEO_FRAMES} max abs diff = {diff:.3e}")
    assert diff <= EQUIV_TOL


def _labelled_features(batch: int, num_frames: int, grid_tokens: int, channels: int):
    """Pooled features whose every value is 1000 * b + unique frame id, so tokens reveal their source."""
    label = 1000.0 * torch.arange(batch)[:, None] + torch.arange(num_frames)[None, :]  # [B, F]
    means = label[:, :, None].expand(batch, num_frames, channels).clone()
    grids = label[:, :, None, None].expand(batch, num_frames, grid_tokens, channels).clone()
    return means, grids


def test_tiled_epic_frame_order():
    batch, grid_tokens, channels = 3, 16, 5
    means, grids = _labelled_features(batch, NUM_EPIC_FRAMES, grid_tokens, channels)
    tokens = video_tokens(means, grids, nn.Identity(), NUM_VIDEO_FRAMES, NUM_SLOW)
    assert tokens.shape == (batch, NUM_VIDEO_FRAMES + NUM_SLOW * grid_tokens, channels)
    source = tokens[..., 0] - 1000.0 * torch.arange(batch)[:, None]  # unique frame of every token
    fast, slow = source[:, :NUM_VIDEO_FRAMES], source[:, NUM_VIDEO_FRAMES:]
    assert torch.equal(fast, (torch.arange(NUM_VIDEO_FRAMES) % NUM_EPIC_FRAMES).float().expand(batch, -1))
    assert torch.equal(slow.view(batch, NUM_SLOW, grid_tokens)[:, :, 0],
                       torch.tensor([0.0, 3.0, 6.0, 9.0]).expand(batch, -1))
    assert torch.equal(slow.view(batch, NUM_SLOW, grid_tokens).amin(2), slow.view(batch, NUM_SLOW, grid_tokens).amax(2))


def test_untiled_lita_video_frame_order():
    grid_tokens, channels = 4, 3
    means, grids = _labelled_features(2, NUM_VIDEO_FRAMES, grid_tokens, channels)
    tokens = video_tokens(means, grids, nn.Identity(), NUM_VIDEO_FRAMES, NUM_SLOW)
    source = tokens[..., 0] - 1000.0 * torch.arange(2)[:, None]
    assert torch.equal(source[:, :NUM_VIDEO_FRAMES], torch.arange(NUM_VIDEO_FRAMES).float().expand(2, -1))
    assert torch.equal(source[:, NUM_VIDEO_FRAMES::grid_tokens], torch.tensor([0.0, 33.0, 66.0, 99.0]).expand(2, -1))


def test_slow_frames_follow_real_features(tower, projector):
    """With distinct real frames, the slow tokens are the projected pooled grids of unique frames 0, 3, 6, 9."""
    frames = random_frames(1, NUM_EPIC_FRAMES, tower.image_size, seed=5)
    with torch.no_grad():
        means, grids = pool_frames(tower(frames[0]))
        tokens = encode_video(frames, tower, projector)[0]
        expected_slow = projector(grids[[0, 3, 6, 9]].flatten(0, 1))
        other_slow = projector(grids[[0, 3, 6, 8]].flatten(0, 1))
        expected_fast = projector(means).repeat(NUM_VIDEO_FRAMES // NUM_EPIC_FRAMES, 1)  # f0..f9, f0..f9, ...
    torch.testing.assert_close(tokens[NUM_VIDEO_FRAMES:], expected_slow)
    assert not torch.allclose(tokens[NUM_VIDEO_FRAMES:], other_slow)
    torch.testing.assert_close(tokens[:NUM_VIDEO_FRAMES], expected_fast)


def test_pool_frames_shapes(tower):
    means, grids = pool_frames(tower(torch.randn(NUM_EPIC_FRAMES, 3, 64, 64)))
    assert means.shape == (NUM_EPIC_FRAMES, tower.hidden_size)
    assert grids.shape == (NUM_EPIC_FRAMES, (tower.grid // POOL_KERNEL) ** 2, tower.hidden_size)


def test_video_tokens_rejects_bad_tiling():
    means, grids = _labelled_features(1, 7, 4, 3)
    with pytest.raises(ValueError):
        video_tokens(means, grids, nn.Identity(), NUM_VIDEO_FRAMES, NUM_SLOW)


def test_pretrained_from_local_directory(tmp_path, tower):
    tower.encoder.save_pretrained(tmp_path / "vision")
    loaded = VisionTower(pretrained=tmp_path / "vision")
    assert not loaded.training and all(not p.requires_grad for p in loaded.parameters())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), tower(x))

    # a full CLIPModel directory (the layout of openai/clip-vit-large-patch14) loads its vision half
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    clip = CLIPModel(CLIPConfig(vision_config=TINY_CLIP, text_config=text, projection_dim=16)).eval()
    clip.save_pretrained(tmp_path / "clip")
    loaded = VisionTower(pretrained=str(tmp_path / "clip"))
    with torch.no_grad():
        expected = clip.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(loaded(x), expected)

    with pytest.raises(FileNotFoundError):
        VisionTower(pretrained=tmp_path / "missing")
    with pytest.raises(ValueError):
        VisionTower()


# ---- image preprocessing ---------------------------------------------------------------------

RED, BLUE = (255, 0, 0), (0, 0, 255)
SIDE_PX = 100


def _denormalise(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (pixels * std + mean) * 255.0


def test_preprocess_centre_crop_keeps_middle():
    frame = np.zeros((EPIC_H, EPIC_W, 3), np.uint8)
    frame[:, :] = BLUE
    frame[:, :SIDE_PX] = RED
    frame[:, -SIDE_PX:] = RED
    frames = np.stack([frame, frame])
    out = preprocess_frames(frames, image_size=224)
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    rgb = _denormalise(out[0])
    interior = rgb[:, :, 1:-1]  # the outermost columns straddle the red/blue edge
    assert interior[0].max() < 1.0 and interior[2].min() > 254.0  # blue, no red
    assert rgb[0].max() <= 128.0  # at most a half-red blend (127.5, rounded up on uint8) at the borders


def test_preprocess_matches_plain_normalisation_when_already_square():
    frame = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    out = preprocess_frames(frame, image_size=32)
    expected = (torch.from_numpy(frame).permute(0, 3, 1, 2).float() / 255.0
                - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)


def test_preprocess_agrees_with_hf_clip_processor():
    """transformers' PIL CLIP processor (default = openai's settings): the same uint8 resize (Pillow's bicubic),
    so the pixel values agree within float32 rounding, on smooth and on noisy frames."""
    pytest.importorskip("PIL")
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (2, EPIC_H, EPIC_W, 3), dtype=np.uint8)
    smooth = np.stack([cv2.GaussianBlur(f, (0, 0), sigmaX=3) for f in noise])  # natural-image-like
    frames = np.concatenate([smooth, noise])
    reference = CLIPImageProcessorPil()(images=list(frames), return_tensors="pt")["pixel_values"]
    out = preprocess_frames(frames)
    grey_levels = (out - reference).abs() * torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255.0
    assert out.shape == reference.shape == (4, 3, 224, 224)
    assert grey_levels.max() < 1e-3  # float rounding of /255 and the normalisation; one grey level is 1


def test_renormalize_gives_another_towers_normalisation():
    """CLIP pixel values -> EfficientNet-Lite's (v - 127) / 128 (and ImageNet's): as normalising so directly."""
    frames = np.random.default_rng(3).integers(0, 256, (2, EPIC_H, EPIC_W, 3), dtype=np.uint8)
    clip = preprocess_frames(frames, image_size=224)
    lite = preprocess_frames(frames, 224, LITE_MEAN, LITE_STD)
    torch.testing.assert_close(renormalize(clip, LITE_MEAN, LITE_STD), lite, rtol=0, atol=2e-6)
    rgb = torch.from_numpy(frames[:, :224, :224].copy()).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(preprocess_frames(frames[:, :224, :224], 224, LITE_MEAN, LITE_STD), (rgb - 127) / 128)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    torch.testing.assert_close(renormalize(clip, *imagenet), preprocess_frames(frames, 224, *imagenet),
                               rtol=0, atol=2e-6)
    assert renormalize(clip.half(), LITE_MEAN, LITE_STD).dtype == torch.float16


def test_build_tower_by_kind():
    from handsonvlm.config import VisionConfig

    torch.manual_seed(0)
    tower = build_tower(VisionConfig(config=TINY_CLIP, select_layer=-1, dtype="float32"))
    assert isinstance(tower, VisionTower) and tower.select_layer == -1 and tower.grid == 8
    with pytest.raises(ValueError, match="kind must be one of"):
        VisionConfig(kind="vit")


def test_decode_jpegs_rgb():
    frame = np.zeros((EPIC_H, EPIC_W, 3), np.uint8)
    frame[:, :] = RED
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    assert ok
    decoded = decode_jpegs([jpeg.tobytes()] * 3)
    assert decoded.shape == (3, EPIC_H, EPIC_W, 3) and decoded.dtype == np.uint8
    assert decoded[..., 0].min() > 240 and decoded[..., 2].max() < 15
    with pytest.raises(ValueError):
        decode_jpegs([b"not a jpeg"])
