"""The seeded training task mixture: which task (VHP, RBHP, ...) and which conversation a row gets.

Every random choice for a sample comes from a generator derived only from (seed, epoch,
sample_id), so a row's conversation is the same on every worker and in any order (the release's
``HybridDataset`` is OS-seeded and cannot be replayed). Pieces, task choice, the deliberate
deviations from the release and how LITA co-training sources plug in: docs/MODEL.md, "The
training mixture".
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from handsonvlm import data
from handsonvlm.config import ModelConfig
from handsonvlm.image import CLIP_IMAGE_SIZE
from handsonvlm.prompts import (
    ACTION_ANSWERS,
    ACTION_PREDICTION_ANSWERS,
    ACTION_PREDICTION_NOUN_ANSWERS,
    ACTION_PREDICTION_QUESTIONS,
    ACTION_QUESTIONS,
    FOLLOW_UP_TRAJECTORY_QUESTIONS,
    GENERAL_QUESTIONS,
    TRAJECTORY_ANSWERS,
    hand_tokens,
    image_prompt,
)

Turns = list[tuple[str, str]]
DEFAULT_TASK_RATES = {"vhp": 0.5, "rbhp": 0.5}
DEFAULT_REPHRASE_RATE = 0.5
VHP_MODES = (0, 1, 2, 3)
TASK_STREAM = "task"
EVAL_STREAM = "eval"
_U64 = (1 << 64) - 1


class NoTaskError(ValueError):
    """No source of the mixture can serve a row (e.g. no narration and no RBHP questions)."""


# ---------------------------------------------------------------------------------------------
# Reproducible per-sample generators


def stable_hash(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same in every process (unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def row_rng(seed: int, epoch: int, sample_id: str, stream: str = TASK_STREAM) -> np.random.Generator:
    """The generator of one (seed, epoch, sample, stream): a function of these values only."""
    seed, epoch = int(seed), int(epoch)
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative integers, got seed={seed}, epoch={epoch}")
    entropy = [seed & _U64, seed >> 64, epoch, stable_hash(str(sample_id))]
    return np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(stable_hash(stream),)))


def eval_rng(sample_id: str, seed: int = 0) -> np.random.Generator:
    """A generator for the evaluation prompt of one clip (stable per clip, order-free)."""
    return row_rng(seed, 0, sample_id, EVAL_STREAM)


def sample_key(row: Mapping) -> str:
    sample_id = row.get("sample_id")
    if sample_id is None or str(sample_id) == "":
        raise KeyError("a mixture row needs a non-empty 'sample_id' (the key of its random draws)")
    return str(sample_id)


def _strings(value: Any) -> list[str]:
    """A list-like column (list, tuple, numpy array from pandas/Arrow, or None) -> its non-blank strings."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    return [v for v in list(value) if isinstance(v, str) and v.strip()]


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _pick(options: Sequence, rng: np.random.Generator):
    return options[int(rng.integers(len(options)))]


# ---------------------------------------------------------------------------------------------
# Sources


@runtime_checkable
class TaskSource(Protocol):
    """One task of the mixture. ``conversation`` returns None when ``row`` cannot serve it.

    Optional: ``media(row, rng, cfg) -> Media`` for a source that owns its clips (see the module
    docstring); ``rng`` is then in the same state as the one given to ``conversation``.
    """

    name: str

    def conversation(self, row: dict, rng: np.random.Generator, cfg: ModelConfig) -> Turns | None:
        ...


@dataclass
class Media:
    """A source's own clip and targets (shapes as :class:`data.Example`); None = zeros/invalid."""

    frames: torch.Tensor | None
    future_hands: torch.Tensor | None = None  # [2, T, 2]
    future_valid: torch.Tensor | None = None  # [2] bool


def _trajectory_answer(rng: np.random.Generator, cfg: ModelConfig) -> str:
    return _pick(TRAJECTORY_ANSWERS, rng).format(hands=hand_tokens(cfg.hand_token, cfg.num_future_points))


@dataclass(frozen=True)
class VHPDraw:
    """What :class:`VHPSource` drew for a row: the mode, the narration used and the turns."""

    mode: int
    narration: str
    rephrased: bool
    turns: Turns


@dataclass
class VHPSource:
    """The release's ``EpicMultiturnConversationDataset``, seeded."""

    rephrase_rate: float = DEFAULT_REPHRASE_RATE
    name: str = "vhp"

    def __post_init__(self):
        if not 0.0 <= float(self.rephrase_rate) <= 1.0:
            raise ValueError(f"rephrase_rate must lie in [0, 1], got {self.rephrase_rate}")

    def draw(self, row: Mapping, rng: np.random.Generator, cfg: ModelConfig) -> VHPDraw | None:
        narration = _text(row.get("narration"))
        if narration is None:
            return None
        # Fixed draw order: mode, rephrase coin, then the templates of that mode.
        mode = int(rng.integers(len(VHP_MODES)))
        coin = rng.random()
        paraphrases = _strings(row.get("narration_paraphrases"))
        rephrased = bool(paraphrases) and coin < self.rephrase_rate
        if rephrased:
            narration = _pick(paraphrases, rng)

        if mode == 0:
            turns = data.vhp_turns(narration, cfg, question_index=int(rng.integers(len(ACTION_QUESTIONS))),
                                   answer_index=int(rng.integers(len(ACTION_ANSWERS))))
        elif mode == 1:
            turns = [(image_prompt(_pick(GENERAL_QUESTIONS, rng), cfg.image_token), _trajectory_answer(rng, cfg))]
        elif mode == 2:
            turns = [(image_prompt(_pick(ACTION_PREDICTION_QUESTIONS, rng), cfg.image_token),
                      self._action_answer(narration, row, rng)),
                     (_pick(FOLLOW_UP_TRAJECTORY_QUESTIONS, rng), _trajectory_answer(rng, cfg))]
        else:
            turns = [(image_prompt(_pick(GENERAL_QUESTIONS, rng), cfg.image_token), _trajectory_answer(rng, cfg)),
                     (_pick(ACTION_PREDICTION_QUESTIONS, rng), self._action_answer(narration, row, rng))]
        return VHPDraw(mode, narration, rephrased, [(u, a) for u, a in turns])

    @staticmethod
    def _action_answer(narration: str, row: Mapping, rng: np.random.Generator) -> str:
        noun = _text(row.get("noun"))
        options = ACTION_PREDICTION_ANSWERS + (ACTION_PREDICTION_NOUN_ANSWERS if noun else ())
        return _pick(options, rng).format(narration=narration, noun=noun)

    def conversation(self, row: dict, rng: np.random.Generator, cfg: ModelConfig) -> Turns | None:
        drawn = self.draw(row, rng, cfg)
        return None if drawn is None else drawn.turns


@dataclass
class RBHPSource:
    """The release's ``EpicReasoningConversationDataset``, seeded."""

    name: str = "rbhp"

    def conversation(self, row: dict, rng: np.random.Generator, cfg: ModelConfig) -> Turns | None:
        questions = _strings(row.get("rbhp_questions"))
        if not questions:
            return None
        question = _pick(questions, rng)
        answer_index = int(rng.integers(len(TRAJECTORY_ANSWERS)))
        return [(u, a) for u, a in data.rbhp_turns(question, cfg, answer_index=answer_index)]


# ---------------------------------------------------------------------------------------------
# Evaluation prompts


def vhp_eval_turns(row: Mapping, cfg: ModelConfig, rng: np.random.Generator) -> list[tuple[str, None]]:
    """The VHP evaluation prompt: an action question with the RAW narration, no answer."""
    narration = _text(row.get("narration"))
    if narration is None:
        raise ValueError(f"row {row.get('sample_id')!r} has no narration: it cannot be a VHP evaluation sample")
    index = int(rng.integers(len(ACTION_QUESTIONS)))
    return data.vhp_turns(narration, cfg, question_index=index, with_answer=False)


def rbhp_eval_turns(row: Mapping, cfg: ModelConfig, rng: np.random.Generator) -> list[tuple[str, None]]:
    """The RBHP evaluation prompt: one of the row's reasoning questions, no answer."""
    questions = _strings(row.get("rbhp_questions"))
    if not questions:
        raise ValueError(f"row {row.get('sample_id')!r} has no RBHP questions: it cannot be an RBHP evaluation sample")
    return data.rbhp_turns(_pick(questions, rng), cfg, with_answer=False)


def has_rbhp(row: Mapping) -> bool:
    return bool(_strings(row.get("rbhp_questions")))


# ---------------------------------------------------------------------------------------------
# The mixture


class Mixture:
    """Draws a task per (row, epoch) by rate among the sources that can serve the row.

    ``sources``: task name -> source (the key is the task's name in rates and reports);
    ``rates``: task name -> non-negative weight (renormalised; the keys must equal the sources');
    ``seed``: non-negative integer; ``cfg``: the model config given to the sources (may instead be
    passed to :meth:`choose`).
    """

    def __init__(self, sources: Mapping[str, TaskSource], rates: Mapping[str, float], seed: int = 0,
                 cfg: ModelConfig | None = None):
        missing_sources = sorted(set(rates) - set(sources))
        missing_rates = sorted(set(sources) - set(rates))
        if missing_sources:
            raise ValueError(f"task rates name tasks without a source: {missing_sources} "
                             "(pass them as sources / extra_sources)")
        if missing_rates:
            raise ValueError(f"sources without a rate in task_rates: {missing_rates}")
        for name, source in sources.items():
            if not callable(getattr(source, "conversation", None)):
                raise TypeError(f"source {name!r} has no conversation(row, rng, cfg) method")
        clean = {}
        for name, rate in rates.items():
            rate = float(rate)
            if not np.isfinite(rate) or rate < 0:
                raise ValueError(f"task rate of {name!r} must be a finite non-negative number, got {rate}")
            clean[str(name)] = rate
        if sum(clean.values()) <= 0:
            raise ValueError(f"task rates must not all be zero: {dict(rates)}")
        if int(seed) < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        self.sources = dict(sources)
        self.rates = clean
        self.seed = int(seed)
        self.cfg = cfg
        self.names = tuple(sorted(self.sources))  # draw order: independent of dict order

    @classmethod
    def from_config(cls, train_cfg: Mapping | None, model_cfg: ModelConfig | None = None,
                    extra_sources: Mapping[str, TaskSource] | None = None) -> Mixture:
        """From a preset's ``train:`` section: ``task_rates`` (default {"vhp": 0.5, "rbhp": 0.5}),
        ``rephrase_rate`` (default 0.5), ``seed`` (default 0). ``vhp``/``rbhp`` are built here;
        any other task in ``task_rates`` must come in ``extra_sources`` (which may also replace them)."""
        train_cfg = dict(train_cfg or {})
        rates = dict(train_cfg.get("task_rates") or DEFAULT_TASK_RATES)
        rephrase = train_cfg.get("rephrase_rate")
        builtin = {"vhp": VHPSource(DEFAULT_REPHRASE_RATE if rephrase is None else float(rephrase)),
                   "rbhp": RBHPSource()}
        sources = {name: builtin[name] for name in rates if name in builtin}
        sources.update(extra_sources or {})
        seed = train_cfg.get("seed")
        return cls(sources, rates, seed=0 if seed is None else int(seed), cfg=model_cfg)

    def probabilities(self, available: Sequence[str] | None = None) -> dict[str, float]:
        """The renormalised rates over ``available`` tasks (default: all)."""
        names = [n for n in self.names if available is None or n in available]
        total = sum(self.rates[n] for n in names)
        return {n: (self.rates[n] / total if total > 0 else 0.0) for n in names}

    def source_rng(self, row: Mapping, epoch: int, task: str) -> np.random.Generator:
        return row_rng(self.seed, epoch, sample_key(row), f"source:{task}")

    def choose(self, row: Mapping, epoch: int, cfg: ModelConfig | None = None) -> tuple[str, Turns]:
        """(task name, turns) for ``row`` at ``epoch``; raises :class:`NoTaskError` if no source serves it."""
        cfg = cfg or self.cfg
        if cfg is None:
            raise ValueError("Mixture.choose needs a ModelConfig: give cfg= here or to the Mixture")
        sid = sample_key(row)
        task_rng = row_rng(self.seed, epoch, sid, TASK_STREAM)
        remaining = [n for n in self.names if self.rates[n] > 0]
        while remaining:
            weights = np.array([self.rates[n] for n in remaining], dtype=np.float64)
            cumulative = np.cumsum(weights / weights.sum())
            index = min(int(np.searchsorted(cumulative, task_rng.random(), side="right")), len(remaining) - 1)
            name = remaining[index]
            turns = self.sources[name].conversation(row, self.source_rng(row, epoch, name), cfg)
            if turns is not None:
                return name, [(u, a) for u, a in turns]
            remaining.pop(index)
        raise NoTaskError(f"no task of the mixture {list(self.names)} can serve row {sid!r} "
                          "(no narration and no RBHP questions?)")


# ---------------------------------------------------------------------------------------------
# Examples


@dataclass
class MixtureExample(data.Example):
    """A :class:`data.Example` that also records the chosen task and the turns."""

    task: str = ""
    turns: list = field(default_factory=list)


def default_image_size(cfg: ModelConfig) -> int:
    """The vision tower's input size from a ``config`` tower, else CLIP's 224."""
    return int((cfg.vision.config or {}).get("image_size", CLIP_IMAGE_SIZE))


def make_example(row: Mapping, cfg: ModelConfig, tokenizer, mixture: Mixture, epoch: int,
                 frames_fn: Callable[[Mapping], torch.Tensor | None] | None = None,
                 image_size: int | None = None) -> MixtureExample:
    """Choose a task for ``row`` at ``epoch``, tokenise it, and attach the clip and its targets.

    Frames: ``frames_fn(row)`` when given (it may return None, e.g. when cached features are used),
    else ``data.clip_frames(row["obs_jpeg"], image_size)``, else None when the row has no JPEGs.
    A source with a ``media`` hook supplies its own frames/targets instead. The task is in
    ``.task`` (and the turns in ``.turns``)."""
    task, turns = mixture.choose(row, epoch, cfg)
    input_ids, labels = data.encode_conversation(tokenizer, turns, cfg)
    source = mixture.sources[task]
    media_fn = getattr(source, "media", None)
    if media_fn is not None:
        media = media_fn(row, mixture.source_rng(row, epoch, task), cfg)
        frames = media.frames
        hands = (media.future_hands if media.future_hands is not None
                 else torch.zeros(2, cfg.num_future_points, 2))
        valid = media.future_valid if media.future_valid is not None else torch.zeros(2, dtype=torch.bool)
    else:
        if frames_fn is not None:
            frames = frames_fn(row)
        elif row.get("obs_jpeg") is not None:
            frames = data.clip_frames(list(row["obs_jpeg"]), image_size or default_image_size(cfg))
        else:
            frames = None
        hands, valid = data.clip_targets(row["future_hands"], row["future_valid"])
    return MixtureExample(input_ids, labels, frames, hands, valid, sample_id=sample_key(row), task=task,
                          turns=turns)
