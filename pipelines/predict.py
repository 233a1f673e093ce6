"""Ask an exported HandsOnVLM about your own clip: answer text + the future trajectories of both hands.

    python pipelines/predict.py --model runs/models/<name> (--video clip.mp4 | --frames DIR) --question "..."
        [--at SECONDS] [--num-samples K] [--temperature 0.5] [--top-p 0.9] [--seed 0] [--max-new-tokens 100]
        [--draw mean|first] [--device auto|cpu|cuda] [--out overlay.mp4] [--png overlay.png] [--json out.json]

One machine, no Ray: the model is loaded with ``HandsOnVLM.from_pretrained`` (the export written
by ``pipelines/train.py``) and answers one clip.

Observation window (what the model was trained on, ``preprocessing/window.py``): 10 frames at
4 fps spanning 2.25 s. The prediction is for +0.25, +0.5, +0.75 and +1.0 s after the last of them.

* ``--video``: read with decord. The window ends at ``--at`` seconds (default: the last frame, i.e.
  "what happens right after this clip"). Frame k (k = 0..9) is taken at t_k = at - (9 - k) * 0.25 s,
  clamped to >= 0 (as hoi-forecast clamps windows that start before the video: the first frame is
  then repeated), each mapped to the video frame whose timestamp is nearest. ``--at`` may not
  exceed the video's duration.
* ``--frames DIR``: the ``.jpg``/``.jpeg``/``.png`` images of DIR sorted by name (digit runs
  compared as numbers, so ``f2`` < ``f10``; identical to plain sorting for zero-padded names) are
  taken as consecutive frames at 4 fps: the last 10 are used; with fewer than 10 the first image is
  repeated at the front to make 10 (so a single image is repeated 10 times, as the release's chat
  did). All images must have the same size.

Frames taller than 256 px are first resized to 256 px height (the height of the training shards'
frames), then CLIP-preprocessed (``handsonvlm.image.preprocess_frames``: short side to the tower's
size, centre crop). The prompt is the question as a single user turn with the image token,
exactly as RBHP questions are asked in training (``vicuna_v1`` template).

Output (stdout): one line per answer (``A[k]``), then the JSON document on the *last* line (also
written to ``--json FILE``, indented)::

    {"question", "answers": [K], "trajectories": [K][2 hands][4 steps][x, y], "hands": ["right", "left"],
     "complete": [K], "hand_token_counts": [K], "times_s": [0.25, 0.5, 0.75, 1.0],
     "observed_frame_times_s": [10], "frame_size": [W, H], "source": {...}, "sampling": {...},
     "drawn": {...} | null, "notes": [...]}

Coordinates are normalised to the full input frame, (x / W, y / H), in the plane of the last
observed frame, the convention of the training labels (x/456, y/256 on EPIC); values outside
[0, 1) are off-screen. Only the centre crop is seen by the vision tower (for a 16:9 frame about
x in [0.22, 0.78]). A sample whose answer has fewer than 4 ``<hand_traj>`` tokens is incomplete:
its missing points are ``null`` (``model.mode=corrected``; a release-mode model zero-pads them
as the release did), it is flagged ``complete: false``, listed in ``notes`` and never drawn.

Drawing (``--out`` MP4, ``--png`` last frame): by default (``--draw mean``) the per-point mean
over the complete samples (= the sample itself when K = 1); ``--draw first`` draws the first
complete sample instead (one coherent path where samples disagree, e.g. two possible targets).
The MP4 (``handsonvlm.viz.overlay_video``, mp4v, 4 fps so that time runs at its real pace) shows
the 10 observed frames, then the whitened last frame with the trajectories revealed one point per
frame: 14 frames. Frames are drawn 960 px wide (960x540 for 16:9 input, as the release;
other aspect ratios keep their own). No hand detector is run, so the paths start at the first
predicted point (as in the release), not at the current hand position.

Sampling: ``--temperature 0`` is greedy (argmax tokens, CVAE prior mean): deterministic, and all
K samples are identical, so use K = 1. Otherwise tokens use temperature + nucleus (top-p)
sampling and the CVAE draws z, all from one generator seeded by ``--seed``.

Exit status: 0 on success, 2 on a usage error or an unreadable input (one ``error:`` line on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a bare checkout

import numpy as np  # noqa: E402

from pipelines.common import positive_int  # noqa: E402
from preprocessing.window import NUM_OBS_FRAMES, OBS_FPS  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
HANDS = ("right", "left")  # row order of every trajectory tensor
MODEL_FRAME_HEIGHT = 256  # frames are resized to the training shards' height (docs/DATA.md) when taller
TRAINING_ASPECT = 456 / 256  # EPIC rgb_frames
ASPECT_TOLERANCE = 0.05  # relative; beyond it a note says the centre crop differs from training
OVERLAY_WIDTH = 960  # the release draws at 960x540
DEFAULT_MAX_NEW_TOKENS = 100  # the release's limit
DRAW_MODES = ("mean", "first")
EXIT_ERROR = 2


class PredictError(Exception):
    """A problem with the user's input (unreadable video, bad --at, ...): reported as one line."""


@dataclass
class Observation:
    """The observed window. frames: uint8 RGB [F, H, W, 3] at the input's resolution."""

    frames: np.ndarray
    times_s: list[float]
    source: dict
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------- inputs
def window_times(at: float, num_frames: int = NUM_OBS_FRAMES, fps: float = OBS_FPS) -> np.ndarray:
    """Times (s) of the observed frames ending at ``at``: t_k = at - (F-1-k)/fps, clamped to >= 0."""
    k = np.arange(num_frames, dtype=np.float64)
    return np.clip(at - (num_frames - 1 - k) / fps, 0.0, None)


def nearest_frames(times: np.ndarray, frame_starts: np.ndarray) -> np.ndarray:
    """Index of the frame whose timestamp is nearest to each time (ties go to the earlier frame)."""
    starts = np.asarray(frame_starts, np.float64)
    right = np.searchsorted(starts, times, side="left").clip(0, len(starts) - 1)
    left = (right - 1).clip(0, len(starts) - 1)
    take_left = np.abs(times - starts[left]) <= np.abs(starts[right] - times)
    return np.where(take_left, left, right).astype(np.int64)


def _frame_timestamps(reader, fps: float) -> tuple[np.ndarray, float]:
    """Start times of every frame and the video's duration (s): the container's timestamps when they
    are usable (handles variable frame rate), else index / fps."""
    n = len(reader)
    try:
        stamps = np.asarray(reader.get_frame_timestamp(list(range(n))), np.float64).reshape(n, 2)
        if np.isfinite(stamps).all() and (stamps >= 0).all() and (np.diff(stamps[:, 0]) >= 0).all():
            return stamps[:, 0], float(max(stamps[-1, 1], stamps[-1, 0]))
    except Exception:  # noqa: BLE001 - decord builds without timestamps: fall back to the average rate
        pass
    if not fps > 0:
        raise PredictError("the video reports no frame rate and no timestamps")
    return np.arange(n) / fps, n / fps


def read_video(path: str | Path, at: float | None = None, num_frames: int = NUM_OBS_FRAMES) -> Observation:
    """The observation window of an MP4 (or any container decord reads) ending at ``at`` seconds."""
    path = Path(path)
    if not path.is_file():
        raise PredictError(f"video not found: {path}")
    if path.stat().st_size == 0:
        raise PredictError(f"video is empty (0 bytes): {path}")
    try:
        import decord

        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        n = len(reader)
        fps = float(reader.get_avg_fps())
    except Exception as exc:  # noqa: BLE001 - decord raises RuntimeError/DECORDError for non-video files
        raise PredictError(f"cannot read video {path}: {str(exc).splitlines()[0][:200]}") from exc
    if n == 0:
        raise PredictError(f"video has no frames: {path}")
    starts, duration = _frame_timestamps(reader, fps)
    last = float(starts[-1])
    notes = []
    if at is None:
        at = last
    elif at < 0:
        raise PredictError(f"--at must be >= 0 s, got {at}")
    elif at > duration + 1e-6:
        raise PredictError(f"--at {at:g} s is past the end of {path} ({duration:.3f} s long, {n} frames "
                           f"at {fps:.3f} fps; its last frame is at {last:.3f} s)")
    times = window_times(at, num_frames)
    if at - (num_frames - 1) / OBS_FPS < 0:
        notes.append(f"the {(num_frames - 1) / OBS_FPS:g} s window ending at {at:g} s starts before the video: "
                     f"{int((times == 0).sum())} observed frames are its first frame")
    index = nearest_frames(times, starts)
    try:
        frames = reader.get_batch(index.tolist()).asnumpy()
    except Exception as exc:  # noqa: BLE001
        raise PredictError(f"cannot decode frames {index.tolist()} of {path}: {str(exc).splitlines()[0][:200]}") from exc
    return Observation(frames=np.ascontiguousarray(frames, dtype=np.uint8),
                       times_s=[round(float(t), 6) for t in starts[index]],
                       source={"video": str(path), "at_s": round(float(at), 6), "frame_indices": index.tolist(),
                               "fps": round(fps, 6), "num_frames": n, "duration_s": round(duration, 6)},
                       notes=notes)


def _natural_key(name: str):
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def read_frames_dir(directory: str | Path, num_frames: int = NUM_OBS_FRAMES) -> Observation:
    """The last ``num_frames`` images of a directory (front-padded with the first when fewer)."""
    import cv2

    directory = Path(directory)
    if not directory.is_dir():
        raise PredictError(f"frames directory not found: {directory}")
    files = sorted((p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: _natural_key(p.name))
    if not files:
        raise PredictError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {directory}")
    notes = []
    chosen = files[-num_frames:]
    if len(chosen) < num_frames:
        pad = num_frames - len(chosen)
        notes.append(f"{len(chosen)} image(s) for a {num_frames}-frame window: the first image "
                     f"({chosen[0].name}) is repeated {pad} more time(s) at the start")
        chosen = [chosen[0]] * pad + chosen
    decoded: dict[Path, np.ndarray] = {}
    for p in dict.fromkeys(chosen):
        bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if bgr is None:
            raise PredictError(f"cannot read image {p}")
        decoded[p] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    sizes = {img.shape[:2] for img in decoded.values()}
    if len(sizes) != 1:
        raise PredictError(f"images in {directory} differ in size: {sorted((w, h) for h, w in sizes)} (W, H)")
    frames = np.stack([decoded[p] for p in chosen])
    return Observation(frames=frames, times_s=[round(k / OBS_FPS, 6) for k in range(num_frames)],
                       source={"frames": str(directory), "files": [p.name for p in chosen], "assumed_fps": OBS_FPS},
                       notes=notes)


def model_frames(frames: np.ndarray, height: int = MODEL_FRAME_HEIGHT) -> np.ndarray:
    """Frames as the training shards store them: resized to ``height`` when taller (aspect kept)."""
    import cv2

    h, w = frames.shape[1:3]
    if h <= height:
        return frames
    width = max(1, int(round(w * height / h)))
    return np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in frames])


# ---------------------------------------------------------------------------------------- model
def load_model(directory: str | Path, device: str):
    import torch

    from handsonvlm.model import CONFIG_FILE, WEIGHTS_FILE, HandsOnVLM

    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise PredictError(f"{directory} is not an exported HandsOnVLM model (no {name}); "
                               f"pass the directory written by pipelines/train.py, e.g. runs/models/<run-name>")
    try:
        model = HandsOnVLM.from_pretrained(directory)
    except (OSError, RuntimeError, ValueError) as exc:
        raise PredictError(f"cannot load the model from {directory}: {str(exc).splitlines()[0][:300]}") from exc
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), device


def build_prompt(model, question: str):
    """Left-padded [1, L] ids and mask: the question as one user turn after the image token."""
    from handsonvlm.data import encode_conversation, pad_sequences, rbhp_turns

    ids, _ = encode_conversation(model.tokenizer, rbhp_turns(question, model.cfg, with_answer=False), model.cfg)
    return pad_sequences([ids], model.tokens.pad, side="left")


def predict(model, observation: Observation, question: str, num_samples: int = 1, temperature: float = 0.5,
            top_p: float = 0.9, seed: int = 0, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, device: str = "cpu"):
    """Run the model on one observed window -> GenerationResult (batch of one)."""
    from handsonvlm.generation import generate
    from handsonvlm.image import preprocess_frames

    frames = preprocess_frames(model_frames(observation.frames), image_size=model.vision.image_size)
    input_ids, attention_mask = build_prompt(model, question)
    return generate(model, input_ids.to(device), attention_mask.to(device), frames=frames[None].to(device),
                    num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, seed=seed)


# ---------------------------------------------------------------------------------------- output
def _json_points(trajectory: np.ndarray) -> list:
    """[2, T, 2] -> nested lists, NaN -> None (strict JSON)."""
    return [[[None if not math.isfinite(v) else round(float(v), 6) for v in point] for point in hand]
            for hand in trajectory]


def choose_drawn(trajectories: np.ndarray, complete: np.ndarray, mode: str) -> tuple[np.ndarray | None, dict | None]:
    """The trajectory [2, T, 2] to draw from K samples [K, 2, T, 2]: the mean over complete samples,
    or the first complete one; None when no sample is complete."""
    done = np.flatnonzero(complete)
    if len(done) == 0:
        return None, None
    if mode == "first":
        return trajectories[done[0]], {"mode": "first", "samples": [int(done[0])]}
    return trajectories[done].mean(0), {"mode": "mean", "samples": done.tolist()}


def overlay_size(width: int, height: int) -> tuple[int, int]:
    """(W, H) to draw at: 960x540 for 16:9-ish input (the release's), else 960 wide with the input's aspect."""
    from handsonvlm.viz import RELEASE_SIZE

    if abs((width / height) / (RELEASE_SIZE[0] / RELEASE_SIZE[1]) - 1) < 0.01:
        return RELEASE_SIZE
    return OVERLAY_WIDTH, max(2, int(round(OVERLAY_WIDTH * height / width / 2)) * 2)


def build_document(question: str, observation: Observation, result, sampling: dict, drawn: dict | None,
                   notes: list[str], num_future_points: int) -> dict:
    trajectories = result.trajectories[0].detach().float().cpu().numpy()
    h, w = observation.frames.shape[1:3]
    return {
        "question": question,
        "answers": list(result.texts[0]),
        "trajectories": [_json_points(t) for t in trajectories],
        "hands": list(HANDS),
        "complete": [bool(c) for c in result.complete[0].tolist()],
        "hand_token_counts": [int(c) for c in result.hand_counts[0].tolist()],
        "times_s": [round((k + 1) / OBS_FPS, 6) for k in range(num_future_points)],
        "observed_frame_times_s": observation.times_s,
        "frame_size": [int(w), int(h)],
        "coordinates": "normalised to the full input frame (x/W, y/H), plane of the last observed frame",
        "source": observation.source,
        "sampling": sampling,
        "drawn": drawn,
        "notes": notes,
    }


def write_overlays(observation: Observation, pred: np.ndarray | None, out: str | None, png: str | None) -> None:
    from handsonvlm import viz

    h, w = observation.frames.shape[1:3]
    size = overlay_size(w, h)
    if out:
        viz.overlay_video(observation.frames, pred=pred, path=out, fps=OBS_FPS, size=size, hold=1)
    if png:
        viz.save_png(viz.overlay_image(observation.frames, pred=pred, size=size), png)


# ---------------------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="predict.py", description=__doc__.split("\n\n")[0],
                                epilog="Details (window, coordinates, drawing): the docstring of pipelines/predict.py "
                                       "and README.md, 'Predicting on your own video'.")
    p.add_argument("--model", required=True, help="exported model directory (runs/models/<run-name>)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", help="a video file (mp4, ...) read with decord")
    src.add_argument("--frames", help="a directory of .jpg/.png frames at 4 fps, sorted by name; the last 10 are used")
    p.add_argument("--question", required=True, help='e.g. "Where should my hand move to if I want to open the fridge?"')
    p.add_argument("--at", type=float, help="--video only: time (s) of the last observed frame (default: the last frame)")
    p.add_argument("--num-samples", type=positive_int, default=1, help="K answers, each with its own trajectory (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.5, help="0 = greedy, deterministic (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds token and CVAE sampling (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS,
                   help="answer length limit (default: %(default)s, as the release)")
    p.add_argument("--draw", choices=DRAW_MODES, default="mean",
                   help="what --out/--png draw: the mean over complete samples, or the first complete sample (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ... (default: %(default)s)")
    p.add_argument("--out", help="write an overlay MP4 (observed frames, then the trajectories point by point)")
    p.add_argument("--png", help="write the last observed frame with the trajectories as PNG")
    p.add_argument("--json", help="also write the JSON document to this file")
    args = p.parse_args(argv)
    if args.at is not None and args.video is None:
        p.error("--at only applies to --video")
    if args.temperature < 0:
        p.error("--temperature must be >= 0")
    if not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    if not args.question.strip():
        p.error("--question is empty")
    return args


def run(args: argparse.Namespace) -> dict:
    from handsonvlm.config import ModelConfig
    from handsonvlm.model import CONFIG_FILE

    # Read and check the input before loading the (possibly large) model.
    config_path = Path(args.model) / CONFIG_FILE
    if not config_path.is_file():
        raise PredictError(f"{args.model} is not an exported HandsOnVLM model (no {CONFIG_FILE}); "
                           f"pass the directory written by pipelines/train.py, e.g. runs/models/<run-name>")
    try:
        cfg = ModelConfig.from_dict(json.loads(config_path.read_text()))
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise PredictError(f"invalid model config {config_path}: {exc}") from exc
    num_frames = cfg.num_obs_frames
    observation = read_video(args.video, args.at, num_frames) if args.video else read_frames_dir(args.frames, num_frames)
    h, w = observation.frames.shape[1:3]
    notes = list(observation.notes)
    if abs((w / h) / TRAINING_ASPECT - 1) > ASPECT_TOLERANCE:
        notes.append(f"the frames are {w}x{h}; the model was trained on 456x256 EPIC frames, so its centre "
                     f"crop covers a different part of the picture than in training")
    if args.temperature == 0 and args.num_samples > 1:
        notes.append("--temperature 0 is greedy: all samples are identical")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)

    print(f"loading {args.model} ...", file=sys.stderr)
    model, device = load_model(args.model, args.device)
    question = args.question.strip()
    result = predict(model, observation, question, num_samples=args.num_samples, temperature=args.temperature,
                     top_p=args.top_p, seed=args.seed, max_new_tokens=args.max_new_tokens, device=device)

    trajectories = result.trajectories[0].detach().float().cpu().numpy()  # [K, 2, T, 2]
    complete = result.complete[0].cpu().numpy().astype(bool)
    counts = result.hand_counts[0].tolist()
    T = model.cfg.num_future_points
    late = []
    for k in np.flatnonzero(~complete):
        if counts[k] < T:
            missing = ("its missing points are null" if model.cfg.mode == "corrected"
                       else "its missing points are zero-padded (release mode)")
        else:
            missing = (f"its first {T} points are kept" if model.cfg.mode == "corrected"
                       else f"its last {T} points are kept (release mode)")
        late.append(f"sample {k} is incomplete ({counts[k]} hand tokens, {T} expected): {missing}; it is not drawn")
    pred, drawn = choose_drawn(trajectories, complete, args.draw)
    if pred is None and (args.out or args.png):
        late.append("no sample is complete: the overlays show the frames without trajectories")
    for note in late:
        print(f"note: {note}", file=sys.stderr)
    notes += late
    sampling = {"num_samples": args.num_samples, "temperature": args.temperature, "top_p": args.top_p,
                "seed": args.seed, "max_new_tokens": args.max_new_tokens, "model": str(args.model),
                "mode": model.cfg.mode, "device": str(device)}
    doc = build_document(question, observation, result, sampling, drawn, notes, T)

    for k, (text, ok) in enumerate(zip(doc["answers"], complete)):
        flag = "" if ok else f"  [incomplete: {counts[k]}/{T} hand tokens]"
        print(f"A[{k}]: {text}{flag}")
    try:
        write_overlays(observation, pred, args.out, args.png)
    except OSError as exc:
        raise PredictError(str(exc)) from exc
    text = json.dumps(doc, allow_nan=False)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    print(text)
    return doc


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except PredictError as exc:
        print(f"predict.py: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
