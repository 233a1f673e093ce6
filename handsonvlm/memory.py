"""Per-GPU memory of a training run, estimated from its config without building the model.

``train.py --dry-run`` prints :func:`estimate_training_memory` as ``memory_per_gpu_gib``. The parts:

* **Parameters by part** from the architecture alone: the LLaMA LM and a CLIP tower by the formulas of
  :func:`llama_parameters` / :func:`clip_vision_parameters` (tests/test_memory_estimate.py checks them
  against real models built from the same configs), the projector ``C x D + D``, the trajectory decoder
  built on the ``meta`` device (no memory). A ``pretrained`` directory is read through its
  ``config.json``; where it is not on this machine (a dry run on a laptop), the published architecture
  of a known directory name (:data:`KNOWN_ARCHITECTURES`) stands in, and the report says so.
* **Model states** by the ZeRO paper's rule (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
  Toward Training Trillion Parameter Models", section 3.1): mixed-precision Adam keeps 2 bytes of
  bf16 weights + 2 bytes of bf16 gradients + K = 12 bytes of fp32 master weights, momentum and
  variance per trained parameter (fp32 training: 4 + 4 + 12). ZeRO-2 partitions gradients and
  optimizer states over the N workers (2 + (2 + 12) / N), ZeRO-3 the weights too (16 / N). DeepSpeed
  also makes an fp32 copy of its gradient partition for the step (4 / N; its own estimator,
  ``estimate_zero{2,3}_model_states_mem_needs``, counts 18 = 2 + 4 + 12), and under ZeRO-3 gathers
  the largest layer's weights and gradients whole (4 bytes x its parameters, the estimator's figure).
  ZeRO++ hpZ adds a secondary copy of the weights partitioned over its group (2 / group size).
  Frozen parts (the vision tower) hold their weights only, whole, in ``model.vision.dtype``.
* **Communication buffers**: DeepSpeed's gradient-reduction and weight-gathering buckets at their
  configured sizes (configs/deepspeed/zero{2,3}.json), capped at the trained parameters.
* **Activations** (approximate): saved for backward per token in one decoder layer, in the
  activation dtype, are the layer input, each RMSNorm's normalised input and its output (x2), Q, the
  attention output, the residual sum (8 h), K and V (2 h_kv; SDPA/flash attention keeps no s x s
  scores) and the SwiGLU MLP's gate, up, activated-gate and product tensors (4 i):
  ``A = 8 h + 2 h_kv + 4 i`` elements, plus, in bf16, the fp32 copy each RMSNorm makes of its input
  (2 x 2 h bytes more). tests/test_memory_estimate.py counts the tensors a real LLaMA layer saves
  (``saved_tensors_hooks``) and finds exactly this. Without gradient checkpointing a micro-batch
  saves ``b x s x L x A``; with it (``model.lm.gradient_checkpointing``) each layer keeps only its
  input, ``b x s x L x h``, plus one layer's ``b x s x A`` while it is recomputed. The LM head's
  logits at the supervised positions cost ``b x s_text x V x (2 + 4 + 4)`` bytes (bf16 logits, the
  fp32 log-probabilities cross-entropy saves, their fp32 gradient), with every text position counted
  as supervised (an upper bound: answers are a few dozen tokens). ``s`` is ``model.max_length``
  unless given: the bound the collate truncates to. Not counted: the vision tower's forward (no
  gradient, chunked), the CUDA context and allocator fragmentation (add ~1-3 GiB).

Everything is approximate (within ~10-20 % for model states, more for activations); it is meant to
tell whether a preset fits a GPU before the first run, not to replace a measurement.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from handsonvlm.config import CONFIG_DIR, ModelConfig, TrainConfig

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2}
OPTIMIZER_STATE_BYTES = 12  # fp32 master weights + Adam momentum + variance: the ZeRO paper's K
FP32_BYTES = DTYPE_BYTES["fp32"]
FP32_GRADIENT_BYTES = FP32_BYTES  # DeepSpeed's fp32 copy of the gradient partition at the optimizer step
ZERO3_GATHERED_LAYER_BYTES = 4  # per parameter of the largest layer: its gathered weights and gradients
LOGIT_BYTES_BEYOND_ACTIVATION = 2 * FP32_BYTES  # fp32 log-probabilities saved by cross-entropy + their fp32 gradient
RMSNORMS_PER_LAYER = 2  # before the attention and before the MLP
MIXED_PRECISION_GPU = "bf16"  # train.precision auto on a GPU (the worker picks bf16 where supported)

# config.json of the directories the presets name (their published architectures), used only when the
# directory is not on this machine. Vicuna v1.3 is LLaMA-1's architecture; vocab before the added tokens.
KNOWN_ARCHITECTURES = {
    "vicuna-7b-v1.3": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                       "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                       "tie_word_embeddings": False},
    "vicuna-13b-v1.3": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                        "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
                        "tie_word_embeddings": False},
    "clip-vit-large-patch14": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                               "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "num_channels": 3},
}
CONFIG_JSON = "config.json"


# ------------------------------------------------------------------------------------------ parameters

def llama_parameters(config: dict, vocab_size: int) -> dict[str, int]:
    """Parameters of ``LlamaForCausalLM(LlamaConfig(**config, vocab_size=vocab_size))`` by part:
    ``embeddings`` (V h), ``layers`` (L x [attention h (n_q + 2 n_kv) d_head + n_q d_head h, SwiGLU MLP
    3 h i, two RMSNorms 2 h, biases where configured]), ``final_norm`` (h), ``lm_head`` (V h, 0 when tied),
    ``largest_layer`` (the biggest single module) and ``total``."""
    from transformers import LlamaConfig

    c = LlamaConfig(**{k: v for k, v in config.items() if k != "vocab_size"}, vocab_size=vocab_size)
    h, i, heads = c.hidden_size, c.intermediate_size, c.num_attention_heads
    kv_heads = c.num_key_value_heads or heads
    head_dim = getattr(c, "head_dim", None) or h // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    attention = h * (q + 2 * kv) + q * h + (q + 2 * kv + h if c.attention_bias else 0)
    mlp = 3 * h * i + (2 * i + h if c.mlp_bias else 0)
    layer = attention + mlp + 2 * h
    parts = {"embeddings": vocab_size * h, "layers": c.num_hidden_layers * layer, "final_norm": h,
             "lm_head": 0 if c.tie_word_embeddings else vocab_size * h}
    parts["largest_layer"] = max(vocab_size * h, h * i, h * q)
    parts["total"] = parts["embeddings"] + parts["layers"] + parts["final_norm"] + parts["lm_head"]
    return parts


def clip_vision_parameters(config: dict) -> int:
    """Parameters of ``CLIPVisionModel(CLIPVisionConfig(**config))``: patch embedding (3 p^2 h, no bias),
    class token and position embeddings ((P + 1) h + h), pre/post LayerNorms (4 h), and per layer
    four biased attention projections (4 h^2 + 4 h), two LayerNorms (4 h) and the MLP (2 h i + i + h)."""
    from transformers import CLIPVisionConfig

    c = CLIPVisionConfig(**config)
    h, i = c.hidden_size, c.intermediate_size
    patches = (c.image_size // c.patch_size) ** 2
    embeddings = c.num_channels * c.patch_size ** 2 * h + (patches + 1) * h + h
    layer = 4 * h * h + 4 * h + 4 * h + 2 * h * i + i + h
    return embeddings + 4 * h + c.num_hidden_layers * layer


def _architecture(part_cfg, part: str, notes: list[str]) -> dict:
    """The config dict of ``model.<part>``: its ``config``, else ``<pretrained>/config.json`` (a CLIP
    checkpoint's ``vision_config``), else the published one of a known directory name."""
    if part_cfg.config is not None:
        return dict(part_cfg.config)
    path = Path(part_cfg.pretrained)
    if (path / CONFIG_JSON).is_file():
        config = json.loads((path / CONFIG_JSON).read_text())
        return dict(config.get("vision_config", config)) if part == "vision" else config
    known = KNOWN_ARCHITECTURES.get(path.name)
    if known is None:
        raise FileNotFoundError(f"model.{part}.pretrained {str(path)!r}: no {CONFIG_JSON} here and not one of the "
                                f"known architectures {sorted(KNOWN_ARCHITECTURES)}: cannot size it")
    notes.append(f"model.{part}: {path / CONFIG_JSON} is not here; sized as the published {path.name}")
    return dict(known)


def _lm_vocab_size(model_cfg: ModelConfig, architecture: dict) -> int:
    """The LM's vocabulary after the time and hand tokens are added: the tokenizer's length when the
    tokenizer is on this machine (what the model resizes to), else the architecture's vocabulary plus
    the tokens the model adds."""
    source = model_cfg.lm.tokenizer or model_cfg.lm.pretrained
    if source is None or Path(source).is_dir():
        from handsonvlm.tokens import load_tokenizer

        return len(load_tokenizer(model_cfg))
    return architecture["vocab_size"] + model_cfg.num_time_tokens + 1  # + <t0>..<tN-1> + the hand token


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters by part of a HandsOnVLM config. ``lm_architecture``: the LlamaConfig keys used;
    ``notes``: where an architecture came from when its directory is missing."""

    lm: int
    lm_largest_layer: int
    vision: int
    projector: int
    decoder: int
    vision_width: int
    num_visual_tokens: int
    lm_vocab_size: int
    lm_architecture: dict = field(repr=False)
    notes: tuple[str, ...] = ()

    @property
    def trainable(self) -> int:
        return self.lm + self.projector + self.decoder

    @property
    def frozen(self) -> int:
        return self.vision


def parameter_counts(model_cfg: ModelConfig) -> ParameterCounts:
    """Parameters of the model ``model_cfg`` describes, by part, without building the LM or the CLIP tower."""
    import torch

    from handsonvlm.traj_decoder import build_traj_decoder
    from handsonvlm.vision import EFFICIENTNET_LITE0_GRID, EFFICIENTNET_LITE0_WIDTH, num_video_tokens

    notes: list[str] = []
    lm_arch = _architecture(model_cfg.lm, "lm", notes)
    vocab = _lm_vocab_size(model_cfg, lm_arch)
    lm = llama_parameters(lm_arch, vocab)
    hidden = lm_arch["hidden_size"]
    if model_cfg.vision.kind == "clip":
        vision_arch = _architecture(model_cfg.vision, "vision", notes)
        vision = clip_vision_parameters(vision_arch)
        width, grid = vision_arch["hidden_size"], vision_arch["image_size"] // vision_arch["patch_size"]
    else:  # a small fixed architecture (EfficientNet-Lite0, ~3.4M): built and counted
        from handsonvlm.vision import build_tower

        vision = sum(p.numel() for p in build_tower(model_cfg.vision).parameters())
        width, grid = EFFICIENTNET_LITE0_WIDTH, EFFICIENTNET_LITE0_GRID
    with torch.device("meta"):  # shapes only, no memory
        decoder = build_traj_decoder(model_cfg.traj_decoder, hidden // 2, model_cfg.decoder_hidden,
                                     model_cfg.decoder_latent)
    visual = num_video_tokens(grid, model_cfg.num_video_frames, model_cfg.num_slow_frames, model_cfg.spatial_pool)
    return ParameterCounts(lm=lm["total"], lm_largest_layer=lm["largest_layer"], vision=vision,
                           projector=width * hidden + hidden, decoder=sum(p.numel() for p in decoder.parameters()),
                           vision_width=width, num_visual_tokens=visual, lm_vocab_size=vocab,
                           lm_architecture=lm_arch, notes=tuple(notes))


# ------------------------------------------------------------------------------------------ bytes

def model_state_bytes(trainable: int, frozen: int, *, weight_bytes: int, frozen_bytes: int, zero_stage: int,
                      world_size: int, largest_layer: int = 0,
                      hpz_partition_size: int | None = None) -> dict[str, float]:
    """Bytes per GPU of the weights, gradients and optimizer states (module docstring's rule):

    ======================  ==========================  ===========================
    part                    ZeRO-2                      ZeRO-3
    ======================  ==========================  ===========================
    weights                 w x T                       w x T / N
    gradients               w x T / N                   w x T / N
    optimizer_states        12 x T / N                  12 x T / N
    fp32_gradients          4 x T / N (w < 4)           4 x T / N (w < 4)
    gathered_layer          0                           4 x largest layer
    hpz_secondary_weights   0                           w x T / group size (hpZ on)
    frozen_weights          f x F                       f x F
    ======================  ==========================  ===========================

    with T trained and F frozen parameters, w = ``weight_bytes`` (2 bf16, 4 fp32), f = ``frozen_bytes``,
    N = ``world_size``."""
    if zero_stage not in (2, 3):
        raise ValueError(f"ZeRO stage must be 2 or 3, got {zero_stage}")
    n = world_size
    hpz = hpz_partition_size or 1
    return {
        "weights": weight_bytes * trainable / (n if zero_stage == 3 else 1),
        "gradients": weight_bytes * trainable / n,
        "optimizer_states": OPTIMIZER_STATE_BYTES * trainable / n,
        "fp32_gradients": FP32_GRADIENT_BYTES * trainable / n if weight_bytes < FP32_GRADIENT_BYTES else 0.0,
        "gathered_layer": ZERO3_GATHERED_LAYER_BYTES * largest_layer if zero_stage == 3 else 0.0,
        "hpz_secondary_weights": weight_bytes * trainable / hpz if zero_stage == 3 and hpz > 1 else 0.0,
        "frozen_weights": float(frozen_bytes * frozen),
    }


def deepspeed_buffer_bytes(ds_zero: dict, zero_stage: int, trainable: int, weight_bytes: int) -> float:
    """DeepSpeed's communication buckets of a ``zero_optimization`` section, each capped at the trained
    parameters: ZeRO-2 reduces gradients into ``reduce_bucket_size`` buckets (two with ``overlap_comm``)
    and gathers updated weights in ``allgather_bucket_size`` ones; ZeRO-3 reduces into one
    ``reduce_bucket_size`` bucket and prefetches ``stage3_prefetch_bucket_size`` weights."""
    def bucket(key: str) -> int:
        return min(int(ds_zero.get(key, 0)), trainable)

    if zero_stage == 2:
        reduce = bucket("reduce_bucket_size") * (2 if ds_zero.get("overlap_comm") else 1)
        return float(weight_bytes * (reduce + bucket("allgather_bucket_size")))
    return float(weight_bytes * (bucket("reduce_bucket_size") + bucket("stage3_prefetch_bucket_size")))


def activation_bytes(lm_architecture: dict, micro_batch: int, sequence_length: int, text_length: int,
                     vocab_size: int, activation_bytes_per_element: int, checkpointing: bool) -> dict[str, float]:
    """Activations of one micro-batch (the module docstring's formula): ``layers`` (saved for backward by
    the decoder layers, checkpointing-aware) and ``logits`` (the LM head at ``text_length`` positions)."""
    h, i, layers = (lm_architecture[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
    heads = lm_architecture["num_attention_heads"]
    head_dim = lm_architecture.get("head_dim") or h // heads
    kv = (lm_architecture.get("num_key_value_heads") or heads) * head_dim
    # bytes one decoder layer saves per token: A elements in the activation dtype, and the RMSNorms' fp32
    # copies of their inputs where that dtype is narrower (LlamaRMSNorm normalises in fp32)
    per_token_layer = (activation_bytes_per_element * (8 * h + 2 * kv + 4 * i)
                       + RMSNORMS_PER_LAYER * h * (FP32_BYTES - activation_bytes_per_element))
    tokens = micro_batch * sequence_length
    if checkpointing:  # every layer's input, and one layer recomputed at a time in the backward
        saved = tokens * (layers * h * activation_bytes_per_element + per_token_layer)
    else:
        saved = tokens * layers * per_token_layer
    logits = micro_batch * text_length * vocab_size * (activation_bytes_per_element + LOGIT_BYTES_BEYOND_ACTIVATION)
    return {"layers": float(saved), "logits": float(logits)}


def training_precision(train_cfg: TrainConfig) -> str:
    """bf16 or fp32 as the worker will pick it for ``train.precision`` (auto: bf16 unless the run is on CPU)."""
    if train_cfg.precision != "auto":
        return train_cfg.precision
    return "fp32" if train_cfg.device == "cpu" else MIXED_PRECISION_GPU


def estimate_training_memory(model_cfg: ModelConfig, train_cfg: TrainConfig, sequence_length: int | None = None,
                             counts: ParameterCounts | None = None) -> dict:
    """Per-GPU memory of a training run in GiB: ``total``, ``parts`` (model states, buffers,
    activations), ``parameters`` (by part), and what it assumed (precision, sequence length, notes)."""
    counts = counts or parameter_counts(model_cfg)
    precision = training_precision(train_cfg)
    weight_bytes = DTYPE_BYTES[precision]
    world = train_cfg.num_workers
    states = model_state_bytes(counts.trainable, counts.frozen, weight_bytes=weight_bytes,
                               frozen_bytes=DTYPE_BYTES[model_cfg.vision.dtype], zero_stage=train_cfg.zero_stage,
                               world_size=world, largest_layer=counts.lm_largest_layer,
                               hpz_partition_size=train_cfg.zero_hpz_partition_size)
    ds = json.loads((CONFIG_DIR / "deepspeed" / f"zero{train_cfg.zero_stage}.json").read_text())
    buffers = deepspeed_buffer_bytes(ds["zero_optimization"], train_cfg.zero_stage, counts.trainable, weight_bytes)
    seq = sequence_length or model_cfg.max_length
    text = max(seq - counts.num_visual_tokens, 0)
    acts = activation_bytes(counts.lm_architecture, train_cfg.micro_batch_size, seq, text, counts.lm_vocab_size,
                            weight_bytes, model_cfg.lm.gradient_checkpointing)
    parts = {**states, "deepspeed_buffers": buffers, "activations_layers": acts["layers"],
             "activations_logits": acts["logits"]}
    gib = {name: round(value / GIB, 3) for name, value in parts.items()}
    return {
        "total": round(sum(parts.values()) / GIB, 2),
        "model_states": round(sum(states.values()) / GIB, 2),
        "activations": round((acts["layers"] + acts["logits"]) / GIB, 2),
        "parts": gib,
        "parameters": {"lm": counts.lm, "vision_frozen": counts.vision, "projector": counts.projector,
                       "decoder": counts.decoder, "trainable": counts.trainable},
        "assumes": {"precision": precision, "zero_stage": train_cfg.zero_stage, "world_size": world,
                    "micro_batch": train_cfg.micro_batch_size, "sequence_length": seq,
                    "supervised_text_positions": text, "gradient_checkpointing": model_cfg.lm.gradient_checkpointing,
                    "zero_hpz_partition_size": train_cfg.zero_hpz_partition_size},
        "notes": list(counts.notes) + ["approximate (handsonvlm/memory.py): add ~1-3 GiB for the CUDA context and "
                                       "allocator fragmentation; activations are the bound at sequence_length with "
                                       "every text position supervised"],
    }
