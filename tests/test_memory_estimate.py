"""handsonvlm.memory: parameter counts against real models built from the same configs, the ZeRO
bytes rule against hand-computed values and DeepSpeed's own estimator, the activation formula
against the tensors a real LLaMA layer saves for backward, and the dry run's memory_per_gpu_gib."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlamaModel

from handsonvlm import memory
from handsonvlm.config import ModelConfig, TrainConfig, load_preset
from handsonvlm.model import HandsOnVLM
from handsonvlm.tokens import TINY_TOKENIZER_DIR

GIB = memory.GIB
# published sizes: LLaMA-7B / 13B (vocabulary 32,000) and CLIP ViT-L/14's vision model
LLAMA_7B_PARAMS, LLAMA_13B_PARAMS, CLIP_VIT_L14_VISION_PARAMS = 6_738_415_616, 13_015_864_320, 303_179_776
ADDED_TOKENS = 101  # 100 LITA time tokens + <hand_traj>


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def deepspeed_largest_layer(module: torch.nn.Module) -> int:
    """DeepSpeed's definition (estimate_zero3_model_states_mem_needs_all_live): the most parameters one module owns."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules())


@pytest.mark.parametrize("variant", [
    {},  # the tiny preset's shape: grouped-query attention, untied head
    {"num_key_value_heads": 4, "tie_word_embeddings": True},
    {"attention_bias": True, "mlp_bias": True, "head_dim": 8},
], ids=["gqa", "tied", "biases"])
def test_llama_formula_matches_a_real_model(variant):
    config = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": 2, **variant}
    model = LlamaForCausalLM(LlamaConfig(**config, vocab_size=1125))
    parts = memory.llama_parameters(config, 1125)
    assert parts["total"] == count(model)
    assert parts["layers"] == count(model.model.layers) and parts["embeddings"] == count(model.model.embed_tokens)
    assert parts["largest_layer"] == deepspeed_largest_layer(model)


def test_clip_formula_matches_a_real_tower():
    config = {"hidden_size": 32, "intermediate_size": 80, "num_hidden_layers": 3, "num_attention_heads": 2,
              "image_size": 48, "patch_size": 8}
    assert memory.clip_vision_parameters(config) == count(CLIPVisionModel(CLIPVisionConfig(**config)))


def test_tiny_preset_counts_equal_the_built_model_by_part():
    cfg = ModelConfig.from_dict(load_preset("tiny", [])["model"])
    counts = memory.parameter_counts(cfg)
    model = HandsOnVLM(cfg)
    assert (counts.lm, counts.vision, counts.projector, counts.decoder) == (
        count(model.lm), count(model.vision), count(model.projector), count(model.traj_decoder))
    assert counts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts.lm_vocab_size == len(model.tokenizer) and counts.lm_largest_layer == deepspeed_largest_layer(model.lm)
    assert counts.num_visual_tokens == cfg.num_video_frames + cfg.num_slow_frames * 4 * 4  # 8x8 grid pooled by 2


def test_presets_are_sized_as_the_published_models_without_their_files():
    """The presets' directories are not on this machine: the published architectures stand in, and the
    counts are the known sizes plus the 101 added embedding and head rows."""
    for preset, base, hidden in (("vicuna-7b", LLAMA_7B_PARAMS, 4096), ("vicuna-13b", LLAMA_13B_PARAMS, 5120)):
        counts = memory.parameter_counts(ModelConfig.from_dict(load_preset(preset, [])["model"]))
        assert counts.lm == base + 2 * ADDED_TOKENS * hidden, preset
        assert counts.vision == CLIP_VIT_L14_VISION_PARAMS and counts.num_visual_tokens == 356
        assert counts.projector == 1024 * hidden + hidden
        assert any("sized as the published vicuna" in n for n in counts.notes)
    with torch.device("meta"):  # the full-size models, shapes only: the table's architectures are those sizes
        lm = LlamaForCausalLM(LlamaConfig(**memory.KNOWN_ARCHITECTURES["vicuna-7b-v1.3"]))
        tower = CLIPVisionModel(CLIPVisionConfig(**memory.KNOWN_ARCHITECTURES["clip-vit-large-patch14"]))
    assert (count(lm), count(tower)) == (LLAMA_7B_PARAMS, CLIP_VIT_L14_VISION_PARAMS)


def test_a_pretrained_directory_is_read_through_its_config_json(tmp_path):
    lm_dir = tmp_path / "my-llama"
    LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=1024).save_pretrained(lm_dir)
    data = load_preset("tiny", [])["model"]
    data["lm"] = {**data["lm"], "config": None, "pretrained": str(lm_dir), "tokenizer": str(TINY_TOKENIZER_DIR)}
    counts = memory.parameter_counts(ModelConfig.from_dict(data))
    assert counts.lm_architecture["hidden_size"] == 48 and not counts.notes
    missing = {**data, "lm": {**data["lm"], "pretrained": str(tmp_path / "unknown-7b")}}
    with pytest.raises(FileNotFoundError, match="cannot size it"):
        memory.parameter_counts(ModelConfig.from_dict(missing))


def test_zero_bytes_rule_by_hand():
    """T = 1,000 trained, F = 100 frozen parameters; values computed by hand from the table in the docstring."""
    zero2 = memory.model_state_bytes(1000, 100, weight_bytes=2, frozen_bytes=2, zero_stage=2, world_size=4,
                                     largest_layer=10)
    assert zero2 == {"weights": 2000, "gradients": 500, "optimizer_states": 3000, "fp32_gradients": 1000,
                     "gathered_layer": 0, "hpz_secondary_weights": 0, "frozen_weights": 200}
    zero3 = memory.model_state_bytes(1000, 100, weight_bytes=2, frozen_bytes=2, zero_stage=3, world_size=8,
                                     largest_layer=10, hpz_partition_size=2)
    assert zero3 == {"weights": 250, "gradients": 250, "optimizer_states": 1500, "fp32_gradients": 500,
                     "gathered_layer": 40, "hpz_secondary_weights": 1000, "frozen_weights": 200}
    fp32 = memory.model_state_bytes(1000, 100, weight_bytes=4, frozen_bytes=4, zero_stage=3, world_size=8)
    assert fp32 == {"weights": 500, "gradients": 500, "optimizer_states": 1500, "fp32_gradients": 0,
                    "gathered_layer": 0, "hpz_secondary_weights": 0, "frozen_weights": 400}
    # the ZeRO paper's 7.5B example (section 3.1, N = 64): 120 GB without ZeRO, 16.6 GB P_os+g, 1.9 GB P_os+g+p
    paper = 7_500_000_000

    def paper_gb(stage, n):
        s = memory.model_state_bytes(paper, 0, weight_bytes=2, frozen_bytes=2, zero_stage=stage, world_size=n)
        return (s["weights"] + s["gradients"] + s["optimizer_states"]) / 1e9

    assert paper_gb(2, 1) == pytest.approx(120) and paper_gb(2, 64) == pytest.approx(16.64, abs=0.01)
    assert paper_gb(3, 64) == pytest.approx(1.875)
    with pytest.raises(ValueError, match="stage"):
        memory.model_state_bytes(1, 0, weight_bytes=2, frozen_bytes=2, zero_stage=1, world_size=1)


def test_model_states_against_deepspeeds_own_estimator():
    """DeepSpeed's estimate_zero{2,3}_model_states_mem_needs (no offload), 7B on 8 GPUs. ZeRO-2: 2 T + 18 T / N,
    exactly ours (18 = bf16 gradients 2 + fp32 gradient copy 4 + fp32 master weights 4 + Adam 8). ZeRO-3:
    4 x largest layer + 18 T / N, which leaves out one of the two partitioned bf16 tensors; ours counts the
    bf16 weight partition too: 2 T / N more (1.6 GiB here)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    counts = memory.parameter_counts(ModelConfig.from_dict(load_preset("vicuna-7b", [])["model"]))
    t, largest, n = counts.trainable, counts.lm_largest_layer, 8

    def ours(stage):
        return sum(memory.model_state_bytes(t, 0, weight_bytes=2, frozen_bytes=2, zero_stage=stage, world_size=n,
                                            largest_layer=largest).values())

    _, zero2 = estimate_zero2_model_states_mem_needs(t, num_gpus_per_node=n, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(t, largest, num_gpus_per_node=n, cpu_offload=False)
    assert ours(2) == pytest.approx(zero2, abs=1)
    assert ours(3) - zero3 == pytest.approx(2 * t / n, abs=1)


def saved_bytes_per_layer(dtype: torch.dtype, config: dict, batch: int, seq: int) -> float:
    """Bytes of the tensors two real LLaMA decoder layers save for backward, minus one layer's (storages counted
    once; the weights, which autograd also saves, excluded)."""
    model = LlamaModel(LlamaConfig(**config, vocab_size=64)).to(dtype)
    model.config._attn_implementation = "sdpa"
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    x = torch.randn(batch, seq, config["hidden_size"], dtype=dtype, requires_grad=True)
    position = model.rotary_emb(x, torch.arange(seq)[None])

    def saved_by(layers: int) -> int:
        storages: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = x
            for layer in model.layers[:layers]:
                h = layer(h, position_embeddings=position, attention_mask=None)
        return sum(storages.values())

    return saved_by(3) - saved_by(2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_activation_formula_matches_what_a_llama_layer_saves(dtype):
    config = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": 2}
    batch, seq = 2, 96
    measured = saved_bytes_per_layer(dtype, config, batch, seq)
    width = torch.finfo(dtype).bits // 8
    estimated = memory.activation_bytes(config, batch, seq, 0, 64, width, checkpointing=False)["layers"] / 3
    # what the formula leaves out: the RMSNorms' per-token rsqrt and the attention's log-sum-exp, a few floats
    assert 0.98 < measured / estimated < 1.02, (measured, estimated)
    checkpointed = memory.activation_bytes(config, batch, seq, 0, 64, width, checkpointing=True)["layers"]
    assert checkpointed == batch * seq * 3 * 64 * width + estimated


def test_activation_and_logit_bytes_by_hand():
    arch = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}
    # A = 8 x 8 + 2 x 8 + 4 x 16 = 144 elements per token and layer; bf16: 2 x 144 + 2 norms x 8 x (4 - 2) = 320 bytes
    plain = memory.activation_bytes(arch, 3, 10, 4, 100, 2, checkpointing=False)
    assert plain == {"layers": 3 * 10 * 2 * 320, "logits": 3 * 4 * 100 * (2 + 4 + 4)}
    assert memory.activation_bytes(arch, 3, 10, 4, 100, 2, checkpointing=True)["layers"] == 3 * 10 * (2 * 8 * 2 + 320)


def test_vicuna_7b_on_8_gpus_is_plausible():
    """The release's recipe (ZeRO-3, bf16, 8 x 16 samples, checkpointing): model states ~16.8 GiB per GPU, the
    total below an 80 GB GPU even at the 2048-token bound; ZeRO-2 keeps whole bf16 weights (+11 GiB)."""
    data = load_preset("vicuna-7b", [])
    model_cfg = ModelConfig.from_dict(data["model"])
    zero3 = memory.estimate_training_memory(model_cfg, TrainConfig.from_dict(data["train"]))
    zero2 = memory.estimate_training_memory(model_cfg, TrainConfig.from_dict({**data["train"], "zero_stage": 2}))
    assert zero3["assumes"] == {"precision": "bf16", "zero_stage": 3, "world_size": 8, "micro_batch": 16,
                                "sequence_length": 2048, "supervised_text_positions": 2048 - 356,
                                "gradient_checkpointing": True, "zero_hpz_partition_size": None}
    trained = zero3["parameters"]["trainable"]
    assert zero3["parts"]["weights"] == round(2 * trained / 8 / GIB, 3)
    assert zero2["parts"]["weights"] == round(2 * trained / GIB, 3)
    assert 15 < zero3["model_states"] < 18 and 26 < zero2["model_states"] < 29
    assert 30 < zero3["total"] < 60 and zero3["total"] < zero2["total"] < 80 * 1e9 / GIB
    shorter = memory.estimate_training_memory(model_cfg, TrainConfig.from_dict(data["train"]), sequence_length=440)
    assert shorter["activations"] < zero3["activations"] / 4 and shorter["model_states"] == zero3["model_states"]
    hpz = memory.estimate_training_memory(model_cfg, TrainConfig.from_dict(
        {**data["train"], "num_workers": 16, "zero_hpz_partition_size": 8}))
    assert hpz["parts"]["hpz_secondary_weights"] == round(2 * trained / 8 / GIB, 3)


def test_dry_run_prints_the_memory_estimate(tmp_path, capsys):
    from test_training_data import write_shards

    from pipelines import train as train_job

    write_shards(tmp_path / "samples" / "train")
    assert train_job.main(["--config", "vicuna-7b", "--data", str(tmp_path), "--dry-run"]) == 0
    report = json.loads(capsys.readouterr().out)
    estimate = report["memory_per_gpu_gib"]
    assert set(estimate) >= {"total", "model_states", "activations", "parts", "parameters", "assumes"}
    assert estimate["total"] == pytest.approx(sum(estimate["parts"].values()), abs=0.01)
    assert report["pg_timeout_s"] == 1800 and (report["device"], report["backend"]) == ("cuda", "nccl")
