"""Batched, KV-cached generation that decodes a hand point every time ``<hand_traj>`` is emitted.

Per step: the LM state at the last position gives the next-token logits; if the sampled token is
``<hand_traj>``, that same state (the one that predicted it, as in training) is split into
right/left halves and decoded into a point, and the point's sinusoidal encoding is added to the
hand token's input embedding for the next step. Only the new token is fed through the LM (KV
cache); the release re-ran the whole sequence, vision tower included, at every token, batch 1.

``temperature=0`` is greedy decoding: argmax tokens and the CVAE's prior mean (z = 0), so the
output is deterministic. The release's greedy path skipped hand decoding altogether.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from handsonvlm.hand_embedding import hand_conditions, hand_token_embeddings


@dataclass
class GenerationResult:
    """B clips x K samples. trajectories [B, K, 2, T, 2]; hand_counts, complete [B, K];
    token_ids [B, K, N] (generated ids, pad after the end); texts [B][K]."""

    texts: list[list[str]]
    token_ids: torch.Tensor
    trajectories: torch.Tensor
    hand_counts: torch.Tensor
    complete: torch.Tensor


def next_token_probs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0) -> torch.Tensor:
    """logits [N, V] -> the sampling distribution [N, V] (rows sum to 1) for ``temperature > 0``.

    In the order of HF's warpers (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
    ``TopPLogitsWarper``): logits / temperature; ``top_k > 0`` keeps the tokens whose logit is at
    least the k-th largest of their row (ties at the k-th value are kept, as HF does); then nucleus
    sampling (``top_p < 1``) on the renormalised rest, keeping the most likely tokens until their
    mass reaches ``top_p`` (at least one). ``top_k=0`` is off and leaves the computation as it was."""
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]  # [N, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keeps at least the top token
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs / probs.sum(-1, keepdim=True)


def sample_next_token(logits: torch.Tensor, temperature: float, top_p: float,
                      generator: torch.Generator | None, top_k: int = 0) -> torch.Tensor:
    """logits [N, V] -> token ids [N]: argmax when temperature <= 0, else a draw from
    :func:`next_token_probs` (temperature, top-k, top-p)."""
    if temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial(next_token_probs(logits, temperature, top_p, top_k), 1, generator=generator).squeeze(-1)


def select_trajectory(points: torch.Tensor, counts: torch.Tensor, num_points: int, mode: str) -> torch.Tensor:
    """The T points of each answer from the decoded points [N, 2, M, 2] and hand-token counts [N].

    corrected: the first T points, NaN where fewer were produced (flagged incomplete, never
    scored as a guess). release: the last T points, zero-padded (the release's post-processing,
    which scored missing points as the top-left corner)."""
    n = points.shape[0]
    slots = torch.arange(num_points, device=points.device)[None]  # [1, T]
    start = (counts - num_points).clamp(min=0)[:, None] if mode == "release" else torch.zeros_like(counts)[:, None]
    index = (start + slots).clamp(max=points.shape[2] - 1)  # [N, T]
    chosen = points.gather(2, index[:, None, :, None].expand(n, 2, num_points, 2))
    present = (start + slots < counts[:, None])[:, None, :, None]
    fill = 0.0 if mode == "release" else float("nan")
    return torch.where(present, chosen, torch.full_like(chosen, fill))


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, frames=None, frame_means=None,
             frame_grids=None, num_samples: int = 1, max_new_tokens: int = 64, temperature: float = 0.5,
             top_p: float = 0.9, seed: int = 0, z_scale: float | None = None,
             use_cache: bool = True, top_k: int = 0) -> GenerationResult:
    """Answer B left-padded prompts [B, L] (each ending with "ASSISTANT:") with K samples each.

    Sampling: ``temperature``, ``top_k`` (0 = off), ``top_p`` (see :func:`sample_next_token`);
    the mode-dependent values come from ``handsonvlm.inference.resolve_sampling``."""
    from transformers import DynamicCache

    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded (the last position of every row must be real)")
    cfg, tokens = model.cfg, model.tokens
    was_training = model.training
    model.eval()
    device = input_ids.device
    generator = torch.Generator(device=device).manual_seed(seed)
    greedy = temperature <= 0
    z = 0.0 if greedy else (cfg.z_scale if z_scale is None else z_scale)

    visual = model.visual_tokens(frames, frame_means, frame_grids).repeat_interleave(num_samples, 0)
    ids = input_ids.repeat_interleave(num_samples, 0)
    seq = model.embed_inputs(ids, attention_mask.repeat_interleave(num_samples, 0), visual, hand_points=None)
    n = ids.shape[0]
    embeds, mask, positions = seq["inputs_embeds"], seq["attention_mask"], seq["position_ids"]
    step_embeds, step_positions = embeds, positions
    cache = DynamicCache() if use_cache else None

    points = torch.zeros(n, 2, max_new_tokens, 2, device=device)
    counts = torch.zeros(n, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    generated = []
    embed_tokens = model.lm.get_input_embeddings()
    for _ in range(max_new_tokens):
        if use_cache:
            out = model.lm.model(inputs_embeds=step_embeds, attention_mask=mask, position_ids=step_positions,
                                 past_key_values=cache, use_cache=True)
        else:
            out = model.lm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
        last = out.last_hidden_state[:, -1]  # [N, D]
        next_ids = sample_next_token(model.lm.lm_head(last).float(), temperature, top_p, generator, top_k)
        next_ids = torch.where(finished, torch.full_like(next_ids, tokens.pad), next_ids)
        is_hand = next_ids == tokens.hand
        new_embeds = embed_tokens(next_ids)[:, None]  # [N, 1, D]
        if bool(is_hand.any()):
            point = model.traj_decoder.sample(hand_conditions(last[:, None])[:, :, 0], z_scale=z,
                                              generator=generator)  # [N, 2, 2]
            rows = is_hand.nonzero().squeeze(-1)
            points[rows, :, counts[rows]] = point[rows].to(points.dtype)
            offset = hand_token_embeddings(point[:, :, None], model.hidden_size, dtype=new_embeds.dtype)
            new_embeds = new_embeds + offset * is_hand[:, None, None].to(new_embeds.dtype)
            counts = counts + is_hand.long()
        generated.append(next_ids)
        finished = finished | (next_ids == tokens.eos)
        step_positions = positions[:, -1:] + 1
        step_embeds = new_embeds
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = torch.cat([positions, step_positions], dim=1)
        embeds = torch.cat([embeds, new_embeds], dim=1) if not use_cache else embeds
        if bool(finished.all()):
            break

    token_ids = torch.stack(generated, dim=1)  # [N, steps]
    trajectories = select_trajectory(points, counts, cfg.num_future_points, cfg.mode)
    texts = [decode_answer(model.tokenizer, row, tokens.eos, tokens.pad) for row in token_ids.tolist()]
    model.train(was_training)
    b = input_ids.shape[0]
    return GenerationResult(
        texts=[texts[i * num_samples:(i + 1) * num_samples] for i in range(b)],
        token_ids=token_ids.view(b, num_samples, -1),
        trajectories=trajectories.view(b, num_samples, 2, cfg.num_future_points, 2),
        hand_counts=counts.view(b, num_samples),
        complete=(counts == cfg.num_future_points).view(b, num_samples),
    )


def decode_answer(tokenizer, ids: list[int], eos: int, pad: int) -> str:
    """Generated ids -> text, up to the end-of-sequence token."""
    if eos in ids:
        ids = ids[:ids.index(eos)]
    return tokenizer.decode([i for i in ids if i != pad], skip_special_tokens=False).strip()
