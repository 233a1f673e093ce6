"""Typed model configuration, YAML presets and flat ``key=value`` overrides.

A preset (``configs/tiny.yaml``, ``configs/vicuna-7b.yaml``, ...) has a ``model:`` section that maps
onto :class:`ModelConfig`; later stages add their own sections (``train:``, ``eval:``). Overrides
use dotted keys into the whole file: ``model.mode=release``, ``model.lm.config.num_hidden_layers=4``.
Nothing here touches the network: weights are read only where a config names a local path.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

MODES = ("release", "corrected")
DECODERS = ("cvae", "mlp")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


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


@dataclass
class VisionConfig:
    """The frozen CLIP-style vision tower (``pretrained`` local directory or a tiny ``config``)."""

    pretrained: str | None = None
    config: dict | None = None
    select_layer: int = -2  # penultimate layer, as LLaVA/LITA
    dtype: str = "float32"  # the release ran CLIP in fp16 on GPUs
    # Seed of a randomly initialised tower: the frozen tower must be identical in every process
    # (training workers, the feature cache, evaluation), whatever the global RNG state.
    init_seed: int = 0


@dataclass
class ModelConfig:
    name: str = "tiny"
    # "release": reproduce the released HandsOnVLM where it matters for its weights and numbers
    # (KL reduction, zero-padded/last-4 hand tokens at generation); "corrected": fix its defects.
    mode: str = "corrected"
    lm: LMConfig = field(default_factory=LMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    num_obs_frames: int = 10  # unique frames per EPIC clip
    num_video_frames: int = 100  # LITA's fixed frame count; a 10-frame clip is tiled to it
    num_slow_frames: int = 4  # frames whose pooled patch grids become "slow" tokens
    spatial_pool: int = 2  # avg_pool2d kernel on the patch grid of the slow frames
    num_time_tokens: int = 100  # LITA <t0> ... <t99>
    hand_token: str = "<hand_traj>"
    image_token: str = "<image>"
    num_future_points: int = 4  # hand tokens per answer: +0.25 ... +1.0 s
    traj_decoder: str = "cvae"
    decoder_hidden: int = 512
    decoder_latent: int = 256
    z_scale: float = 2.0  # CVAE prior scale at inference (the release samples wider than training)
    hoi_lambda: float = 1.0
    lambda_kl: float = 1e-3
    max_length: int = 2048
    prompt_template: str = "vicuna_v1"

    def __post_init__(self):
        if isinstance(self.lm, dict):
            self.lm = LMConfig(**self.lm)
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        self.validate()

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"model.mode must be one of {MODES}, got {self.mode!r}")
        if self.traj_decoder not in DECODERS:
            raise ValueError(f"model.traj_decoder must be one of {DECODERS}, got {self.traj_decoder!r}")
        if self.mode == "release" and self.traj_decoder == "mlp":
            raise ValueError("the release's MLP decoder cannot train (its validity shapes disagree); "
                             "use traj_decoder=cvae, or mode=corrected for the fixed MLP decoder")
        for part, name in ((self.lm, "lm"), (self.vision, "vision")):
            if (part.pretrained is None) == (part.config is None):
                raise ValueError(f"model.{name}: give exactly one of 'pretrained' (a local path) or 'config'")
        if self.num_video_frames % self.num_obs_frames:
            raise ValueError("num_video_frames must be a multiple of num_obs_frames (frames are tiled)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        return cls(**copy.deepcopy(data))


@dataclass
class TrainConfig:
    """The ``train:`` section of a preset (consumed by pipelines/train.py)."""

    data: str = "runs/demo/data"  # preprocessing output root: samples/<split>/, features/<key>/
    split: str = "train"
    zero_stage: int = 2
    precision: str = "auto"  # auto | bf16 | fp32
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    lr_schedule: str = "cosine"  # cosine | constant
    warmup_ratio: float = 0.03
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    task_rates: dict = field(default_factory=lambda: {"vhp": 0.5, "rbhp": 0.5})
    rephrase_rate: float = 0.5
    feature_cache: str = "auto"  # auto | on | off
    export_dir: str = "runs/models"

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        for name in ("lr", "weight_decay", "eps", "max_grad_norm", "warmup_ratio", "rephrase_rate", "cpus_per_worker"):
            setattr(self, name, float(getattr(self, name)))  # YAML may give "1e-3" as a string
        if self.zero_stage not in (2, 3):
            raise ValueError(f"train.zero_stage must be 2 or 3, got {self.zero_stage}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"train.precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"train.lr_schedule must be cosine or constant, got {self.lr_schedule!r}")
        if isinstance(self.feature_cache, bool):  # YAML reads on/off as booleans
            self.feature_cache = "on" if self.feature_cache else "off"
        if self.feature_cache not in ("auto", "on", "off"):
            raise ValueError(f"train.feature_cache must be auto, on or off, got {self.feature_cache!r}")
        if min(self.num_workers, self.micro_batch_size, self.gradient_accumulation_steps, self.epochs) < 1:
            raise ValueError("train.num_workers, micro_batch_size, gradient_accumulation_steps and epochs must be >= 1")

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown train config keys {sorted(unknown)}")
        return cls(**copy.deepcopy(data))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["betas"] = list(self.betas)
        return out


def _parse_value(text: str):
    """``key=value`` override values use YAML scalars: 3, 1e-3, true, null, [1, 2], "text".

    YAML 1.1 reads ``1e-3`` (no dot) as a string; numbers written that way are still numbers."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
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
