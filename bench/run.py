"""Benchmarks of every stage, each comparison measured side by side in one run.

    python bench/run.py [--quick | --tiny-test] --out bench/results.json [--markdown bench/RESULTS.md]

Sections (each a module of bench/): preprocessing (Ray Data samples stage vs a bare process pool),
visual path (release tiled-100 vs efficient 10-frame), generation (batch-1 uncached vs batched
KV-cached), training (Ray Train + ZeRO-2 vs a plain loop; feature cache on/off) and scaling on
paper (FLOPs per sample, projected H100-hours of the release recipe). Medians and ratios go to the
JSON, a readable table to the Markdown file. ``--quick`` takes about 5 minutes on 2 CPUs (plus
about a minute to render the synthetic dataset the first time); ``--tiny-test`` shrinks every input
to the smallest that still runs every code path (for tests/test_bench.py; its speeds mean nothing).

Ray: an already-initialised Ray is reused (its CPU count sets the number of processes); otherwise a
local one with ``--processes`` CPUs is started.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from the repo root

from bench.common import FULL, QUICK, REPO_ROOT, TINY_TEST, Sizes, all_finite, machine_info, profile_top
from bench.targets import TARGETS
from preprocessing import layout

for _key, _value in (("HF_HUB_OFFLINE", "1"), ("DS_ACCELERATOR", "cpu"), ("RAY_AUTH_MODE", "disabled"),
                     ("RAY_USAGE_STATS_ENABLED", "0"),
                     ("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))):
    os.environ.setdefault(_key, _value)  # the Makefile's offline CPU defaults, also when run directly

METHOD = """
* **Repetitions.** Every comparison runs both sides in this one process (or on this one Ray), one
  untimed warm-up round first, then the sides alternate within each repetition; the JSON keeps every
  repetition's seconds and the table shows medians. Ratios are ratios of medians.
* **Preprocessing.** A SynthKitchens tree (`synthkitchens.generate.generate`, seed 0) is indexed
  once per side; each repetition deletes the sample shards and done markers and redoes every
  shard. Ray side: `preprocessing.stages.run_samples_stage` on a local Ray with N CPUs
  (`map(num_cpus=1)` -> N concurrent tasks). Bare side: a `multiprocessing.Pool(N)` (spawn, created
  once, like Ray's reused workers) `starmap`s `preprocessing.samples.process_shard` over the same
  shard plan (`plan_shards` of the same index). `in_task_s` sums the seconds each shard's done
  marker records inside `process_shard`; `cpu_utilisation` = in_task_s / (N x wall).
* **Visual path.** `handsonvlm.vision.video_tokens_literal` (tile to 100 frames, CLIP on all, project
  every patch, pool) vs `handsonvlm.vision.encode_video` (CLIP on the 10 unique frames, pool,
  project 356 tokens), same random clips, under `torch.no_grad`, fp32. ViT-L/14-sized tower: random
  CLIP (hidden 1024, 16 heads, MLP 4096, 224 px, patch 14), projector 1024 -> 4096 (the 7B width);
  the layer count is in the JSON (`vitl14.vision_layers`, `reduced_layers`); quick mode uses fewer
  than 24 layers to stay within its time budget, which changes both sides' tower time alike.
* **Generation.** Tiny preset (random weights, seed 0); greedy; VHP evaluation prompts
  (`mixture.vhp_eval_turns` + `eval_rng`) of the first clips of the train shards.
  `generate(use_cache=False)` one clip at a time vs `generate(use_cache=True)` on left-padded
  batches. Identity: generated ids equal token for token.
* **Training.** Tiny preset, SynthKitchens train split, both sides over several epochs (an epoch =
  one log window of draws) with a checkpoint every other window. Ray side: `pipelines.train.launch`
  (2 workers, ZeRO-2, gloo, 0.5 CPU each as in `configs/tiny.yaml`, each rank's DrawStream preparing
  batches in a background thread, validation of 8 clips at each checkpoint), MLflow into a private
  sqlite store; its `train/samples_per_s_end_to_end` at the last step (every sample after the first
  step over the wall time since it) is the headline rate, and its `train/samples_per_s` windows
  after the warm-up give the steady rate. Plain side: `bench/train_bench.py:plain_loop`, one
  process with `torch.set_num_threads(2)`, batch = 2 x micro-batch (the Ray job's global batch), the
  same constructor, AdamW, LR schedule, clipping, `handsonvlm.training.rows_to_batch` /
  `FeatureLookup` and the same DrawStream, a `torch.save` checkpoint at the same steps; timed the
  same two ways. Feature cache: the features stage (`preprocessing.features.run_features_stage`,
  float32) then both loops with `feature_cache=on`.
* **Profiles.** For a missed target, cProfile of one call of the side that should be fast (the
  driver, for Ray runs) is printed: top functions by cumulative time.
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller repetitions and a 2-layer ViT-L/14 (~5 min)")
    size.add_argument(
        "--tiny-test", action="store_true", help="smallest inputs, for the test suite (speeds meaningless)"
    )
    p.add_argument("--out", default="bench/results.json", help="results JSON")
    p.add_argument("--markdown", default="bench/RESULTS.md", help="Markdown report ('' to skip)")
    p.add_argument("--workdir", default="runs/bench", help="scratch: synthetic data, shards, Ray results (kept)")
    p.add_argument("--processes", type=int, default=2, help="CPUs of the local Ray and of the bare pool")
    return p.parse_args(argv)


def mode_and_sizes(args) -> tuple[str, Sizes]:
    if args.tiny_test:
        return "tiny-test", TINY_TEST
    return ("quick", QUICK) if args.quick else ("full", FULL)


def start_ray(processes: int) -> int:
    """Reuse an initialised Ray (returns its CPU count) or start a local one with ``processes`` CPUs."""
    import ray

    from pipelines.common import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=processes)
    return int(ray.cluster_resources().get("CPU", processes))


def pop_profilers(section: dict) -> dict:
    """Remove the deferred profile callables (``_profile_*``) from a result dict, recursively."""
    found = {}
    for key in list(section):
        if key.startswith("_profile"):
            found[key] = section.pop(key)
        elif isinstance(section[key], dict):
            found.update(pop_profilers(section[key]))
    return found


def scaling_section(samples_dir: Path) -> dict:
    """FLOPs check on the tiny model (one real batch) and the recipe projections for 7B and 13B."""
    import torch

    from bench.scaling import MFU, mean_text_tokens, project_recipe, validate_on_tiny
    from bench.train_bench import read_rows
    from handsonvlm.config import load_model_config
    from handsonvlm.mixture import Mixture, drawn_rows
    from handsonvlm.model import HandsOnVLM
    from handsonvlm.prompts import TEMPLATES
    from handsonvlm.training import rows_to_batch

    torch.manual_seed(0)
    model = HandsOnVLM(load_model_config("tiny"))
    mixture = Mixture.from_config({}, model_cfg=model.cfg)
    rows = read_rows([str(p) for p in sorted(samples_dir.glob("*.parquet"))])
    draws = mixture.draw_epoch(mixture.pools(rows), 2, 0)
    batch, _ = rows_to_batch(drawn_rows([rows[r] for r in draws.rows.tolist()], draws, range(len(draws))),
                             model, mixture, 0, torch.device("cpu"))
    big_cfg = load_model_config("vicuna-7b")
    template = TEMPLATES[big_cfg.prompt_template]
    conversations = ["".join(text for text, _ in template.render(turns))
                     for _, _, turns in mixture.epoch_conversations(rows, len(rows), 0, big_cfg)]
    text_tokens = mean_text_tokens(conversations)
    return {"tiny_check": validate_on_tiny(model, batch), "text_tokens": text_tokens, "mfu": MFU,
            "gpu": None, "note": "no GPU available to this run: projections only",
            **{preset: project_recipe(preset, text_tokens) for preset in ("vicuna-7b", "vicuna-13b")}}


def summarise(results: dict) -> dict:
    s = results["scaling"]
    return {
        "preprocess_ratio": results["preprocess"]["preprocess_ratio"],
        "vision_speedup": results["vision"]["vision_speedup"],
        "vision_max_abs_diff": results["vision"]["max_abs_diff"],
        "generate_speedup": results["generate"]["generate_speedup"],
        "greedy_identical": results["generate"]["greedy_identical"],
        "train_overhead_ratio": results["train"]["train_overhead_ratio"],
        "feature_cache_speedup": results["train"]["feature_cache_speedup"],
        "gpu_hours_7b_release": s["vicuna-7b"]["release"]["gpu_hours"],
        "gpu_hours_7b_efficient": s["vicuna-7b"]["efficient"]["gpu_hours"],
        "gpu_hours_7b_efficient_cached": s["vicuna-7b"]["efficient_cached"]["gpu_hours"],
        "gpu_hours_13b_release": s["vicuna-13b"]["release"]["gpu_hours"],
        "gpu_hours_13b_efficient": s["vicuna-13b"]["efficient"]["gpu_hours"],
        "gpu_hours_13b_efficient_cached": s["vicuna-13b"]["efficient_cached"]["gpu_hours"],
    }


def check_targets(summary: dict) -> dict:
    return {name: {"value": summary[name], "target": t.minimum,
                   "met": None if t.minimum is None else bool(summary[name] >= t.minimum)}
            for name, t in TARGETS.items()}


def profiles_for_misses(targets: dict, profilers: dict, workdir: Path) -> dict[str, str]:
    """A cProfile text for every missed target (run now, after the timings, so it cannot disturb them)."""
    from bench.preprocess_bench import run_ray_stage
    from preprocessing.samples import MediaConfig

    def preprocess_profile():
        out = workdir / "prep-ray"
        media = MediaConfig(epic_root=str(next(workdir.glob("synth-*")) / "EPIC-KITCHENS"), out=str(out))
        return profile_top(lambda: run_ray_stage(out, media))

    makers = {"preprocess_ratio": preprocess_profile,
              "vision_speedup": profilers.get("vision"),
              "generate_speedup": profilers.get("generate"),
              "train_overhead_ratio": profilers.get("train")}
    return {name: makers[name]() for name, status in targets.items()
            if status["met"] is False and makers.get(name) is not None}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from bench import generate_bench, preprocess_bench, train_bench, vision_bench

    mode, sizes = mode_and_sizes(args)
    workdir = Path(args.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict = {"mode": mode, "sizes": sizes.__dict__, "machine": machine_info()}
    processes = start_ray(args.processes)
    profilers: dict = {}

    def section(name: str, fn):
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        results[name] = fn()
        found = pop_profilers(results[name])
        if found:
            profilers[name] = next(iter(found.values()))
        results[name]["section_s"] = time.perf_counter() - t0
        print(f"[bench] {name} done in {results[name]['section_s']:.0f} s", flush=True)

    section("preprocess", lambda: preprocess_bench.bench_preprocess(workdir, sizes, processes))
    data_root = workdir / "prep-ray"  # the Ray side's output: the training data of the later sections
    section("vision", lambda: vision_bench.bench_vision(sizes))
    section("generate", lambda: generate_bench.bench_generate(Path(layout.samples_dir(data_root, "train")), sizes))
    section("train", lambda: train_bench.bench_train(data_root, workdir / "train", sizes, processes))
    profilers["train"] = lambda: train_bench.profile_plain_step(data_root, sizes, processes)
    section("scaling", lambda: scaling_section(Path(layout.samples_dir(data_root, "train"))))

    results["summary"] = summarise(results)
    results["targets"] = check_targets(results["summary"])
    results["profiles"] = profiles_for_misses(results["targets"], profilers, workdir)
    results["wall_s"] = time.perf_counter() - started
    results["all_finite"] = all_finite(results["summary"])

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, sort_keys=True))
    if args.markdown:
        from bench.report import render

        Path(args.markdown).write_text(render(results, METHOD))
    print(json.dumps({"summary": results["summary"], "wall_s": round(results["wall_s"])}, indent=2), flush=True)
    return results


if __name__ == "__main__":
    main()
