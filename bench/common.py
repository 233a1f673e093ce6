"""Shared pieces of the benchmark: timing with warm-up and medians, profiles, machine facts.

Every comparison in ``bench/`` runs both sides in the same process (or the same Ray runtime),
alternating repetitions, so that noise from the shared 2-CPU machine hits both sides alike; only
ratios of medians are meant to be compared across machines.
"""

from __future__ import annotations

import cProfile
import datetime as dt
import io
import math
import os
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROFILE_LINES = 18  # functions kept per profile: enough to see where the time goes, short enough to read


@dataclass(frozen=True)
class Sizes:
    """How big each benchmark is; ``quick`` and ``tiny_test`` shrink the ``full`` defaults."""

    videos: int  # SynthKitchens videos (12 actions each; train + validation clips are processed)
    actions_per_video: int
    preprocess_reps: int
    vision_reps: int
    vitl_layers: int  # ViT-L/14 depth used for the large vision comparison (24 = the real one)
    vision_batch: int  # clips per vision call
    generate_clips: int
    generate_batch: int
    generate_reps: int
    max_new_tokens: int
    train_warmup_steps: int
    train_steps: int  # measured steps after warm-up
    train_log_every: int  # steps per measured window (the loop reports one rate per window)
    micro_batch: int  # per Ray Train worker; the plain loop uses micro_batch x workers


FULL = Sizes(videos=18, actions_per_video=12, preprocess_reps=3, vision_reps=2, vitl_layers=24, vision_batch=1,
             generate_clips=16, generate_batch=16, generate_reps=3, max_new_tokens=64,
             train_warmup_steps=4, train_steps=16, train_log_every=4, micro_batch=4)
QUICK = Sizes(videos=18, actions_per_video=12, preprocess_reps=2, vision_reps=3, vitl_layers=2, vision_batch=1,
              generate_clips=16, generate_batch=16, generate_reps=3, max_new_tokens=64,
              train_warmup_steps=2, train_steps=6, train_log_every=2, micro_batch=4)
# The smallest inputs that still exercise every code path (for tests/test_bench.py); speeds are meaningless.
TINY_TEST = Sizes(videos=3, actions_per_video=4, preprocess_reps=1, vision_reps=1, vitl_layers=1, vision_batch=1,
                  generate_clips=2, generate_batch=2, generate_reps=1, max_new_tokens=8,
                  train_warmup_steps=1, train_steps=2, train_log_every=1, micro_batch=1)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(wall seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def compare(sides: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall seconds of each side over ``reps`` repetitions after ``warmup`` untimed rounds.

    The sides alternate inside each repetition (A, B, A, B, ...) so that a burst of load from
    another process on the shared machine slows both rather than one."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(reps):
        for name, fn in sides.items():
            seconds[name].append(timed(fn)[0])
    return seconds


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def rate(count: float, seconds: list[float]) -> float:
    """Items per second at the median time."""
    return count / median(seconds)


def profile_top(fn: Callable[[], object], lines: int = PROFILE_LINES) -> str:
    """cProfile of one call of ``fn``: the top functions by cumulative time, as text."""
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        fn()
    finally:
        profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("cumulative").print_stats(lines)
    text = out.getvalue()
    # drop the preamble (totals line kept) and trailing blank lines
    start = text.find("function calls")
    return text[max(0, text.rfind("\n", 0, start) + 1):].rstrip()


def all_finite(tree) -> bool:
    """Whether every number in a nested dict/list is finite (booleans and strings are fine)."""
    if isinstance(tree, dict):
        return all(all_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(all_finite(v) for v in tree)
    if isinstance(tree, bool) or tree is None or isinstance(tree, str):
        return True
    if isinstance(tree, (int, float)):
        return math.isfinite(tree)
    return True


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "not installed"


def machine_info() -> dict:
    """CPU, accelerator and library versions of this run."""
    import torch

    return {
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "versions": {"python": sys.version.split()[0], **{m: _version(m) for m in
                                                          ("torch", "ray", "deepspeed", "transformers", "pyarrow")}},
    }
