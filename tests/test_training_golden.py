"""Golden values of the training recipe: the tiny preset, five plain-PyTorch optimizer steps.

``handsonvlm.training`` (build_training, rows_to_batch, plain_step, fixed_batch_loss) on fixed
rows from a fixed seed must reproduce these numbers, so a change that reorders RNG draws, model
or optimizer construction, data order or float ops shows up here in seconds, without Ray or
DeepSpeed. They change only on purpose, and the commit that changes them says why. Last change: the
frames are resized with Pillow's bicubic on uint8 (``handsonvlm.image.preprocess_frames``, the
release processor's resize) instead of a float32 torch bicubic; with the old resize patched back in,
the values before this change are reproduced.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from handsonvlm.config import ModelConfig, TrainConfig, load_preset
from handsonvlm.constants import NUM_FUTURE_POINTS, NUM_HANDS, NUM_OBS_FRAMES, POINT_DIM
from handsonvlm.mixture import drawn_rows
from handsonvlm.training import LOSS_PARTS, build_training, fixed_batch_loss, plain_step, rows_to_batch

PRESET = "tiny"
STEPS, BATCH = 5, 2  # the schedule spans exactly these steps: warm-up, then cosine decay to 0
EPOCH = 0
ROW_SEED = 0
FRAME_HEIGHT, FRAME_WIDTH = 48, 80  # small noise frames; the tower resizes them to its own size
RTOL = 1e-5  # torch on CPU with one thread is deterministic; this only absorbs float printing
ACTIONS = [("take cup", "cup", "Where should my hand move to if I want to have a drink?"),
           ("open drawer", "drawer", "How do I get to the cutlery?"),
           ("wash plate", "plate", "Where do my hands go to clean the dish?")]

GOLDEN_TASKS = [["rbhp", "rbhp"], ["vhp", "rbhp"], ["rbhp", "rbhp"], ["rbhp", "vhp"], ["rbhp", "vhp"]]
GOLDEN_LOSSES = [  # loss, text_loss, traj_loss, kl_loss of each step (before that step's update)
    (20.971172332763672, 7.042774677276611, 13.916196823120117, 12.200715065002441),
    (16.899147033691406, 6.9412970542907715, 9.945497512817383, 12.352127075195312),
    (8.949159622192383, 6.758041858673096, 2.184469699859619, 6.64848518371582),
    (7.9797282218933105, 6.7416863441467285, 1.2301048040390015, 7.937227725982666),
    (9.113289833068848, 6.674588680267334, 2.425499677658081, 13.201631546020508),
]
GOLDEN_FIXED_BATCH_LOSS = {"initial": 24.856605529785156, "final": 11.673791885375977}


def golden_rows(count: int) -> list[dict]:
    """Sample-shard rows (docs/DATA.md columns) with noise JPEG frames and random targets, seeded."""
    rng = np.random.default_rng(ROW_SEED)
    rows = []
    for i in range(count):
        narration, noun, question = ACTIONS[i % len(ACTIONS)]
        frames = rng.integers(0, 256, (NUM_OBS_FRAMES, FRAME_HEIGHT, FRAME_WIDTH, 3), dtype=np.uint8)
        # point 0 is the last observed position, then the future points
        hands = rng.uniform(0.0, 1.0, (NUM_HANDS, NUM_FUTURE_POINTS + 1, POINT_DIM)).astype(np.float32)
        rows.append({"sample_id": f"P01_01_{i}", "narration": narration, "narration_paraphrases": [f"{narration} now"],
                     "noun": noun, "rbhp_questions": [question], "future_hands": hands.tolist(),
                     "future_valid": [True, bool(i % 2)],
                     "obs_jpeg": [cv2.imencode(".jpg", frame)[1].tobytes() for frame in frames]})
    return rows


@pytest.fixture(scope="module")
def golden_run() -> dict:
    preset = load_preset(PRESET)
    train, cfg = TrainConfig.from_dict(preset["train"]), ModelConfig.from_dict(preset["model"])
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: reductions in one order, bit-identical results
    try:
        with torch.random.fork_rng(devices=[]):  # build_training seeds the global RNG; leave it to the others
            parts = build_training(train, cfg, STEPS)
            generator = torch.Generator().manual_seed(train.seed)
            device = torch.device("cpu")
            clips = golden_rows(STEPS * BATCH)
            draws = parts.mixture.draw_epoch(parts.mixture.pools(clips), STEPS * BATCH, EPOCH)
            rows = drawn_rows([clips[r] for r in draws.rows.tolist()], draws, range(len(draws)))
            fixed, _ = rows_to_batch(rows[:BATCH], parts.model, parts.mixture, EPOCH, device)
            initial = fixed_batch_loss(parts.model, fixed)
            losses, tasks = [], []
            for step in range(STEPS):
                batch, step_tasks = rows_to_batch(rows[step * BATCH:(step + 1) * BATCH], parts.model, parts.mixture,
                                                  EPOCH, device)
                out = plain_step(parts, batch, generator, train.max_grad_norm)
                losses.append(tuple(float(out[k].detach()) for k in LOSS_PARTS))
                tasks.append(step_tasks)
            final = fixed_batch_loss(parts.model, fixed)
    finally:
        torch.set_num_threads(previous_threads)
    return {"losses": losses, "tasks": tasks, "fixed": {"initial": initial, "final": final}}


def test_the_mixture_draws_the_golden_tasks(golden_run):
    assert golden_run["tasks"] == GOLDEN_TASKS


def test_five_steps_reproduce_the_golden_losses(golden_run):
    for step, (got, want) in enumerate(zip(golden_run["losses"], GOLDEN_LOSSES), start=1):
        assert got == pytest.approx(want, rel=RTOL), f"step {step}"


def test_fixed_batch_loss_before_and_after_training_is_golden(golden_run):
    assert golden_run["fixed"] == pytest.approx(GOLDEN_FIXED_BATCH_LOSS, rel=RTOL)
