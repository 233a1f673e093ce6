"""Release-mode tokenisation: the real LLaMA tokenizer gives the release's token ids.

The references are ``release_token_examples.json`` (ids the release's transformers 4.31 pipeline
produced, see PROVENANCE.md next to it) and, for prompts without added tokens, LLaVA's rule
written out with the ``sentencepiece`` library itself. Corrected mode keeps its piece-by-piece
tokenisation; its tiny-tokenizer ids are pinned from the code before release mode existed.
"""

from __future__ import annotations

import json

import pytest
from conftest import SHARED, require

from handsonvlm import evaluation
from handsonvlm.compat import check_release_vocab
from handsonvlm.config import load_model_config
from handsonvlm.data import encode_conversation, rbhp_turns, vhp_turns
from handsonvlm.model import IGNORE_INDEX, IMAGE_PLACEHOLDER
from handsonvlm.prompts import (
    ACTION_PREDICTION_ANSWERS,
    ACTION_PREDICTION_QUESTIONS,
    ACTION_QUESTIONS,
    FOLLOW_UP_TRAJECTORY_QUESTIONS,
    GENERAL_QUESTIONS,
    TEMPLATES,
    TRAJECTORY_ANSWERS,
    hand_tokens,
    image_prompt,
)
from handsonvlm.tokens import SENTENCEPIECE_MODEL_FILE, load_tokenizer, release_text_ids

LLAMA_TOKENIZER = SHARED / "data" / "tokenizers" / "llama"
EXAMPLES_FILE = LLAMA_TOKENIZER / "release_token_examples.json"
TEMPLATE_OF_KIND = {"prompt_v1": "vicuna_v1", "prompt_v0": "llava_v0", "train_v1": "vicuna_v1"}
RBHP_QUESTION = "I am thirsty, what should I do with the bottle in front of me?"
NARRATIONS = ("open fridge", "take cup", "wash the knife")


def release_cfg(template: str = "vicuna_v1", mode: str = "release"):
    return load_model_config("tiny", [f"model.mode={mode}", f"model.lm.tokenizer={LLAMA_TOKENIZER}",
                                      f"model.prompt_template={template}"])


@pytest.fixture(scope="module")
def examples() -> dict:
    return json.loads(require(EXAMPLES_FILE).read_text())


@pytest.fixture(scope="module")
def llama():
    """The real LLaMA tokenizer as release mode loads it (the template does not change it)."""
    require(LLAMA_TOKENIZER)
    return load_tokenizer(release_cfg())


@pytest.fixture(scope="module")
def sentencepiece_ids():
    """Independent reference: the SentencePiece model's own encoding (dummy prefix, no BOS)."""
    import sentencepiece

    model_file = require(LLAMA_TOKENIZER / SENTENCEPIECE_MODEL_FILE)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    return processor.encode


def case_of(examples: dict, kind: str) -> dict:
    (case,) = [c for c in examples["cases"] if c["kind"] == kind]
    return case


def example_turns(case: dict, image_token: str) -> list[tuple[str, str | None]]:
    return [(image_prompt(case["question"], image_token), case.get("answer"))]


def pieces(tokenizer, ids: list[int]) -> list[str]:
    """Token strings, the image placeholder kept as "<image>"."""
    return ["<image>" if i == IMAGE_PLACEHOLDER else tokenizer.convert_ids_to_tokens(i) for i in ids]


def llava_prompt_ids(tokenizer, encode, question: str, template: str = "vicuna_v1") -> list[int]:
    """The release evaluator's prompt, spelled out: BOS, the system text and user role as one
    SentencePiece chunk, the image, then "\\n<question> ASSISTANT:" as the second chunk."""
    t = TEMPLATES[template]
    before = f"{t.system}{t.sep}{t.user}: "
    after = f"\n{question}{t.sep}{t.assistant}:"
    return [tokenizer.bos_token_id, *encode(before), IMAGE_PLACEHOLDER, *encode(after)]


# ---------------------------------------------------------------------------------- the examples
@pytest.mark.parametrize("kind", sorted(TEMPLATE_OF_KIND))
def test_release_examples_are_reproduced(llama, examples, kind):
    case = case_of(examples, kind)
    cfg = release_cfg(TEMPLATE_OF_KIND[kind])
    ids, labels = encode_conversation(llama, example_turns(case, cfg.image_token), cfg)
    assert ids == case["ids"]
    if "labels" in case:
        assert labels == case["labels"]
    elif case.get("answer") is None:
        assert labels == [IGNORE_INDEX] * len(ids)


def test_training_labels_supervise_exactly_the_answer(llama, examples):
    """The example file has no labels: the training ids start with the evaluation prompt's ids
    and preprocess_v1 supervises exactly what follows (the answer and its </s>)."""
    prompt, train = case_of(examples, "prompt_v1")["ids"], case_of(examples, "train_v1")
    assert train["ids"][:len(prompt)] == prompt
    cfg = release_cfg()
    _, labels = encode_conversation(llama, example_turns(train, cfg.image_token), cfg)
    assert labels == [IGNORE_INDEX] * len(prompt) + train["ids"][len(prompt):]


def test_release_vocabulary(llama, examples):
    assert llama.convert_tokens_to_ids(release_cfg().hand_token) == examples["hand_token_id"]
    assert len(llama) == examples["vocab"] == len(llama.get_vocab())
    check_release_vocab(llama)  # <t0>..<t99> then <hand_traj>, as the released checkpoint expects


def test_spelled_out_llava_rule_matches_the_examples(llama, examples, sentencepiece_ids):
    """The independent reference used below agrees with the release's own ids."""
    for kind in ("prompt_v1", "prompt_v0"):
        case = case_of(examples, kind)
        assert llava_prompt_ids(llama, sentencepiece_ids, case["question"], TEMPLATE_OF_KIND[kind]) == case["ids"]


# ------------------------------------------------------------------------------ other prompts
def assert_release_shape(tokenizer, ids: list[int]) -> None:
    """One BOS (first), one image placeholder, no lone "▁" between the system text and USER."""
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert ids.count(IMAGE_PLACEHOLDER) == 1
    tokens = pieces(tokenizer, ids)
    user = tokens.index("▁US")
    assert tokens[user - 1] == "." and tokens[user + 1:user + 3] == ["ER", ":"]


def assert_release_hands(tokenizer, ids: list[int], hand_token: str) -> None:
    """No "▁" before the first hand token (4.31 stripped the space) and "▁." after the last."""
    tokens = pieces(tokenizer, ids)
    first = tokens.index(hand_token)
    last = len(tokens) - 1 - tokens[::-1].index(hand_token)
    assert tokens[first - 1] == ":" and tokens[last + 1] == "▁."


@pytest.mark.parametrize("question", [q.format(n) for q, n in zip(ACTION_QUESTIONS, NARRATIONS, strict=True)]
                         + list(GENERAL_QUESTIONS) + [RBHP_QUESTION])
def test_generation_prompts_follow_llava(llama, sentencepiece_ids, question):
    cfg = release_cfg()
    ids, labels = encode_conversation(llama, rbhp_turns(question, cfg, with_answer=False), cfg)
    assert ids == llava_prompt_ids(llama, sentencepiece_ids, question)
    assert_release_shape(llama, ids)
    assert labels == [IGNORE_INDEX] * len(ids)


def test_evaluation_jobs_and_predict_prompts_are_release_prompts(llama, sentencepiece_ids):
    """The ids the evaluator (pipelines/evaluate.py) and predict (inference.build_prompt) feed to
    generation are the release evaluator's prompts."""
    from handsonvlm.inference import build_prompt
    from handsonvlm.model import HandsOnVLM

    cfg = release_cfg()
    rows = [{"sample_id": f"clip{i}", "narration": n, "rbhp_questions": [RBHP_QUESTION]}
            for i, n in enumerate(NARRATIONS)]
    jobs = evaluation.build_jobs(rows, cfg, (evaluation.VHP, evaluation.RBHP), seed=0, shuffle=False)
    assert len(jobs) == 2 * len(rows)
    for job in jobs:
        question = job["question"].removeprefix(image_prompt("", cfg.image_token))
        ids, _ = encode_conversation(llama, [(job["question"], None)], cfg)
        assert ids == llava_prompt_ids(llama, sentencepiece_ids, question)

    model = HandsOnVLM(cfg, tokenizer=llama)
    input_ids, mask = build_prompt(model, RBHP_QUESTION)
    assert input_ids[0].tolist() == llava_prompt_ids(llama, sentencepiece_ids, RBHP_QUESTION) and bool(mask.all())


def multi_turn_conversations(cfg) -> list[list[tuple[str, str]]]:
    """The two-turn VHP conversations of the mixture (modes 2 and 3)."""
    hands = hand_tokens(cfg.hand_token, cfg.num_future_points)
    action = ACTION_PREDICTION_ANSWERS[1].format(narration="open fridge")
    return [[(image_prompt(ACTION_PREDICTION_QUESTIONS[0], cfg.image_token), action),
             (FOLLOW_UP_TRAJECTORY_QUESTIONS[1], TRAJECTORY_ANSWERS[0].format(hands=hands))],
            [(image_prompt(GENERAL_QUESTIONS[2], cfg.image_token), TRAJECTORY_ANSWERS[1].format(hands=hands)),
             (ACTION_PREDICTION_QUESTIONS[1], action)]]


@pytest.mark.parametrize("index", [0, 1])
def test_multi_turn_training_conversation(llama, index):
    cfg = release_cfg()
    turns = multi_turn_conversations(cfg)[index]
    ids, labels = encode_conversation(llama, turns, cfg)
    assert_release_shape(llama, ids)
    assert_release_hands(llama, ids, cfg.hand_token)
    # supervised: each answer, each with its </s> (the rounds add up: no mismatch, nothing dropped)
    eos = llama.eos_token_id
    assert ids.count(eos) == 2 and ids[-1] == eos
    assert [i for i, label in enumerate(labels) if label == eos] == [i for i, t in enumerate(ids) if t == eos]
    supervised = [label for label in labels if label != IGNORE_INDEX]
    expected = []
    for _, answer in turns:
        expected += release_text_ids(llama, answer) + [eos]
    assert supervised == expected
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, ids, strict=True))


def test_single_turn_answers_strip_hand_token_spaces(llama):
    cfg = release_cfg()
    for narration in NARRATIONS:
        ids, _ = encode_conversation(llama, vhp_turns(narration, cfg, answer_index=1), cfg)
        assert_release_shape(llama, ids)
        assert_release_hands(llama, ids, cfg.hand_token)


def test_release_training_normalises_the_image_message_like_the_release(llama):
    """The release's dataset stripped the text after the image token (preprocess_multimodal);
    its evaluator did not."""
    cfg = release_cfg()
    answer = TRAJECTORY_ANSWERS[0].format(hands=hand_tokens(cfg.hand_token, cfg.num_future_points))
    padded = image_prompt(f"  {RBHP_QUESTION} \n", cfg.image_token)
    clean = image_prompt(RBHP_QUESTION, cfg.image_token)
    assert encode_conversation(llama, [(padded, answer)], cfg) == encode_conversation(llama, [(clean, answer)], cfg)
    assert encode_conversation(llama, [(padded, None)], cfg) != encode_conversation(llama, [(clean, None)], cfg)


def test_plain_text_chunks_are_sentencepiece_with_the_dummy_prefix(llama, sentencepiece_ids):
    """Where transformers 5's converted LlamaTokenizer differs from SentencePiece (a leading
    space, runs of spaces), release mode follows SentencePiece, as 4.31's slow tokenizer did."""
    hand = llama.convert_tokens_to_ids("<hand_traj>")
    for text in (" USER", "  two  spaces ", "\nWhere", ".", "héllo 日本 123", "a\n\nb"):
        assert release_text_ids(llama, text) == sentencepiece_ids(text)
    assert release_text_ids(llama, "is: <hand_traj> <t3> .</s>") == [
        *sentencepiece_ids("is:"), hand, llama.convert_tokens_to_ids("<t3>"), *sentencepiece_ids("."),
        llama.eos_token_id]


def test_saved_release_tokenizer_reloads_the_same(llama, examples, tmp_path):
    """HandsOnVLM.save_pretrained writes the tokenizer and reloads it from there."""
    llama.save_pretrained(str(tmp_path))
    cfg = load_model_config("tiny", ["model.mode=release", f"model.lm.tokenizer={tmp_path}"])
    reloaded = load_tokenizer(cfg)
    case = case_of(examples, "train_v1")
    assert len(reloaded) == len(llama)
    assert encode_conversation(reloaded, example_turns(case, cfg.image_token), cfg)[0] == case["ids"]


def test_release_mode_refuses_to_train_with_another_template(llama):
    cfg = release_cfg("llava_v0")
    with pytest.raises(ValueError, match="vicuna_v1"):
        encode_conversation(llama, vhp_turns("open fridge", cfg), cfg)


# ------------------------------------------------------------------------------ corrected mode
# ids and labels of vhp_turns("open fridge") with the tiny tokenizer (corrected mode must not change
# by accident: the demo and goldens use it). Last change: the project's own answer wording replaced
# the release's (the prompt, the first 54 ids, is unchanged since release mode got its own tokenisation).
TINY_CORRECTED_IDS = [
    1, 35, 568, 684, 324, 680, 641, 399, 372, 675, 685, 413, 16, 433, 413, 686, 688, 14, 691, 14, 399, 677, 687, 313,
    298, 641, 449, 676, 16, 223, 702, 28, 223, -200, 201, 451, 437, 438, 290, 327, 313, 541, 798, 602, 313, 815, 580,
    645, 33, 1019, 697, 701, 54, 28, 223, 53, 785, 16, 223, 700, 815, 580, 645, 14, 298, 408, 327, 432, 318, 339, 28,
    223, 1124, 1124, 1124, 1124, 16, 2]
TINY_CORRECTED_PROMPT_LEN = 54  # the prompt's ids are the first 54; labels supervise the rest


def test_corrected_mode_with_the_tiny_tokenizer_is_unchanged():
    cfg = load_model_config("tiny", ["model.mode=corrected"])
    tokenizer = load_tokenizer(cfg)
    ids, labels = encode_conversation(tokenizer, vhp_turns("open fridge", cfg), cfg)
    assert ids == TINY_CORRECTED_IDS
    assert labels == [IGNORE_INDEX] * TINY_CORRECTED_PROMPT_LEN + TINY_CORRECTED_IDS[TINY_CORRECTED_PROMPT_LEN:]
    prompt, prompt_labels = encode_conversation(tokenizer, vhp_turns("open fridge", cfg, with_answer=False), cfg)
    assert prompt == TINY_CORRECTED_IDS[:TINY_CORRECTED_PROMPT_LEN]
    assert prompt_labels == [IGNORE_INDEX] * TINY_CORRECTED_PROMPT_LEN
