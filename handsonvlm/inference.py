"""Asking an exported HandsOnVLM about one clip: load it, prompt it, sample, and shape the answer as JSON.

The model side of ``pipelines/predict.py``, kept here so that it is plain library code (no Ray, no
video decoding): frames come in as the samples stage stores them
(``preprocessing.media.model_frames``), answers go out as the document predict.py prints.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from handsonvlm.config import ModelConfig, SamplingConfig
from handsonvlm.constants import EPIC_FRAME_HEIGHT, EPIC_FRAME_WIDTH, FUTURE_STEP_SECONDS, HANDS

JSON_DIGITS = 6  # coordinates and times in the document: 1e-6 of the frame / a microsecond
TRAINING_ASPECT = EPIC_FRAME_WIDTH / EPIC_FRAME_HEIGHT
ASPECT_TOLERANCE = 0.05  # relative; beyond it a note says the centre crop differs from training
RELEASE_ASPECT_TOLERANCE = 0.01  # relative; within it a frame is drawn at exactly the release's size
EVEN_PIXELS = 2  # overlay heights are a multiple of this: video encoders need even frame sizes
MESSAGE_CHARS = 300  # a loader's message is cut to its first line and this many characters
EXPORT_HINT = "pass the directory written by pipelines/train.py, e.g. runs/models/<run-name>"


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


def load_model(directory: str | Path, device: str = "auto"):
    """``(model in eval mode on its device, device)``; ``device="auto"``: cuda when available, else cpu."""
    import torch

    from handsonvlm.model import CONFIG_FILE, WEIGHTS_FILE, HandsOnVLM

    directory = check_export(directory, (CONFIG_FILE, WEIGHTS_FILE))
    try:
        model = HandsOnVLM.from_pretrained(directory)
    except (OSError, RuntimeError, ValueError) as exc:
        first = (str(exc).splitlines() or [""])[0][:MESSAGE_CHARS]
        raise ModelLoadError(f"cannot load the model from {directory}: {first}") from exc
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), device


def build_prompt(model, question: str):
    """Left-padded ``[1, L]`` ids and mask: the question as one user turn after the image token,
    as RBHP questions are asked in training (the ``vicuna_v1`` template)."""
    from handsonvlm.data import encode_conversation, pad_sequences, rbhp_turns

    ids, _ = encode_conversation(model.tokenizer, rbhp_turns(question, model.cfg, with_answer=False), model.cfg)
    return pad_sequences([ids], model.tokens.pad, side="left")


def predict(model, frames: np.ndarray, question: str, sampling: SamplingConfig, device: str = "cpu"):
    """Answer ``question`` about one clip -> ``GenerationResult`` (a batch of one, K samples).

    frames: uint8 RGB ``[F, H, W, 3]`` as the shards store them; sampling: K, temperature, top-p,
    seed, length (a PredictConfig is one)."""
    from handsonvlm.generation import generate
    from handsonvlm.image import preprocess_frames

    pixels = preprocess_frames(frames, image_size=model.vision.image_size)
    input_ids, attention_mask = build_prompt(model, question)
    return generate(model, input_ids.to(device), attention_mask.to(device), frames=pixels[None].to(device),
                    num_samples=sampling.num_samples, max_new_tokens=sampling.max_new_tokens,
                    temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed)


def answer_jobs(model, jobs: list[dict], num_samples: int, max_new_tokens: int, temperature: float,
                top_p: float, **visual) -> list[dict]:
    """Answer evaluation ``jobs`` (``evaluation.build_jobs``) in one left-padded call, K samples each,
    seeded by the first job -> one result dict per job (``evaluation.prediction_row``'s input).

    ``visual``: the clips in job order, as ``frames`` [B, F, 3, S, S] or cached ``frame_means`` and
    ``frame_grids`` (see ``generation.generate``)."""
    from handsonvlm.data import encode_conversation, pad_sequences
    from handsonvlm.generation import generate

    device = next(model.parameters()).device
    ids = [encode_conversation(model.tokenizer, [(job["question"], None)], model.cfg)[0] for job in jobs]
    input_ids, mask = pad_sequences(ids, model.tokens.pad, side="left")
    result = generate(model, input_ids.to(device), mask.to(device), num_samples=num_samples,
                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
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
