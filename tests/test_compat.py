"""Released checkpoint -> our layout: key mapping, shard loading, shapes, vocabulary check."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from handsonvlm.compat import (
    AddedTokensVocab,
    UnknownReleaseKeyError,
    check_release_vocab,
    load_release_checkpoint,
    load_release_state_dict,
    ours_to_release,
    release_added_token_ids,
    release_decoder_shapes,
    release_to_ours,
    release_unused_shapes,
    state_dict_files,
    stored_tensors,
)
from handsonvlm.traj_decoder import CVAETrajectoryDecoder, MLPTrajectoryDecoder

# tiny released model: LLaMA D=64, 2 layers; CLIP width 32, 1 layer, 28 px / 14 px patches
D, FFN, LAYERS = 64, 128, 2
VOCAB = 32 + 100 + 1  # base + <t0>..<t99> + <hand_traj>
CLIP_D, CLIP_FFN, CLIP_LAYERS, CLIP_POSITIONS = 32, 64, 1, 5
HEAD_DIM = 16

LLAMA_LAYER_LEAVES = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                      "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                      "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"]
CLIP_LAYER_LEAVES = [f"self_attn.{p}_proj.{wb}" for p in ("k", "v", "q", "out") for wb in ("weight", "bias")] + [
    f"{m}.{wb}" for m in ("layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2") for wb in ("weight", "bias")]
CLIP = "model.vision_tower.vision_tower.vision_model."
DEC = "hand_traj_decoder.hand_traj_decoder."


def _t(*shape, dtype=torch.float16):
    return torch.randn(*shape).to(dtype)


def fake_release_state_dict(kind: str = "cvae") -> tuple[dict, dict]:
    """Released key names (transformers 4.31-era names) with tiny shapes -> (state dict, expected ours name or None)."""
    sd, expect = {}, {}

    def add(key, tensor, ours):
        sd[key] = tensor
        expect[key] = ours

    llama_shapes = {"self_attn.q_proj.weight": (D, D), "self_attn.k_proj.weight": (D, D),
                    "self_attn.v_proj.weight": (D, D), "self_attn.o_proj.weight": (D, D),
                    "mlp.gate_proj.weight": (FFN, D), "mlp.up_proj.weight": (FFN, D),
                    "mlp.down_proj.weight": (D, FFN), "input_layernorm.weight": (D,),
                    "post_attention_layernorm.weight": (D,)}
    add("model.embed_tokens.weight", _t(VOCAB, D), "lm.model.embed_tokens.weight")
    for i in range(LAYERS):
        for leaf in LLAMA_LAYER_LEAVES:
            add(f"model.layers.{i}.{leaf}", _t(*llama_shapes[leaf]), f"lm.model.layers.{i}.{leaf}")
        add(f"model.layers.{i}.self_attn.rotary_emb.inv_freq", _t(HEAD_DIM // 2, dtype=torch.float32), None)
    add("model.norm.weight", _t(D), "lm.model.norm.weight")
    add("lm_head.weight", _t(VOCAB, D), "lm.lm_head.weight")
    add("model.mm_projector.weight", _t(D, CLIP_D), "projector.weight")
    add("model.mm_projector.bias", _t(D), "projector.bias")

    clip_shapes = {"embeddings.class_embedding": (CLIP_D,), "embeddings.patch_embedding.weight": (CLIP_D, 3, 14, 14),
                   "embeddings.position_embedding.weight": (CLIP_POSITIONS, CLIP_D),
                   "pre_layrnorm.weight": (CLIP_D,), "pre_layrnorm.bias": (CLIP_D,),
                   "post_layernorm.weight": (CLIP_D,), "post_layernorm.bias": (CLIP_D,)}
    for leaf, shape in clip_shapes.items():
        add(CLIP + leaf, _t(*shape), "vision.encoder." + leaf)
    layer_shapes = {"mlp.fc1.weight": (CLIP_FFN, CLIP_D), "mlp.fc1.bias": (CLIP_FFN,),
                    "mlp.fc2.weight": (CLIP_D, CLIP_FFN), "mlp.fc2.bias": (CLIP_D,)}
    for i in range(CLIP_LAYERS):
        for leaf in CLIP_LAYER_LEAVES:
            shape = layer_shapes.get(leaf, (CLIP_D, CLIP_D) if leaf.endswith("proj.weight") else (CLIP_D,))
            add(f"{CLIP}encoder.layers.{i}.{leaf}", _t(*shape), f"vision.encoder.encoder.layers.{i}.{leaf}")
    add(CLIP + "embeddings.position_ids", torch.arange(CLIP_POSITIONS)[None], None)

    # Written out from the release's module definitions (TrajCVAE / the MLP head, Dc = D/2 = 32),
    # not derived from handsonvlm.compat's shape tables, so that the mapping is checked against them.
    for module, ours, out_features, in_features in RELEASE_DECODER_LAYERS[kind]:
        add(f"{DEC}{module}.weight", _t(out_features, in_features, dtype=torch.bfloat16), f"traj_decoder.{ours}.weight")
        add(f"{DEC}{module}.bias", _t(out_features, dtype=torch.bfloat16), f"traj_decoder.{ours}.bias")
    for key, shape in RELEASE_UNUSED_SHAPES.items():
        add(key, _t(*shape), None)
    return sd, expect


# (released module, ours, out_features, in_features) at D = 64
RELEASE_DECODER_LAYERS = {
    "cvae": [("cvae.enc_MLP.0", "enc_in", 512, 2 + 32), ("cvae.linear_means", "enc_mu", 256, 512),
             ("cvae.linear_log_var", "enc_logvar", 256, 512), ("cvae.dec_MLP.0", "dec_in", 512, 256 + 32),
             ("cvae.dec_MLP.2", "dec_out", 2, 512)],
    "mlp": [("mlp.0", "fc1", 512, 32), ("mlp.2", "fc2", 512, 512), ("mlp.4", "fc_out", 2, 512)],
}
RELEASE_UNUSED_SHAPES = {  # at D = 64; never trained, dropped on load
    "hand_traj_positional_embedding.weight": (32, 2), "hand_traj_positional_embedding.bias": (32,),
    "time_embedding": (20, 64),
    "bbox_to_feature.0.weight": (32, 4), "bbox_to_feature.0.bias": (32,),
    "bbox_to_feature.2.weight": (64, 32), "bbox_to_feature.2.bias": (64,),
    "feat_fusion.0.weight": (1024, 1088), "feat_fusion.0.bias": (1024,),
    "downproject.weight": (1024, 1024), "downproject.bias": (1024,),
}


def test_shape_tables_agree_with_the_release_modules():
    for kind, layers in RELEASE_DECODER_LAYERS.items():
        expected = {}
        for module, _, out_features, in_features in layers:
            expected[f"{DEC}{module}.weight"] = (out_features, in_features)
            expected[f"{DEC}{module}.bias"] = (out_features,)
        assert release_decoder_shapes(D, kind) == expected
    assert release_unused_shapes(D) == RELEASE_UNUSED_SHAPES


UNUSED_PREFIXES = ("hand_traj_positional_embedding.", "time_embedding", "bbox_to_feature.", "feat_fusion.",
                   "downproject.")


def _is_buffer(key):
    return key.endswith("rotary_emb.inv_freq") or key.endswith("embeddings.position_ids")


# ---- mapping -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["cvae", "mlp"])
def test_every_key_maps_to_expected_name(kind):
    sd, expect = fake_release_state_dict(kind)
    mapped, dropped = release_to_ours(sd, include_vision=True)
    want = {ours: key for key, ours in expect.items() if ours is not None}
    assert set(mapped) == set(want)
    for ours, key in want.items():
        assert mapped[ours] is sd[key]
    assert dropped == sorted(k for k, ours in expect.items() if ours is None)
    assert all(k.startswith(UNUSED_PREFIXES) or _is_buffer(k) for k in dropped)
    assert {k for k in dropped if not _is_buffer(k)} == set(release_unused_shapes(D))


def test_clip_is_dropped_by_default():
    sd, expect = fake_release_state_dict()
    mapped, dropped = release_to_ours(sd)
    assert not any(k.startswith("vision.") for k in mapped)
    clip_keys = {k for k in sd if k.startswith(CLIP)}
    unused = set(release_unused_shapes(D))
    buffers = {k for k in sd if _is_buffer(k)}
    assert set(dropped) == clip_keys | unused | buffers


def test_mapped_names_fit_transformers_and_our_modules():
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    sd, _ = fake_release_state_dict()
    mapped, _ = release_to_ours(sd, include_vision=True)

    def sub(prefix):
        return {k[len(prefix):]: v.float() for k, v in mapped.items() if k.startswith(prefix)}

    lm = LlamaForCausalLM(LlamaConfig(hidden_size=D, intermediate_size=FFN, num_hidden_layers=LAYERS,
                                      num_attention_heads=D // HEAD_DIM, num_key_value_heads=D // HEAD_DIM,
                                      vocab_size=VOCAB, tie_word_embeddings=False))
    lm.load_state_dict(sub("lm."), strict=True)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=CLIP_D, intermediate_size=CLIP_FFN,
                                            num_hidden_layers=CLIP_LAYERS, num_attention_heads=2,
                                            image_size=28, patch_size=14))
    clip_sd = sub("vision.encoder.")
    clip_sd.update({k: v for k, v in clip.state_dict().items() if k.endswith("position_ids")})  # if persistent
    clip.load_state_dict(clip_sd, strict=True)
    CVAETrajectoryDecoder(D // 2).load_state_dict(sub("traj_decoder."), strict=True)
    torch.nn.Linear(CLIP_D, D).load_state_dict(sub("projector."), strict=True)

    sd_mlp, _ = fake_release_state_dict("mlp")
    mapped_mlp, _ = release_to_ours(sd_mlp)
    MLPTrajectoryDecoder(D // 2).load_state_dict(
        {k[len("traj_decoder."):]: v.float() for k, v in mapped_mlp.items() if k.startswith("traj_decoder.")})


@pytest.mark.parametrize("bad", ["oct_decoder.blocks.0.weight", "model.layers.0.self_attn.q_proj.bias",
                                 "hand_traj_decoder.hand_traj_decoder.cvae.enc_MLP.1.weight",
                                 "affordance_decoder.cvae.enc_MLP.0.weight", "model.mm_projector.0.weight"])
def test_unknown_keys_raise_naming_them(bad):
    sd, _ = fake_release_state_dict()
    sd[bad] = torch.zeros(1)
    with pytest.raises(UnknownReleaseKeyError, match=bad.replace(".", r"\.")) as info:
        release_to_ours(sd)
    assert info.value.keys == [bad]


def test_round_trip():
    sd, _ = fake_release_state_dict()
    mapped, dropped = release_to_ours(sd, include_vision=True)
    back = ours_to_release(mapped)
    assert set(back) == set(sd) - set(dropped)
    assert all(back[k] is sd[k] for k in back)
    again, dropped_again = release_to_ours(back, include_vision=True)
    assert again.keys() == mapped.keys() and dropped_again == []
    with pytest.raises(UnknownReleaseKeyError):
        ours_to_release({"vision_tower.foo": torch.zeros(1)})


# ---- files -------------------------------------------------------------------------------------------

def _write_sharded_safetensors(directory, sd, num_shards=3):
    keys = sorted(sd)
    weight_map = {}
    for s in range(num_shards):
        name = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[s::num_shards]}
        save_file(part, str(directory / name))
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def _assert_same(loaded, sd):
    assert loaded.keys() == sd.keys()
    for k in sd:
        assert loaded[k].dtype == sd[k].dtype and torch.equal(loaded[k], sd[k]), k


def test_load_sharded_safetensors(tmp_path):
    sd, expect = fake_release_state_dict()
    _write_sharded_safetensors(tmp_path, sd)
    _assert_same(load_release_state_dict(tmp_path), sd)
    mapped = load_release_checkpoint(tmp_path, include_vision=True)
    assert set(mapped) == {ours for ours in expect.values() if ours is not None}
    torch.testing.assert_close(mapped["traj_decoder.enc_in.weight"], sd[DEC + "cvae.enc_MLP.0.weight"])


def test_load_bin_single_and_sharded(tmp_path):
    sd, _ = fake_release_state_dict()
    single = tmp_path / "single"
    single.mkdir()
    torch.save(sd, single / "pytorch_model.bin")
    _assert_same(load_release_state_dict(single), sd)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = sorted(sd)
    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    weight_map = {}
    for s, name in enumerate(names):
        part = {k: sd[k] for k in keys[s::2]}
        torch.save(part, sharded / name)
        weight_map.update({k: name for k in part})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_same(load_release_state_dict(sharded), sd)
    assert set(load_release_checkpoint(sharded)) == set(release_to_ours(sd)[0])


def test_bin_refuses_arbitrary_pickles(tmp_path):
    torch.save({"w": torch.zeros(1), "obj": _Custom()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError):
        load_release_state_dict(tmp_path)


class _Custom:
    pass


def test_index_disagreeing_with_shards_raises(tmp_path):
    sd, _ = fake_release_state_dict()
    _write_sharded_safetensors(tmp_path, sd)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.extra.weight"] = next(iter(index["weight_map"].values()))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="disagree"):
        load_release_state_dict(tmp_path)


def test_shards_outside_the_folder_and_repeated_keys_are_refused(tmp_path):
    sd, _ = fake_release_state_dict()
    _write_sharded_safetensors(tmp_path, sd)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../elsewhere.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside the directory"):
        load_release_state_dict(tmp_path)

    bins = tmp_path / "bins"
    bins.mkdir()
    torch.save({"a": torch.zeros(1), "b": torch.ones(2)}, bins / "pytorch_model-1.bin")
    torch.save({"b": torch.ones(2)}, bins / "pytorch_model-2.bin")
    with pytest.raises(ValueError, match="repeats 1 key"):
        load_release_state_dict(bins)


def test_stored_tensors_give_each_tensors_shape_and_value(tmp_path):
    sd = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.full((4,), 7.0)}
    save_file(sd, str(tmp_path / "model.safetensors"))
    torch.save(sd, tmp_path / "weights.bin")
    for path in (tmp_path, tmp_path / "model.safetensors", tmp_path / "weights.bin"):
        for t in stored_tensors(path):  # read while the iterator is at its file
            assert t.shape == tuple(sd[t.key].shape)
            assert torch.equal(t.read(), sd[t.key])
    assert state_dict_files(tmp_path) == ([tmp_path / "model.safetensors"], None)
    with pytest.raises(FileNotFoundError, match="no weights there"):
        state_dict_files(tmp_path / "weights.pt")


def test_missing_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_release_state_dict(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_release_state_dict(tmp_path / "nope")


# ---- shapes at full size (no allocation) ---------------------------------------------------------------

def test_released_cvae_shapes_for_7b_and_13b():
    shapes = release_decoder_shapes(4096)
    assert shapes == {
        DEC + "cvae.enc_MLP.0.weight": (512, 2050), DEC + "cvae.enc_MLP.0.bias": (512,),
        DEC + "cvae.linear_means.weight": (256, 512), DEC + "cvae.linear_means.bias": (256,),
        DEC + "cvae.linear_log_var.weight": (256, 512), DEC + "cvae.linear_log_var.bias": (256,),
        DEC + "cvae.dec_MLP.0.weight": (512, 2304), DEC + "cvae.dec_MLP.0.bias": (512,),
        DEC + "cvae.dec_MLP.2.weight": (2, 512), DEC + "cvae.dec_MLP.2.bias": (2,),
    }
    for hidden_size in (4096, 5120):
        release = release_decoder_shapes(hidden_size)
        with torch.device("meta"):
            ours = CVAETrajectoryDecoder(hidden_size // 2)
        mapped, _ = release_to_ours({k: torch.empty(s, device="meta") for k, s in release.items()})
        assert {k: tuple(v.shape) for k, v in mapped.items()} == {
            "traj_decoder." + k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert release_decoder_shapes(5120)[DEC + "cvae.dec_MLP.0.weight"] == (512, 256 + 2560)


def test_released_unused_shapes_7b():
    shapes = release_unused_shapes(4096)
    assert shapes["hand_traj_positional_embedding.weight"] == (2048, 2)
    assert shapes["time_embedding"] == (20, 4096)
    assert shapes["feat_fusion.0.weight"] == (1024, 1088)
    assert shapes["bbox_to_feature.0.weight"] == (32, 4) and shapes["bbox_to_feature.2.weight"] == (64, 32)
    assert shapes["downproject.weight"] == (1024, 1024)


# ---- vocabulary ---------------------------------------------------------------------------------------

def test_check_release_vocab():
    ids = release_added_token_ids()
    assert ids["<t0>"] == 32000 and ids["<t99>"] == 32099 and ids["<hand_traj>"] == 32100 and len(ids) == 101
    check_release_vocab(AddedTokensVocab(ids))
    wrong = dict(ids, **{"<hand_traj>": 32000})
    with pytest.raises(AssertionError, match="hand_traj"):
        check_release_vocab(AddedTokensVocab(wrong))
    missing = {k: v for k, v in ids.items() if k != "<t5>"}
    with pytest.raises(AssertionError, match="<t5>"):
        check_release_vocab(AddedTokensVocab(missing))


def test_check_release_vocab_with_hf_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(32000)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.add_tokens([f"<t{i}>" for i in range(100)])
    tok.add_tokens(["<hand_traj>"])
    check_release_vocab(tok)


def test_load_checks_added_tokens_json(tmp_path):
    sd, _ = fake_release_state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "added_tokens.json").write_text(json.dumps(release_added_token_ids()))
    assert "projector.weight" in load_release_checkpoint(tmp_path)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<hand_traj>": 32000}))
    with pytest.raises(AssertionError):
        load_release_checkpoint(tmp_path)
    load_release_checkpoint(tmp_path, check_vocab=False)


def test_vision_keys_fit_our_vision_tower():
    vision = pytest.importorskip("handsonvlm.vision")
    tower = vision.VisionTower(config=dict(hidden_size=CLIP_D, intermediate_size=CLIP_FFN,
                                           num_hidden_layers=CLIP_LAYERS, num_attention_heads=2,
                                           image_size=28, patch_size=14))
    sd, _ = fake_release_state_dict()
    mapped, _ = release_to_ours(sd, include_vision=True)
    ours_vision = {k for k in mapped if k.startswith("vision.")}
    assert ours_vision == {"vision." + k for k in tower.state_dict()}
