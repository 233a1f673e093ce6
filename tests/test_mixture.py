"""The seeded training task mixture (handsonvlm.mixture): determinism, rates, conventions, tokenisation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import cv2
import numpy as np
import pytest
import torch

from handsonvlm import data
from handsonvlm.config import load_model_config, load_preset
from handsonvlm.mixture import (
    DEFAULT_TASK_RATES,
    Media,
    Mixture,
    MixtureExample,
    NoTaskError,
    RBHPSource,
    TaskSource,
    VHPSource,
    drawn_rows,
    eval_rng,
    make_example,
    rbhp_eval_turns,
    row_rng,
    stable_hash,
    vhp_eval_turns,
)
from handsonvlm.model import IGNORE_INDEX, IMAGE_PLACEHOLDER
from handsonvlm.prompts import ACTION_QUESTIONS
from handsonvlm.tokens import load_tokenizer, special_tokens

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NARRATION = "take cup"
PARAPHRASES = ["grab the mug", "pick up the drinking vessel"]
QUESTIONS = ["Where should my hand move to if I want to have a drink?",
             "Can you provide the hand trajectory for quenching my thirst?",
             "What is the recommended hand movement for getting something to sip from?"]


def make_row(i: int, questions=QUESTIONS, paraphrases=PARAPHRASES, narration=NARRATION, noun="cup") -> dict:
    return {"sample_id": f"P01_01_{i}", "narration": narration, "narration_paraphrases": paraphrases,
            "noun": noun, "rbhp_questions": questions,
            "future_hands": (np.arange(20, dtype=np.float32).reshape(2, 5, 2) / 20).tolist(),
            "future_valid": [True, False]}


@pytest.fixture(scope="module")
def cfg():
    return load_model_config("tiny")


@pytest.fixture(scope="module")
def tokenizer(cfg):
    return load_tokenizer(cfg)


def trajectory_counts(turns, cfg) -> list[int]:
    return [answer.count(cfg.hand_token) for _, answer in turns]


def image_count(turns, cfg) -> int:
    return sum(u.count(cfg.image_token) + (a or "").count(cfg.image_token) for u, a in turns)


# ----------------------------------------------------------------------------------------------- determinism


def test_draws_and_conversations_are_functions_of_their_keys(cfg):
    rows = [make_row(i) for i in range(200)]
    a = Mixture.from_config({"seed": 7}, cfg)
    b = Mixture.from_config({"seed": 7}, cfg)
    draws_a, draws_b = a.draw_epoch(a.pools(rows), 300, 3), b.draw_epoch(b.pools(rows), 300, 3)
    assert np.array_equal(draws_a.tasks, draws_b.tasks) and np.array_equal(draws_a.rows, draws_b.rows)
    keys = [(rows[r], a.names[t], j) for j, (t, r) in enumerate(zip(draws_a.tasks, draws_a.rows))]
    forward = [a.conversation(row, task, 3, j) for row, task, j in keys]
    backward = [b.conversation(dict(row), task, 3, j) for row, task, j in reversed(keys)][::-1]
    assert forward == backward  # another mixture, the other order, copies of the rows
    assert forward == [a.conversation(row, task, 3, j) for row, task, j in keys]  # no hidden state
    # dict order of sources/rates does not matter either
    c = Mixture({"rbhp": RBHPSource(), "vhp": VHPSource(0.5)}, {"rbhp": 0.5, "vhp": 0.5}, seed=7, cfg=cfg)
    assert c.epoch_conversations(rows, 300, 3) == a.epoch_conversations(rows, 300, 3)
    # the same clip drawn twice in an epoch gets independent conversations
    vhp = [a.conversation(rows[0], "vhp", 3, j) for j in range(40)]
    assert len({str(turns) for turns in vhp}) > 10


def test_different_epoch_or_seed_changes_draws(cfg):
    rows = [make_row(i) for i in range(300)]
    mix = Mixture.from_config({"seed": 0}, cfg)
    other_seed = Mixture.from_config({"seed": 1}, cfg)
    e0 = mix.epoch_conversations(rows, 300, 0)
    e1 = mix.epoch_conversations(rows, 300, 1)
    s1 = other_seed.epoch_conversations(rows, 300, 0)
    assert sum(x != y for x, y in zip(e0, e1)) > 0.6 * len(rows)
    assert sum(x != y for x, y in zip(e0, s1)) > 0.6 * len(rows)
    # tasks and clips themselves also change between epochs (not only the templates)
    assert sum(x[0] != y[0] for x, y in zip(e0, e1)) > 0.3 * len(rows)
    assert sum(x[1] != y[1] for x, y in zip(e0, e1)) > 0.9 * len(rows)


def test_draws_do_not_depend_on_python_hash_seed(cfg):
    script = ("import json; from handsonvlm.config import load_model_config; from handsonvlm.mixture import Mixture\n"
              "cfg = load_model_config('tiny'); mix = Mixture.from_config({'seed': 5}, cfg)\n"
              "rows = [{'sample_id': f'P01_01_{i}', 'narration': 'take cup', 'noun': 'cup',\n"
              "         'narration_paraphrases': ['grab the mug'], 'rbhp_questions': ['Where to drink?']}"
              " for i in range(30)]\n"
              "print(json.dumps(mix.epoch_conversations(rows, 30, 2)))\n")
    # one child process with a hash seed other than this process's (str hashes differ between them)
    hash_seed = "12345" if os.environ.get("PYTHONHASHSEED") != "12345" else "54321"
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, check=True, timeout=120)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    mix = Mixture.from_config({"seed": 5}, cfg)
    here = mix.epoch_conversations([{"sample_id": f"P01_01_{i}", "narration": "take cup", "noun": "cup",
                                     "narration_paraphrases": ["grab the mug"], "rbhp_questions": ["Where to drink?"]}
                                    for i in range(30)], 30, 2)
    as_json = json.loads(json.dumps(here))
    assert child == as_json


def test_row_rng_is_a_function_of_its_inputs():
    assert stable_hash("P01_01_0") == stable_hash("P01_01_0") != stable_hash("P01_01_1")
    def draw(*a):
        return row_rng(*a).random(4).tolist()

    assert draw(0, 1, "x", "task") == draw(0, 1, "x", "task")
    assert draw(0, 1, "x", "task") != draw(0, 1, "x", "source:vhp")
    assert draw(0, 1, "x", "task") != draw(0, 2, "x", "task")
    assert draw(0, 1, "x", "task") != draw(1, 1, "x", "task")
    with pytest.raises(ValueError):
        row_rng(-1, 0, "x")


# ----------------------------------------------------------------------------------------------- rates


@pytest.mark.parametrize("rates", [DEFAULT_TASK_RATES, {"vhp": 0.8, "rbhp": 0.2}, {"vhp": 1.0, "rbhp": 3.0}])
def test_task_frequencies_follow_rates(cfg, rates):
    mix = Mixture.from_config({"task_rates": rates, "seed": 3}, cfg)
    n = 2000
    counts = mix.draw_epoch(mix.pools([make_row(i) for i in range(50)]), n, 0).counts()
    total = sum(rates.values())
    for task, rate in rates.items():
        expected = rate / total
        assert abs(counts[task] / n - expected) < 4 * np.sqrt(expected * (1 - expected) / n) + 1e-9, (task, counts)


def test_task_first_then_a_clip_from_the_tasks_own_pool(cfg):
    """The release's HybridDataset: RBHP gets its rate however few clips have questions; its clips
    are then drawn repeatedly (here 20 % coverage: each RBHP clip about 2.5x per 100 draws)."""
    empties = [[], None, np.array([], dtype=object), ["", "  "]]
    rows = [make_row(i, questions=QUESTIONS if i % 5 == 0 else empties[i % 4]) for i in range(500)]
    mix = Mixture.from_config({"seed": 4}, cfg)
    pools = mix.pools(rows)
    assert pools["rbhp"].tolist() == list(range(0, 500, 5)) and len(pools["vhp"]) == 500
    n = 20000
    draws = mix.draw_epoch(pools, n, 0)
    share = draws.counts()["rbhp"] / n
    assert abs(share - 0.5) < 4 * np.sqrt(0.25 / n)  # not 0.5 x 20 % as a per-row choice would give
    rbhp_rows = draws.rows[draws.tasks == mix.names.index("rbhp")]
    assert set(rbhp_rows.tolist()) <= set(pools["rbhp"].tolist())
    seen = np.bincount(rbhp_rows, minlength=500)[pools["rbhp"]]
    assert seen.min() > 0 and abs(seen.mean() - n * 0.5 / 100) < 5  # each RBHP clip ~100 times
    # a numpy array column (as from pandas) with questions is in the pool
    assert len(mix.pools([make_row(0, questions=np.array(QUESTIONS, dtype=object))])["rbhp"]) == 1


def test_empty_pools_are_not_drawn_and_no_pool_at_all_raises(cfg):
    mix = Mixture.from_config({}, cfg)
    rows = [make_row(i, narration=None) for i in range(30)]
    assert mix.draw_epoch(mix.pools(rows), 300, 0).counts() == {"rbhp": 300, "vhp": 0}
    assert mix.drawn_probabilities(mix.pools(rows)) == {"rbhp": 1.0}
    with pytest.raises(NoTaskError, match="no task"):
        mix.draw_epoch(mix.pools([make_row(0, narration=None, questions=[])]), 10, 0)
    with pytest.raises(NoTaskError, match="cannot serve"):
        mix.conversation(make_row(0, questions=[]), "rbhp", 0)
    with pytest.raises(KeyError, match="sample_id"):
        mix.conversation({"narration": NARRATION}, "vhp", 0)


def test_zero_rate_task_is_never_drawn(cfg):
    mix = Mixture.from_config({"task_rates": {"vhp": 1.0, "rbhp": 0.0}}, cfg)
    assert mix.draw_epoch(mix.pools([make_row(i) for i in range(30)]), 300, 0).counts() == {"rbhp": 0, "vhp": 300}
    with pytest.raises(NoTaskError):
        mix.draw_epoch(mix.pools([make_row(0, narration=None)]), 10, 0)


def test_mixture_validation(cfg):
    with pytest.raises(ValueError, match="without a source"):
        Mixture.from_config({"task_rates": {"vhp": 0.5, "dvc": 0.5}}, cfg)
    with pytest.raises(ValueError, match="without a rate"):
        Mixture({"vhp": VHPSource(), "rbhp": RBHPSource()}, {"vhp": 1.0}, cfg=cfg)
    with pytest.raises(ValueError, match="all be zero"):
        Mixture({"vhp": VHPSource()}, {"vhp": 0.0}, cfg=cfg)
    with pytest.raises(ValueError, match="non-negative"):
        Mixture({"vhp": VHPSource()}, {"vhp": -1.0}, cfg=cfg)
    with pytest.raises(ValueError, match="rephrase_rate"):
        VHPSource(1.5)
    with pytest.raises(ValueError, match="ModelConfig"):
        Mixture({"vhp": VHPSource()}, {"vhp": 1.0}).conversation(make_row(0), "vhp", 0)


def test_from_config_reads_the_preset_train_section(cfg):
    train = load_preset("vicuna-7b")["train"]
    mix = Mixture.from_config(train, cfg)
    assert mix.rates == {"vhp": 0.5, "rbhp": 0.5} and mix.seed == 0
    assert mix.sources["vhp"].rephrase_rate == 0.5
    mix = Mixture.from_config({"task_rates": {"vhp": 2, "rbhp": 1}, "rephrase_rate": 0.25, "seed": 9}, cfg)
    assert mix.probabilities() == pytest.approx({"rbhp": 1 / 3, "vhp": 2 / 3})
    assert mix.sources["vhp"].rephrase_rate == 0.25 and mix.seed == 9
    assert isinstance(mix.sources["vhp"], TaskSource) and isinstance(mix.sources["rbhp"], TaskSource)


# ----------------------------------------------------------------------------------------------- VHP


@pytest.mark.parametrize("rate", [0.5, 0.2])
def test_rephrase_frequency_and_text(cfg, rate):
    source = VHPSource(rate)
    n = 2000
    draws = [source.draw(make_row(i), row_rng(0, 0, f"s{i}", "source:vhp"), cfg) for i in range(n)]
    share = np.mean([d.rephrased for d in draws])
    assert abs(share - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
    for d in draws:
        text = " ".join(u + " " + a for u, a in d.turns)
        assert d.narration in PARAPHRASES if d.rephrased else d.narration == NARRATION
        if d.mode != 1:  # mode 1 names no action
            assert d.narration in text
            assert (NARRATION in text) == (not d.rephrased)
        else:
            assert NARRATION not in text and not any(p in text for p in PARAPHRASES)
    # no paraphrases, or rate 0: always the raw narration
    assert not any(source.draw(make_row(i, paraphrases=[]), np.random.default_rng(i), cfg).rephrased
                   for i in range(200))
    assert not any(VHPSource(0.0).draw(make_row(i), np.random.default_rng(i), cfg).rephrased for i in range(200))


def test_every_vhp_mode_appears_with_its_structure(cfg):
    source = VHPSource(0.5)
    n = 2000
    draws = [source.draw(make_row(i), np.random.default_rng([4, i]), cfg) for i in range(n)]
    modes = Counter(d.mode for d in draws)
    assert set(modes) == {0, 1, 2, 3}
    for mode in range(4):
        assert abs(modes[mode] / n - 0.25) < 4 * np.sqrt(0.25 * 0.75 / n)
    k = cfg.num_future_points
    expected_hands = {0: [k], 1: [k], 2: [0, k], 3: [k, 0]}
    noun_variant = 0
    for d in draws:
        assert trajectory_counts(d.turns, cfg) == expected_hands[d.mode]
        assert image_count(d.turns, cfg) == 1 and d.turns[0][0].startswith(cfg.image_token + "\n")
        if d.mode == 0:
            assert any(d.turns[0][0] == f"{cfg.image_token}\n" + q.format(d.narration) for q in ACTION_QUESTIONS)
        if d.mode in (2, 3):
            action_answer = d.turns[0][1] if d.mode == 2 else d.turns[1][1]
            assert d.narration in action_answer
            noun_variant += "there is cup in view" in action_answer
    assert noun_variant > 0
    # without a noun the noun variant never appears
    for i in range(300):
        d = source.draw(make_row(i, noun=None), np.random.default_rng(i), cfg)
        assert all("in view" not in a for _, a in d.turns)


def test_hand_tokens_follow_the_config(cfg):
    cfg3 = load_model_config("tiny", ["model.num_future_points=3"])
    mix = Mixture.from_config({}, cfg3)
    for _task, _, turns in mix.epoch_conversations([make_row(i) for i in range(50)], 200, 0):
        counts = trajectory_counts(turns, cfg3)
        assert set(counts) <= {0, 3} and counts.count(3) == 1


def test_mixture_conversations_follow_turn_conventions(cfg):
    mix = Mixture.from_config({}, cfg)
    rows = [make_row(i) for i in range(100)]
    for task, _, turns in [c for epoch in range(3) for c in mix.epoch_conversations(rows, 333, epoch)]:
        assert image_count(turns, cfg) == 1
        assert turns[0][0].startswith(cfg.image_token + "\n")
        assert all(cfg.image_token not in u for u, _ in turns[1:])
        assert all(a is not None and a for _, a in turns)
        counts = trajectory_counts(turns, cfg)
        assert set(counts) <= {0, cfg.num_future_points} and counts.count(cfg.num_future_points) == 1
        if task == "rbhp":
            assert len(turns) == 1 and turns[0][0].split("\n", 1)[1] in QUESTIONS


# ----------------------------------------------------------------------------------------------- tokenisation


def test_conversations_tokenise_with_supervised_hand_tokens(cfg, tokenizer):
    hand_id = special_tokens(tokenizer, cfg).hand
    mix = Mixture.from_config({}, cfg)
    seen = Counter()
    source = mix.sources["vhp"]
    rows = [make_row(i) for i in range(100)]
    draws = mix.draw_epoch(mix.pools(rows), 400, 0)
    for j, (t, r) in enumerate(zip(draws.tasks.tolist(), draws.rows.tolist())):
        row, task = rows[r], mix.names[t]
        turns = mix.conversation(row, task, 0, j)
        if task == "vhp":
            seen[source.draw(row, mix.source_rng(row, 0, "vhp", j), cfg).mode] += 1
        else:
            seen["rbhp"] += 1
        ids, labels = data.encode_conversation(tokenizer, turns, cfg)
        assert len(ids) == len(labels)
        assert ids.count(IMAGE_PLACEHOLDER) == 1
        n_traj = sum(c == cfg.num_future_points for c in trajectory_counts(turns, cfg))
        assert n_traj == 1
        assert ids.count(hand_id) == 4 * n_traj
        assert labels.count(hand_id) == 4 * n_traj  # every hand token is supervised
        supervised = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
        for _, answer in turns:
            assert answer.replace(cfg.hand_token, "").split(":")[0].strip() in supervised
        # the user turns are never supervised
        assert labels[:ids.index(IMAGE_PLACEHOLDER) + 1] == [IGNORE_INDEX] * (ids.index(IMAGE_PLACEHOLDER) + 1)
    assert set(seen) == {0, 1, 2, 3, "rbhp"}  # multi-turn modes were tokenised too


# ----------------------------------------------------------------------------------------------- evaluation


def test_eval_turns_are_deterministic_and_use_the_raw_narration(cfg):
    row = make_row(0)
    a = vhp_eval_turns(row, cfg, eval_rng(row["sample_id"]))
    b = vhp_eval_turns(dict(row), cfg, eval_rng(row["sample_id"]))
    assert a == b and len(a) == 1 and a[0][1] is None
    assert a[0][0].startswith(cfg.image_token + "\n") and NARRATION in a[0][0]
    assert not any(p in a[0][0] for p in PARAPHRASES)
    templates = {vhp_eval_turns(row, cfg, np.random.default_rng(s))[0][0] for s in range(60)}
    assert templates == {f"{cfg.image_token}\n" + q.format(NARRATION) for q in ACTION_QUESTIONS}

    r = rbhp_eval_turns(row, cfg, eval_rng(row["sample_id"]))
    assert r == rbhp_eval_turns(row, cfg, eval_rng(row["sample_id"]))
    assert r[0][1] is None and r[0][0].split("\n", 1)[1] in QUESTIONS
    assert {rbhp_eval_turns(row, cfg, np.random.default_rng(s))[0][0] for s in range(60)} == {
        f"{cfg.image_token}\n{q}" for q in QUESTIONS}
    with pytest.raises(ValueError, match="no RBHP"):
        rbhp_eval_turns(make_row(0, questions=[]), cfg, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no narration"):
        vhp_eval_turns(make_row(0, narration=None), cfg, np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------- examples


def _jpegs(n=10, h=48, w=80):
    rng = np.random.default_rng(0)
    return [cv2.imencode(".jpg", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))[1].tobytes() for _ in range(n)]


def drawn(mix, rows, epoch=0):
    """``rows`` as the draws of ``epoch`` over them deliver them: the j-th draw's clip, task and index."""
    draws = mix.draw_epoch(mix.pools(rows), len(rows), epoch)
    return drawn_rows([rows[r] for r in draws.rows.tolist()], draws, range(len(rows)))


def test_make_example(cfg, tokenizer):
    mix = Mixture.from_config({"seed": 1}, cfg)
    first = make_row(0)
    first["obs_jpeg"] = _jpegs()
    row, other = drawn(mix, [first], epoch=2)[0], drawn(mix, [make_row(1)])[0]
    ex = make_example(row, cfg, tokenizer, mix, epoch=2)
    assert isinstance(ex, MixtureExample) and isinstance(ex, data.Example)
    assert (ex.task, ex.turns) == (row["task"], mix.conversation(first, row["task"], 2, row["draw"]))
    with pytest.raises(KeyError, match="was not drawn"):
        make_example(first, cfg, tokenizer, mix, epoch=2)
    ids, labels = data.encode_conversation(tokenizer, ex.turns, cfg)
    assert (ex.input_ids, ex.labels) == (ids, labels)
    size = cfg.vision.config["image_size"]
    assert ex.frames.shape == (cfg.num_obs_frames, 3, size, size)
    assert ex.future_hands.shape == (2, cfg.num_future_points, 2)
    assert torch.equal(ex.future_hands, torch.tensor(row["future_hands"])[:, 1:])
    assert ex.future_valid.tolist() == [True, False] and ex.sample_id == row["sample_id"]
    # frames_fn overrides decoding (and may give None), rows without JPEGs give None
    assert make_example(row, cfg, tokenizer, mix, 2, frames_fn=lambda r: None).frames is None
    assert make_example(other, cfg, tokenizer, mix, 0).frames is None
    batch = data.collate([ex, make_example(other, cfg, tokenizer, mix, 0, frames_fn=lambda r: ex.frames)],
                         pad_id=tokenizer.pad_token_id)
    assert batch["future_hands"].shape == (2, 2, cfg.num_future_points, 2)


class ToyImageQA:
    """A LITA-style source that owns its data (the pattern of the module docstring)."""

    name = "imgqa"

    def __init__(self, cfg):
        self.items = [(f"What colour is object {k}?", f"It is colour {k}.") for k in range(5)]
        self.cfg = cfg

    def _index(self, rng):
        return int(rng.integers(len(self.items)))

    def conversation(self, row, rng, cfg):
        q, a = self.items[self._index(rng)]
        return [(f"{cfg.image_token}\n{q}", a)]

    def media(self, row, rng, cfg):
        k = self._index(rng)
        size = cfg.vision.config["image_size"]
        return Media(frames=torch.full((cfg.num_obs_frames, 3, size, size), float(k)))


def test_extra_sources_plug_in_by_name(cfg, tokenizer):
    mix = Mixture.from_config({"task_rates": {"vhp": 0.25, "rbhp": 0.25, "imgqa": 0.5}, "seed": 2}, cfg,
                              extra_sources={"imgqa": ToyImageQA(cfg)})
    n = 2000
    counts = mix.draw_epoch(mix.pools([make_row(i) for i in range(40)]), n, 0).counts()
    assert abs(counts["imgqa"] / n - 0.5) < 0.045 and abs(counts["vhp"] / n - 0.25) < 0.04
    hand_id = special_tokens(tokenizer, cfg).hand
    for row in drawn(mix, [make_row(i) for i in range(40)]):
        ex = make_example(row, cfg, tokenizer, mix, 0)
        if ex.task != "imgqa":
            continue
        k = int(ex.turns[0][0].rsplit(" ", 1)[1].rstrip("?"))
        assert torch.all(ex.frames == k)  # media drew the same item as the conversation
        assert not ex.future_valid.any() and torch.all(ex.future_hands == 0)
        assert ex.input_ids.count(hand_id) == 0
