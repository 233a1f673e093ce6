"""Asking an exported HandsOnVLM about one clip: load it, prompt it, sample, and shape the answer as JSON.

The model side of ``pipelines/predict.py``, kept here so that it is plain library code (no Ray, no
video decoding): frames come in as the samples stage stores them
(``preprocessing.media.model_frames``), answers go out as the document predict.py prints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np

from handsonvlm.config import (
    CORRECTED_MAX_NEW_TOKENS,
    CORRECTED_TOP_K,
    RELEASE_MAX_NEW_TOKENS,
    RELEASE_TOP_K,
    ModelConfig,
    SamplingConfig,
)
from handsonvlm.constants import EPIC_FRAME_HEIGHT, EPIC_FRAME_WIDTH, FUTURE_STEP_SECONDS, HANDS
from handsonvlm.prompts import TEMPLATES

JSON_DIGITS = 6  # coordinates and times in the document: 1e-6 of the frame / a microsecond
TRAINING_ASPECT = EPIC_FRAME_WIDTH / EPIC_FRAME_HEIGHT
ASPECT_TOLERANCE = 0.05  # relative; beyond it a note says the centre crop differs from training
RELEASE_ASPECT_TOLERANCE = 0.01  # relative; within it a frame is drawn at exactly the release's size
EVEN_PIXELS = 2  # overlay heights are a multiple of this: video encoders need even frame sizes
MESSAGE_CHARS = 300  # a loader's message is cut to its first line and this many characters
EXPORT_HINT = "pass the directory written by pipelines/train.py, e.g. runs/models/<run-name>"
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # SamplingConfig.dtype -> torch
DEFAULT_LOAD_DTYPE = "fp32"  # load_model without a dtype (what an export was before inference dtypes)
RELEASE_DEFAULT_TEMPLATE = "llava_v0"  # what the release's evaluator picks for a name without "v1"

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A model directory that is not a loadable export of ``HandsOnVLM.save_pretrained``: one line."""


# ---------------------------------------------------------------------------------------- model
def check_export(directory: str | Path, names: tuple[str, ...]) -> Path:
    """``directory`` as a Path, after checking that it holds the export files ``names``."""
    directory = Path(directory)
    for name in names:
        if not (directory / name).is_file():
            raise ModelLoadError(f"{directory} is not an exported HandsOnVLM model (no {name}); {EXPORT_HINT}")
    return directory


def read_model_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig of an export, read without loading its weights (so input can be checked first)."""
    from handsonvlm.model import CONFIG_FILE

    path = check_export(directory, (CONFIG_FILE,)) / CONFIG_FILE
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise ModelLoadError(f"invalid model config {path}: {exc}") from exc


def resolve_device(device: str = "auto") -> str:
    """``"auto"``: cuda when available, else cpu; anything else as given (cpu, cuda, cuda:1, ...), after
    checking that a CUDA device asked for exists here (``handsonvlm.devices.DeviceError`` otherwise,
    naming ``--device cpu``: a GPU request never silently runs on CPU)."""
    import torch

    from handsonvlm.devices import check_local_device

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_local_device(str(device), torch.cuda.device_count())
    return str(device)


def enable_tf32() -> bool:
    """TF32 matmuls and cuDNN convolutions on CUDA (the release trained and ran with ``--tf32 True``);
    a no-op without CUDA. True when it was turned on."""
    import torch

    if not torch.cuda.is_available():
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def load_model(directory: str | Path, device: str = "auto", dtype: str | None = None):
    """``(model in eval mode on its device, device)``; ``device="auto"``: cuda when available, else cpu.

    ``dtype`` (``"fp32"``/``"fp16"``/``"bf16"``, a resolved ``SamplingConfig.dtype``; None: fp32): the
    LM, projector and decoder are loaded in it directly on the device (``HandsOnVLM.from_pretrained``:
    no fp32 copy, no random init), the frozen vision tower in the config's ``model.vision.dtype`` (its
    features are cast to the projector's dtype). On CUDA, TF32 is turned on (:func:`enable_tf32`)."""
    from handsonvlm.model import CONFIG_FILE, WEIGHTS_FILE, HandsOnVLM

    directory = check_export(directory, (CONFIG_FILE, WEIGHTS_FILE))
    device = resolve_device(device)
    target = torch_dtype(dtype or DEFAULT_LOAD_DTYPE)
    try:
        model = HandsOnVLM.from_pretrained(directory, map_location=device, dtype=target)
    except (OSError, RuntimeError, ValueError) as exc:
        first = (str(exc).splitlines() or [""])[0][:MESSAGE_CHARS]
        raise ModelLoadError(f"cannot load the model from {directory}: {first}") from exc
    if device.startswith("cuda"):
        enable_tf32()
    return model.eval(), device


def torch_dtype(dtype: str):
    """``"fp32"``/``"fp16"``/``"bf16"`` (a resolved ``SamplingConfig.dtype``) -> the torch dtype."""
    import torch

    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(TORCH_DTYPES)} (resolve 'auto' first), got {dtype!r}")
    return getattr(torch, TORCH_DTYPES[dtype])


# ------------------------------------------------------------------------------- sampling settings
def model_name_from_path(model_path: str | Path) -> str:
    """The model name LLaVA's ``get_model_name_from_path`` gives a directory (the release's evaluator
    uses it): the last path component, or ``<parent>_<checkpoint-N>`` for a ``checkpoint-N`` folder."""
    parts = str(model_path).strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def release_conversation_template(model_path: str | Path) -> str:
    """The template the release's ``HandsOnVLMInference`` picks for a model directory when no
    ``--conv-mode`` is given: ``llava_llama_2`` if the name holds "llama-2", else ``llava_v1`` if it
    holds "v1", else ``mpt`` if it holds "mpt", else ``llava_v0`` (lower-cased name, in that order).
    ``handsonvlm-7b`` -> ``llava_v0``; ``llava_v0`` and ``llava_v1`` are in ``prompts.TEMPLATES``."""
    name = model_name_from_path(model_path).lower()
    if "llama-2" in name:
        return "llava_llama_2"
    if "v1" in name:
        return "llava_v1"
    if "mpt" in name:
        return "mpt"
    return RELEASE_DEFAULT_TEMPLATE


def resolve_sampling(sampling: SamplingConfig, model_cfg: ModelConfig, model_path: str | Path | None = None,
                     device: str = "cpu", bf16_supported: bool | None = None,
                     notes: list[str] | None = None) -> SamplingConfig:
    """``sampling`` with its mode-dependent fields made concrete: a copy of the same class (an
    EvalConfig stays an EvalConfig), which is what runs and what is logged. Given values are kept.

    ==================  ===================================  ==================================
    field               release mode (``model_cfg.mode``)    corrected mode
    ==================  ===================================  ==================================
    ``top_k``           50 (HF generate's default)           0 (off)
    ``max_new_tokens``  100                                  64
    ``dtype``           fp16 on CUDA; fp32 on CPU            bf16 on CUDA where supported, else
                                                             fp32; fp32 on CPU
    ``prompt_template`` the release evaluator's pick for     the model's own
                        ``model_path``'s name
                        (:func:`release_conversation_template`)
                        when it is in ``prompts.TEMPLATES``,
                        else (and without ``model_path``)
                        the model's own
    ==================  ===================================  ==================================

    fp16 is not chosen on CPU: PyTorch's CPU fp16 matmuls are slow or missing for some ops. An
    explicit ``dtype`` is kept; ``"bf16"`` on a CUDA device without bf16 is an error.
    ``bf16_supported``: whether the CUDA device has bf16 (None: ask torch when this process sees a
    GPU, else assume it does, e.g. a CPU-only Ray driver of GPU actors). What is worth telling the
    user (a fallback, an assumption) is logged and appended to ``notes`` when given."""
    told: list[str] = []
    release = model_cfg.mode == "release"
    cuda = str(device).startswith("cuda")

    top_k = sampling.top_k if sampling.top_k is not None else (RELEASE_TOP_K if release else CORRECTED_TOP_K)
    max_new = sampling.max_new_tokens
    if max_new is None:
        max_new = RELEASE_MAX_NEW_TOKENS if release else CORRECTED_MAX_NEW_TOKENS

    dtype = sampling.dtype
    if dtype == "bf16" and cuda and _bf16_on(device, bf16_supported, told) is False:
        raise ValueError(f"dtype bf16: the CUDA device {device} does not support bf16; use fp16 or fp32")
    if dtype == "auto":
        if not cuda:
            dtype = "fp32"
            if release:
                told.append("release mode runs in fp32 on CPU (the release ran in fp16 on a GPU; CPU fp16 is slow)")
        elif release:
            dtype = "fp16"
        else:
            dtype = "bf16" if _bf16_on(device, bf16_supported, told) else "fp32"
    elif dtype == "fp16" and not cuda:
        told.append("dtype fp16 on CPU: slow, and some CPU kernels lack fp16")

    template = sampling.prompt_template
    if template is None:
        template = model_cfg.prompt_template
        if release and model_path is not None:
            pick = release_conversation_template(model_path)
            if pick in TEMPLATES:
                template = pick
            else:
                told.append(f"the release's evaluator would use the {pick!r} template for "
                            f"{model_name_from_path(model_path)!r}; prompts.TEMPLATES has no such template, "
                            f"so the model's own {template!r} is used")

    for note in told:
        log.info("sampling: %s", note)
    if notes is not None:
        notes.extend(told)
    return dataclasses.replace(sampling, top_k=top_k, max_new_tokens=max_new, dtype=dtype, prompt_template=template)


def _bf16_on(device: str, supported: bool | None, told: list[str]) -> bool:
    if supported is not None:
        return supported
    import torch

    if torch.cuda.is_available():
        index = torch.device(device).index
        with torch.cuda.device(index if index is not None else torch.cuda.current_device()):
            return torch.cuda.is_bf16_supported()
    told.append("bf16 support of the GPU assumed (no GPU visible to this process); pass a dtype to choose")
    return True


def is_resolved(sampling: SamplingConfig) -> bool:
    """Whether :func:`resolve_sampling` has made every mode-dependent field concrete."""
    return (None not in (sampling.top_k, sampling.max_new_tokens, sampling.prompt_template)
            and sampling.dtype != "auto")


def _require_resolved(sampling: SamplingConfig) -> None:
    if not is_resolved(sampling):
        raise ValueError("sampling settings are not resolved (top_k, max_new_tokens, dtype or prompt_template "
                         "unset): pass them through handsonvlm.inference.resolve_sampling first")


def prompt_config(model, template: str | None) -> ModelConfig:
    """The model's config with ``prompt_template`` = ``template`` (None: the model's own)."""
    if template is None or template == model.cfg.prompt_template:
        return model.cfg
    return dataclasses.replace(model.cfg, prompt_template=template)


def build_prompt(model, question: str, template: str | None = None):
    """Left-padded ``[1, L]`` ids and mask: the question as one user turn after the image token,
    as RBHP questions are asked in training, in ``template`` (None: the model's own, ``vicuna_v1``)."""
    from handsonvlm.data import encode_conversation, pad_sequences, rbhp_turns

    cfg = prompt_config(model, template)
    ids, _ = encode_conversation(model.tokenizer, rbhp_turns(question, cfg, with_answer=False), cfg)
    return pad_sequences([ids], model.tokens.pad, side="left")


def predict(model, frames: np.ndarray, question: str, sampling: SamplingConfig, device: str = "cpu"):
    """Answer ``question`` about one clip -> ``GenerationResult`` (a batch of one, K samples).

    frames: uint8 RGB ``[F, H, W, 3]`` as the shards store them; sampling: K, temperature, top-k,
    top-p, seed, length, template (a PredictConfig is one), resolved by :func:`resolve_sampling`.
    The dtype is applied where the model is loaded (:func:`load_model`)."""
    from handsonvlm.generation import generate
    from handsonvlm.image import preprocess_frames

    _require_resolved(sampling)
    pixels = preprocess_frames(frames, image_size=model.vision.image_size)
    input_ids, attention_mask = build_prompt(model, question, sampling.prompt_template)
    return generate(model, input_ids.to(device), attention_mask.to(device), frames=pixels[None].to(device),
                    num_samples=sampling.num_samples, max_new_tokens=sampling.max_new_tokens,
                    temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                    seed=sampling.seed)


def answer_jobs(model, jobs: list[dict], sampling: SamplingConfig, **visual) -> list[dict]:
    """Answer evaluation ``jobs`` (``evaluation.build_jobs``) in one left-padded call, K samples each,
    seeded by the first job -> one result dict per job (``evaluation.prediction_row``'s input).

    ``sampling``: resolved settings (:func:`resolve_sampling`): K, temperature, top-k, top-p, length
    and the prompt template; its dtype is applied where the model is loaded (:func:`load_model`), not
    here (validation runs in the training dtype). ``visual``: the clips in job order, as ``frames``
    [B, F, 3, S, S] or cached ``frame_means`` and ``frame_grids`` (see ``generation.generate``)."""
    from handsonvlm.data import encode_conversation, pad_sequences
    from handsonvlm.generation import generate

    _require_resolved(sampling)
    device = next(model.parameters()).device
    cfg = prompt_config(model, sampling.prompt_template)
    ids = [encode_conversation(model.tokenizer, [(job["question"], None)], cfg)[0] for job in jobs]
    input_ids, mask = pad_sequences(ids, model.tokens.pad, side="left")
    result = generate(model, input_ids.to(device), mask.to(device), num_samples=sampling.num_samples,
                      max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                      top_p=sampling.top_p, top_k=sampling.top_k,
                      seed=int(jobs[0]["seed"]), **{k: v.to(device) for k, v in visual.items()})
    traj = result.trajectories.detach().float().cpu().numpy()
    return [{"answers": list(result.texts[i]), "trajectories": traj[i], "complete": result.complete[i].cpu().numpy(),
             "hand_counts": result.hand_counts[i].cpu().numpy()} for i in range(len(jobs))]


def first_clip(result) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The samples of clip 0: trajectories ``[K, 2, T, 2]``, complete ``[K]`` bool, hand-token counts."""
    return (result.trajectories[0].detach().float().cpu().numpy(),
            result.complete[0].cpu().numpy().astype(bool),
            [int(c) for c in result.hand_counts[0].tolist()])


# ---------------------------------------------------------------------------------------- notes
def input_notes(width: int, height: int, sampling: SamplingConfig) -> list[str]:
    """What the user should know before the model runs: an aspect ratio unlike training's, greedy K > 1."""
    notes = []
    if abs((width / height) / TRAINING_ASPECT - 1) > ASPECT_TOLERANCE:
        notes.append(f"the frames are {width}x{height}; the model was trained on {EPIC_FRAME_WIDTH}x"
                     f"{EPIC_FRAME_HEIGHT} EPIC frames, so its centre crop covers a different part of the "
                     f"picture than in training")
    if sampling.temperature == 0 and sampling.num_samples > 1:
        notes.append("--temperature 0 is greedy: all samples are identical")
    return notes


def incomplete_notes(complete: np.ndarray, counts: list[int], num_points: int, mode: str) -> list[str]:
    """One note per sample without exactly ``num_points`` hand tokens: what was kept of it."""
    notes = []
    for k in np.flatnonzero(~complete):
        if counts[k] < num_points:
            missing = ("its missing points are null" if mode == "corrected"
                       else "its missing points are zero-padded (release mode)")
        else:
            missing = (f"its first {num_points} points are kept" if mode == "corrected"
                       else f"its last {num_points} points are kept (release mode)")
        notes.append(f"sample {k} is incomplete ({counts[k]} hand tokens, {num_points} expected): {missing}; "
                     f"it is not drawn")
    return notes


# ---------------------------------------------------------------------------------------- output
def choose_drawn(trajectories: np.ndarray, complete: np.ndarray, mode: str) -> tuple[np.ndarray | None, dict | None]:
    """The trajectory ``[2, T, 2]`` to draw from K samples ``[K, 2, T, 2]``: the mean over complete
    samples (``mode="mean"``) or the first complete one (``"first"``); (None, None) when none is complete."""
    done = np.flatnonzero(complete)
    if len(done) == 0:
        return None, None
    if mode == "first":
        return trajectories[done[0]], {"mode": "first", "samples": [int(done[0])]}
    return trajectories[done].mean(0), {"mode": "mean", "samples": done.tolist()}


def overlay_size(width: int, height: int) -> tuple[int, int]:
    """(W, H) to draw at: the release's 960x540 for 16:9-ish input, else 960 wide with the input's aspect."""
    from handsonvlm.viz import RELEASE_SIZE

    release_width, release_height = RELEASE_SIZE
    if abs((width / height) / (release_width / release_height) - 1) < RELEASE_ASPECT_TOLERANCE:
        return RELEASE_SIZE
    return release_width, max(EVEN_PIXELS, int(round(release_width * height / width / EVEN_PIXELS)) * EVEN_PIXELS)


def json_points(trajectory: np.ndarray) -> list:
    """``[2, T, 2]`` -> nested lists, NaN -> None (strict JSON)."""
    return [[[None if not math.isfinite(v) else round(float(v), JSON_DIGITS) for v in point] for point in hand]
            for hand in trajectory]


def build_document(question: str, observation, result, sampling: dict, drawn: dict | None,
                   notes: list[str]) -> dict:
    """The JSON document of one answered clip (described in pipelines/predict.py).

    observation: a ``preprocessing.media.Observation`` (frames ``[F, H, W, 3]``, times_s, source)."""
    trajectories, complete, counts = first_clip(result)
    h, w = observation.frames.shape[1:3]
    return {
        "question": question,
        "answers": list(result.texts[0]),
        "trajectories": [json_points(t) for t in trajectories],
        "hands": list(HANDS),
        "complete": [bool(c) for c in complete],
        "hand_token_counts": counts,
        "times_s": [round((k + 1) * FUTURE_STEP_SECONDS, JSON_DIGITS) for k in range(trajectories.shape[-2])],
        "observed_frame_times_s": observation.times_s,
        "frame_size": [int(w), int(h)],
        "coordinates": "normalised to the full input frame (x/W, y/H), plane of the last observed frame",
        "source": observation.source,
        "sampling": sampling,
        "drawn": drawn,
        "notes": notes,
    }
