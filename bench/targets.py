"""The issue's targets, how each number is measured, and the explanation written into RESULTS.md
when a target is missed (built from the run's own numbers)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    minimum: float | None  # None: reported, no target
    how: str


TARGETS = {
    "preprocess_ratio": Target(
        0.7, "clips/s of the Ray Data samples stage / a bare Pool running the same process_shard"
    ),
    "vision_speedup": Target(5.0, "release tiled-100 encode / efficient 10-frame encode, ViT-L/14-sized tower"),
    "vision_max_abs_diff": Target(None, "max |release - efficient| over all visual tokens (fp32)"),
    "generate_speedup": Target(10.0, "clips/s batched KV-cached / batch-1 uncached, greedy, tiny preset"),
    "greedy_identical": Target(None, "greedy token ids of both generation paths equal for every clip"),
    "train_overhead_ratio": Target(0.8, "samples/s end to end (epochs, checkpoints included) Ray Train + ZeRO-2 "
                                        "(2 workers) / plain 1-process loop, same cores"),
    "feature_cache_speedup": Target(None, "samples/s of the Ray Train loop with / without the feature cache"),
    "gpu_hours_7b_release": Target(None, "projected H100-hours, 7B, release visual path (no GPU here)"),
    "gpu_hours_7b_efficient_cached": Target(None, "projected H100-hours, 7B, efficient path + feature cache"),
    "gpu_hours_13b_release": Target(None, "projected H100-hours, 13B, release visual path"),
    "gpu_hours_13b_efficient_cached": Target(None, "projected H100-hours, 13B, efficient path + feature cache"),
}


def _preprocess(results: dict) -> str:
    p = results["preprocess"]
    ray, bare = p["ray"], p["bare"]
    return (
        f"Both sides spend about the same CPU time inside `process_shard` ({ray['in_task_s']:.1f} s vs "
        f"{bare['in_task_s']:.1f} s summed over shards), but the Ray run keeps the {p['processes']} CPUs busy "
        f"with it {ray['cpu_utilisation']:.0%} of its wall time against {bare['cpu_utilisation']:.0%} for the pool: "
        f"{p['ray_overhead_s']:.1f} s more per run for {p['shards']} shards. "
        "That time is Ray Data's per-run fixed cost "
        "(building and optimising the plan, starting the streaming executor and its operators, the driver "
        "pulling results through `iter_rows`) plus per-task scheduling through the raylet; on a run this short "
        "it is not amortised. The driver profile of one Ray run below shows it waiting on the executor, not working."
    )


def _vision(results: dict) -> str:
    v = results["vision"]["vitl14"]
    return (
        f"The efficient path runs the tower on {10} frames instead of 100, so the speedup is bounded by "
        f"10x; measured {v['vision_speedup']:.2f}x with {v['vision_layers']} layers. Profile of the efficient path:"
    )


def _generate(results: dict) -> str:
    g = results["generate"]
    return (
        f"On the tiny preset (2 layers, width 64) a forward step costs about as much in Python and "
        f"dispatch overhead as in arithmetic, so batching {g['batch']} clips and caching keys/values save "
        f"less than they would on a 7B model, where each uncached step recomputes {g['mean_prompt_tokens']:.0f}+ "
        "tokens through 32 layers. The profile of the batched path shows the per-step overhead:"
    )


def _train(results: dict) -> str:
    t = results["train"]
    return (
        f"The plain loop runs one batch of {t['plain_online']['batch']} with {t['plain_online']['threads']} threads; "
        f"the Ray job runs {t['workers']} workers with batch {t['micro_batch_per_worker']} each and must, every step, "
        "all-reduce/reduce-scatter the gradients over gloo (ZeRO-2 partitions the optimizer state), step "
        "DeepSpeed's engine, and at every checkpoint save through Ray Train and validate a few clips, on the same "
        "2 CPUs. "
        "With a model this small each step's compute is a few tens of milliseconds, so these per-step fixed costs "
        "are a large fraction; the profile of one plain step below shows how little compute there is to hide "
        "them behind."
    )


EXPLANATIONS = {
    "preprocess_ratio": _preprocess,
    "vision_speedup": _vision,
    "generate_speedup": _generate,
    "train_overhead_ratio": _train,
}
