"""Validation during training: greedy answers on a small, fixed set of validation clips.

At every checkpoint the training worker (pipelines/train_worker.py, rank 0) asks the model the
evaluation prompts of a few validation clips, greedily (temperature 0: argmax tokens, the CVAE's
prior mean), and scores them with the evaluation policy (``handsonvlm.evaluation``, as
``pipelines/evaluate.py --temperature 0`` does), as a step series ``val/<task>/<metric>`` in the
training run. VHP asks every clip, RBHP the clips that have reasoning questions. No Ray here;
DeepSpeed only in :func:`weights_for_one_rank`.

Validation must not change training: it draws no number from the training RNG streams (the global
torch RNG is restored afterwards, generation seeds its own generator) and puts the model back in
training mode.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from handsonvlm import evaluation
from handsonvlm.config import EvalConfig
from handsonvlm.evaluation import ADE_OVER_BASELINE, RBHP, VHP

PREFIX = "val"
TASKS = (VHP, RBHP)
# logged per task: the trajectory errors, how often an answer holds all its hand tokens, and
# whether the model beats extrapolating the observed motion (below 1)
LOGGED_METRICS = ("ade", "fde", "coverage", ADE_OVER_BASELINE)
DURATION_METRIC = f"{PREFIX}/duration_s"  # what one validation costs, logged with its metrics
NUM_SAMPLES = 1  # greedy decoding gives one answer per prompt
GREEDY = 0.0  # temperature: argmax tokens (top-k and top-p then play no part)
PROMPTS_PER_CALL = 16  # prompts per generation call: one call for the default 8 clips x 2 tasks
CLIP_CHOICE_STREAM = 7  # seeds the clip choice apart from every other use of train.seed
# the columns validation reads from a sample shard: prompts, frames, targets and the past track
# (the baselines of the ADE ratio)
COLUMNS = [*evaluation.PROMPT_COLUMNS, "obs_jpeg", *evaluation.CLIP_COLUMNS]
ARRAY_DTYPES = {"future_hands": np.float32, "future_valid": bool, "past_hands": np.float32,
                "past_hands_valid": bool}  # as the shards store them


def choose_clips(sample_ids: Sequence[str], count: int, seed: int) -> list[str]:
    """``count`` of ``sample_ids`` (all when fewer), chosen by ``seed`` alone: the same clips for
    the same data whatever the listing order, at every checkpoint and after a resume."""
    ids = sorted(set(sample_ids))
    if count >= len(ids):
        return ids
    rng = np.random.default_rng([seed, CLIP_CHOICE_STREAM])
    return sorted(ids[i] for i in rng.choice(len(ids), size=count, replace=False))


class ValidationSet:
    """The prompts of a few clips and everything generation needs that does not change in training.

    ``rows``: shard rows with :data:`COLUMNS` (nested lists or arrays), ``model_cfg``: the model's
    ``ModelConfig``; ``seed`` picks each clip's prompt (as ``eval.seed`` does)."""

    def __init__(self, rows: Sequence[Mapping], model_cfg, seed: int, max_new_tokens: int | None = None):
        from handsonvlm.inference import resolve_sampling

        self.clips = {str(r["sample_id"]): {**r, **{k: np.asarray(r[k], t) for k, t in ARRAY_DTYPES.items()}}
                      for r in sorted(rows, key=lambda r: r["sample_id"])}
        self.jobs = evaluation.build_jobs(list(self.clips.values()), model_cfg, TASKS, seed, shuffle=False)
        # evaluation's settings of the model's mode (answer budget, the model's own template), greedy; the
        # model runs in the training dtype (answer_jobs does not cast)
        self.sampling = resolve_sampling(EvalConfig(num_samples=NUM_SAMPLES, temperature=GREEDY,
                                                    max_new_tokens=max_new_tokens), model_cfg)
        self.max_new_tokens = self.sampling.max_new_tokens
        self.tasks = tuple(t for t in TASKS if any(job["task"] == t for job in self.jobs))
        self.features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # sample_id -> (means, grids)

    def __len__(self) -> int:
        return len(self.clips)

    @classmethod
    def for_rank(cls, rows: Sequence[Mapping] | None, rank: int, model_cfg, seed: int) -> ValidationSet | None:
        """A training rank's part: None when validation is off (no ``rows``), the clips on rank 0,
        an empty set on the other ranks (they only join ZeRO-3's gather, see :func:`validate_in_training`)."""
        if not rows:
            return None
        return cls(rows if rank == 0 else [], model_cfg, seed)

    def frame_features(self, model, device: torch.device) -> None:
        """The frozen tower's features of every clip, computed once (they never change in training)."""
        from handsonvlm.data import clip_frames

        for sample_id, clip in self.clips.items():
            if sample_id not in self.features:
                frames = clip_frames(list(clip["obs_jpeg"]), image_size=model.vision.image_size)
                means, grids = model.frame_features(frames[None].to(device))
                self.features[sample_id] = (means[0].cpu(), grids[0].cpu())

    def answers(self, model) -> list[dict]:
        """Every job's prediction row (``evaluation.prediction_row``), greedy, in job order."""
        from handsonvlm.inference import answer_jobs

        rows = []
        for start in range(0, len(self.jobs), PROMPTS_PER_CALL):
            jobs = self.jobs[start:start + PROMPTS_PER_CALL]
            means, grids = (torch.stack([self.features[job["sample_id"]][i] for job in jobs]) for i in range(2))
            results = answer_jobs(model, jobs, self.sampling, frame_means=means, frame_grids=grids)
            rows += [evaluation.prediction_row(job, result, NUM_SAMPLES) for job, result in zip(jobs, results)]
        return evaluation.reconcile(self.jobs, rows, NUM_SAMPLES)


def validate(model, validation: ValidationSet, device: torch.device) -> dict[str, float]:
    """``val/<task>/<metric>`` (:data:`LOGGED_METRICS`, finite values only) of ``model`` on the set.

    The global torch RNG (CPU and ``device``) is restored afterwards and the model is put back in
    the mode it was in, so that the training that goes on is the one without validation."""
    start = time.perf_counter()
    was_training = model.training
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        try:
            validation.frame_features(model, device)
            preds = validation.answers(model)
        finally:
            model.train(was_training)
    metrics = evaluation.metrics_from_rows(preds, validation.clips, NUM_SAMPLES, validation.tasks)
    out = {}
    for task in validation.tasks:
        for name in LOGGED_METRICS:
            value = metrics.get(f"{task}/{name}")
            if value is not None and math.isfinite(value):
                out[f"{PREFIX}/{task}/{name}"] = float(value)
    out[DURATION_METRIC] = time.perf_counter() - start
    return out


def validate_in_training(engine, validation: ValidationSet | None, device: torch.device) -> dict[str, float]:
    """:func:`validate` on the model of a DeepSpeed ``engine``, called by every rank: each rank's
    :meth:`ValidationSet.for_rank` part; rank 0 validates, the others return {} at once (they wait
    at the checkpoint's barrier), all of them join ZeRO-3's gather (:func:`weights_for_one_rank`)."""
    if validation is None:
        return {}
    with weights_for_one_rank(engine):
        return validate(engine.module, validation, device) if len(validation) else {}


@contextmanager
def weights_for_one_rank(engine) -> Iterator[None]:
    """Inside: ``engine.module`` can run forward passes on one rank alone. Enter it on every rank.

    ZeRO-0/1/2 keep whole weights on every rank: nothing to do. ZeRO-3 partitions them, and its
    forward hooks gather each layer's weights from all ranks (a collective the other ranks would not
    join) and free them again after the layer: every rank gathers the whole model once (a
    collective, as the export does) and the hooks are lifted until the end, then re-registered
    (what TRL does to generate under ZeRO-3)."""
    if engine.zero_optimization_stage() != 3:
        yield
        return
    import deepspeed

    offload = engine.optimizer.parameter_offload
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        for param in engine.module.parameters():
            param.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)  # new hooks; the layer trace re-records
