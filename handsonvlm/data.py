"""From a sample shard row (docs/DATA.md) to model tensors: frames, targets, token ids, batches.

Conversations are tokenised piece by piece (system + user text unsupervised, each assistant answer
and its ``</s>`` supervised), so the training labels and the generation prompt come from one
function. The image token in the text becomes ``IMAGE_PLACEHOLDER``, replaced by the visual
tokens inside the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from handsonvlm.config import ModelConfig
from handsonvlm.image import decode_jpegs, preprocess_frames
from handsonvlm.model import IGNORE_INDEX, IMAGE_PLACEHOLDER
from handsonvlm.prompts import (
    ACTION_ANSWERS,
    ACTION_QUESTIONS,
    TEMPLATES,
    TRAJECTORY_ANSWERS,
    hand_tokens,
    image_prompt,
)


@dataclass
class Example:
    """One tokenised conversation with its clip. Shapes: frames [F, 3, S, S], future_hands [2, T, 2]."""

    input_ids: list[int]
    labels: list[int]
    frames: torch.Tensor | None
    future_hands: torch.Tensor
    future_valid: torch.Tensor
    sample_id: str = ""


def vhp_turns(narration: str, cfg: ModelConfig, question_index: int = 0, answer_index: int = 0,
              with_answer: bool = True) -> list[tuple[str, str | None]]:
    """A vanilla (action-naming) question and its trajectory answer."""
    question = ACTION_QUESTIONS[question_index % len(ACTION_QUESTIONS)].format(narration)
    answer = ACTION_ANSWERS[answer_index % len(ACTION_ANSWERS)].format(
        narration=narration, hands=hand_tokens(cfg.hand_token, cfg.num_future_points))
    return [(image_prompt(question, cfg.image_token), answer if with_answer else None)]


def rbhp_turns(question: str, cfg: ModelConfig, answer_index: int = 0,
               with_answer: bool = True) -> list[tuple[str, str | None]]:
    """A reasoning question (implies the action) and its trajectory answer."""
    answer = TRAJECTORY_ANSWERS[answer_index % len(TRAJECTORY_ANSWERS)].format(
        hands=hand_tokens(cfg.hand_token, cfg.num_future_points))
    return [(image_prompt(question, cfg.image_token), answer if with_answer else None)]


def encode_conversation(
    tokenizer, turns: list[tuple[str, str | None]], cfg: ModelConfig
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation; the last turn's answer may be None (a prompt)."""
    template = TEMPLATES[cfg.prompt_template]
    ids: list[int] = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    for text, supervised in template.render(turns):
        for i, part in enumerate(text.split(cfg.image_token)):
            if i:
                ids.append(IMAGE_PLACEHOLDER)
                labels.append(IGNORE_INDEX)
            if part:
                piece = tokenizer(part, add_special_tokens=False)["input_ids"]
                ids += piece
                labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    return ids, labels


def clip_frames(obs_jpeg: list[bytes], image_size: int) -> torch.Tensor:
    """The observed JPEGs -> CLIP-preprocessed frames [F, 3, S, S]."""
    return preprocess_frames(decode_jpegs(obs_jpeg), image_size=image_size)


def clip_targets(future_hands, future_valid) -> tuple[torch.Tensor, torch.Tensor]:
    """Shard targets [2, 5, 2] (point 0 = last observed position) -> the T = 4 future points [2, 4, 2]
    the model predicts, and the hand validity [2]."""
    hands = torch.as_tensor(np.asarray(future_hands, np.float32))
    return hands[:, 1:], torch.as_tensor(np.asarray(future_valid, bool))


def max_text_tokens(cfg: ModelConfig, num_visual_tokens: int) -> int:
    """Text budget so that the spliced sequence (text - 1 + visual) fits ``max_length``.

    The release truncated text to 2048 *before* splicing in 356 visual tokens, then asserted a
    length it could not have for long texts."""
    return cfg.max_length - num_visual_tokens + 1


def pad_sequences(seqs: list[list[int]], pad_value: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """[B] lists -> ([B, L] tensor, [B, L] attention mask with 0 on padding)."""
    length = max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        out[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return out, mask


def collate(examples: list[Example], pad_id: int, max_text: int | None = None, side: str = "right") -> dict:
    """Stack examples into a batch for :meth:`HandsOnVLM.forward` (right padding for training,
    left for generation). Sequences longer than ``max_text`` are cut from the end."""
    ids = [e.input_ids[:max_text] for e in examples]
    labels = [e.labels[:max_text] for e in examples]
    input_ids, attention_mask = pad_sequences(ids, pad_id, side)
    label_ids, _ = pad_sequences(labels, IGNORE_INDEX, side)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids,
             "future_hands": torch.stack([e.future_hands for e in examples]),
             "future_valid": torch.stack([e.future_valid for e in examples])}
    if all(e.frames is not None for e in examples):
        batch["frames"] = torch.stack([e.frames for e in examples])
    return batch
