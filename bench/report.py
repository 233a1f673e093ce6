"""bench/RESULTS.md from the results JSON: machine, versions, the ratio table, the paper scaling
table, and for every target not met the explanation with its profile."""

from __future__ import annotations

from bench.targets import EXPLANATIONS, TARGETS


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.2e}"
        return f"{value:.{digits}g}"
    return str(value)


def machine_section(results: dict) -> list[str]:
    m = results["machine"]
    v = m["versions"]
    return [
        f"* date (UTC): {m['date_utc']}; mode: `{results['mode']}` ({results['wall_s']:.0f} s)",
        f"* machine: {m['cpu_count']} CPUs ({m['cpu_affinity']} usable), {m['cpu_model']}; GPU: {m['gpu'] or 'none'}",
        f"* versions: python {v['python']}, torch {v['torch']}, ray {v['ray']}, deepspeed {v['deepspeed']}, "
        f"transformers {v['transformers']}, pyarrow {v['pyarrow']}",
    ]


def ratio_table(results: dict) -> list[str]:
    lines = ["| metric | value | target | met | measured as |", "| --- | --- | --- | --- | --- |"]
    for name, target in TARGETS.items():
        value = results["summary"][name]
        bound = "-" if target.minimum is None else f">= {target.minimum:g}"
        met = results["targets"][name]["met"]
        lines.append(f"| `{name}` | {_fmt(value)} | {bound} | {'-' if met is None else _fmt(met)} | {target.how} |")
    return lines


def detail_table(results: dict) -> list[str]:
    p, v, g, t = results["preprocess"], results["vision"], results["generate"], results["train"]
    rows = [
        ("preprocess: Ray Data samples stage", f"{p['ray']['clips_per_s']:.2f} clips/s",
         f"CPU busy in process_shard {p['ray']['cpu_utilisation']:.0%}"),
        ("preprocess: bare multiprocessing.Pool", f"{p['bare']['clips_per_s']:.2f} clips/s",
         f"CPU busy in process_shard {p['bare']['cpu_utilisation']:.0%}"),
        (f"vision ViT-L/14 ({v['vitl14']['vision_layers']} layers): release tiled-100",
         f"{v['vitl14']['literal_clips_per_s']:.3g} clips/s", f"{v['vitl14']['tokens']} tokens"),
        (f"vision ViT-L/14 ({v['vitl14']['vision_layers']} layers): efficient 10-frame",
         f"{v['vitl14']['efficient_clips_per_s']:.3g} clips/s", f"max abs diff {v['vitl14']['max_abs_diff']:.2e}"),
        ("vision tiny: release tiled-100 / efficient", f"{v['tiny']['literal_clips_per_s']:.3g} / "
         f"{v['tiny']['efficient_clips_per_s']:.3g} clips/s", f"speedup {v['tiny']['vision_speedup']:.3g}"),
        ("generation: batch-1 uncached", f"{g['release_style_clips_per_s']:.3g} clips/s",
         f"{g['mean_generated_tokens']:.0f} tokens/clip"),
        (f"generation: batch {g['batch']} KV-cached", f"{g['batched_cached_clips_per_s']:.3g} clips/s",
         f"greedy identical: {_fmt(g['greedy_identical'])}"),
        ("train: plain loop, online CLIP", _train_rate(t["plain_online"]),
         f"{t['plain_online']['threads']} threads, batch {t['plain_online']['batch']}"),
        ("train: Ray Train + ZeRO-2, online CLIP", _train_rate(t["ray_online"]),
         f"job wall {t['ray_online']['job_wall_s']:.0f} s for {t['ray_online']['steps']} steps; "
         f"data wait {t['ray_online']['data_wait_s_median'] * 1000:.0f} ms/step"),
        ("train: plain loop, feature cache", _train_rate(t["plain_cached"]), ""),
        ("train: Ray Train + ZeRO-2, feature cache", _train_rate(t["ray_cached"]),
         f"features stage {t['feature_stage_s']:.0f} s (once)"),
    ]
    return ["| what | rate | note |", "| --- | --- | --- |"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]


def _train_rate(run: dict) -> str:
    return (f"{run['samples_per_s_end_to_end']:.3g} samples/s end to end "
            f"({run['samples_per_s']:.3g} in the steady windows)")


def scaling_section(results: dict) -> list[str]:
    s = results["scaling"]
    check = s["tiny_check"]["analytic_linear_over_measured"]
    lines = [
        f"Model FLOPs per training sample, counted from the configs (`bench/scaling.py`); the formula's "
        f"weight-matmul FLOPs on the tiny model agree with `FlopCounterMode` to "
        f"{max(abs(r - 1) for r in check.values()):.2%} (LM {check['lm']:.4f}, vision {check['vision']:.4f}, "
        f"projector {check['projector']:.4f}; the CPU attention kernel has no FlopCounterMode formula, "
        f"attention is counted analytically). Sequence: {s['text_tokens']:.0f} text tokens (estimated) + 356 visual. "
        f"Recipe: {s['vicuna-7b']['samples']:,} samples (40 x 48,296), H100 at {s['mfu']:.0%} MFU of 989 TFLOP/s bf16. "
        "**No GPU was available to this run: these are projections, not measurements.**",
        "",
        "| preset | visual path | TFLOP / sample | GPU-hours | on 8 H100 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for preset in ("vicuna-7b", "vicuna-13b"):
        for variant, label in (
            ("release", "release (CLIP on 100 tiled frames)"),
            ("efficient", "efficient (10 frames)"),
            ("efficient_cached", "efficient + feature cache (incl. building it)"),
        ):
            r = s[preset][variant]
            lines.append(f"| {preset} | {label} | {r['flops_per_sample'] / 1e12:.1f} | {r['gpu_hours']:.0f} | "
                         f"{r['gpu_hours'] / 8:.1f} h |")
    return lines


def shortfalls(results: dict) -> list[str]:
    lines = []
    for name, status in results["targets"].items():
        if status["met"] is not False:
            continue
        lines += [f"### `{name}` = {_fmt(status['value'])} (target >= {status['target']:g})", "",
                  EXPLANATIONS[name](results), ""]
        profile = results["profiles"].get(name)
        if profile:
            lines += ["```", profile, "```", ""]
    return lines or ["Every target was met in this run."]


def observations(results: dict) -> list[str]:
    """Findings the targets do not capture, written from this run's numbers."""
    p, t, g = results["preprocess"], results["train"], results["generate"]
    return [
        f"* **Preprocessing.** The shards' own timers add up to {p['ray']['in_task_s']:.1f} s of `process_shard` "
        f"under Ray vs {p['bare']['in_task_s']:.1f} s in the pool, while Ray keeps the CPUs busy with it only "
        f"{p['ray']['cpu_utilisation']:.0%} of the time ({p['bare']['cpu_utilisation']:.0%} for the pool): Ray's "
        "streaming executor does not always have both tasks running (its scheduling and the driver's "
        "`iter_rows` leave gaps), and a shard that runs alone decodes faster than two competing for the 2 "
        "CPUs. The two effects roughly cancel at this size, so the ratio is close to 1 and moves with machine "
        "noise from run to run.",
        f"* **Training overhead grows as the step shrinks.** With CLIP online a plain step takes "
        f"{t['plain_online']['step_s_median'] * 1000:.0f} ms and Ray Train + ZeRO-2 keeps "
        f"{t['train_overhead_ratio']:.0%} of the plain loop's rate; with the feature cache the plain step drops to "
        f"{t['plain_cached']['step_s_median'] * 1000:.0f} ms and Ray keeps only "
        f"{t['train_overhead_ratio_cached']:.0%}. "
        "(A ratio above 100% is plausible here: two single-threaded processes on half batches use 2 CPUs "
        "better than one process splitting such small matrices over 2 intra-op threads.) "
        "The Ray job pays a roughly fixed cost per step (gloo gradient reduction between 2 processes, the DeepSpeed "
        "engine's step, pulling the next rows from the Ray Data stream, all on the same 2 CPUs) that a "
        "tiny model cannot hide; so the feature cache speeds the Ray job up by "
        f"{t['feature_cache_speedup']:.2f}x but the plain loop by {t['feature_cache_speedup_plain']:.2f}x. On GPUs "
        "with a 7B model a step is seconds long and this fixed cost is negligible.",
        f"* **Generation baseline is generous.** The batch-1 side still computes the visual tokens once per clip; "
        f"the release re-ran CLIP on 100 frames at every one of the ~{g['mean_generated_tokens']:.0f} generated "
        "tokens, so the real release-to-here speedup is larger than `generate_speedup`.",
    ]


def render(results: dict, method: str) -> str:
    lines = ["# Benchmark results", "", *machine_section(results), "", "## Ratios", "", *ratio_table(results), "",
             "## Rates behind the ratios (medians)", "", *detail_table(results), "", "## Scaling on paper", "",
             *scaling_section(results), "", "## Targets not met", "", *shortfalls(results), "",
             "## Observations", "", *observations(results), "",
             "## Method", "",
             method.strip(), ""]
    return "\n".join(lines)
