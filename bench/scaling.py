"""Scaling on paper: training FLOPs per sample from the model configs, checked against
``torch.utils.flop_counter.FlopCounterMode`` on the tiny model, and the GPU-hours the release
recipe (docs/MODEL.md, "The released training recipe": 40 epochs x 48,296 samples, Vicuna-7B/13B + CLIP ViT-L/14)
would take on H100s at a stated MFU, with the release's visual path, the efficient one, and the feature cache.

Counting conventions (those of FlopCounterMode, so the check is like for like):
  * a matmul [m, k] x [k, n] is 2 m k n FLOPs; attention scores and values are 2 s^2 d each per
    layer (full square, causal masking not discounted); norms, activations, softmax, embedding
    lookups are not counted;
  * training an LM layer is 3x its forward (backward = 2x forward); gradient checkpointing re-runs
    the forward (the recipe uses it) but MFU counts model FLOPs, so the 4th forward is not counted;
  * the frozen vision tower runs forward only (no gradient flows into it), all its layers (HF
    computes the last layer although the penultimate one is read);
  * the projector gets weight gradients but no input gradients: 2x its forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from handsonvlm.config import load_model_config

H100_BF16_DENSE_FLOPS = 989e12
MFU = 0.40
RECIPE_EPOCHS = 40
RECIPE_SAMPLES_PER_EPOCH = 48_296
EK100_TRAIN_CLIPS = 24_148  # unique clips whose features the cache computes once (48,296 = 2 x 24,148)
CHARS_PER_LLAMA_TOKEN = 4.0  # rule of thumb for LLaMA's SentencePiece on English text

# The presets name local Vicuna v1.3 / CLIP directories; their published architectures (config.json):
VICUNA = {
    "vicuna-7b": dict(hidden=4096, layers=32, ffn=11008, vocab=32101),
    "vicuna-13b": dict(hidden=5120, layers=40, ffn=13824, vocab=32101),
}
CLIP_VIT_L14 = dict(hidden=1024, layers=24, ffn=4096, image=224, patch=14)


@dataclass(frozen=True)
class LMDims:
    hidden: int
    layers: int
    ffn: int
    vocab: int
    kv_hidden: int | None = None  # K/V width (grouped-query attention); None = hidden

    def forward_flops(self, seq: int) -> dict[str, float]:
        """One sequence of ``seq`` tokens through the decoder and lm_head: matmuls with weights, and attention."""
        d, kv = self.hidden, self.kv_hidden or self.hidden
        per_token = self.layers * (2 * d * (2 * d + 2 * kv) + 2 * 3 * d * self.ffn) + 2 * d * self.vocab
        return {"linear": seq * per_token, "attention": self.layers * 2 * (2 * seq * seq * d)}


@dataclass(frozen=True)
class VisionDims:
    hidden: int
    layers: int
    ffn: int
    image: int
    patch: int

    @property
    def patches(self) -> int:
        return (self.image // self.patch) ** 2

    def forward_flops_per_frame(self) -> dict[str, float]:
        """Patch embedding + every encoder layer on 1 + P tokens (the CLS token included)."""
        d, tokens = self.hidden, self.patches + 1
        embed = 2 * self.patches * (3 * self.patch * self.patch) * d
        linear = tokens * (2 * 4 * d * d + 2 * 2 * d * self.ffn)
        return {"linear": embed + self.layers * linear, "attention": self.layers * 2 * (2 * tokens * tokens * d)}


def training_flops_per_sample(lm: LMDims, vision: VisionDims, seq: int, tower_frames: int,
                              projected_tokens: int) -> dict[str, float]:
    """Model FLOPs of one training sample, by part."""
    lm_fwd, frame = lm.forward_flops(seq), vision.forward_flops_per_frame()
    return {
        "lm_linear": 3 * lm_fwd["linear"],
        "lm_attention": 3 * lm_fwd["attention"],
        "vision_linear": tower_frames * frame["linear"],
        "vision_attention": tower_frames * frame["attention"],
        "projector": 2 * (2 * projected_tokens * vision.hidden * lm.hidden),
    }


def dims_of_tiny(cfg) -> tuple[LMDims, VisionDims]:
    lm_cfg, v_cfg = cfg.lm.config, cfg.vision.config
    heads, kv_heads = lm_cfg["num_attention_heads"], lm_cfg.get("num_key_value_heads", lm_cfg["num_attention_heads"])
    from handsonvlm.tokens import load_tokenizer

    lm = LMDims(lm_cfg["hidden_size"], lm_cfg["num_hidden_layers"], lm_cfg["intermediate_size"],
                len(load_tokenizer(cfg)), kv_hidden=lm_cfg["hidden_size"] * kv_heads // heads)
    vision = VisionDims(v_cfg["hidden_size"], v_cfg["num_hidden_layers"], v_cfg["intermediate_size"],
                        v_cfg["image_size"], v_cfg["patch_size"])
    return lm, vision


def measured_tiny_flops(model, batch: dict) -> dict[str, float]:
    """FlopCounterMode over one forward + backward of the tiny model on ``batch``, per sample and by part."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(**batch, generator=torch.Generator().manual_seed(0))["loss"].backward()
    model.zero_grad(set_to_none=True)
    counts = counter.get_flop_counts()
    n = batch["input_ids"].shape[0]

    def part(module: str) -> float:
        return sum(counts.get(module, {}).values()) / n

    # the frozen tower is not a submodule (it stays out of the DeepSpeed engine), so the counter's module
    # tree has no "HandsOnVLM.vision": its FLOPs are counted over the same frames on their own
    vision = FlopCounterMode(display=False)
    with vision, torch.no_grad():
        model.frame_features(batch["frames"])
    return {"total": counter.get_total_flops() / n, "lm": part("HandsOnVLM.lm.model") + part("HandsOnVLM.lm.lm_head"),
            "vision": vision.get_total_flops() / n, "projector": part("HandsOnVLM.projector")}


def validate_on_tiny(model, batch: dict) -> dict:
    """Analytic vs FlopCounterMode FLOPs per sample for the tiny model on one real batch.

    The batch is right-padded, so every row runs the padded length: the analytic count uses it too.
    FlopCounterMode has no formula for the CPU attention kernel
    (``_scaled_dot_product_flash_attention_for_cpu``), so the weight matmuls are compared exactly
    and the analytic attention FLOPs are reported beside them."""
    cfg = model.cfg
    lm, vision = dims_of_tiny(cfg)
    n_visual = cfg.num_video_frames + cfg.num_slow_frames * (model.vision.grid // cfg.spatial_pool) ** 2
    seq = batch["input_ids"].shape[1] - 1 + n_visual
    analytic = training_flops_per_sample(lm, vision, seq, cfg.num_obs_frames, n_visual)
    measured = measured_tiny_flops(model, batch)
    ratios = {"lm": analytic["lm_linear"] / measured["lm"], "vision": analytic["vision_linear"] / measured["vision"],
              "projector": analytic["projector"] / measured["projector"]}
    return {"seq_len": seq, "analytic_per_sample": analytic, "analytic_total_per_sample": sum(analytic.values()),
            "measured_per_sample": measured, "analytic_linear_over_measured": ratios,
            "attention_share_of_analytic": (analytic["lm_attention"] + analytic["vision_attention"])
            / sum(analytic.values())}


def mean_text_tokens(conversations: list[str]) -> float:
    """Estimated LLaMA tokens of rendered conversations: special tokens count 1, the rest chars / 4."""
    totals = []
    for text in conversations:
        hands = text.count("<hand_traj>")
        plain = text.replace("<hand_traj>", "").replace("<image>", "")
        totals.append(len(plain) / CHARS_PER_LLAMA_TOKEN + hands + 2)  # + <s>, </s>
    return sum(totals) / len(totals)


def project_recipe(preset: str, text_tokens: float, mfu: float = MFU) -> dict:
    """GPU-hours of the release recipe for one preset: release visual path, efficient path, + cache."""
    cfg = load_model_config(preset)
    lm = LMDims(**VICUNA[preset])
    vision = VisionDims(**CLIP_VIT_L14)
    grid_tokens = (vision.image // vision.patch // cfg.spatial_pool) ** 2
    n_visual = cfg.num_video_frames + cfg.num_slow_frames * grid_tokens  # 356
    seq = round(text_tokens) - 1 + n_visual
    samples = RECIPE_EPOCHS * RECIPE_SAMPLES_PER_EPOCH
    variants = {
        "release": training_flops_per_sample(
            lm, vision, seq, cfg.num_video_frames, cfg.num_video_frames * vision.patches
        ),
        "efficient": training_flops_per_sample(lm, vision, seq, cfg.num_obs_frames, n_visual),
        "efficient_cached": {**training_flops_per_sample(lm, vision, seq, 0, n_visual)},
    }
    cache_build = EK100_TRAIN_CLIPS * cfg.num_obs_frames * sum(vision.forward_flops_per_frame().values())
    out = {"seq_len": seq, "visual_tokens": n_visual, "samples": samples, "mfu": mfu,
           "peak_flops": H100_BF16_DENSE_FLOPS}
    for name, parts in variants.items():
        per_sample = sum(parts.values())
        total = per_sample * samples + (cache_build if name == "efficient_cached" else 0.0)
        out[name] = {"flops_per_sample": per_sample, "parts": parts, "total_flops": total,
                     "gpu_hours": total / (H100_BF16_DENSE_FLOPS * mfu) / 3600}
    out["efficient_cached"]["cache_build_flops"] = cache_build
    out["gpu_hours_saved_by_efficient"] = out["release"]["gpu_hours"] - out["efficient"]["gpu_hours"]
    out["speedup_efficient"] = out["release"]["gpu_hours"] / out["efficient"]["gpu_hours"]
    out["speedup_efficient_cached"] = out["release"]["gpu_hours"] / out["efficient_cached"]["gpu_hours"]
    return out
