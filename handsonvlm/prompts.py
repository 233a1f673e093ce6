"""Conversation templates and HandsOnVLM's question/answer templates.

The release trains with the ``vicuna_v1`` template (its ``--version vicuna-v1-3-7b`` is not a key of
LLaVA's templates, so training falls back to it) and its evaluator picks ``llava_v0`` (or
``llava_v1`` for a directory name with "v1") unless a ``--conv-mode`` is given: a mismatch.
Training uses ``vicuna_v1`` in both modes; evaluation and prediction use the model's own template
in corrected mode and the release evaluator's rule in release mode
(``handsonvlm.inference.resolve_sampling``, docs/MODEL.md).

The question/answer tuples below are the project's own wordings; :mod:`handsonvlm.templates`
gathers them into ``PROJECT_TEMPLATES`` (a validated ``TemplateSet``), which is what conversation
code should read. Only ACTION_QUESTIONS equals a release list (``action_question_templates``):
they are the VHP benchmark's question format, which the RBHP question files also reuse, so
corrected-mode evaluation asks what the release's evaluator asks. Every other wording here is the
project's own (checked against the release at commit 89b7721: no other sentence is shared). The
release's lists themselves are read from the user's clone:
``python -m handsonvlm.compat templates`` writes them to a file for ``data.templates``.
``{narration}`` is filled with the narration, ``{hands}`` with the hand tokens, ``{noun}`` with
the clip's noun; ACTION_QUESTIONS alone keeps a positional ``{}`` for the narration (its callers
use ``.format(narration)``; ``PROJECT_TEMPLATES.action_questions`` names it ``{narration}``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    system: str
    user: str
    assistant: str
    sep: str  # after the system text and after each user turn
    sep2: str  # after each assistant turn (the end-of-sequence text for vicuna_v1)
    # How a role opens its message: Vicuna/LLaVA's "USER:", ChatML's "<|im_start|>user\n".
    role_open: str = "{role}:"
    # Between an open role and its message: Vicuna/LLaVA's space, nothing in ChatML.
    message_prefix: str = " "
    # Whether the ids start with the tokenizer's BOS (LLaMA's <s>). ChatML writes its own
    # "<|im_start|>", which SmolLM2's tokenizer names its BOS: adding it again would double it.
    add_bos: bool = True

    def open_role(self, role: str) -> str:
        return self.role_open.format(role=role)

    def render(self, turns: list[tuple[str, str | None]]) -> list[tuple[str, bool]]:
        """Pieces of the conversation text, each flagged True where it is supervised.

        ``turns``: (user message, assistant answer or None for the open generation prompt).
        Only the assistant answers and their closing ``sep2`` are supervised, as in LLaVA's
        ``preprocess_v1``.
        """
        pieces = [(self.system + self.sep, False)]
        for user_text, answer in turns:
            pieces.append((f"{self.open_role(self.user)}{self.message_prefix}{user_text}{self.sep}"
                           f"{self.open_role(self.assistant)}", False))
            if answer is not None:
                pieces.append((f"{self.message_prefix}{answer}{self.sep2}", True))
        return pieces

    def conversation_text(self, turns: list[tuple[str, str | None]]) -> str:
        """The whole conversation as one string, as LLaVA's ``Conversation.get_prompt`` writes it
        (release mode tokenises this string at once): ``system + sep``, then ``"ROLE: message"``
        followed by ``sep`` after a user message and ``sep2`` after an answer (``llava_v0``'s
        single separator is both). A missing or empty message leaves its role open as
        ``"ROLE:"``, so a generation prompt ends with ``"ASSISTANT:"``."""
        text = self.system + self.sep
        for user_text, answer in turns:
            text += self._message_text(self.user, user_text, self.sep)
            text += self._message_text(self.assistant, answer, self.sep2)
        return text

    def _message_text(self, role: str, message: str | None, separator: str) -> str:
        # LLaVA tests the message's truth, so "" is left open like None
        opened = self.open_role(role)
        return f"{opened}{self.message_prefix}{message}{separator}" if message else opened


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")
CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TEMPLATES = {
    "vicuna_v1": Template(VICUNA_SYSTEM, "USER", "ASSISTANT", " ", "</s>"),
    # LLaVA's v0 template, which the released evaluator picks for "handsonvlm-7b" (no "v1" in the name).
    "llava_v0": Template(LLAVA_SYSTEM, "Human", "Assistant", "###", "###"),
    # LLaVA's v1 template, which the released evaluator picks for a directory name containing "v1".
    "llava_v1": Template(LLAVA_SYSTEM, "USER", "ASSISTANT", " ", "</s>"),
    # SmolLM2-Instruct's own chat template (ChatML with its default system message; configs/smol.yaml):
    # the text equals its tokenizer's apply_chat_template, so the answer ends with its EOS <|im_end|>.
    "smollm2": Template(f"{CHATML_START}system\n{SMOLLM2_SYSTEM}", "user", "assistant", f"{CHATML_END}\n",
                        f"{CHATML_END}\n", role_open=f"{CHATML_START}{{role}}\n", message_prefix="", add_bos=False),
}

# VHP: the question names the action (positional "{}": see the module docstring).
ACTION_QUESTIONS = (
    "Where should my hand move to if I want to {}?",
    "Can you provide the hand trajectory for {}?",
    "What is the recommended hand movement for {}?",
)
ACTION_ANSWERS = (
    "Sure. To {narration}, the hands move like this: {hands}.",
    "For {narration}, the hands follow this path: {hands}.",
)
# Questions that name no action (VHP modes 1-3 and RBHP answers).
GENERAL_QUESTIONS = (
    "Where will the hands go in this clip?",
    "Can you predict where the hands will move next?",
    "How will the hands move in the next second?",
)
TRAJECTORY_ANSWERS = (
    "Here is where the hands will move: {hands}.",
    "The predicted hand trajectory is: {hands}.",
)
ACTION_PREDICTION_QUESTIONS = (
    "What action is going to happen in this video?",
    "What will the person do next?",
)
ACTION_PREDICTION_ANSWERS = (
    "Next, the person will {narration}.",
    "The action that is going to happen in this video is {narration}.",
)
FOLLOW_UP_TRAJECTORY_QUESTIONS = (
    "What is the hand trajectory for doing this?",
    "Where should my hands move to do this?",
)
# Answers that also name the clip's EPIC noun (as the release's third one does with ``action.noun``);
# used alongside ACTION_PREDICTION_ANSWERS when the row has a noun (PROJECT_TEMPLATES holds both
# in ``action_prediction_answers``; ``TemplateSet.action_prediction_answers_for`` picks).
ACTION_PREDICTION_NOUN_ANSWERS = (
    "The person is about to {narration}; there is {noun} in view.",
)


def hand_tokens(hand_token: str, count: int) -> str:
    """The hand tokens of an answer, concatenated without spaces as in the release."""
    return hand_token * count


def image_prompt(question: str, image_token: str) -> str:
    """The first user message: the visual placeholder on its own line, then the question."""
    return f"{image_token}\n{question}"


def tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: every template, rendered."""
    lines = [VICUNA_SYSTEM, TEMPLATES["llava_v0"].system, "USER: ASSISTANT: Human: Assistant: ###"]
    for group in (ACTION_QUESTIONS, ACTION_ANSWERS, GENERAL_QUESTIONS, TRAJECTORY_ANSWERS,
                  ACTION_PREDICTION_QUESTIONS, ACTION_PREDICTION_ANSWERS, FOLLOW_UP_TRAJECTORY_QUESTIONS):
        lines.extend(t.replace("{}", "").replace("{narration}", "").replace("{hands}", "") for t in group)
    return lines
