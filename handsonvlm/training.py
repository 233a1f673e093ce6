"""The framework-free half of the training recipe: set-up, batches, evaluation, one plain step.

The Ray Train worker (pipelines/train_worker.py) hands the model, optimizer and scheduler built
here to DeepSpeed; the benchmark's plain loop and the golden regression test run them in plain
PyTorch. One definition keeps their set-up identical. No Ray here, and DeepSpeed only inside
:class:`Zero3Init`'s methods (imported when a ZeRO-3 worker builds its model), so that this module
imports without it.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from handsonvlm.compat import stored_tensors
from handsonvlm.config import ModelConfig, TrainConfig
from handsonvlm.data import collate, max_text_tokens
from handsonvlm.mixture import Mixture, make_example
from handsonvlm.model import PLAIN_INIT, TIED_LM_HEAD_KEY, VISION_PREFIX, HandsOnVLM, ModelInit
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
                   templates: TemplateSet = PROJECT_TEMPLATES, init: ModelInit | None = None) -> TrainingParts:
    """The model (from ``train_cfg.seed``: identical initial weights in every process), AdamW over
    its trainable parameters, the LR schedule over ``total_steps`` optimizer steps and the mixture
    (its conversations made of ``templates``).

    The construction order is part of the result: the model draws its initial weights from the
    global torch RNG right after the seed is set. ``init``: how its parameters are created; ``None``
    builds the whole model in this process (plain PyTorch, ZeRO-2), :class:`Zero3Init` partitions
    them over the ranks as they are created, with the same initial values (tests/test_zero3_init.py).
    ``train_cfg.init_weights`` then replaces those values (:func:`load_initial_weights`)."""
    torch.manual_seed(train_cfg.seed)
    model = HandsOnVLM(model_cfg, init=init or PLAIN_INIT)
    if train_cfg.init_weights:
        load_initial_weights(model, train_cfg.init_weights, init or PLAIN_INIT)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train_cfg.lr, betas=train_cfg.betas, eps=train_cfg.eps,
                                  weight_decay=train_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, train_cfg.warmup_ratio, train_cfg.lr_schedule))
    mixture = Mixture.from_config(train_cfg.to_dict(), model_cfg=model_cfg, templates=templates)
    return TrainingParts(model, trainable, optimizer, scheduler, mixture)


def load_initial_weights(model: HandsOnVLM, path: str | Path, init: ModelInit = PLAIN_INIT) -> int:
    """Replace the initial values of ``model``'s parameters with the weights at ``path``
    (``train.init_weights``: an export folder, DeepSpeed's zero_to_fp32 output, whole or sharded, or one
    safetensors/.bin file; see :func:`handsonvlm.compat.state_dict_files`); returns how many tensors
    were loaded.

    Keys are the model's own state-dict names (an export's, or zero_to_fp32's of a HandsOnVLM
    checkpoint). The frozen tower's ``vision.*`` keys, when present, replace the tower's weights (an
    export carries them; zero_to_fp32 output does not, and the tower then stays the configured one).
    Every trainable parameter must be there with its shape, and nothing else may be: a mismatch raises
    ``ValueError`` naming the keys. Under ZeRO-3 (``init``: :class:`Zero3Init`) each parameter is
    gathered on its own while it is written (``init.modify``), so no rank holds the whole model, and
    only rank 0, whose values are kept, reads the LM's tensors (the others check the shapes from the
    files' headers); every rank reads the tower's, which it holds whole."""
    params = dict(model.named_parameters())  # a tied LM head appears once, as the input embeddings
    tied = model.lm.config.tie_word_embeddings
    tower_state = model.vision.state_dict()
    loaded, unexpected, wrong_shape = set(), [], []
    for key, file_shape, read in stored_tensors(path):
        if key.startswith(VISION_PREFIX):
            target = tower_state.get(key[len(VISION_PREFIX):])
            if target is None:
                unexpected.append(key)
            elif tuple(target.shape) != file_shape:
                wrong_shape.append(f"{key} {file_shape} != {tuple(target.shape)}")
            else:
                target.copy_(read())
            continue
        if key == TIED_LM_HEAD_KEY and tied:
            continue  # the same tensor as the input embeddings (zero_to_fp32 writes shared weights twice)
        param = params.get(key)
        if param is None:
            unexpected.append(key)
            continue
        shape = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3: the whole shape of a partitioned param
        if file_shape != shape:
            wrong_shape.append(f"{key} {file_shape} != {shape}")
            continue
        with torch.no_grad(), init.modify([param]):
            if init.keeps_writes():
                param.data.copy_(read().to(param.dtype))
        loaded.add(key)
    missing = sorted(k for k, p in params.items() if p.requires_grad and k not in loaded)
    if missing or unexpected or wrong_shape:
        raise ValueError(f"train.init_weights={str(path)!r} does not fit this model (model.* of the preset): "
                         f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}, "
                         f"wrong shape {wrong_shape[:5]}")
    return len(loaded)


class Zero3Init(ModelInit):
    """DeepSpeed ZeRO-3 construction of :class:`HandsOnVLM`: no rank ever holds the whole model.

    * The LM is created under ``deepspeed.zero.Init(config_dict_or_path=ds_config)``: each module's
      parameters are partitioned over the ranks as soon as the module exists, so a rank holds its
      1/world share plus one module at a time. A pretrained LM is loaded with transformers'
      ``HfDeepSpeedConfig(ds_config)`` alive: ``from_pretrained`` then creates the model under
      zero.Init itself and rank 0 reads the checkpoint and scatters it module by module (the other
      ranks read only the keys and shapes), as transformers 5.23 does. ``resize_token_embeddings``
      and gradient checkpointing run with the config alive too (transformers gathers the old rows
      itself); the resized embeddings are partitioned right after.
    * Initial values equal the whole-model build's for the same seed: every rank draws the same
      numbers in the same order. Plain modules initialise themselves in their constructor, before
      zero.Init partitions them. transformers' ``post_init`` weight initialisation would run on
      the already partitioned (empty) parameters, so while constructing, ``PreTrainedModel.init_weights``
      is replaced by :func:`_gathered_init_weights` (every module's parameters gathered, the same
      draws on every rank, rank 0's kept), as transformers' own ``no_init_weights`` replaces it.
    * The projector and the trajectory decoder are created under zero.Init too; the projector's
      initial weights from ``model.projector_init`` are copied in with its parameters gathered.
    * The frozen vision tower is built whole, outside zero.Init, in its configured dtype, and is not a
      submodule of the model (``handsonvlm.vision.FrozenTower``): ``deepspeed.initialize`` never sees it,
      so ZeRO-3 neither partitions nor gathers it and the bf16 mode does not cast it (docs/MODEL.md,
      "Precision"; docs/CLUSTER.md, "5. Scaling").

    ``ds_config`` is the worker's DeepSpeed config (its ``bf16`` setting decides the partitions'
    dtype). ``deepspeed.comm`` is set up on the existing ``torch.distributed`` process group (Ray
    Train's) before the first zero.Init, as ``deepspeed.initialize`` would: zero.Init reads the world
    size from it to check the config's batch sizes."""

    def __init__(self, ds_config: dict):
        self.ds_config = ds_config

    @staticmethod
    def _init_comm() -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if not deepspeed.comm.is_initialized():
            deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())

    @contextmanager
    def transformers(self) -> Iterator[None]:
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        self._init_comm()
        hf_config = HfDeepSpeedConfig(self.ds_config)  # transformers holds a weak reference: alive while in here
        try:
            yield
        finally:
            unset_hf_deepspeed_config()
            del hf_config

    @contextmanager
    def construct(self) -> Iterator[None]:
        import deepspeed
        from transformers.integrations.deepspeed import prevent_arange_dtype_change
        from transformers.modeling_utils import PreTrainedModel

        self._init_comm()
        original = PreTrainedModel.init_weights
        PreTrainedModel.init_weights = _gathered_init_weights
        try:
            # prevent_arange_dtype_change keeps RoPE's arange-built buffers in their dtype (as transformers does)
            with prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=self.ds_config):
                yield
        finally:
            PreTrainedModel.init_weights = original

    def partition(self, module: torch.nn.Module) -> None:
        import deepspeed

        deepspeed.zero.Init(module=module, config_dict_or_path=self.ds_config)  # converts the not yet partitioned

    def modify(self, params: Iterable[nn.Parameter]) -> AbstractContextManager:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0)

    def keeps_writes(self) -> bool:
        return torch.distributed.get_rank() == 0


def _gathered_init_weights(model) -> None:
    """``PreTrainedModel.init_weights`` for a model whose modules are partitioned as they are created.

    The same traversal as ``PreTrainedModel.initialize_weights`` (children first, a sub-model with its
    own ``_initialize_weights``), but each module's parameters and its direct children's (which
    ``_init_weights`` may set) are gathered while it is initialised, and every rank runs the init:
    the same draws as the whole-model build, so the global RNG stays in step on every rank; rank 0's
    values are kept. transformers' ``initialize_weights_zero3`` draws on rank 0 only, which leaves the
    other ranks' RNG behind and gives other values than the whole-model build."""
    import deepspeed
    from transformers.initialization import guard_torch_init_functions
    from transformers.modeling_utils import PreTrainedModel

    custom = model.is_custom_code()

    def apply(module: nn.Module, fn) -> None:
        for child in module.children():
            apply(child, child._initialize_weights if isinstance(child, PreTrainedModel) else fn)
        if getattr(module, "_is_hf_initialized", False):
            return  # done by a sub-model's own post_init
        params = [p for m in (module, *module.children()) for p in m.parameters(recurse=False)]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            fn(module, custom)

    with torch.no_grad(), guard_torch_init_functions():
        apply(model, model._initialize_weights)
    model.tie_weights(recompute_mapping=False)


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
