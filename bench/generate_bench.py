"""Generation: release-style batch-1 uncached decoding vs batched KV-cached decoding (tiny preset).

Both sides call :func:`handsonvlm.generation.generate` greedily on the same clips (VHP evaluation
prompts of real sample-shard rows, ``mixture.vhp_eval_turns`` with ``eval_rng``): the baseline one
clip at a time with ``use_cache=False`` (the whole sequence re-run at every token, as the release
did), the efficient side in left-padded batches with the KV cache. Greedy outputs must be
identical token for token.

The baseline is kinder than the release: the release also re-ran the vision tower (100 CLIP
passes) at every generated token, whereas ``generate`` computes the visual tokens once.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import torch

from bench.common import Sizes, compare, median, profile_top
from handsonvlm.config import load_model_config
from handsonvlm.data import clip_frames, encode_conversation, pad_sequences
from handsonvlm.generation import generate
from handsonvlm.mixture import eval_rng, vhp_eval_turns
from handsonvlm.model import HandsOnVLM

PROMPT_COLUMNS = ["sample_id", "narration", "obs_jpeg"]


def load_clips(samples_dir: Path, count: int) -> list[dict]:
    """The first ``count`` rows (sorted shard order) of the sample shards in ``samples_dir``."""
    rows: list[dict] = []
    for path in sorted(samples_dir.glob("*.parquet")):
        rows += pq.read_table(path, columns=PROMPT_COLUMNS).to_pylist()
        if len(rows) >= count:
            break
    if len(rows) < count:
        raise ValueError(f"only {len(rows)} clips in {samples_dir}, {count} wanted")
    return rows[:count]


def prompts_and_frames(model: HandsOnVLM, rows: list[dict]) -> tuple[list[list[int]], torch.Tensor]:
    """VHP prompt ids per clip (unpadded) and frames [N, F, 3, S, S]."""
    prompts = [encode_conversation(model.tokenizer, vhp_eval_turns(row, model.cfg, eval_rng(row["sample_id"])),
                                   model.cfg)[0] for row in rows]
    frames = torch.stack([clip_frames(list(row["obs_jpeg"]), model.vision.image_size) for row in rows])
    return prompts, frames


def release_style(model, prompts, frames, max_new_tokens: int) -> list[list[int]]:
    """One clip at a time, no KV cache: generated ids per clip."""
    outputs = []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        result = generate(model, ids, torch.ones_like(ids), frames=frames[i:i + 1], temperature=0.0,
                          max_new_tokens=max_new_tokens, use_cache=False)
        outputs.append(result.token_ids[0, 0].tolist())
    return outputs


def batched_cached(model, prompts, frames, max_new_tokens: int, batch: int) -> list[list[int]]:
    """Left-padded batches of ``batch`` clips with the KV cache: generated ids per clip."""
    outputs = []
    for start in range(0, len(prompts), batch):
        ids, mask = pad_sequences(prompts[start:start + batch], model.tokens.pad, side="left")
        result = generate(model, ids, mask, frames=frames[start:start + batch], temperature=0.0,
                          max_new_tokens=max_new_tokens, use_cache=True)
        outputs += [row[0] for row in result.token_ids.tolist()]
    return outputs


def same_answers(single: list[list[int]], batched: list[list[int]]) -> bool:
    """Token-for-token equality; a batched row may run on (as padding) after its own end."""
    return all(b[:len(s)] == s for s, b in zip(single, batched, strict=True))


def bench_generate(samples_dir: Path, sizes: Sizes) -> dict:
    torch.manual_seed(0)
    model = HandsOnVLM(load_model_config("tiny")).eval()
    rows = load_clips(samples_dir, sizes.generate_clips)
    prompts, frames = prompts_and_frames(model, rows)
    outputs = {}

    def single():
        outputs["single"] = release_style(model, prompts, frames, sizes.max_new_tokens)

    def batched():
        outputs["batched"] = batched_cached(model, prompts, frames, sizes.max_new_tokens, sizes.generate_batch)

    seconds = compare({"release_style": single, "batched_cached": batched}, reps=sizes.generate_reps, warmup=1)
    n = len(rows)
    return {
        "clips": n, "batch": sizes.generate_batch, "max_new_tokens": sizes.max_new_tokens,
        "mean_prompt_tokens": sum(map(len, prompts)) / n,
        "mean_generated_tokens": sum(map(len, outputs["single"])) / n,
        "release_style_s": seconds["release_style"], "batched_cached_s": seconds["batched_cached"],
        "release_style_clips_per_s": n / median(seconds["release_style"]),
        "batched_cached_clips_per_s": n / median(seconds["batched_cached"]),
        "generate_speedup": median(seconds["release_style"]) / median(seconds["batched_cached"]),
        "greedy_identical": same_answers(outputs["single"], outputs["batched"]),
        "_profile_efficient": lambda: profile_top(batched),
    }
