"""HandsOnVLM: a LLaMA-family LM that sees pooled video tokens and emits ``<hand_traj>`` tokens whose
hidden states a small decoder turns into future hand positions.

    frames [B, F, 3, S, S] --CLIP (frozen)--> pooled per-frame features --projector--> visual [B, V, D]
    input_ids with one image placeholder  ->  [text ; visual ; text] embeddings  [B, L - 1 + V, D]
      + sinusoidal encoding of waypoint k added to the k-th <hand_traj> input embedding
    LM -> hidden [B, L', D] -> logits (text loss)
       -> hidden one position before each <hand_traj> -> right = even dims, left = odd dims
       -> trajectory decoder -> points [B, 2, T, 2] (recon + KL losses)

    loss = text_ce + hoi_lambda * (recon + lambda_kl * kl)

Everything is batched: the visual splice, the hand-embedding scatter and the hidden-state gather
are index arithmetic, not per-sample loops (the release loops over samples for all three).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from handsonvlm.config import ModelConfig
from handsonvlm.hand_embedding import hand_conditions, hand_token_embeddings
from handsonvlm.tokens import load_tokenizer, special_tokens
from handsonvlm.traj_decoder import build_traj_decoder
from handsonvlm.vision import FrozenTower, VisionTower, tower_features, video_tokens

IMAGE_PLACEHOLDER = -200  # input id marking where the visual tokens go (LLaVA's IMAGE_TOKEN_INDEX)
IGNORE_INDEX = -100  # label of positions without a text loss
VISION_PREFIX = "vision."  # the tower's keys in the model's state dict (exports, checkpoints, compat)
WEIGHTS_FILE = "model.safetensors"
TIED_LM_HEAD_KEY = "lm.lm_head.weight"  # not saved when the LM ties it to its input embeddings
CONFIG_FILE = "handsonvlm_config.json"
FLASH_ATTENTION = "flash_attention_2"
FALLBACK_ATTENTION = "sdpa"  # what a flash-attention export runs with where flash-attention cannot
HALF_DTYPES = (torch.float16, torch.bfloat16)  # the only dtypes flash-attention takes
# PyTorch's warning for each tensor a module copies into a meta parameter (a no-op): the EfficientNet tower
# loads its package's weights as it is built, which an empty build skips (the export's weights follow).
META_COPY_WARNING = ".*copying from a non-meta parameter in the checkpoint to a meta parameter"

log = logging.getLogger(__name__)


class ModelInit:
    """How :class:`HandsOnVLM` creates its parameters. This class builds every part whole in each
    process (every hook a no-op): plain PyTorch, inference, export, ZeRO-2.

    :class:`handsonvlm.training.Zero3Init` (DeepSpeed ZeRO-3) partitions the parameters over the ranks
    as the modules are created, so that no rank ever holds the whole model. The hooks, in the order
    :class:`HandsOnVLM` uses them:

    * ``transformers()``: around everything done to the LM through transformers (``from_pretrained``,
      ``resize_token_embeddings``, gradient checkpointing), so that transformers' own ZeRO-3 code runs;
    * ``construct()``: around the construction of modules whose parameters are partitioned as they are
      created (the random-init LM, the projector, the trajectory decoder);
    * ``partition(module)``: partitions ``module``'s parameters that were created outside ``construct()``
      (the rows added by ``resize_token_embeddings``);
    * ``modify(params)``: around an in-place edit of parameters made under ``construct()`` (the
      projector's initial weights from a file): gathered whole inside, rank 0's values kept on exit
      (``keeps_writes()`` says whether this process's are).

    The frozen vision tower is built outside all of them (whole, in its dtype; docs/CLUSTER.md,
    "5. Scaling")."""

    def transformers(self) -> AbstractContextManager:
        return nullcontext()

    def construct(self) -> AbstractContextManager:
        return nullcontext()

    def partition(self, module: nn.Module) -> None:
        return None

    def modify(self, params: Iterable[nn.Parameter]) -> AbstractContextManager:
        return nullcontext()

    def keeps_writes(self) -> bool:
        """Whether values this process writes inside ``modify`` are kept (ZeRO-3: rank 0's only), so
        that a loader can skip reading what would be thrown away."""
        return True


PLAIN_INIT = ModelInit()


def _build_lm(cfg: ModelConfig, tokenizer, init: ModelInit = PLAIN_INIT):
    from transformers import LlamaConfig, LlamaForCausalLM

    with init.transformers():
        if cfg.lm.pretrained:
            # A local directory, or a hub id already in the local Hugging Face cache: never a download.
            try:
                lm = LlamaForCausalLM.from_pretrained(cfg.lm.pretrained, local_files_only=True,
                                                      attn_implementation=cfg.lm.attn_implementation)
            except OSError as exc:
                raise FileNotFoundError(f"LM weights {cfg.lm.pretrained!r} are neither a local directory nor in the "
                                        "local Hugging Face cache; nothing is downloaded at run time "
                                        "(see docs/MODEL.md)") from exc
        else:
            lm_config = LlamaConfig(**cfg.lm.config, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
            lm_config._attn_implementation = cfg.lm.attn_implementation
            with init.construct():
                lm = LlamaForCausalLM(lm_config)
        if lm.get_input_embeddings().num_embeddings != len(tokenizer):
            # New rows (time and hand tokens) get the LM's normal init, as the release's resize did.
            lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            init.partition(lm)
        if cfg.lm.gradient_checkpointing:
            lm.gradient_checkpointing_enable()
    return lm


def build_vision_tower(cfg: ModelConfig) -> VisionTower:
    """The frozen tower of ``model.vision.kind`` (``handsonvlm.vision.build_tower``: CLIP, or EfficientNet-Lite0
    with the same interface); a randomly initialised one is seeded so that every process builds the same."""
    from handsonvlm.vision import build_tower

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.vision.init_seed)
        return build_tower(cfg.vision)


PROJECTOR_KEY_SUFFIXES = ("mm_projector.weight", "mm_projector.bias")  # LLaVA's names, any prefix


def load_projector_init(projector: nn.Linear, path: str | Path) -> None:
    """Initialise ``projector`` (``Linear(C, D)``) from LLaVA's pretrained ``mm_projector.bin``.

    The file is a torch state dict, e.g. ``{"model.mm_projector.weight": [D, C], "model.mm_projector.bias":
    [D]}`` as LLaVA's pretraining saved it; LLaVA's ``initialize_vision_modules`` takes every key holding
    ``mm_projector``, here exactly one key must end in each of :data:`PROJECTOR_KEY_SUFFIXES`. Read with
    ``weights_only=True`` (tensors only, no code); values are cast to the projector's dtype. A missing
    file, a missing or repeated key or a wrong shape raises with what was expected and what was found."""
    path = Path(path)
    where = f"model.projector_init {str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file (LLaVA's pretrained projector, e.g. "
                                "llava-pretrain-vicuna-7b-v1.3/mm_projector.bin)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or one holding more than tensors
        first = (str(exc).splitlines() or [""])[0]
        raise ValueError(f"{where}: cannot read it as a torch state dict of tensors (weights_only=True): "
                         f"{first}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{where}: holds a {type(state).__name__}, not a state dict")
    d, c = projector.weight.shape
    expected = {"weight": (d, c), "bias": (d,)}
    values = {}
    for suffix in PROJECTOR_KEY_SUFFIXES:
        keys = sorted(k for k in state if isinstance(k, str) and k.endswith(suffix))
        if len(keys) != 1:
            found = "no key" if not keys else f"{len(keys)} keys {keys}"
            raise ValueError(f"{where}: {found} ending in {suffix!r}; it has {sorted(map(str, state))[:10]}")
        name = suffix.rsplit(".", 1)[1]
        value = state[keys[0]]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != expected[name]:
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            want = f"[D, C] = {list(expected[name])}" if name == "weight" else f"[D] = {list(expected[name])}"
            raise ValueError(f"{where}: {keys[0]} has shape {shape}, expected {want} (D = the LM's hidden size "
                             f"{d}, C = the vision tower's width {c})")
        values[name] = value
    with torch.no_grad():
        for name, value in values.items():
            getattr(projector, name).copy_(value.to(getattr(projector, name).dtype))


class HandsOnVLM(nn.Module):
    def __init__(self, cfg: ModelConfig, tokenizer=None, init: ModelInit = PLAIN_INIT):
        """``init``: how the parameters are created (:class:`ModelInit`; ZeRO-3 partitions them as they
        are created). The parts are built in a fixed order, each drawing its initial weights from the
        global torch RNG (the vision tower from its own seed), so that the order is part of the result."""
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
        self.tokens = special_tokens(self.tokenizer, cfg)
        self.lm = _build_lm(cfg, self.tokenizer, init)
        # A plain attribute, not a submodule: the tower stays out of parameters() and so out of DeepSpeed's
        # casts, ZeRO-3 partitions and the optimizer; state_dict()/load_state_dict() still carry its
        # "vision." keys (the hooks below), and .to(device) moves it in its own dtype (_apply).
        self._frozen_vision = FrozenTower(build_vision_tower(cfg))
        self.register_state_dict_post_hook(_add_vision_state)
        self.register_load_state_dict_pre_hook(_load_vision_state)
        self.hidden_size = self.lm.config.hidden_size
        with init.construct():
            self.projector = nn.Linear(self.vision.hidden_size, self.hidden_size)
        if cfg.projector_init:
            with init.modify(self.projector.parameters()):
                load_projector_init(self.projector, cfg.projector_init)
        with init.construct():
            self.traj_decoder = build_traj_decoder(cfg.traj_decoder, self.hidden_size // 2, cfg.decoder_hidden,
                                                   cfg.decoder_latent)

    # ------------------------------------------------------------------ the frozen vision tower
    @property
    def vision(self) -> VisionTower:
        """The frozen tower (CLIP or EfficientNet-Lite0), in ``model.vision.dtype`` on this model's device;
        held outside the module tree (:class:`handsonvlm.vision.FrozenTower`)."""
        return self._frozen_vision.tower

    def _apply(self, fn, recurse=True):
        """``to``/``cuda``/``half``/``bfloat16``/``to_empty`` on the module tree, then the tower follows to its
        device only: its dtype is the config's, whatever the rest is cast to."""
        super()._apply(fn, recurse)
        frozen = self.__dict__.get("_frozen_vision")
        reference = next(self.parameters(), None)
        if frozen is not None and reference is not None:
            frozen.follow(reference.device)
        return self

    # ------------------------------------------------------------------ visual tokens
    def frame_features(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frames [B, F, 3, S, S] -> pooled per-frame features (means [B, F, C], grids [B, F, G, C]) in the
        tower's dtype: :func:`handsonvlm.vision.tower_features`, the computation the feature cache stores;
        pass it back as ``frame_means`` / ``frame_grids`` to skip the tower."""
        return tower_features(self.vision, frames, self.cfg.spatial_pool)

    def visual_tokens(self, frames=None, frame_means=None, frame_grids=None) -> torch.Tensor:
        """[B, V, D] with V = num_video_frames + num_slow_frames * G (356 for the 7B/13B presets)."""
        if frame_means is None:
            frame_means, frame_grids = self.frame_features(frames)
        return video_tokens(frame_means, frame_grids, self.projector, self.cfg.num_video_frames,
                            self.cfg.num_slow_frames)

    # ------------------------------------------------------------------ sequence assembly
    def embed_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual: torch.Tensor,
                     hand_points: torch.Tensor | None, labels: torch.Tensor | None = None) -> dict:
        """Splice the visual tokens in place of the image placeholder and add hand encodings.

        input_ids, attention_mask, labels [B, L] (one ``IMAGE_PLACEHOLDER`` per row), visual
        [B, V, D], hand_points [B, 2, T, 2] (teacher forcing in training, the model's own
        predictions in generation) or None. Returns ``inputs_embeds`` [B, L-1+V, D] and
        ``attention_mask``, ``position_ids``, ``ids`` (placeholder-free ids, -1 at visual
        positions), ``labels`` (or None), all [B, L-1+V].
        """
        b, length = input_ids.shape
        n_visual = visual.shape[1]
        is_image = input_ids == IMAGE_PLACEHOLDER
        if not bool((is_image.sum(1) == 1).all()):
            raise ValueError("every sequence needs exactly one image placeholder")
        image_at = is_image.int().argmax(1, keepdim=True)  # [B, 1]
        j = torch.arange(length - 1 + n_visual, device=input_ids.device)[None]  # output positions
        in_visual = (j >= image_at) & (j < image_at + n_visual)
        text_index = torch.where(j < image_at, j, j - n_visual + 1).clamp(0, length - 1)  # [B, L']
        visual_index = (j - image_at).clamp(0, n_visual - 1)

        text_ids = input_ids.clamp(min=0).gather(1, text_index)
        text_embeds = self.lm.get_input_embeddings()(text_ids)
        visual_embeds = visual.to(text_embeds.dtype).gather(1, visual_index[..., None].expand(-1, -1, visual.shape[-1]))
        embeds = torch.where(in_visual[..., None], visual_embeds, text_embeds)

        ids = torch.where(in_visual, torch.full_like(text_ids, -1), input_ids.gather(1, text_index))
        mask = torch.where(in_visual, torch.ones_like(text_ids), attention_mask.gather(1, text_index).long())
        if hand_points is not None:
            embeds = embeds + self._hand_offsets(ids, hand_points, embeds.dtype)
        out = {"inputs_embeds": embeds, "attention_mask": mask, "ids": ids,
               "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        out["labels"] = None if labels is None else torch.where(
            in_visual, torch.full_like(text_ids, IGNORE_INDEX), labels.gather(1, text_index))
        return out

    def _hand_offsets(self, ids: torch.Tensor, hand_points: torch.Tensor, dtype) -> torch.Tensor:
        """[B, L', D]: the encoding of waypoint k at the k-th hand token (k < T), zero elsewhere."""
        is_hand = ids == self.tokens.hand
        k = is_hand.long().cumsum(-1) - 1  # index of each hand token among its row's hand tokens
        n_points = hand_points.shape[2]
        use = is_hand & (k < n_points)
        if n_points == 0 or not bool(use.any()):
            return torch.zeros((), dtype=dtype, device=ids.device)
        encodings = hand_token_embeddings(hand_points, self.hidden_size, dtype=dtype)  # [B, T, D]
        gathered = encodings.gather(1, k.clamp(0, n_points - 1)[..., None].expand(-1, -1, self.hidden_size))
        return gathered * use[..., None].to(dtype)

    def hand_states(
        self, hidden: torch.Tensor, ids: torch.Tensor, num_points: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states one position before each of the first ``num_points`` hand tokens.

        hidden [B, L', D], ids [B, L'] -> (states [B, T, D], found [B, T] bool). The state at
        p - 1 is the one that predicts the hand token at p."""
        is_hand = ids == self.tokens.hand
        k = is_hand.long().cumsum(-1) - 1
        slots = torch.arange(num_points, device=ids.device)
        match = is_hand[:, None, :] & (k[:, None, :] == slots[None, :, None])  # [B, T, L']
        found = match.any(-1)
        position = match.int().argmax(-1)  # [B, T] position of hand token t
        before = (position - 1).clamp(min=0)
        states = hidden.gather(1, before[..., None].expand(-1, -1, hidden.shape[-1]))
        return states * found[..., None].to(states.dtype), found

    # ------------------------------------------------------------------ training forward
    def forward(self, input_ids, attention_mask, labels, future_hands, future_valid, frames=None,
                frame_means=None, frame_grids=None, generator: torch.Generator | None = None) -> dict:
        """Teacher-forced training pass.

        future_hands [B, 2, T, 2] (the T future points, GT point 0 excluded), future_valid [B, 2].
        Returns ``loss`` and its parts ``text_loss``, ``traj_loss`` (recon), ``kl_loss`` (before
        lambdas), plus ``pred`` [B, 2, T, 2] (posterior reconstructions) and ``hand_found`` [B, T].
        """
        visual = self.visual_tokens(frames, frame_means, frame_grids)
        seq = self.embed_inputs(input_ids, attention_mask, visual, future_hands, labels)
        hidden = self.lm.model(inputs_embeds=seq["inputs_embeds"], attention_mask=seq["attention_mask"],
                               position_ids=seq["position_ids"], use_cache=False).last_hidden_state
        text_loss = self.text_loss(hidden, seq["labels"])
        n_points = future_hands.shape[2]
        states, found = self.hand_states(hidden, seq["ids"], n_points)
        # A hand without all its hand tokens in the text cannot be supervised (LITA samples have none).
        valid = future_valid.bool() & found.all(-1, keepdim=True)
        kl_reduction = "release" if self.cfg.mode == "release" else "corrected"
        decoded = self.traj_decoder(hand_conditions(states), future_hands, valid, kl_reduction=kl_reduction,
                                    generator=generator)
        loss = text_loss + self.cfg.hoi_lambda * (decoded["recon"] + self.cfg.lambda_kl * decoded["kl"])
        return {"loss": loss, "text_loss": text_loss.detach(), "traj_loss": decoded["recon"].detach(),
                "kl_loss": decoded["kl"].detach(), "pred": decoded["pred"], "hand_found": found}

    def text_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the supervised positions (fp32), from hidden [B, L', D] and
        labels [B, L'] (``IGNORE_INDEX`` where there is no loss).

        ``lm_head`` runs only on the N positions whose next token is supervised (the answers): the visual
        tokens (356 per clip at 7B) and the prompt never get a [V]-wide logit row, which at a 32k
        vocabulary is most of the activation memory of a batch. The value is that of the cross-entropy over
        every position with ``ignore_index`` (the same rows, the same mean over N)."""
        targets = labels[:, 1:]  # [B, L' - 1]: position p predicts token p + 1
        supervised = targets != IGNORE_INDEX
        logits = self.lm.lm_head(hidden[:, :-1][supervised])  # [N, V]
        return F.cross_entropy(logits.float(), targets[supervised])

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> None:
        """safetensors weights (frozen vision tower included) + config + tokenizer; no DeepSpeed/Ray needed."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.lm.config.tie_word_embeddings:  # one tensor under two names (SmolLM2): safetensors refuses
            # shared memory; saved once as the input embeddings, re-tied by the LM built on load
            state.pop(TIED_LM_HEAD_KEY, None)
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        lm_config = self.lm.config.to_dict()
        cfg = self.cfg.to_dict()
        # The exported model is self-contained: rebuild both towers from configs, then load weights.
        cfg["lm"].update(pretrained=None, tokenizer=None, config=_llama_kwargs(lm_config))
        cfg["vision"].update(pretrained=None, config=self.vision.config.to_diff_dict())
        cfg["projector_init"] = None  # its weights are in the export
        (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True))
        self.tokenizer.save_pretrained(str(directory))

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> HandsOnVLM:
        """The model :meth:`save_pretrained` wrote to ``directory``, on ``map_location``: the LM, projector
        and decoder in ``dtype`` (default fp32), the frozen vision tower in its configured
        ``model.vision.dtype``, whatever dtype the file holds.

        No weight is initialised: the model is built with its parameters on the meta device (buffers, e.g.
        the LM's rotary ``inv_freq``, are computed as in a normal build), then each tensor of the
        safetensors file is read into host memory (``pread``, no page-cache mapping kept), moved to
        ``map_location`` in its dtype and assigned (``load_state_dict(assign=True)``). Peak host memory is
        the weights in their target dtype plus one tensor (a CUDA load: one tensor): a bf16 7B export loads
        in bf16 (~14 GB), not through an fp32 model (~27 GB). An export asking for flash-attention gets it
        only where it can run (:func:`inference_attention`; otherwise sdpa and one warning). Missing or
        unexpected keys raise ``RuntimeError``."""
        from accelerate import init_empty_weights
        from safetensors import safe_open

        directory = Path(directory)
        cfg = ModelConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
        cfg.lm.tokenizer = str(directory)
        cfg.lm.attn_implementation = inference_attention(cfg.lm.attn_implementation, dtype, map_location)
        with init_empty_weights(include_buffers=False), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=META_COPY_WARNING, category=UserWarning)
            model = cls(cfg)
        tower_dtype = model.vision.dtype
        state = {}
        # read into host memory (pread: no mapping of the file stays resident), then each tensor to its device
        # and dtype on its own (a no-op for a CPU load in the file's dtype; a CUDA load holds one on the host)
        with safe_open(str(directory / WEIGHTS_FILE), framework="pt", device="cpu", backend="pread") as f:
            for key in f.offset_keys():  # file order: sequential reads
                tensor = f.get_tensor(key)
                target = (tower_dtype if key.startswith(VISION_PREFIX) else dtype) if tensor.is_floating_point() \
                    else tensor.dtype
                state[key] = tensor.to(device=map_location, dtype=target)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        del state
        tied = {TIED_LM_HEAD_KEY} if model.lm.config.tie_word_embeddings else set()
        if tied:  # assign replaced the embedding's Parameter (the head is not in the file): tie the head to it
            model.lm.tie_weights()
        empty = sorted(k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta)
        if unexpected or set(missing) - tied or empty:
            raise RuntimeError(f"checkpoint mismatch: missing {sorted((set(missing) - tied) | set(empty))}, "
                               f"unexpected {unexpected}")
        return model.to(map_location)  # the buffers (built on the CPU) join the weights


def _add_vision_state(module: HandsOnVLM, state: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: the tower's tensors under ``<prefix>vision.`` (what an export or a checkpoint
    holds of it, as when the tower was a submodule)."""
    for key, value in module.vision.state_dict().items():
        state[prefix + VISION_PREFIX + key] = value


def _load_vision_state(module: HandsOnVLM, state: dict, prefix: str, local_metadata, strict, missing_keys,
                       unexpected_keys, error_msgs) -> None:
    """load_state_dict pre-hook: ``<prefix>vision.*`` entries go into the tower (in its dtype; ``assign=True``
    is passed on), the tower's keys they lack are reported as missing, their unknown ones as unexpected."""
    where = prefix + VISION_PREFIX
    tower_state = {key[len(where):]: state.pop(key) for key in [k for k in state if k.startswith(where)]}
    result = module.vision.load_state_dict(tower_state, strict=False,
                                           assign=local_metadata.get("assign_to_params_buffers", False))
    missing_keys.extend(where + key for key in result.missing_keys)
    unexpected_keys.extend(where + key for key in result.unexpected_keys)


def inference_attention(requested: str, dtype: torch.dtype, device: str | torch.device) -> str:
    """The attention implementation a model loaded in ``dtype`` on ``device`` runs with: ``requested``
    (the export's ``model.lm.attn_implementation``), except flash-attention where it cannot run: in fp32
    (flash-attention takes fp16/bf16 only, it would raise at every generation), off CUDA, or without the
    ``flash_attn`` package; then sdpa (the same attention, other kernels), with one warning saying why."""
    if requested != FLASH_ATTENTION:
        return requested
    from transformers.utils import is_flash_attn_2_available

    if dtype not in HALF_DTYPES:
        reason = f"it needs fp16 or bf16 and the model is loaded in {dtype}"
    elif torch.device(device).type != "cuda":
        reason = f"it needs a CUDA device and the model is loaded on {device}"
    elif not is_flash_attn_2_available():
        reason = "the flash_attn package is not installed"
    else:
        return requested
    log.warning("model.lm.attn_implementation %s: %s; using %s", requested, reason, FALLBACK_ATTENTION)
    return FALLBACK_ATTENTION


_LLAMA_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "max_position_embeddings", "rms_norm_eps", "initializer_range", "tie_word_embeddings", "rope_theta",
               "hidden_act", "attention_bias", "mlp_bias", "head_dim", "rope_scaling", "rope_parameters")


def _llama_kwargs(config: dict) -> dict:
    """The architecture part of a LlamaConfig dict (vocab and special ids come from the tokenizer)."""
    return {k: config[k] for k in _LLAMA_KEYS if k in config and config[k] is not None}
