"""GPU check: what one GPU does with the vicuna-7b-shaped HandsOnVLM, in one short run.

    python bench/gpu_check.py --out $OUT/gpu_check.json       # one H100/H200: 2-4 minutes expected
    python bench/gpu_check.py --tiny --out /tmp/gpu_check.json  # CPU, tiny preset, seconds (CI)

Needs only torch, transformers and safetensors (plus numpy and PyYAML, which transformers brings):
no Ray, DeepSpeed, MLflow, pyarrow or OpenCV. It imports ``handsonvlm.config``, ``.model``,
``.generation``, ``.vision`` (whose imports stay within those) and ``bench.scaling`` /
``bench.vision_bench``; never ``handsonvlm.data`` (OpenCV), ``.training`` or ``pipelines``.
Inputs are synthetic (random token ids, frames and targets); weights are random: nothing is read
or downloaded.

Sections, each wrapped so that a failure is recorded in the JSON and the next one still runs, and
skipped once the global ``--budget-s`` is spent:

* ``vision``: the frozen vision tower + LITA pooling + projector. The efficient path
  (``handsonvlm.vision.encode_video``: CLIP on the 10 unique frames, pool, project 356 tokens) on the
  device (tower in the preset's dtype, fp16 for vicuna-7b) vs the same path on the CPU in fp32, and
  vs the release's literal path (``video_tokens_literal``: 100 tiled frames, project every patch,
  then pool) on the device. ViT-L/14-sized random tower from ``bench/vision_bench.py``.
* ``train``: bf16 training steps of the vicuna-7b-shaped model (LlamaConfig of Vicuna-7B v1.3,
  vocabulary 32,101, random weights; CLIP ViT-L/14-sized tower, frozen, fp16), gradient
  checkpointing, SDPA attention (flash-attention 2 when ``flash_attn`` imports), micro-batch 16,
  356 visual + 84 text tokens, CLIP online; then the same with the tower's pooled features given
  (the feature cache). The optimizer is AdamW on bf16 parameters (``--optimizer adamw-bf16``: its two
  states are bf16 too, 8 bytes per parameter with the gradients, about 54 GB for 6.7B parameters),
  not the release's DeepSpeed recipe (fp32 master weights and states, 16 bytes per parameter, about
  108 GB, which with activations does not fit one 141 GB GPU and is sharded over 8 GPUs by ZeRO-3);
  ``--optimizer none`` measures forward + backward only. If a step runs out of memory the model is
  rebuilt with half the layers (down to 4) and the step time is also extrapolated to the full depth
  by the FLOP ratio; the JSON says which layer count was measured.
  MFU = model FLOPs per step / step time / ``--peak-tflops`` (989 TFLOP/s, H100/H200 bf16 dense).
  Model FLOPs are ``bench/scaling.py``'s count: trained LM matmuls 6 N s per sample (N = weight
  parameters of the decoder layers and lm_head, s = sequence length), LM attention 12 L s^2 d (full
  square, causal masking not discounted), projector 4 N_proj V (weight gradients only), the frozen
  tower's forward 2 N_vit (P + 1) per frame plus its attention; gradient-checkpointing recompute is
  not counted (model FLOPs, not hardware FLOPs). ``mfu_lm`` counts the LM terms alone.
* ``generate``: ``handsonvlm.generation.generate`` greedily on the same model: left-padded batches
  with the KV cache vs one clip at a time with the cache and without it (the release's way), in
  generated tokens/s. The EOS row of ``lm_head`` is zeroed first so that every answer of the random
  model runs to ``max_new_tokens`` (equal work on every side).
* ``dtypes``: the one dtype story (docs/MODEL.md, "Precision") on the device, with a
  ``--dtype-lm-layers``-deep (default 2) model of the preset's shape: every parameter of the module cast
  to bf16 (buffers kept), as DeepSpeed's bf16 mode casts the parameters it owns, then one ZeRO-free single-GPU bf16
  step (AdamW) with the tower online. Asserts that the frozen tower kept ``model.vision.dtype`` (fp16
  for vicuna-7b), is on the device and is not among the module's parameters, and that the loss is
  finite; that the training model's pooled features equal, bit for bit, those of a tower built as the
  feature cache builds it (``handsonvlm.vision.tower_features``); records how far clip-at-a-time
  features (the cache's ``rows_per_call=1``) are from the batched ones (cuBLAS may pick other kernels
  per batch size). Then the evaluation load: ``save_pretrained`` and
  ``HandsOnVLM.from_pretrained(dtype=torch.bfloat16)`` on the device (seconds, peak memory), the
  tower in its configured dtype, features and the fixed-noise eval loss equal to the trained model's.

The JSON (``--out``, default ``$OUT/gpu_check.json`` when ``$OUT`` is set, else
``bench/gpu_check.json``) is rewritten after every section, so a run that is killed keeps what it
measured. A short summary is printed at the end.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # runnable as a script from anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from bench.scaling import H100_BF16_DENSE_FLOPS, VICUNA, LMDims, VisionDims, training_flops_per_sample  # noqa: E402
from bench.vision_bench import NUM_SLOW, VITL14, tiny_setup, vitl_setup  # noqa: E402
from handsonvlm.config import ModelConfig, load_preset  # noqa: E402
from handsonvlm.generation import generate  # noqa: E402
from handsonvlm.model import IGNORE_INDEX, IMAGE_PLACEHOLDER, HandsOnVLM, build_vision_tower  # noqa: E402
from handsonvlm.vision import encode_video, tower_features, video_tokens_literal  # noqa: E402

SCHEMA = "handsonvlm-gpu-check/1"
SECTIONS = ("vision", "train", "generate", "dtypes")
FORBIDDEN_MODULES = ("ray", "deepspeed", "mlflow", "pyarrow", "cv2", "pandas")  # absent on the device machine
# Vicuna-7B v1.3's config.json (lmsys/vicuna-7b-v1.3), the architecture of configs/vicuna-7b.yaml's LM
VICUNA_7B_LM = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6, initializer_range=0.02,
                    tie_word_embeddings=False)
TEXT_TOKEN_RANGE = (3, 1024)  # ordinary BPE pieces of the tiny tokenizer (0-2 special, then time/hand tokens)
ANSWER_TOKENS = 24  # supervised tail of every synthetic sample: answer text with 4 <hand_traj> and </s>
MIN_LAYERS_ON_OOM = 4
DTYPE_LM_LAYERS = 2  # the dtypes section checks dtypes and loading, not speed: a shallow LM of the preset's width
GIB = 1 << 30


@dataclass(frozen=True)
class Plan:
    """Sizes of one run; ``FULL`` for a GPU, ``TINY`` for a CPU in seconds."""

    preset: str
    micro_batch: int
    text_tokens: int  # per training sample, BOS and </s> included (the image placeholder is not)
    lm_layers: int | None  # None: the preset's
    train_warmup: int
    train_steps: int
    cached_steps: int  # steps with the pooled features given (feature cache); 0: off
    vision_layers: int
    vision_device_clips: int
    vision_cpu_clips: int
    vision_reps: int
    gen_batch: int
    gen_single_clips: int
    max_new_tokens: int
    gen_reps: int


FULL = Plan(preset="vicuna-7b", micro_batch=16, text_tokens=84, lm_layers=None, train_warmup=2, train_steps=5,
            cached_steps=3, vision_layers=VITL14["num_hidden_layers"], vision_device_clips=4, vision_cpu_clips=1,
            vision_reps=3, gen_batch=16, gen_single_clips=4, max_new_tokens=64, gen_reps=2)
TINY = Plan(preset="tiny", micro_batch=4, text_tokens=84, lm_layers=None, train_warmup=1, train_steps=2,
            cached_steps=1, vision_layers=0, vision_device_clips=2, vision_cpu_clips=1, vision_reps=1,
            gen_batch=4, gen_single_clips=2, max_new_tokens=8, gen_reps=1)


# --------------------------------------------------------------------------------------------- plumbing

class Run:
    """The run's clock, budget, device and shared state (the model built by one section and reused)."""

    def __init__(self, args, plan: Plan):
        self.args, self.plan = args, plan
        self.start = time.perf_counter()
        self.device = torch.device(args.device)
        self.dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.dtype])
        self.model: HandsOnVLM | None = None
        self.model_info: dict = {}
        self.force_sdpa = False  # set when flash-attention 2 failed once: SDPA from then on
        self.attn_fallbacks: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.args.budget_s - self.elapsed()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], object]) -> tuple[float, object]:
        """Wall seconds of one call, the device synchronised before and after."""
        self.sync()
        start = time.perf_counter()
        result = fn()
        self.sync()
        return time.perf_counter() - start, result

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def log(message: str) -> None:
    print(f"[gpu_check] {message}", flush=True)


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:  # absent, or a stub that refuses to import
        return None


def flash_attn_available() -> bool:
    """Whether ``flash_attn`` imports (as ``handsonvlm.training.has_flash_attn``, which this
    script cannot import: handsonvlm.training pulls in handsonvlm.data and OpenCV)."""
    try:
        importlib.import_module("flash_attn")
        return True
    except Exception:
        return False


def device_info(device: torch.device) -> dict:
    info = {
        "device": str(device), "python": sys.version.split()[0], "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": _version("transformers"), "safetensors": _version("safetensors"),
        "numpy": _version("numpy"), "flash_attn": _version("flash_attn") if flash_attn_available() else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_name=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=props.total_memory / GIB, compute_capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count, bf16_supported=torch.cuda.is_bf16_supported())
        free, total = torch.cuda.mem_get_info(device)
        info["gpu_memory_free_gib_at_start"] = free / GIB
    return info


def peak_memory(run: Run) -> dict:
    """Peak GPU memory since the last reset (cuda), else the process's peak resident set (cpu)."""
    if run.device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(run.device) / GIB,
                "peak_memory_reserved_gib": torch.cuda.max_memory_reserved(run.device) / GIB,
                "peak_memory_kind": "torch.cuda.max_memory_allocated"}
    return {"peak_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
            "peak_memory_kind": "process max RSS (CPU run)"}


def reset_peak(run: Run) -> None:
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)


# --------------------------------------------------------------------------------------------- the model

def model_config(plan: Plan, layers: int | None, attn: str) -> ModelConfig:
    """The preset's model section with random weights: vicuna-7b's local checkpoint paths replaced by
    Vicuna-7B's LlamaConfig and a ViT-L/14-sized CLIP config (the tiny tokenizer; the vocabulary is
    resized to 32,101 afterwards). Gradient checkpointing on, ``attn`` attention."""
    model = copy.deepcopy(load_preset(plan.preset)["model"])
    if plan.preset != "tiny":
        model["lm"].update(pretrained=None, tokenizer=None, config=dict(VICUNA_7B_LM))
        model["vision"].update(pretrained=None, config=dict(VITL14, num_hidden_layers=plan.vision_layers))
    if "projector_init" in model:  # never read a pretrained projector
        model["projector_init"] = None
    model["lm"]["gradient_checkpointing"] = True
    model["lm"]["attn_implementation"] = attn
    if layers is not None:
        model["lm"]["config"]["num_hidden_layers"] = layers
    return ModelConfig.from_dict(model)


def build_model(run: Run, layers: int | None) -> HandsOnVLM:
    """HandsOnVLM with random weights built directly on the device in the run's dtype (LM, projector);
    the vision tower in the preset's dtype, the trajectory decoder in fp32 (it computes in fp32)."""
    plan = run.plan
    use_flash = run.device.type == "cuda" and not run.force_sdpa and flash_attn_available()
    attn = "flash_attention_2" if use_flash else "sdpa"
    run.model_info = {"attn_implementation": attn}  # what failed, should the build fail
    cfg = model_config(plan, layers, attn)
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    start = time.perf_counter()
    try:
        torch.set_default_dtype(run.dtype)
        with torch.device(run.device):
            model = HandsOnVLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    if plan.preset != "tiny":
        vocab = VICUNA[plan.preset]["vocab"]  # 32,000 + 100 time tokens + <hand_traj>
        model.lm.resize_token_embeddings(vocab, mean_resizing=False)
    model.lm.to(run.dtype)
    model.projector.to(run.dtype)
    model.traj_decoder.float()
    run.sync()
    lm_cfg = model.lm.config
    run.model_info = {
        "preset": plan.preset, "attn_implementation": attn, "lm_layers": lm_cfg.num_hidden_layers,
        "lm_layers_preset": preset_layers(plan),
        "hidden_size": lm_cfg.hidden_size, "vocab_size": model.lm.get_input_embeddings().num_embeddings,
        "vision_layers": model.vision.config.num_hidden_layers, "vision_dtype": str(model.vision.dtype),
        "lm_dtype": str(next(model.lm.parameters()).dtype), "gradient_checkpointing": True,
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "visual_tokens": n_visual(model), "build_s": time.perf_counter() - start,
    }
    return model


def preset_layers(plan: Plan) -> int:
    """The LM depth of the preset's model (Vicuna-7B: 32)."""
    if plan.preset == "tiny":
        return load_preset(plan.preset)["model"]["lm"]["config"]["num_hidden_layers"]
    return VICUNA_7B_LM["num_hidden_layers"]


def n_visual(model: HandsOnVLM) -> int:
    cfg = model.cfg
    return cfg.num_video_frames + cfg.num_slow_frames * (model.vision.grid // cfg.spatial_pool) ** 2


def synthetic_batch(model: HandsOnVLM, batch: int, text_tokens: int, device: torch.device, seed: int = 0) -> dict:
    """A training batch like the collator's, without padding: input_ids/labels/attention_mask [B, L]
    (L = text_tokens + 1: BOS, prompt, the image placeholder, prompt, a 24-token answer with 4
    ``<hand_traj>`` and ``</s>``, only the answer supervised), future_hands [B, 2, 4, 2],
    future_valid [B, 2], frames [B, F, 3, S, S]."""
    g = torch.Generator().manual_seed(seed)
    length = text_tokens + 1
    points = model.cfg.num_future_points
    if length < ANSWER_TOKENS + 8:
        raise ValueError(f"text_tokens must be at least {ANSWER_TOKENS + 7}")
    ids = torch.randint(*TEXT_TOKEN_RANGE, (batch, length), generator=g)
    ids[:, 0] = model.tokens.bos if model.tokens.bos is not None else ids[:, 0]
    ids[:, (length - ANSWER_TOKENS) // 2] = IMAGE_PLACEHOLDER
    hand_at = [length - ANSWER_TOKENS + 4 + 5 * k for k in range(points)]
    ids[:, hand_at] = model.tokens.hand
    ids[:, -1] = model.tokens.eos
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -ANSWER_TOKENS:] = ids[:, -ANSWER_TOKENS:]
    size = model.vision.image_size
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
           "future_hands": torch.rand(batch, 2, points, 2, generator=g),
           "future_valid": torch.ones(batch, 2, dtype=torch.bool),
           "frames": torch.randn(batch, model.cfg.num_obs_frames, 3, size, size, generator=g)}
    return {k: v.to(device) for k, v in out.items()}


def step_flops(model: HandsOnVLM, batch: int, seq: int, online_vision: bool) -> dict:
    """Model FLOPs of one training step of ``batch`` samples, by part (bench/scaling.py's count)."""
    lm_cfg, v_cfg = model.lm.config, model.vision.config
    heads = lm_cfg.num_attention_heads
    kv = lm_cfg.hidden_size * getattr(lm_cfg, "num_key_value_heads", heads) // heads
    lm = LMDims(lm_cfg.hidden_size, lm_cfg.num_hidden_layers, lm_cfg.intermediate_size,
                model.lm.get_input_embeddings().num_embeddings, kv_hidden=kv)
    vision = VisionDims(v_cfg.hidden_size, v_cfg.num_hidden_layers, v_cfg.intermediate_size, v_cfg.image_size,
                        v_cfg.patch_size)
    frames = model.cfg.num_obs_frames if online_vision else 0
    parts = training_flops_per_sample(lm, vision, seq, frames, n_visual(model))
    return {k: v * batch for k, v in parts.items()}


# --------------------------------------------------------------------------------------------- sections

def section_vision(run: Run) -> dict:
    """Efficient visual path on the device vs on the CPU (fp32), and vs the release's literal path."""
    plan = run.plan
    if plan.preset == "tiny":
        tower, projector, unique, video = tiny_setup()
        tiled = "tiny tower, tiled to 100 frames as the release"
    else:
        tower, projector, unique, video = vitl_setup(plan.vision_layers)
        tiled = "ViT-L/14-sized random CLIP, 100 tiled frames"
    vision_dtype = getattr(torch, load_preset(plan.preset)["model"]["vision"].get("dtype", "float32"))
    size = tower.image_size
    g = torch.Generator().manual_seed(1)
    cpu_frames = torch.randn(plan.vision_cpu_clips, unique, 3, size, size, generator=g)
    dev_frames = torch.randn(plan.vision_device_clips, unique, 3, size, size, generator=g).to(run.device)

    def efficient_on(tower_, projector_, frames):
        with torch.no_grad():
            return encode_video(frames, tower_, projector_, video, NUM_SLOW)

    # CPU, fp32: one frame as warm-up, then the clips once (a ViT-L/14 clip takes seconds there).
    efficient_on(tower, projector, cpu_frames[:1, :1])
    cpu_s, cpu_tokens = run.timed(lambda: efficient_on(tower, projector, cpu_frames))

    dev_tower = copy.deepcopy(tower).to(device=run.device, dtype=vision_dtype)
    dev_projector = copy.deepcopy(projector).to(device=run.device, dtype=run.dtype)

    def literal():
        with torch.no_grad():
            return video_tokens_literal(dev_frames, dev_tower, dev_projector, video, NUM_SLOW)

    def efficient():
        return efficient_on(dev_tower, dev_projector, dev_frames)

    literal_tokens, efficient_tokens = literal(), efficient()  # warm-up of both
    run.sync()
    diff_paths = (literal_tokens.float() - efficient_tokens.float()).abs().max().item()
    same_clip = efficient_on(dev_tower, dev_projector, cpu_frames.to(run.device)).float().cpu()
    diff_devices = (same_clip - cpu_tokens.float()).abs().max().item()
    del literal_tokens, efficient_tokens, same_clip
    seconds: dict[str, list[float]] = {"literal": [], "efficient": []}
    for rep in range(plan.vision_reps):
        if rep and run.remaining() < 0:
            break
        for name, fn in (("literal", literal), ("efficient", efficient)):
            seconds[name].append(run.timed(fn)[0])
    n = plan.vision_device_clips
    dev_rate = n / median(seconds["efficient"])
    cpu_rate = plan.vision_cpu_clips / cpu_s
    return {
        "what": f"{tiled}; efficient = encode_video (CLIP on {unique} unique frames, pool, project), literal = "
                "video_tokens_literal (CLIP on every tiled frame, project every patch, pool)",
        "vision_layers": tower.config.num_hidden_layers, "image_size": size, "visual_tokens": cpu_tokens.shape[1],
        "device_vision_dtype": str(vision_dtype), "device_projector_dtype": str(run.dtype),
        "cpu_dtype": "torch.float32", "cpu_threads": torch.get_num_threads(),
        "device_clips": n, "cpu_clips": plan.vision_cpu_clips,
        "device_efficient_s": seconds["efficient"], "device_literal_s": seconds["literal"], "cpu_efficient_s": cpu_s,
        "device_efficient_clips_per_s": dev_rate, "device_literal_clips_per_s": n / median(seconds["literal"]),
        "cpu_efficient_clips_per_s": cpu_rate,
        "device_over_cpu_speedup": dev_rate / cpu_rate,
        "efficient_over_literal_speedup": median(seconds["literal"]) / median(seconds["efficient"]),
        "max_abs_diff_literal_vs_efficient": diff_paths, "max_abs_diff_device_vs_cpu": diff_devices,
    }


def make_optimizer(run: Run, params: list[torch.nn.Parameter]):
    kind = run.args.optimizer
    if kind == "none":
        return None
    fused = {"fused": True} if run.device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **fused)


def measure_steps(run: Run, model: HandsOnVLM, optimizer, trainable, batch: dict, warmup: int, steps: int) -> dict:
    """Step seconds (forward, backward, clip to 1.0, optimizer step) after ``warmup`` untimed steps."""
    generator = torch.Generator(device=run.device).manual_seed(0)
    losses: list[float] = []

    def step():
        out = model(**batch, generator=generator)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(float(out["loss"].detach()))

    for _ in range(warmup):
        step()
    seconds: list[float] = []
    for i in range(steps):
        # after the first measured step, stop when the next one would overrun the budget
        if i and run.remaining() < 2 * max(seconds):
            break
        seconds.append(run.timed(step)[0])
    return {"step_s": seconds, "step_s_median": median(seconds), "losses": losses,
            "losses_finite": all(math.isfinite(x) for x in losses)}


def rates(run: Run, model: HandsOnVLM, measured: dict, batch: int, seq: int, online_vision: bool) -> dict:
    flops = step_flops(model, batch, seq, online_vision)
    total, t = sum(flops.values()), measured["step_s_median"]
    peak = run.args.peak_tflops * 1e12
    return {"samples_per_s": batch / t, "tokens_per_s": batch * seq / t,
            "model_tflop_per_step": total / 1e12, "achieved_tflop_per_s": total / t / 1e12,
            "mfu": total / t / peak, "mfu_lm": (flops["lm_linear"] + flops["lm_attention"]) / t / peak,
            "flops_parts_per_step": flops}


def train_once(run: Run, layers: int | None) -> dict:
    plan = run.plan
    reset_peak(run)
    model = build_model(run, layers)
    run.model = model
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(run, trainable)
    batch = synthetic_batch(model, plan.micro_batch, plan.text_tokens, run.device)
    seq = plan.text_tokens + n_visual(model)
    result = {"model": dict(run.model_info), "micro_batch": plan.micro_batch, "text_tokens": plan.text_tokens,
              "visual_tokens": n_visual(model), "seq_len": seq}
    online = measure_steps(run, model, optimizer, trainable, batch, plan.train_warmup, plan.train_steps)
    result["online"] = {**online, **rates(run, model, online, plan.micro_batch, seq, True), **peak_memory(run)}
    if plan.cached_steps and run.remaining() > 3 * online["step_s_median"]:
        with torch.no_grad():
            means, grids = model.frame_features(batch["frames"])
        cached_batch = {**{k: v for k, v in batch.items() if k != "frames"}, "frame_means": means,
                        "frame_grids": grids}
        cached = measure_steps(run, model, optimizer, trainable, cached_batch, 1, plan.cached_steps)
        result["cached_features"] = {**cached, **rates(run, model, cached, plan.micro_batch, seq, False)}
    del optimizer, trainable, batch
    model.zero_grad(set_to_none=True)
    run.free()
    return result


def section_train(run: Run) -> dict:
    plan = run.plan
    layers = plan.lm_layers
    attempts = []
    while True:
        attempt = layers or preset_layers(plan)
        error = None
        try:
            result = train_once(run, layers)
            break
        except torch.OutOfMemoryError as exc:
            error = str(exc).splitlines()[0][:300]
        except Exception as exc:
            if run.force_sdpa or run.model_info.get("attn_implementation") != "flash_attention_2":
                raise
            run.force_sdpa = True  # flash-attention 2 failed: the same depth again with SDPA
            run.attn_fallbacks.append(f"train: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            log(f"train: flash_attention_2 failed ({type(exc).__name__}), retrying with sdpa")
        # outside the except block: the traceback's frames (model, optimizer) are gone, memory can be freed
        run.model = None
        run.free()
        if error is None:
            continue
        attempts.append({"lm_layers": attempt, "error": error})
        if attempt // 2 < MIN_LAYERS_ON_OOM:
            raise RuntimeError(f"out of memory with every depth tried: {attempts}")
        layers = attempt // 2
        log(f"train: out of memory with {attempt} LM layers, retrying with {layers}")
    result["attn_fallbacks"] = list(run.attn_fallbacks)
    result["oom_attempts"] = attempts
    full_layers = run.model_info["lm_layers_preset"]
    result["measured_full_depth"] = run.model_info["lm_layers"] == full_layers
    optimizer = "none (forward + backward only)" if run.args.optimizer == "none" else (
        "torch.optim.AdamW on bf16 parameters (bf16 states), fused on CUDA; lr 2e-5, grad-norm clip 1.0")
    result["what"] = (f"{plan.preset}-shaped HandsOnVLM, random weights, {run.model_info['lm_layers']} of "
                      f"{full_layers} LM layers, {run.args.dtype}, gradient checkpointing, "
                      f"{run.model_info['attn_implementation']}; micro-batch {plan.micro_batch} x "
                      f"({result['visual_tokens']} visual + {plan.text_tokens} text tokens); optimizer: {optimizer}; "
                      "'online' runs the frozen tower on the frames, 'cached_features' gets its pooled features")
    result["optimizer"] = optimizer
    result["flops_formula"] = ("bench/scaling.py: lm_linear = 6 * N_matmul * s, lm_attention = 12 * L * s^2 * d "
                               "(full square), projector = 4 * N_proj * V, vision (frozen, online only) = forward "
                               "2 * N_vit * (P + 1) + 4 * L_v * (P + 1)^2 * d_v per frame; per sample, x micro-batch; "
                               "recompute of gradient checkpointing not counted")
    result["peak_tflops"] = run.args.peak_tflops
    trained = run.model_info["params_trained"]
    result["memory_context"] = {  # what the release's recipe would hold for the same parameters
        "this_run_bytes_per_trained_param": 8 if run.args.optimizer != "none" else 4,
        "release_recipe_bytes_per_trained_param": 16,
        "release_recipe_states_gib_one_gpu": 16 * trained / GIB,
        "release_recipe_states_gib_per_gpu_zero3_8_gpus": 16 * trained / GIB / 8,
        "note": "bf16 weights + grads + 2 bf16 AdamW states here; the release: bf16 weights + grads, fp32 master "
                "weights + 2 fp32 AdamW states (DeepSpeed bf16), sharded over 8 GPUs by ZeRO-3; activations extra",
    }
    if not result["measured_full_depth"]:
        # same MFU assumed: time scales with the model FLOPs of the full-depth model
        ratio = (sum(full_depth_flops(run, result).values())
                 / sum(result["online"]["flops_parts_per_step"].values()))
        result["online"]["samples_per_s_extrapolated_full_depth"] = result["online"]["samples_per_s"] / ratio
    return result


def full_depth_flops(run: Run, result: dict) -> dict:
    """Model FLOPs per step of the full-depth model, from the measured one's with layers scaled."""
    parts = dict(result["online"]["flops_parts_per_step"])
    model = run.model
    head = 2 * 3 * model.lm.config.hidden_size * model.lm.get_input_embeddings().num_embeddings \
        * result["seq_len"] * result["micro_batch"]  # lm_head, which does not scale with depth
    scale = run.model_info["lm_layers_preset"] / run.model_info["lm_layers"]
    parts["lm_linear"] = (parts["lm_linear"] - head) * scale + head
    parts["lm_attention"] *= scale
    return parts


def prompt_batch(model: HandsOnVLM, count: int, base_len: int, seed: int = 1) -> list[list[int]]:
    """``count`` generation prompts (BOS, text, the image placeholder, text), lengths varying by up
    to 7 tokens so that batches are left-padded."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for i in range(count):
        length = base_len - (i * 3) % 8
        ids = torch.randint(*TEXT_TOKEN_RANGE, (length,), generator=g).tolist()
        ids[0] = model.tokens.bos if model.tokens.bos is not None else ids[0]
        ids[length // 2] = IMAGE_PLACEHOLDER
        prompts.append(ids)
    return prompts


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def section_generate(run: Run) -> dict:
    if run.model is None:
        run.model = build_model(run, run.plan.lm_layers)
    try:
        return generate_sides(run, run.model.eval())
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:
        if run.model_info.get("attn_implementation") != "flash_attention_2":
            raise
        run.attn_fallbacks.append(f"generate: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        log(f"generate: flash_attention_2 failed ({type(exc).__name__}), retrying with sdpa")
    run.free()
    run.model.lm.set_attn_implementation("sdpa")
    run.model_info["attn_implementation"] = "sdpa"
    result = generate_sides(run, run.model.eval())
    result["attn_fallbacks"] = list(run.attn_fallbacks)
    return result


def generate_sides(run: Run, model: HandsOnVLM) -> dict:
    plan = run.plan
    reset_peak(run)
    with torch.no_grad():  # every answer runs to max_new_tokens: the same work on every side
        model.lm.lm_head.weight[model.tokens.eos] = 0
    n = max(plan.gen_batch, plan.gen_single_clips)
    prompts = prompt_batch(model, n, plan.text_tokens - ANSWER_TOKENS)
    size = model.vision.image_size
    frames = torch.randn(n, model.cfg.num_obs_frames, 3, size, size,
                         generator=torch.Generator().manual_seed(2)).to(run.device)

    def single(use_cache: bool, new_tokens: int):
        out = []
        for i in range(plan.gen_single_clips):
            ids, mask = left_pad(prompts[i:i + 1], model.tokens.pad)
            result = generate(model, ids.to(run.device), mask.to(run.device), frames=frames[i:i + 1],
                              temperature=0.0, max_new_tokens=new_tokens, use_cache=use_cache)
            out.append(result.token_ids[0, 0].tolist())
        return out

    def batched(new_tokens: int):
        ids, mask = left_pad(prompts[:plan.gen_batch], model.tokens.pad)
        result = generate(model, ids.to(run.device), mask.to(run.device), frames=frames[:plan.gen_batch],
                          temperature=0.0, max_new_tokens=new_tokens, use_cache=True)
        return [row[0] for row in result.token_ids.tolist()], int(result.hand_counts.sum())

    sides = {"batch1_uncached": lambda m: single(False, m), "batch1_cached": lambda m: single(True, m),
             "batched_cached": lambda m: batched(m)}
    for fn in sides.values():  # warm-up on short answers
        fn(min(4, plan.max_new_tokens))
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    outputs: dict[str, object] = {}
    for rep in range(plan.gen_reps):
        if rep and run.remaining() < sum(max(s) for s in seconds.values()):
            break
        for name, fn in sides.items():
            t, outputs[name] = run.timed(lambda fn=fn: fn(plan.max_new_tokens))
            seconds[name].append(t)
    batched_ids, hands = outputs["batched_cached"]
    tokens = {"batch1_uncached": sum(map(len, outputs["batch1_uncached"])),
              "batch1_cached": sum(map(len, outputs["batch1_cached"])),
              "batched_cached": sum(map(len, batched_ids))}
    tps = {name: tokens[name] / median(seconds[name]) for name in sides}
    cached_single = outputs["batch1_cached"]
    identical = [cached_single[i] == batched_ids[i] for i in range(min(plan.gen_single_clips, plan.gen_batch))]
    same_cache = [a == b for a, b in zip(outputs["batch1_uncached"], cached_single, strict=True)]
    return {
        "what": f"handsonvlm.generation.generate, greedy, {plan.max_new_tokens} new tokens per clip (EOS disabled), "
                f"prompts of ~{plan.text_tokens - ANSWER_TOKENS} text + {n_visual(model)} visual tokens, CLIP online "
                f"once per call; batched = {plan.gen_batch} clips left-padded with the KV cache, batch-1 = "
                f"{plan.gen_single_clips} clips one at a time",
        "model": dict(run.model_info), "max_new_tokens": plan.max_new_tokens, "batch": plan.gen_batch,
        "single_clips": plan.gen_single_clips, "generated_tokens": tokens, "side_seconds": seconds,
        "tokens_per_s": tps,
        "batched_over_batch1_cached": tps["batched_cached"] / tps["batch1_cached"],
        "batched_over_batch1_uncached": tps["batched_cached"] / tps["batch1_uncached"],
        "cached_over_uncached_batch1": tps["batch1_cached"] / tps["batch1_uncached"],
        "hand_tokens_generated_batched": hands,
        "greedy_rows_identical_batched_vs_batch1": sum(identical) / len(identical),
        "greedy_rows_identical_cached_vs_uncached": sum(same_cache) / len(same_cache),
        **peak_memory(run),
    }


def section_dtypes(run: Run) -> dict:
    """The dtype story on the device (module docstring): a bf16 ZeRO-free step with the tower outside the
    module, then the export loaded in bf16."""
    plan = run.plan
    run.model = None  # the train/generate model is not needed any more: free its memory first
    run.free()
    reset_peak(run)
    cfg = model_config(plan, run.args.dtype_lm_layers, "sdpa")
    configured = getattr(torch, cfg.vision.dtype)
    torch.manual_seed(0)
    with torch.device(run.device):
        model = HandsOnVLM(cfg)
    if plan.preset != "tiny":
        model.lm.resize_token_embeddings(VICUNA[plan.preset]["vocab"], mean_resizing=False)
    for param in model.parameters():  # what DeepSpeed's bf16 mode does: every parameter the module owns, not buffers
        param.data = param.data.to(torch.bfloat16)
    tower = model.vision
    tower_ids = {id(p) for p in tower.parameters()}
    in_module = any(id(p) in tower_ids for p in model.parameters())
    result = {"lm_layers": model.lm.config.num_hidden_layers, "configured_vision_dtype": cfg.vision.dtype,
              "vision_dtype": str(tower.dtype), "vision_device": str(tower.device),
              "lm_dtype": str(next(model.lm.parameters()).dtype),
              "decoder_dtype": str(next(model.traj_decoder.parameters()).dtype),
              "tower_in_module_parameters": in_module}
    if tower.dtype != configured or tower.device.type != run.device.type or in_module:
        raise AssertionError(f"the tower is not outside the module in its dtype: {result}")

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(run, trainable) or torch.optim.AdamW(trainable, lr=2e-5)
    batch = synthetic_batch(model, plan.micro_batch, plan.text_tokens, run.device)
    generator = torch.Generator(device=run.device).manual_seed(0)

    def step():
        out = model(**batch, generator=generator)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return out

    step_s, out = run.timed(step)
    result.update(bf16_step_s=step_s, bf16_step_loss=float(out["loss"].detach()),
                  bf16_step_loss_dtype=str(out["loss"].dtype), pred_dtype=str(out["pred"].dtype),
                  vision_dtype_after_step=str(tower.dtype), **peak_memory(run))
    if not math.isfinite(result["bf16_step_loss"]) or tower.dtype != configured:
        raise AssertionError(f"bf16 step: loss {result['bf16_step_loss']}, tower {tower.dtype}")
    optimizer.state.clear()  # the AdamW states are not needed any more
    del out

    frames = batch["frames"]
    online = model.frame_features(frames)
    cache_tower = build_vision_tower(cfg).to(run.device)  # as the features stage builds it
    cached = tower_features(cache_tower, frames, cfg.spatial_pool)
    per_clip = [tower_features(cache_tower, frames[i:i + 1], cfg.spatial_pool) for i in range(len(frames))]
    per_clip_means = torch.cat([m for m, _ in per_clip])
    result["features_dtype"] = str(online[0].dtype)
    result["features_bit_identical_training_vs_cache"] = all(torch.equal(a, b) for a, b in zip(online, cached))
    result["features_max_abs_diff_batched_vs_per_clip"] = float((per_clip_means.float() - online[0].float())
                                                                .abs().max())
    del cache_tower, cached, per_clip

    model.eval()
    with torch.no_grad():
        trained_loss = float(model(**batch, generator=torch.Generator(device=run.device).manual_seed(1))["loss"])
    with tempfile.TemporaryDirectory(prefix="gpu-check-export-") as directory:
        save_s, _ = run.timed(lambda: model.save_pretrained(directory))
        reset_peak(run)
        try:
            load_s, loaded = run.timed(lambda: HandsOnVLM.from_pretrained(directory, map_location=run.device,
                                                                          dtype=torch.bfloat16))
            result["eval_load"] = "HandsOnVLM.from_pretrained(dtype=torch.bfloat16)"
        except TypeError:  # a from_pretrained without the dtype argument: load, then cast (the tower keeps its dtype)
            load_s, loaded = run.timed(lambda: HandsOnVLM.from_pretrained(directory).to(run.device)
                                       .to(torch.bfloat16))
            result["eval_load"] = "HandsOnVLM.from_pretrained, then .to(bfloat16) (no dtype argument)"
        export_bytes = sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())
    loaded.eval()
    with torch.no_grad():
        loaded_loss = float(loaded(**batch, generator=torch.Generator(device=run.device).manual_seed(1))["loss"])
        loaded_features = loaded.frame_features(frames)
    result.update(export_save_s=save_s, eval_load_s=load_s, export_gib=export_bytes / GIB,
                  eval_load_peak_memory_gib=peak_memory(run)["peak_memory_gib"],
                  eval_vision_dtype=str(loaded.vision.dtype), eval_lm_dtype=str(next(loaded.lm.parameters()).dtype),
                  eval_features_bit_identical=all(torch.equal(a, b) for a, b in zip(loaded_features, online)),
                  eval_loss=loaded_loss, trained_eval_loss=trained_loss,
                  eval_loss_abs_diff=abs(loaded_loss - trained_loss))
    if loaded.vision.dtype != configured or not result["eval_features_bit_identical"]:
        raise AssertionError(f"evaluation load: tower {loaded.vision.dtype}, features equal "
                             f"{result['eval_features_bit_identical']}")
    return result


SECTION_FNS = {"vision": section_vision, "train": section_train, "generate": section_generate,
               "dtypes": section_dtypes}


# --------------------------------------------------------------------------------------------- report

def headline(report: dict) -> dict:
    """The numbers the summary prints (each None when its section did not succeed)."""
    s = report["sections"]

    def get(section, *keys):
        node = s.get(section, {})
        if node.get("status") != "ok":
            return None
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node

    return {
        "vision_device_over_cpu_speedup": get("vision", "device_over_cpu_speedup"),
        "vision_efficient_over_literal_speedup": get("vision", "efficient_over_literal_speedup"),
        "train_samples_per_s": get("train", "online", "samples_per_s"),
        "train_mfu": get("train", "online", "mfu"),
        "train_peak_memory_gib": get("train", "online", "peak_memory_gib"),
        "train_cached_samples_per_s": get("train", "cached_features", "samples_per_s"),
        "train_cached_mfu": get("train", "cached_features", "mfu"),
        "train_measured_lm_layers": get("train", "model", "lm_layers"),
        "generate_batched_tokens_per_s": get("generate", "tokens_per_s", "batched_cached"),
        "generate_batch1_cached_tokens_per_s": get("generate", "tokens_per_s", "batch1_cached"),
        "generate_batch1_uncached_tokens_per_s": get("generate", "tokens_per_s", "batch1_uncached"),
        "generate_batched_over_batch1_cached": get("generate", "batched_over_batch1_cached"),
        "dtypes_vision_dtype": get("dtypes", "vision_dtype"),
        "dtypes_bf16_step_loss": get("dtypes", "bf16_step_loss"),
        "dtypes_features_bit_identical_training_vs_cache": get("dtypes", "features_bit_identical_training_vs_cache"),
        "dtypes_eval_load_s": get("dtypes", "eval_load_s"),
    }


def _fmt(value, spec: str = ".3g") -> str:
    return "n/a" if value is None else format(value, spec)


def summary_lines(report: dict) -> list[str]:
    info, h, s = report["device_info"], report["headline"], report["sections"]
    where = info.get("gpu_name") or f"CPU ({info['cpu_count']} cores)"
    lines = [f"GPU check ({report['mode']}) on {where}: torch {info['torch']}, CUDA {info['cuda']}, "
             f"transformers {info['transformers']}; {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget"]
    for name in SECTIONS:
        node = s.get(name, {})
        status = node.get("status", "not run")
        if status == "error":
            lines.append(f"  {name:<9} ERROR: {node.get('error')}")
            continue
        if status != "ok":
            lines.append(f"  {name:<9} {status}: {node.get('reason', '')}")
            continue
        if name == "vision":
            dtype = node["device_vision_dtype"].replace("torch.", "")
            lines.append(f"  vision    efficient path {_fmt(node['device_efficient_clips_per_s'])} clips/s on "
                         f"{report['device_info']['device']} ({dtype}) vs {_fmt(node['cpu_efficient_clips_per_s'])} "
                         f"on the CPU (float32): {_fmt(h['vision_device_over_cpu_speedup'])}x; "
                         f"{_fmt(h['vision_efficient_over_literal_speedup'])}x the release's tiled-100 path there")
        elif name == "train":
            m = node["model"]
            lines.append(f"  train     {m['lm_layers']}/{m['lm_layers_preset']} layers, mb {node['micro_batch']} x "
                         f"{node['seq_len']} tokens: {_fmt(h['train_samples_per_s'])} samples/s, "
                         f"MFU {_fmt(100 * h['train_mfu'], '.1f')}% of {node['peak_tflops']:g} TFLOP/s, "
                         f"peak {_fmt(h['train_peak_memory_gib'], '.1f')} GiB; cached features "
                         f"{_fmt(h['train_cached_samples_per_s'])} samples/s")
            extra = node["online"].get("samples_per_s_extrapolated_full_depth")
            if extra is not None:
                lines.append(f"            (full depth extrapolated: {_fmt(extra)} samples/s)")
        elif name == "generate":
            lines.append(f"  generate  batch {node['batch']} KV-cached {_fmt(h['generate_batched_tokens_per_s'])} "
                         f"tokens/s vs batch-1 cached {_fmt(h['generate_batch1_cached_tokens_per_s'])} "
                         f"({_fmt(h['generate_batched_over_batch1_cached'])}x), batch-1 uncached "
                         f"{_fmt(h['generate_batch1_uncached_tokens_per_s'])}")
        elif name == "dtypes":
            lines.append(f"  dtypes    tower {node['vision_dtype'].replace('torch.', '')} outside the bf16 module, "
                         f"step loss {_fmt(node['bf16_step_loss'])}; features training = cache "
                         f"{node['features_bit_identical_training_vs_cache']} (per clip vs batched max diff "
                         f"{_fmt(node['features_max_abs_diff_batched_vs_per_clip'])}); bf16 eval load "
                         f"{_fmt(node['eval_load_s'])} s, {_fmt(node['export_gib'])} GiB export")
    return lines


def default_out() -> Path:
    out_dir = os.environ.get("OUT")
    return Path(out_dir) / "gpu_check.json" if out_dir else REPO_ROOT / "bench" / "gpu_check.json"


def write(report: dict, path: Path, run: Run) -> None:
    report["elapsed_s"] = run.elapsed()
    report["headline"] = headline(report)
    report["forbidden_modules_imported"] = sorted(m for m in FORBIDDEN_MODULES if m in sys.modules)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str, allow_nan=True))
    tmp.replace(path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU, tiny preset, seconds (CI)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: $OUT/gpu_check.json, else "
                                                          "bench/gpu_check.json)")
    p.add_argument("--budget-s", type=float, default=420.0, help="sections not started by then are skipped")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_FLOPS / 1e12,
                   help="peak dense TFLOP/s of the GPU in --dtype (H100/H200 bf16: 989)")
    p.add_argument("--device", default=None, help="default: cuda when available (cpu with --tiny)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="LM and projector dtype")
    p.add_argument("--optimizer", choices=("adamw-bf16", "none"), default="adamw-bf16",
                   help="none: forward + backward only")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--lm-layers", type=int, default=None, help="fewer LM layers than the preset's (default: all)")
    p.add_argument("--train-steps", type=int, default=None, help="measured training steps")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--gen-batch", type=int, default=None)
    p.add_argument("--gen-single-clips", type=int, default=None, help="clips generated one at a time")
    p.add_argument("--vision-layers", type=int, default=None, help="ViT-L/14 depth of the vision section's and the "
                   "model's tower (default 24)")
    p.add_argument("--vision-clips", type=int, default=None, help="vision section: clips per device call")
    p.add_argument("--dtype-lm-layers", type=int, default=DTYPE_LM_LAYERS, help="dtypes section: LM layers")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if args.tiny and args.device != "cpu":
        p.error("--tiny runs on the CPU")
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    plan = TINY if args.tiny else FULL
    overrides = {"micro_batch": args.micro_batch, "lm_layers": args.lm_layers, "train_steps": args.train_steps,
                 "max_new_tokens": args.max_new_tokens, "gen_batch": args.gen_batch,
                 "gen_single_clips": args.gen_single_clips, "vision_layers": args.vision_layers,
                 "vision_device_clips": args.vision_clips}
    plan = replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    out = args.out or default_out()
    run = Run(args, plan)
    if run.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the release (tf32 on)
        torch.backends.cudnn.allow_tf32 = True
    report = {"schema": SCHEMA, "mode": "tiny" if args.tiny else "full", "argv": sys.argv[1:] if argv is None
              else list(argv), "budget_s": args.budget_s, "plan": asdict(plan), "dtype": args.dtype,
              "device_info": device_info(run.device), "sections": {}}
    wanted = args.sections.split(",")
    for name in SECTIONS:
        if name not in wanted:
            report["sections"][name] = {"status": "skipped", "reason": "not in --sections"}
            continue
        if run.remaining() <= 0:
            report["sections"][name] = {"status": "skipped", "reason": f"budget of {args.budget_s:g} s spent"}
            log(f"{name}: skipped (budget spent)")
            continue
        log(f"{name}: start at {run.elapsed():.1f} s")
        start = time.perf_counter()
        try:
            result = SECTION_FNS[name](run)
            result["status"] = "ok"
        except Exception as exc:  # recorded, and the next section still runs
            result = {"status": "error", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
                      "traceback": traceback.format_exc()}
            if name == "train":
                run.model = None  # possibly half-built or out of memory: generation builds its own
        run.free()
        result["seconds"] = time.perf_counter() - start
        report["sections"][name] = result
        log(f"{name}: {result['status']} in {result['seconds']:.1f} s")
        write(report, out, run)
    write(report, out, run)
    print("\n".join(summary_lines(report)))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
