"""The HandsOnVLM model on the tiny preset: assembly, losses, both modes, persistence and generation."""

from __future__ import annotations

import math

import pytest
import torch

from handsonvlm.config import ModelConfig, apply_overrides, load_model_config
from handsonvlm.data import Example, collate, encode_conversation, pad_sequences, rbhp_turns, vhp_turns
from handsonvlm.generation import generate, select_trajectory
from handsonvlm.hand_embedding import hand_token_embeddings
from handsonvlm.model import IGNORE_INDEX, IMAGE_PLACEHOLDER, HandsOnVLM

NARRATIONS = ("take cup", "open bottle")


def make_model(mode="corrected", seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = load_model_config("tiny", [f"model.mode={mode}"] + [f"model.{k}={v}" for k, v in overrides.items()])
    return HandsOnVLM(cfg)


def make_batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = model.vision.image_size
    examples = []
    for i, narration in enumerate(NARRATIONS):
        turns = (vhp_turns(narration, model.cfg) if i == 0
                 else rbhp_turns("Where should my hand go to pour oil?", model.cfg))
        ids, labels = encode_conversation(model.tokenizer, turns, model.cfg)
        examples.append(Example(ids, labels, torch.randn(model.cfg.num_obs_frames, 3, size, size, generator=g),
                                torch.rand(2, model.cfg.num_future_points, 2, generator=g),
                                torch.tensor([True, i == 0])))
    return collate(examples, model.tokens.pad)


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def trained():
    """The tiny model overfitted on two clips, so that greedy decoding emits hand tokens."""
    model = make_model(seed=1)
    batch = make_batch(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(120):
        out = model(**batch, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    model.eval()
    return model, batch, losses


def test_config_validation_and_overrides():
    cfg = load_model_config("vicuna-7b")
    assert cfg.num_video_frames == 100 and cfg.lm.pretrained.endswith("vicuna-7b-v1.3")
    with pytest.raises(ValueError, match="MLP"):
        load_model_config("tiny", ["model.mode=release", "model.traj_decoder=mlp"])
    with pytest.raises(ValueError, match="exactly one"):
        load_model_config("tiny", ["model.lm.pretrained=/somewhere"])
    with pytest.raises(ValueError, match="unknown model config"):
        ModelConfig.from_dict({"nope": 1})
    assert apply_overrides({"a": {"b": 1}}, ["a.b=2.5e-3", "a.c=[1, 2]", "d.e=true", "d.f=1e-3", "d.g=abc"]) == \
        {"a": {"b": 2.5e-3, "c": [1, 2]}, "d": {"e": True, "f": 1e-3, "g": "abc"}}


def test_token_ids_come_from_the_tokenizer(model):
    assert model.tokens.hand == model.tokenizer.convert_tokens_to_ids("<hand_traj>")
    assert model.tokens.time_tokens == tuple(model.tokenizer.convert_tokens_to_ids([f"<t{i}>" for i in range(100)]))
    assert model.lm.get_input_embeddings().num_embeddings == len(model.tokenizer)
    ids, labels = encode_conversation(model.tokenizer, vhp_turns("take cup", model.cfg), model.cfg)
    assert ids.count(IMAGE_PLACEHOLDER) == 1 and ids.count(model.tokens.hand) == 4
    supervised = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert supervised[-1] == model.tokens.eos and supervised.count(model.tokens.hand) == 4
    assert "take cup" in model.tokenizer.decode(supervised)  # the answer names the action


def test_visual_splice_shapes_and_positions(model):
    batch = make_batch(model)
    visual = model.visual_tokens(batch["frames"])
    grid = model.vision.grid // model.cfg.spatial_pool
    assert visual.shape == (2, model.cfg.num_video_frames + model.cfg.num_slow_frames * grid ** 2, model.hidden_size)
    seq = model.embed_inputs(batch["input_ids"], batch["attention_mask"], visual, None, batch["labels"])
    b, length = batch["input_ids"].shape
    assert seq["inputs_embeds"].shape == (b, length - 1 + visual.shape[1], model.hidden_size)
    for row in range(b):
        at = int((batch["input_ids"][row] == IMAGE_PLACEHOLDER).nonzero())
        span = slice(at, at + visual.shape[1])
        torch.testing.assert_close(seq["inputs_embeds"][row, span], visual[row])
        assert (seq["labels"][row, span] == IGNORE_INDEX).all() and (seq["ids"][row, span] == -1).all()
        text = torch.cat([batch["input_ids"][row, :at], batch["input_ids"][row, at + 1:]])
        torch.testing.assert_close(seq["ids"][row, torch.arange(seq["ids"].shape[1]) >= 0][seq["ids"][row] != -1], text)
    # padding is masked with 0 (the release padded spliced masks with -100) and positions skip it
    assert set(seq["attention_mask"].unique().tolist()) <= {0, 1}
    bad = batch["input_ids"].clone()
    bad[0, -1] = IMAGE_PLACEHOLDER
    with pytest.raises(ValueError, match="exactly one image"):
        model.embed_inputs(bad, batch["attention_mask"], visual, None)


def test_hand_encodings_are_added_at_hand_tokens_only(model):
    batch = make_batch(model)
    visual = model.visual_tokens(batch["frames"])
    plain = model.embed_inputs(batch["input_ids"], batch["attention_mask"], visual, None)
    with_hands = model.embed_inputs(batch["input_ids"], batch["attention_mask"], visual, batch["future_hands"])
    delta = with_hands["inputs_embeds"] - plain["inputs_embeds"]
    is_hand = plain["ids"] == model.tokens.hand
    assert delta[~is_hand].abs().max() == 0
    expected = hand_token_embeddings(batch["future_hands"], model.hidden_size)  # [B, T, D]
    for row in range(2):
        torch.testing.assert_close(delta[row][is_hand[row]], expected[row])


def test_readout_is_one_position_before_each_hand_token(model):
    batch = make_batch(model)
    seq = model.embed_inputs(batch["input_ids"], batch["attention_mask"], model.visual_tokens(batch["frames"]), None)
    positions = torch.arange(seq["ids"].shape[1], dtype=torch.float32)
    hidden = positions[None, :, None].expand(2, -1, model.hidden_size)
    states, found = model.hand_states(hidden, seq["ids"], 4)
    assert found.all()
    for row in range(2):
        hand_at = (seq["ids"][row] == model.tokens.hand).nonzero().squeeze(-1)
        assert states[row, :, 0].tolist() == (hand_at - 1).float().tolist()
    _, found = model.hand_states(hidden, torch.zeros_like(seq["ids"]), 4)  # no hand tokens at all
    assert not found.any()


def test_loss_components_and_text_loss_matches_transformers(model):
    batch = make_batch(model)
    out = model(**batch, generator=torch.Generator().manual_seed(0))
    assert set(out) >= {"loss", "text_loss", "traj_loss", "kl_loss", "pred"}
    cfg = model.cfg
    total = out["text_loss"] + cfg.hoi_lambda * (out["traj_loss"] + cfg.lambda_kl * out["kl_loss"])
    torch.testing.assert_close(out["loss"].detach(), total)
    assert out["pred"].shape == (2, 2, 4, 2) and out["traj_loss"] > 0 and out["kl_loss"] > 0
    visual = model.visual_tokens(batch["frames"])
    seq = model.embed_inputs(batch["input_ids"], batch["attention_mask"], visual, batch["future_hands"],
                             batch["labels"])
    reference = model.lm(inputs_embeds=seq["inputs_embeds"], attention_mask=seq["attention_mask"],
                         position_ids=seq["position_ids"], labels=seq["labels"]).loss
    torch.testing.assert_close(out["text_loss"], reference.detach(), rtol=1e-5, atol=1e-6)
    # gradients reach the LM, projector and decoder, never the frozen tower
    out["loss"].backward()
    assert model.projector.weight.grad is not None and model.lm.model.layers[0].mlp.up_proj.weight.grad is not None
    assert all(p.grad is None for p in model.vision.parameters())
    model.zero_grad()


def test_release_and_corrected_modes_differ_only_in_kl():
    release, corrected = make_model("release"), make_model("corrected")
    batch = make_batch(release)
    a = release(**batch, generator=torch.Generator().manual_seed(0))
    b = corrected(**batch, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a["text_loss"], b["text_loss"])
    torch.testing.assert_close(a["traj_loss"], b["traj_loss"])
    assert not torch.isclose(a["kl_loss"], b["kl_loss"])  # release: K_tot x #valid hands


def test_cached_features_give_the_same_loss(model):
    batch = make_batch(model)
    means, grids = model.frame_features(batch["frames"])
    from_frames = model(**batch, generator=torch.Generator().manual_seed(0))
    cached = {k: v for k, v in batch.items() if k != "frames"}
    from_cache = model(**cached, frame_means=means, frame_grids=grids, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(from_frames["loss"], from_cache["loss"])


def test_training_reduces_the_loss(trained):
    _, _, losses = trained
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def prompts(model, narrations):
    ids = [encode_conversation(model.tokenizer, vhp_turns(n, model.cfg, with_answer=False), model.cfg)[0]
           for n in narrations]
    return pad_sequences(ids, model.tokens.pad, side="left")


def test_greedy_generation_decodes_hands_and_batched_cached_equals_single_uncached(trained):
    model, batch, _ = trained
    ids, mask = prompts(model, NARRATIONS[:1] + ("put the lid on it",))
    frames = batch["frames"]
    batched = generate(model, ids, mask, frames=frames, temperature=0.0, max_new_tokens=40, use_cache=True)
    assert batched.complete[0, 0] and batched.hand_counts[0, 0] == 4  # the overfitted answer
    assert "take cup" in batched.texts[0][0] and "<hand_traj>" in batched.texts[0][0]
    assert torch.isfinite(batched.trajectories[0, 0]).all()
    for row in range(2):
        keep = mask[row].bool()
        single = generate(model, ids[row:row + 1, keep], mask[row:row + 1, keep], frames=frames[row:row + 1],
                          temperature=0.0, max_new_tokens=40, use_cache=False)
        n = single.token_ids.shape[-1]
        assert single.token_ids[0, 0].tolist() == batched.token_ids[row, 0, :n].tolist()
        torch.testing.assert_close(single.trajectories[0, 0], batched.trajectories[row, 0], equal_nan=True,
                                   rtol=1e-4, atol=1e-5)


def test_sampling_is_seeded_and_returns_k_samples(trained):
    model, batch, _ = trained
    ids, mask = prompts(model, NARRATIONS)
    kw = dict(frames=batch["frames"], num_samples=3, temperature=0.5, top_p=0.9, max_new_tokens=40)
    first, again, other = generate(model, ids, mask, seed=7, **kw), generate(model, ids, mask, seed=7, **kw), \
        generate(model, ids, mask, seed=8, **kw)
    assert first.trajectories.shape == (2, 3, 2, 4, 2) and first.complete.shape == (2, 3)
    torch.testing.assert_close(first.trajectories, again.trajectories, equal_nan=True)
    assert first.texts == again.texts
    done = first.complete & other.complete
    assert done.any() and not torch.allclose(first.trajectories[done], other.trajectories[done])  # CVAE z varies


def test_trajectory_selection_release_vs_corrected():
    points = torch.arange(2 * 2 * 6 * 2, dtype=torch.float32).view(2, 2, 6, 2)
    counts = torch.tensor([6, 2])
    corrected = select_trajectory(points, counts, 4, "corrected")
    release = select_trajectory(points, counts, 4, "release")
    torch.testing.assert_close(corrected[0], points[0, :, :4])  # first 4 of 6
    torch.testing.assert_close(release[0], points[0, :, 2:6])  # last 4 of 6 (release)
    assert torch.isnan(corrected[1, :, 2:]).all() and (release[1, :, 2:] == 0).all()
    torch.testing.assert_close(corrected[1, :, :2], points[1, :, :2])


def test_save_and_load_roundtrip(trained, tmp_path):
    model, batch, _ = trained
    model.save_pretrained(tmp_path / "export")
    loaded = HandsOnVLM.from_pretrained(tmp_path / "export")
    loaded.eval()
    def g():
        return torch.Generator().manual_seed(0)

    torch.testing.assert_close(loaded(**batch, generator=g())["loss"], model(**batch, generator=g())["loss"])
    assert loaded.tokens == model.tokens and not math.isnan(loaded.cfg.z_scale)


def test_released_checkpoint_layout_loads_into_the_model(tmp_path):
    """Our tiny model written in the release's key layout (with its unused modules) loads back exactly."""
    from safetensors.torch import save_file

    from handsonvlm.compat import load_release_weights, ours_to_release, release_unused_shapes

    source = make_model("release", seed=3)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("vision.")}
    released = ours_to_release(state)
    assert "model.mm_projector.weight" in released and "lm_head.weight" in released
    assert "hand_traj_decoder.hand_traj_decoder.cvae.enc_MLP.0.weight" in released
    for key, shape in release_unused_shapes(source.hidden_size).items():
        released[key] = torch.zeros(shape)
    keys = sorted(released)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, shard_keys in shards.items():
        save_file({k: released[k].contiguous() for k in shard_keys}, str(tmp_path / name))
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(__import__("json").dumps(index))

    target = make_model("release", seed=4)
    target.vision.load_state_dict(source.vision.state_dict())  # CLIP comes from its own directory
    untouched = load_release_weights(target, tmp_path)
    assert untouched and all(k.startswith("vision.") for k in untouched)
    batch = make_batch(source)
    def g():
        return torch.Generator().manual_seed(0)

    torch.testing.assert_close(target(**batch, generator=g())["loss"], source(**batch, generator=g())["loss"])


def test_missing_real_weights_fail_clearly_without_network():
    cfg = load_model_config("vicuna-7b", ["model.lm.pretrained=/nonexistent/vicuna"])
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        HandsOnVLM(cfg)


# ------------------------------------------------------------------ projector init (LLaVA's mm_projector.bin)
def write_projector(path, weight_shape=(64, 32), bias_shape=(64,), prefix="model.", seed=0, **extra):
    """A state dict as LLaVA's pretraining saved mm_projector.bin (``model.mm_projector.*``)."""
    g = torch.Generator().manual_seed(seed)
    state = {f"{prefix}mm_projector.weight": torch.randn(*weight_shape, generator=g),
             f"{prefix}mm_projector.bias": torch.randn(*bias_shape, generator=g), **extra}
    torch.save(state, path)
    return state


def test_projector_init_loads_llava_mm_projector(tmp_path):
    path = tmp_path / "mm_projector.bin"
    state = write_projector(path)
    plain = make_model(seed=5)
    init = make_model(seed=5, projector_init=str(path))
    assert init.projector.weight.shape == (64, 32)  # [D, C] of the tiny preset
    torch.testing.assert_close(init.projector.weight, state["model.mm_projector.weight"], rtol=0, atol=0)
    torch.testing.assert_close(init.projector.bias, state["model.mm_projector.bias"], rtol=0, atol=0)
    assert not torch.equal(plain.projector.weight, init.projector.weight)
    # everything else is built exactly as without it (the load draws no random numbers)
    others = {k: v for k, v in plain.state_dict().items() if not k.startswith("projector.")}
    for key, value in init.state_dict().items():
        if not key.startswith("projector."):
            assert torch.equal(value, others[key]), key
    # an fp16 file and a bare "mm_projector.*" prefix load too (cast to the projector's dtype)
    half = {k: v.half() for k, v in write_projector(tmp_path / "half.bin", prefix="", seed=1).items()}
    torch.save(half, tmp_path / "half.bin")
    loaded = make_model(projector_init=str(tmp_path / "half.bin"))
    assert loaded.projector.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.projector.weight, half["mm_projector.weight"].float(), rtol=0, atol=0)


def test_projector_init_is_off_by_default_and_not_kept_in_exports(tmp_path):
    assert ModelConfig().projector_init is None  # off by default; the vicuna presets set LLaVA's, as the release
    assert load_model_config("vicuna-7b").projector_init == "checkpoints/llava-pretrain-vicuna-7b-v1.3/mm_projector.bin"
    torch.testing.assert_close(make_model(seed=2).state_dict(), make_model(seed=2).state_dict(), rtol=0, atol=0)
    path = tmp_path / "mm_projector.bin"
    write_projector(path)
    model = make_model(projector_init=str(path))
    model.save_pretrained(tmp_path / "export")
    path.unlink()  # the export holds the weights; the file is not needed to load it
    loaded = HandsOnVLM.from_pretrained(tmp_path / "export")
    assert loaded.cfg.projector_init is None
    torch.testing.assert_close(loaded.projector.weight, model.projector.weight, rtol=0, atol=0)


@pytest.mark.parametrize(("case", "error", "message"), [
    ("missing_file", FileNotFoundError, "no such file"),
    ("no_bias", ValueError, "no key ending in 'mm_projector.bias'"),
    ("two_weights", ValueError, "2 keys"),
    ("weight_7b", ValueError, r"model.mm_projector.weight has shape \[4096, 1024\], expected \[D, C\] = \[64, 32\]"),
    ("weight_transposed", ValueError, r"has shape \[32, 64\], expected \[D, C\] = \[64, 32\]"),
    ("bias_shape", ValueError, r"model.mm_projector.bias has shape \[32\], expected \[D\] = \[64\]"),
    ("not_a_state_dict", ValueError, "not a state dict"),
    ("pickled_object", ValueError, "cannot read it as a torch state dict"),
])
def test_projector_init_errors_are_clear(tmp_path, case, error, message):
    path = tmp_path / "mm_projector.bin"
    if case == "no_bias":
        torch.save({"model.mm_projector.weight": torch.zeros(64, 32)}, path)
    elif case == "two_weights":
        write_projector(path, **{"mm_projector.weight": torch.zeros(64, 32)})
    elif case == "weight_7b":
        write_projector(path, weight_shape=(4096, 1024), bias_shape=(4096,))
    elif case == "weight_transposed":
        write_projector(path, weight_shape=(32, 64))
    elif case == "bias_shape":
        write_projector(path, bias_shape=(32,))
    elif case == "not_a_state_dict":
        torch.save([torch.zeros(64, 32)], path)
    elif case == "pickled_object":
        torch.save({"model.mm_projector.weight": torch.zeros(64, 32), "cfg": ModelConfig()}, path)
    with pytest.raises(error, match=message) as info:
        make_model(projector_init=str(path))
    assert "model.projector_init" in str(info.value)


def test_released_checkpoint_overrides_projector_init(tmp_path):
    """Loading HandsOnVLM-7B/13B's full checkpoint replaces the LLaVA projector (documented precedence)."""
    from safetensors.torch import save_file

    from handsonvlm.compat import load_release_weights, ours_to_release

    source = make_model("release", seed=3)
    released = ours_to_release({k: v for k, v in source.state_dict().items() if not k.startswith("vision.")})
    save_file({k: v.contiguous() for k, v in released.items()}, str(tmp_path / "model.safetensors"))
    write_projector(tmp_path / "mm_projector.bin")
    target = make_model("release", seed=4, projector_init=str(tmp_path / "mm_projector.bin"))
    load_release_weights(target, tmp_path)
    torch.testing.assert_close(target.projector.weight, source.projector.weight, rtol=0, atol=0)
