"""Ask an exported HandsOnVLM about your own clip: answer text + the future trajectories of both hands.

    python pipelines/predict.py --model runs/models/<name> (--video clip.mp4 | --frames DIR) --question "..."
        [--config PRESET] [--at SECONDS] [--num-samples K] [--temperature 0.5] [--top-p 0.9] [--seed 0]
        [--max-new-tokens N] [--top-k K] [--dtype auto|fp32|fp16|bf16] [--prompt-template T]
        [--draw mean|first] [--device auto|cpu|cuda] [--out overlay.mp4] [--png overlay.png] [--json out.json]

One machine, no Ray: the export of ``pipelines/train.py`` answers one clip. The settings are a
``handsonvlm.config.PredictConfig``: its defaults, then a preset's ``predict:`` section
(``--config``), then the flags; top-k, length, dtype and prompt template left unset take the model
mode's value (``inference.resolve_sampling``; the document's ``sampling`` shows what ran). The
observed window (10 frames at 4 fps ending at ``--at``, or the last 10 images of ``--frames``) is
read by ``preprocessing.media.read_video``/``read_frames_dir`` and resized like the shards' frames
(``model_frames``: 1920x1080 -> 456x256); the model side is ``handsonvlm.inference``. Details
(window, coordinates, drawing): README.md, 'Predicting on your own video'.

Output (stdout): one line per answer (``A[k]``), then the JSON document on the *last* line (also
written to ``--json FILE``, indented)::

    {"question", "answers": [K], "trajectories": [K][2 hands][4 steps][x, y], "hands": ["right", "left"],
     "complete": [K], "hand_token_counts": [K], "times_s": [0.25, 0.5, 0.75, 1.0],
     "observed_frame_times_s": [10], "frame_size": [W, H], "source": {...}, "sampling": {...},
     "drawn": {...} | null, "notes": [...]}

Coordinates are (x / W, y / H) of the full input frame, in the plane of the last observed frame.
A sample with fewer than 4 ``<hand_traj>`` tokens is incomplete: ``null`` points (zero-padded in
release mode), ``complete: false``, a note, never drawn.

Exit status: 0 on success, 2 on a usage error or an unreadable input (one ``error:`` line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a bare checkout

from handsonvlm import inference
from handsonvlm.config import (
    PredictConfig,
    SamplingConfig,
    add_section_flags,
    apply_overrides,
    load_section,
    section_overrides,
)
from handsonvlm.constants import OBS_FPS
from handsonvlm.devices import DeviceError
from pipelines import tracking
from preprocessing.media import InputError, Observation, model_frames, read_frames_dir, read_video

SECTION = "predict"  # the preset section (and override prefix) of PredictConfig
PREDICT_FLAGS = tuple(f.name for f in fields(PredictConfig))  # --num-samples ... --device
EXIT_ERROR = 2


class SettingsError(Exception):
    """Settings that cannot run on this machine (e.g. ``--dtype bf16`` on a GPU without bf16)."""


# one line, not a traceback (DeviceError: --device cuda on a machine without that GPU, naming --device cpu)
USER_ERRORS = (InputError, inference.ModelLoadError, OSError, SettingsError, DeviceError)


def predict_config(preset: str | None, overrides: list[str]) -> PredictConfig:
    """The dataclass defaults, then ``preset``'s ``predict:`` section when given, then ``overrides``."""
    if preset:
        return load_section(PredictConfig, preset, SECTION, overrides)
    return PredictConfig.from_dict(apply_overrides({}, overrides).get(SECTION))


def parse_args(argv=None) -> tuple[argparse.Namespace, PredictConfig]:
    p = argparse.ArgumentParser(prog="predict.py", description=__doc__.split("\n\n")[0],
                                epilog="Details (window, coordinates, drawing): README.md, "
                                       "'Predicting on your own video', and the docstring of pipelines/predict.py.")
    p.add_argument("--model", required=True, help="exported model directory (runs/models/<run-name>), "
                   "models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", help="a video file (mp4, ...) read with decord")
    src.add_argument("--frames", help="a directory of .jpg/.png frames at 4 fps, sorted by name; the last 10 are used")
    p.add_argument("--question", required=True,
                   help='e.g. "Where should my hand move to if I want to open the fridge?"')
    p.add_argument("--config", help="a preset (tiny, configs/<name>.yaml) whose predict: section sets the defaults")
    add_section_flags(p, SECTION, PredictConfig, PREDICT_FLAGS)
    p.add_argument("--out", help="write an overlay MP4 (observed frames, then the trajectories point by point)")
    p.add_argument("--png", help="write the last observed frame with the trajectories as PNG")
    p.add_argument("--json", help="also write the JSON document to this file")
    args = p.parse_args(argv)
    try:
        cfg = predict_config(args.config, section_overrides(args, SECTION, PREDICT_FLAGS))
    except (ValueError, FileNotFoundError) as exc:  # a bad value, an unknown preset or key
        p.error(str(exc))
    if cfg.at is not None and args.video is None:
        p.error("--at only applies to --video")
    if not args.question.strip():
        p.error("--question is empty")
    return args, cfg


def warn(notes: list[str]) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def write_outputs(doc: dict, observation: Observation, pred, args: argparse.Namespace) -> None:
    """The overlays (``--out`` MP4 at 4 fps so that time runs at its real pace, ``--png``) and ``--json``."""
    from handsonvlm import viz

    h, w = observation.frames.shape[1:3]
    size = inference.overlay_size(w, h)
    if args.out:
        viz.overlay_video(observation.frames, pred=pred, path=args.out, fps=OBS_FPS, size=size, hold=1)
    if args.png:
        viz.save_png(viz.overlay_image(observation.frames, pred=pred, size=size), args.png)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")


def run(args: argparse.Namespace, cfg: PredictConfig) -> dict:
    args.model = tracking.resolve_model(args.model)  # an MLflow model URI becomes its local download
    # Read and check the input before loading the (possibly large) model.
    model_cfg = inference.read_model_config(args.model)
    num_frames = model_cfg.num_obs_frames
    if args.video:
        observation = read_video(args.video, cfg.at, num_frames)
    else:
        observation = read_frames_dir(args.frames, num_frames)
    h, w = observation.frames.shape[1:3]
    # the model mode's top-k, length, dtype and template for the device it will run on (what the JSON shows)
    device = inference.resolve_device(cfg.device)
    resolution_notes: list[str] = []
    try:
        cfg = inference.resolve_sampling(cfg, model_cfg, args.model, device, notes=resolution_notes)
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc
    notes = [*observation.notes, *inference.input_notes(w, h, cfg), *resolution_notes]
    warn(notes)

    print(f"loading {args.model} ...", file=sys.stderr)
    model, device = inference.load_model(args.model, device, dtype=cfg.dtype)
    question = args.question.strip()
    result = inference.predict(model, model_frames(observation.frames), question, cfg, device)

    trajectories, complete, counts = inference.first_clip(result)
    num_points = model.cfg.num_future_points
    late = inference.incomplete_notes(complete, counts, num_points, model.cfg.mode)
    pred, drawn = inference.choose_drawn(trajectories, complete, cfg.draw)
    if pred is None and (args.out or args.png):
        late.append("no sample is complete: the overlays show the frames without trajectories")
    warn(late)
    sampling = {f.name: getattr(cfg, f.name) for f in fields(SamplingConfig)}
    sampling.update(model=str(args.model), mode=model.cfg.mode, device=str(device))
    doc = inference.build_document(question, observation, result, sampling, drawn, notes + late)

    for k, (text, ok) in enumerate(zip(doc["answers"], complete)):
        flag = "" if ok else f"  [incomplete: {counts[k]}/{num_points} hand tokens]"
        print(f"A[{k}]: {text}{flag}")
    write_outputs(doc, observation, pred, args)
    print(json.dumps(doc, allow_nan=False))
    return doc


def main(argv=None) -> int:
    args, cfg = parse_args(argv)
    try:
        run(args, cfg)
    except USER_ERRORS as exc:
        print(f"predict.py: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
