"""From a sample shard row (docs/DATA.md) to model tensors: frames, targets, token ids, batches.

Training labels and generation prompts come from one function, :func:`encode_conversation`. In
corrected mode a conversation is tokenised piece by piece (system + user text unsupervised, each
assistant answer and its ``</s>`` supervised). In release mode it is tokenised as the release did
(docs/MODEL.md, "Tokenisation in release mode"): the whole conversation as one string, split only
at the image token (LLaVA's ``tokenizer_image_token``), labels masked by LLaVA's
``preprocess_v1``. Either way the image token in the text becomes ``IMAGE_PLACEHOLDER``, replaced
by the visual tokens inside the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from handsonvlm.config import ModelConfig
from handsonvlm.image import decode_jpegs, preprocess_frames
from handsonvlm.model import IGNORE_INDEX, IMAGE_PLACEHOLDER
from handsonvlm.prompts import TEMPLATES, hand_tokens, image_prompt
from handsonvlm.templates import PROJECT_TEMPLATES, TemplateSet
from handsonvlm.tokens import release_text_ids

log = logging.getLogger(__name__)
# The only template the release trained with: its label masking (preprocess_v1) assumes it.
RELEASE_TRAINING_TEMPLATE = "vicuna_v1"


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
              with_answer: bool = True, templates: TemplateSet = PROJECT_TEMPLATES) -> list[tuple[str, str | None]]:
    """A vanilla (action-naming) question and its trajectory answer: ``templates.action_questions``
    and ``templates.action_answers`` picked by index (modulo their lengths), filled with
    ``narration`` and ``cfg.num_future_points`` hand tokens; the answer is None when not
    ``with_answer`` (a generation prompt)."""
    questions, answers = templates.action_questions, templates.action_answers
    question = questions[question_index % len(questions)].format(narration=narration)
    answer = answers[answer_index % len(answers)].format(
        narration=narration, hands=hand_tokens(cfg.hand_token, cfg.num_future_points))
    return [(image_prompt(question, cfg.image_token), answer if with_answer else None)]


def rbhp_turns(question: str, cfg: ModelConfig, answer_index: int = 0, with_answer: bool = True,
               templates: TemplateSet = PROJECT_TEMPLATES) -> list[tuple[str, str | None]]:
    """A reasoning question (implies the action) and its trajectory answer, one of
    ``templates.trajectory_answers`` picked by index (modulo its length); the answer is None when
    not ``with_answer``."""
    answers = templates.trajectory_answers
    answer = answers[answer_index % len(answers)].format(hands=hand_tokens(cfg.hand_token, cfg.num_future_points))
    return [(image_prompt(question, cfg.image_token), answer if with_answer else None)]


def encode_conversation(
    tokenizer, turns: list[tuple[str, str | None]], cfg: ModelConfig
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation; the last turn's answer may be None (a prompt).
    Release mode reproduces the release's tokenisation, corrected mode tokenises by pieces."""
    if cfg.mode == "release":
        return encode_release_conversation(tokenizer, turns, cfg)
    return encode_conversation_by_pieces(tokenizer, turns, cfg)


def encode_conversation_by_pieces(
    tokenizer, turns: list[tuple[str, str | None]], cfg: ModelConfig
) -> tuple[list[int], list[int]]:
    """Corrected mode: each rendered piece tokenised on its own, so that a label is supervised
    exactly where its text is, whatever the tokenizer does at piece joins."""
    template = TEMPLATES[cfg.prompt_template]
    add_bos = template.add_bos and tokenizer.bos_token_id is not None
    ids: list[int] = [tokenizer.bos_token_id] if add_bos else []
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


def encode_release_conversation(
    tokenizer, turns: list[tuple[str, str | None]], cfg: ModelConfig
) -> tuple[list[int], list[int]]:
    """Release mode: the ids the release's training (``preprocess_v1``) or evaluator produced.

    A conversation with answers is a training sample: its image message is normalised as the
    release's dataset did and its labels masked as ``preprocess_v1`` does. A conversation without
    answers is a generation prompt, built as the release's evaluator built it (no
    normalisation), all labels ignored."""
    template = TEMPLATES[cfg.prompt_template]
    supervised = any(answer is not None for _, answer in turns)
    if supervised:
        if cfg.prompt_template != RELEASE_TRAINING_TEMPLATE:
            raise ValueError(f"release mode trains with the {RELEASE_TRAINING_TEMPLATE!r} template only (the "
                             f"release's preprocess_v1 masks labels for it), not {cfg.prompt_template!r}")
        turns = [(release_image_message(user, cfg.image_token), answer) for user, answer in turns]
    text = template.conversation_text(turns)
    ids = image_token_ids(tokenizer, text, cfg.image_token)
    if not supervised:
        return ids, [IGNORE_INDEX] * len(ids)
    return ids, release_labels(tokenizer, text, ids, cfg)


def release_image_message(text: str, image_token: str) -> str:
    """A training message as the release's ``preprocess_multimodal`` left it: a message holding the
    image token gets the token alone on its first line, the rest stripped of outer whitespace."""
    if image_token not in text:
        return text
    return f"{image_token}\n{text.replace(image_token, '').strip()}"


def image_token_ids(tokenizer, text: str, image_token: str) -> list[int]:
    """LLaVA's ``tokenizer_image_token``: ``text`` split at the image token, each chunk tokenised
    on its own as ``tokenizer(chunk).input_ids`` (the release's tokenizer put BOS before every
    chunk and no EOS), and ``IMAGE_PLACEHOLDER`` between the chunks.

    When the first chunk starts with BOS, LLaVA keeps that one BOS and drops the first id of every
    chunk (the other chunks' BOS); otherwise nothing is dropped."""
    chunks = [_ids_with_bos(tokenizer, chunk) for chunk in text.split(image_token)]
    bos = tokenizer.bos_token_id
    offset = 1 if bos is not None and chunks[0][:1] == [bos] else 0
    ids = chunks[0][:offset]
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_PLACEHOLDER)
        ids += chunk[offset:]
    return ids


def _ids_with_bos(tokenizer, text: str) -> list[int]:
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return bos + release_text_ids(tokenizer, text)


def release_labels(tokenizer, text: str, ids: list[int], cfg: ModelConfig) -> list[int]:
    """Labels of a release-mode training conversation, masked as LLaVA's ``preprocess_v1`` does.

    The text is split into rounds at ``sep2`` (``</s>``) and each round into instruction and
    answer at ``sep + "ASSISTANT: "``; lengths are counted by tokenising those substrings on their
    own. A round's length counts its own BOS, which stands for the previous round's ``</s>``. The
    instruction length is its count minus 2: its BOS and the "▁" that the trailing space of
    "ASSISTANT: " becomes when tokenised alone (in the whole text that space joins the answer's
    first word). BOS, instructions and whatever follows the last complete round are masked; if the
    rounds do not add up to the sequence length, every label is masked (the release printed a
    warning and trained on nothing for that sample)."""
    template = TEMPLATES[cfg.prompt_template]
    answer_start = f"{template.sep}{template.assistant}: "
    labels = list(ids)
    cursor = 1  # the BOS
    _mask(labels, 0, cursor)
    for round_text in text.split(template.sep2):
        parts = round_text.split(answer_start)
        if not round_text or len(parts) != 2:
            break
        round_len = len(image_token_ids(tokenizer, round_text, cfg.image_token))
        instruction_len = len(image_token_ids(tokenizer, parts[0] + answer_start, cfg.image_token)) - 2
        _mask(labels, cursor, cursor + instruction_len)
        cursor += round_len
    _mask(labels, cursor, len(labels))
    text_len = sum(i != tokenizer.pad_token_id for i in ids)
    if cursor < cfg.max_length and cursor != text_len:
        log.warning("release tokenisation mismatch: %d vs. %d tokens; every label masked", cursor, text_len)
        _mask(labels, 0, len(labels))
    return labels


def _mask(labels: list[int], start: int, stop: int) -> None:
    """IGNORE_INDEX over ``labels[start:stop]``, clipped to the list as tensor slicing is."""
    for i in range(start, min(stop, len(labels))):
        labels[i] = IGNORE_INDEX


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
