"""Golden regression values of the training task mixture: the first 20 draws of epoch 0 for seed 0.

The draws (task, clip, question template, paraphrase, answer template) are pinned in
``tests/golden/mixture_draws_seed0.json``. They change only on purpose (new templates, a new
sampling rule); the commit that changes them says why. Last change: the task-first draws with
per-task pools (the release's HybridDataset sampling) replaced the per-row task choice, and the
project's own answer wordings replaced the four that were the release's. Regenerate with
``python tests/test_golden_mixture.py --write``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from handsonvlm.config import load_model_config
from handsonvlm.mixture import Mixture

GOLDEN = Path(__file__).parent / "golden" / "mixture_draws_seed0.json"
NUM_DRAWS = 20
NARRATION = "take cup"
PARAPHRASES = ["grab the mug", "pick up the drinking vessel"]
QUESTIONS = ["Where should my hand move to if I want to have a drink?",
             "Can you provide the hand trajectory for quenching my thirst?",
             "What is the recommended hand movement for getting something to sip from?"]


def golden_rows() -> list[dict]:
    """Every third row has no RBHP question, so the RBHP pool is a strict subset of the clips."""
    return [{"sample_id": f"P01_01_{i}", "narration": NARRATION, "narration_paraphrases": PARAPHRASES,
             "noun": "cup", "rbhp_questions": QUESTIONS if i % 3 else []} for i in range(NUM_DRAWS)]


def draws(seed: int = 0, epoch: int = 0) -> list[dict]:
    mixture = Mixture.from_config({"seed": seed}, load_model_config("tiny"))
    return [{"sample_id": sample_id, "task": task, "turns": [list(turn) for turn in turns]}
            for task, sample_id, turns in mixture.epoch_conversations(golden_rows(), NUM_DRAWS, epoch)]


def test_first_twenty_draws_for_seed_0_match_the_golden_file():
    expected = json.loads(GOLDEN.read_text())
    actual = draws()
    assert [d["task"] for d in actual] == [d["task"] for d in expected]
    assert actual == expected


def test_another_seed_draws_differently():
    assert draws(seed=1) != json.loads(GOLDEN.read_text())


if __name__ == "__main__" and "--write" in sys.argv:
    GOLDEN.write_text(json.dumps(draws(), indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {GOLDEN}")
