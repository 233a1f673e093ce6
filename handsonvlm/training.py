"""The framework-free half of the training recipe: set-up, batches, evaluation, one plain step.

The Ray Train worker (pipelines/train_worker.py) hands the model, optimizer and scheduler built
here to DeepSpeed; the benchmark's plain loop and the golden regression test run them in plain
PyTorch. One definition keeps their set-up identical. No Ray or DeepSpeed here.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from handsonvlm.config import ModelConfig, TrainConfig
from handsonvlm.data import collate, max_text_tokens
from handsonvlm.mixture import Mixture, make_example
from handsonvlm.model import HandsOnVLM
from handsonvlm.templates import PROJECT_TEMPLATES, TemplateSet

FIXED_BATCH_SEED = 1234  # CVAE noise of the fixed-batch loss, identical before and after a restore
LOSS_PARTS = ("loss", "text_loss", "traj_loss", "kl_loss")  # what the model's forward returns, logged per step

# rows (with their shard ``path``) -> frame_means [B, F, C], frame_grids [B, F, G, C] float32
FeatureFn = Callable[[list[dict]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TrainingParts:
    """What one training run optimises: the model, its trainable parameters, the optimizer, the
    LR schedule (stepped once per optimizer step) and the seeded task mixture."""

    model: HandsOnVLM
    trainable: list[nn.Parameter]
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    mixture: Mixture


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to 0 (or constant), as the release's HF cosine schedule."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_training(train_cfg: TrainConfig, model_cfg: ModelConfig, total_steps: int,
                   templates: TemplateSet = PROJECT_TEMPLATES) -> TrainingParts:
    """The model (from ``train_cfg.seed``: identical initial weights in every process), AdamW over
    its trainable parameters, the LR schedule over ``total_steps`` optimizer steps and the mixture
    (its conversations made of ``templates``).

    The construction order is part of the result: the model draws its initial weights from the
    global torch RNG right after the seed is set."""
    torch.manual_seed(train_cfg.seed)
    model = HandsOnVLM(model_cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train_cfg.lr, betas=train_cfg.betas, eps=train_cfg.eps,
                                  weight_decay=train_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, train_cfg.warmup_ratio, train_cfg.lr_schedule))
    mixture = Mixture.from_config(train_cfg.to_dict(), model_cfg=model_cfg, templates=templates)
    return TrainingParts(model, trainable, optimizer, scheduler, mixture)


def has_flash_attn() -> bool:
    try:
        importlib.import_module("flash_attn")
        return True
    except ImportError:
        return False


def resolve_attn_implementation(cfg: ModelConfig, use_cuda: bool) -> None:
    """``attn_implementation: auto`` -> flash-attention 2 on GPUs that have it, else SDPA (in place)."""
    if cfg.lm.attn_implementation == "auto":
        cfg.lm.attn_implementation = "flash_attention_2" if use_cuda and has_flash_attn() else "sdpa"


def no_frames(row: Mapping) -> None:
    """``frames_fn`` of :func:`handsonvlm.mixture.make_example` when cached features replace the
    frames: no JPEG decoding."""
    return None


def rows_to_batch(rows: list[Mapping], model: HandsOnVLM, mixture: Mixture, epoch: int, device: torch.device,
                  features: FeatureFn | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Shard rows -> a :meth:`HandsOnVLM.forward` batch on ``device`` and the task drawn for each row.

    input_ids, attention_mask, labels [B, L]; future_hands [B, 2, T, 2]; future_valid [B, 2]; and
    either frames [B, F, 3, S, S] (JPEGs decoded here) or, with ``features``, the cached
    frame_means [B, F, C] and frame_grids [B, F, G, C]."""
    examples, tasks = [], []
    frames_fn = no_frames if features is not None else None
    for row in rows:
        example = make_example(row, model.cfg, model.tokenizer, mixture, epoch, frames_fn=frames_fn,
                               image_size=model.vision.image_size)
        examples.append(example)
        tasks.append(example.task)
    slow_tokens = (model.vision.grid // model.cfg.spatial_pool) ** 2  # pooled patch grid of one slow frame
    n_visual = model.cfg.num_video_frames + model.cfg.num_slow_frames * slow_tokens
    batch = collate(examples, model.tokens.pad, max_text=max_text_tokens(model.cfg, n_visual))
    if features is not None:
        batch["frame_means"], batch["frame_grids"] = features(rows)
    return {k: v.to(device) for k, v in batch.items()}, tasks


def fixed_batch_loss(model: nn.Module, batch: dict[str, torch.Tensor],
                     forward: Callable[..., dict] | None = None) -> float:
    """Loss on a fixed batch with fixed CVAE noise: the same value before a save and after a restore.

    ``forward`` runs the model (default: ``model`` itself; the worker passes its DeepSpeed engine,
    whose ``module`` is ``model``). The model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        generator = torch.Generator(device=batch["input_ids"].device).manual_seed(FIXED_BATCH_SEED)
        out = (forward or model)(**batch, generator=generator)
    model.train(was_training)
    return float(out["loss"])


def plain_step(parts: TrainingParts, batch: dict[str, torch.Tensor], generator: torch.Generator,
               max_grad_norm: float) -> dict[str, torch.Tensor]:
    """One optimizer step in plain PyTorch, the counterpart of the worker's DeepSpeed forward,
    ``backward`` and ``step``: forward, backward, gradient clipping, AdamW, the LR schedule.
    Returns the forward's outputs (``loss`` and its parts, see :data:`LOSS_PARTS`)."""
    out = parts.model(**batch, generator=generator)
    parts.optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(parts.trainable, max_grad_norm)
    parts.optimizer.step()
    parts.scheduler.step()
    return out
