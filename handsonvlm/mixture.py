"""The seeded training task mixture: which task (VHP, RBHP, ...) each draw trains and on which clip.

As the release's ``HybridDataset``, an epoch is a number of *draws*, not a pass over the clips:
each draw picks a task by its rate, then a clip uniformly from that task's own pool (VHP: every
clip with a narration; RBHP: the clips with reasoning questions), so RBHP gets its rate however
few clips have questions, and those clips are seen several times per epoch. Every random choice
comes from generators derived only from (seed, epoch) for the draws and (seed, epoch, sample_id,
task, draw index) for a conversation, so the draws are the same on every worker, in any order and
after a restart (the release's are OS-seeded and cannot be replayed). Pieces, the deliberate
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
from handsonvlm.prompts import hand_tokens, image_prompt
from handsonvlm.templates import PROJECT_TEMPLATES, TemplateSet

Turns = list[tuple[str, str]]
DEFAULT_TASK_RATES = {"vhp": 0.5, "rbhp": 0.5}
DEFAULT_REPHRASE_RATE = 0.5
VHP_MODES = (0, 1, 2, 3)
TASK_STREAM = "task"
EVAL_STREAM = "eval"
DRAWS_STREAM = "draws"
# The keys a drawn row carries (set by :func:`drawn_rows`): its task and its draw index in the epoch.
DRAW_TASK, DRAW_INDEX = "task", "draw"
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


def serves(source: TaskSource, row: Mapping) -> bool:
    """Whether ``row`` is in ``source``'s pool: its ``serves(row)`` if it has one, else every row
    (a co-training source that owns its data ignores the EPIC row anyway)."""
    test = getattr(source, "serves", None)
    return True if test is None else bool(test(row))


def dataset_of(source: TaskSource, task: str) -> str:
    """The dataset a task's draws come from (``source.dataset``, else the task's own name)."""
    return str(getattr(source, "dataset", task))


@dataclass
class Media:
    """A source's own clip and targets (shapes as :class:`data.Example`); None = zeros/invalid."""

    frames: torch.Tensor | None
    future_hands: torch.Tensor | None = None  # [2, T, 2]
    future_valid: torch.Tensor | None = None  # [2] bool


def _trajectory_answer(templates: TemplateSet, rng: np.random.Generator, cfg: ModelConfig) -> str:
    return _pick(templates.trajectory_answers, rng).format(hands=hand_tokens(cfg.hand_token, cfg.num_future_points))


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
    dataset: str = "epic"
    templates: TemplateSet = PROJECT_TEMPLATES

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

        t = self.templates
        if mode == 0:
            turns = data.vhp_turns(narration, cfg, question_index=int(rng.integers(len(t.action_questions))),
                                   answer_index=int(rng.integers(len(t.action_answers))), templates=t)
        elif mode == 1:
            turns = [(image_prompt(_pick(t.general_questions, rng), cfg.image_token), _trajectory_answer(t, rng, cfg))]
        elif mode == 2:
            turns = [(image_prompt(_pick(t.action_prediction_questions, rng), cfg.image_token),
                      self._action_answer(narration, row, rng)),
                     (_pick(t.follow_up_questions, rng), _trajectory_answer(t, rng, cfg))]
        else:
            turns = [(image_prompt(_pick(t.general_questions, rng), cfg.image_token), _trajectory_answer(t, rng, cfg)),
                     (_pick(t.action_prediction_questions, rng), self._action_answer(narration, row, rng))]
        return VHPDraw(mode, narration, rephrased, [(u, a) for u, a in turns])

    def _action_answer(self, narration: str, row: Mapping, rng: np.random.Generator) -> str:
        noun = _text(row.get("noun"))  # answers naming the noun only for clips that have one
        options = self.templates.action_prediction_answers_for(noun is not None)
        return _pick(options, rng).format(narration=narration, noun=noun)

    def serves(self, row: Mapping) -> bool:
        return _text(row.get("narration")) is not None

    def conversation(self, row: dict, rng: np.random.Generator, cfg: ModelConfig) -> Turns | None:
        drawn = self.draw(row, rng, cfg)
        return None if drawn is None else drawn.turns


@dataclass
class RBHPSource:
    """The release's ``EpicReasoningConversationDataset``, seeded."""

    name: str = "rbhp"
    dataset: str = "epic"
    templates: TemplateSet = PROJECT_TEMPLATES

    def serves(self, row: Mapping) -> bool:
        return has_rbhp(row)

    def conversation(self, row: dict, rng: np.random.Generator, cfg: ModelConfig) -> Turns | None:
        questions = _strings(row.get("rbhp_questions"))
        if not questions:
            return None
        question = _pick(questions, rng)
        answer_index = int(rng.integers(len(self.templates.trajectory_answers)))
        return [(u, a) for u, a in data.rbhp_turns(question, cfg, answer_index=answer_index,
                                                     templates=self.templates)]


# ---------------------------------------------------------------------------------------------
# Evaluation prompts


def vhp_eval_turns(row: Mapping, cfg: ModelConfig, rng: np.random.Generator,
                   templates: TemplateSet = PROJECT_TEMPLATES) -> list[tuple[str, None]]:
    """The VHP evaluation prompt: an action question with the RAW narration, no answer."""
    narration = _text(row.get("narration"))
    if narration is None:
        raise ValueError(f"row {row.get('sample_id')!r} has no narration: it cannot be a VHP evaluation sample")
    index = int(rng.integers(len(templates.action_questions)))
    return data.vhp_turns(narration, cfg, question_index=index, with_answer=False, templates=templates)


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


@dataclass(frozen=True)
class EpochDraws:
    """The draws of one epoch: draw ``j`` trains task ``names[tasks[j]]`` on clip ``rows[j]``.

    ``rows`` index the clip list the pools were built from (the split's rows in plan order)."""

    epoch: int
    names: tuple[str, ...]
    tasks: np.ndarray  # [N] int64, index into names
    rows: np.ndarray  # [N] int64, clip index

    def __len__(self) -> int:
        return len(self.rows)

    def counts(self, stop: int | None = None) -> dict[str, int]:
        """Draws per task among the first ``stop`` draws (default: all)."""
        counts = np.bincount(self.tasks[:stop], minlength=len(self.names))
        return {name: int(c) for name, c in zip(self.names, counts)}


class Mixture:
    """Draws tasks by rate and, per task, clips from that task's pool; builds each draw's conversation.

    ``sources``: task name -> source (the key is the task's name in rates and reports);
    ``rates``: task name -> non-negative weight (renormalised; the keys must equal the sources');
    ``seed``: non-negative integer; ``cfg``: the model config given to the sources (may instead be
    passed to :meth:`conversation`).
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
                    extra_sources: Mapping[str, TaskSource] | None = None,
                    templates: TemplateSet = PROJECT_TEMPLATES) -> Mixture:
        """From a preset's ``train:`` section: ``task_rates`` (default {"vhp": 0.5, "rbhp": 0.5}),
        ``rephrase_rate`` (default 0.5), ``seed`` (default 0). ``vhp``/``rbhp`` are built here,
        with ``templates`` (:func:`handsonvlm.templates.templates_for`); any other task in
        ``task_rates`` must come in ``extra_sources`` (which may also replace them)."""
        train_cfg = dict(train_cfg or {})
        rates = dict(train_cfg.get("task_rates") or DEFAULT_TASK_RATES)
        rephrase = train_cfg.get("rephrase_rate")
        builtin = {"vhp": VHPSource(DEFAULT_REPHRASE_RATE if rephrase is None else float(rephrase),
                                    templates=templates),
                   "rbhp": RBHPSource(templates=templates)}
        sources = {name: builtin[name] for name in rates if name in builtin}
        sources.update(extra_sources or {})
        seed = train_cfg.get("seed")
        return cls(sources, rates, seed=0 if seed is None else int(seed), cfg=model_cfg)

    def probabilities(self, available: Sequence[str] | None = None) -> dict[str, float]:
        """The renormalised rates over ``available`` tasks (default: all)."""
        names = [n for n in self.names if available is None or n in available]
        total = sum(self.rates[n] for n in names)
        return {n: (self.rates[n] / total if total > 0 else 0.0) for n in names}

    # ---- draws -------------------------------------------------------------------------------

    def pools(self, clips: Sequence[Mapping]) -> dict[str, np.ndarray]:
        """Task -> the indices (int64, ascending) of the ``clips`` its source can serve."""
        return {name: np.array([i for i, row in enumerate(clips) if serves(self.sources[name], row)],
                               dtype=np.int64) for name in self.names}

    def drawn_probabilities(self, pools: Mapping[str, np.ndarray]) -> dict[str, float]:
        """The task probabilities of the draws: the rates renormalised over the tasks whose pool is
        not empty (a task with no clip to serve cannot be drawn). Raises :class:`NoTaskError` if none can."""
        available = [n for n in self.names if self.rates[n] > 0 and len(pools.get(n, ())) > 0]
        if not available:
            sizes = {n: len(pools.get(n, ())) for n in self.names}
            raise NoTaskError(f"no task of the mixture {dict(self.rates)} has a clip to serve: pool sizes {sizes} "
                              "(no narrations and no RBHP questions?)")
        return self.probabilities(available)

    def draw_epoch(self, pools: Mapping[str, np.ndarray], count: int, epoch: int) -> EpochDraws:
        """``count`` draws of ``epoch``: a task by :meth:`drawn_probabilities`, then a clip uniformly
        from that task's pool (with replacement), vectorised; a function of (seed, epoch, pools) only."""
        probs = self.drawn_probabilities(pools)
        if int(epoch) < 0 or int(count) < 0:
            raise ValueError(f"epoch and count must be non-negative, got epoch={epoch}, count={count}")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(epoch)],
                                                           spawn_key=(stable_hash(DRAWS_STREAM),)))
        p = np.array([probs.get(n, 0.0) for n in self.names], dtype=np.float64)
        tasks = rng.choice(len(self.names), size=int(count), p=p / p.sum()).astype(np.int64)
        rows = np.zeros(int(count), dtype=np.int64)
        for k, name in enumerate(self.names):  # one vectorised draw per task, in the fixed task order
            chosen = np.flatnonzero(tasks == k)
            if len(chosen):
                pool = np.asarray(pools[name], dtype=np.int64)
                rows[chosen] = pool[rng.integers(len(pool), size=len(chosen))]
        return EpochDraws(int(epoch), self.names, tasks, rows)

    def source_rng(self, row: Mapping, epoch: int, task: str, draw: int = 0) -> np.random.Generator:
        """The generator of one draw's conversation (and media): the same clip drawn twice in an
        epoch gets two independent conversations."""
        return row_rng(self.seed, epoch, sample_key(row), f"source:{task}:{int(draw)}")

    def conversation(self, row: Mapping, task: str, epoch: int, draw: int = 0,
                     cfg: ModelConfig | None = None) -> Turns:
        """The turns of draw ``draw`` of ``epoch``: task ``task`` on ``row``."""
        cfg = cfg or self.cfg
        if cfg is None:
            raise ValueError("Mixture.conversation needs a ModelConfig: give cfg= here or to the Mixture")
        if task not in self.sources:
            raise KeyError(f"task {task!r} is not one of the mixture's {list(self.names)}")
        turns = self.sources[task].conversation(row, self.source_rng(row, epoch, task, draw), cfg)
        if turns is None:
            raise NoTaskError(f"task {task!r} cannot serve row {sample_key(row)!r} (it is not in the task's pool)")
        return [(u, a) for u, a in turns]

    def epoch_conversations(self, clips: Sequence[Mapping], count: int, epoch: int,
                            cfg: ModelConfig | None = None) -> list[tuple[str, str, Turns]]:
        """(task, sample_id, turns) of the first ``count`` draws of ``epoch`` over ``clips``."""
        draws = self.draw_epoch(self.pools(clips), count, epoch)
        return [(self.names[t], sample_key(clips[r]), self.conversation(clips[r], self.names[t], epoch, j, cfg))
                for j, (t, r) in enumerate(zip(draws.tasks.tolist(), draws.rows.tolist()))]


def drawn_rows(rows: Sequence[Mapping], draws: EpochDraws, positions: Sequence[int]) -> list[dict]:
    """Copies of ``rows`` (the clips of draws ``positions``, in that order) carrying their task and
    draw index under :data:`DRAW_TASK` / :data:`DRAW_INDEX`: what :func:`make_example` consumes."""
    return [{**row, DRAW_TASK: draws.names[int(draws.tasks[j])], DRAW_INDEX: int(j)}
            for row, j in zip(rows, positions)]


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
    """The example of a drawn row (see :func:`drawn_rows`): its task's conversation, tokenised,
    with the clip and its targets.

    Frames: ``frames_fn(row)`` when given (it may return None, e.g. when cached features are used),
    else ``data.clip_frames(row["obs_jpeg"], image_size)``, else None when the row has no JPEGs.
    A source with a ``media`` hook supplies its own frames/targets instead. The task is in
    ``.task`` (and the turns in ``.turns``)."""
    if DRAW_TASK not in row or DRAW_INDEX not in row:
        raise KeyError(f"row {row.get('sample_id')!r} was not drawn: it needs {DRAW_TASK!r} and {DRAW_INDEX!r} "
                       "(handsonvlm.mixture.drawn_rows)")
    task, draw = str(row[DRAW_TASK]), int(row[DRAW_INDEX])
    turns = mixture.conversation(row, task, epoch, draw, cfg)
    input_ids, labels = data.encode_conversation(tokenizer, turns, cfg)
    source = mixture.sources[task]
    media_fn = getattr(source, "media", None)
    if media_fn is not None:
        media = media_fn(row, mixture.source_rng(row, epoch, task, draw), cfg)
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
