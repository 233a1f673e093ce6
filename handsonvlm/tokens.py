"""Tokenizer set-up: LITA time tokens, the ``<hand_traj>`` token, and the tiny CPU tokenizer.

Token ids are always resolved from the tokenizer (``<hand_traj>`` is 32100 for Vicuna only
because of the order in which tokens were added; nothing here assumes it).

The tiny preset needs a tokenizer without network access: a byte-level BPE (so any text encodes)
trained on the prompt templates and a kitchen vocabulary, stored in ``configs/tokenizers/tiny``
and rebuilt reproducibly with ``python -m handsonvlm.tokens --build-tiny``.

Release mode tokenises as the release did with transformers 4.31's slow ``LlamaTokenizer``
(docs/MODEL.md, "Tokenisation in release mode"): a SentencePiece model is read with the
``sentencepiece`` library (legacy dummy prefix on every chunk), and :func:`release_text_ids`
strips the whitespace beside plain added tokens as 4.31 did. Corrected mode loads whatever
``AutoTokenizer`` gives and encodes text with it unchanged.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from handsonvlm.config import CONFIG_DIR, ModelConfig
from handsonvlm.constants import time_token
from handsonvlm.prompts import tokenizer_corpus

TINY_TOKENIZER_DIR = CONFIG_DIR / "tokenizers" / "tiny"
TINY_VOCAB_SIZE = 1024
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
SENTENCEPIECE_MODEL_FILE = "tokenizer.model"
# A kitchen vocabulary so that the tiny tokenizer has whole-word pieces for the data's words.
KITCHEN_WORDS = [
    "take", "put", "wash", "open", "close", "insert", "turn-on", "cut", "turn-off", "pour", "mix", "move", "remove",
    "throw", "dry", "shake", "scoop", "adjust", "squeeze", "peel", "empty", "press", "flip", "turn", "check", "scrape",
    "apply", "fill", "fold", "hold", "fit", "lift", "rub", "stir", "transition", "pick", "get", "grab", "set",
    "unscrew", "screw", "pull", "push", "slide", "place", "return", "rinse", "clean", "wipe", "scrub", "fry", "boil",
    "cook", "heat", "chop", "slice", "dice", "serve", "drink", "eat", "sip", "spread", "reach", "use", "make",
    "prepare", "water", "tea", "coffee", "milk", "juice", "oil", "vinegar", "sauce", "salt", "pepper", "sugar", "tap",
    "spoon", "plate", "cupboard", "knife", "pan", "lid", "bowl", "drawer", "sponge", "glass", "hand", "fridge", "cup",
    "fork", "bottle", "onion", "cloth", "board", "chopping", "bag", "spatula", "container", "liquid", "washing", "soap",
    "towel", "kettle", "jar", "egg", "bread", "cheese", "butter", "meat", "vegetable", "potato", "tomato", "carrot",
    "garlic", "rice", "pasta", "dish", "pot", "sink", "counter", "table", "stove", "oven", "microwave", "bin", "box",
    "paper", "tray", "mug", "blade", "scrubber", "cereal", "batter", "soup", "honey", "toast", "jam", "pickles", "prep",
    "surface", "wooden", "frying", "dinner", "meal", "thirst", "something", "some", "the", "a", "an", "my", "me", "to",
    "for", "of", "with", "into", "onto", "on", "in", "from", "off", "up", "down", "out", "over", "under", "left",
    "right", "hands", "hand", "trajectory", "move", "where", "should", "if", "want", "can", "you", "provide", "what",
    "is", "recommended", "movement", "next", "second", "red", "green", "blue", "yellow", "white", "black", "brown",
    "pink", "purple", "orange", "grey", "small", "large", "tall", "round", "flat",
]


@dataclass(frozen=True)
class SpecialTokens:
    """Ids the model needs, resolved from the tokenizer."""

    hand: int
    eos: int
    pad: int
    bos: int | None
    time_tokens: tuple[int, ...]


def build_tiny_tokenizer(out_dir: Path = TINY_TOKENIZER_DIR, vocab_size: int = TINY_VOCAB_SIZE):
    """Train the tiny byte-level BPE tokenizer deterministically and save it to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = tokenizer_corpus() + [" ".join(KITCHEN_WORDS)] + KITCHEN_WORDS
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[UNK, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=UNK)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer with LITA time tokens and the hand token added (as the release does:
    plain ``add_tokens``, time tokens first), right padding, pad = unk.

    Release mode reads a SentencePiece ``tokenizer.model`` with the ``sentencepiece`` library, as
    the release's slow tokenizer did (see :func:`release_sentencepiece_tokenizer`); any other
    source, and corrected mode, load through ``AutoTokenizer``."""
    source = cfg.lm.tokenizer or cfg.lm.pretrained or str(TINY_TOKENIZER_DIR)
    # A local directory, or a hub id already in the local Hugging Face cache: never a download.
    try:
        tokenizer = _base_tokenizer(source, cfg.mode)
    except OSError as exc:
        raise FileNotFoundError(f"tokenizer {source!r} is neither a local directory nor in the local Hugging Face "
                                f"cache; nothing is downloaded at run time (see docs/MODEL.md)") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = cfg.max_length
    time_tokens = [time_token(t) for t in range(cfg.num_time_tokens)]
    missing = [t for t in time_tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing)
    if cfg.hand_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([cfg.hand_token])
    return tokenizer


def _base_tokenizer(source: str, mode: str):
    """The tokenizer of ``source`` before the time and hand tokens are added."""
    from transformers import AutoTokenizer

    tokenizer = release_sentencepiece_tokenizer(source) if mode == "release" else None
    return tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(source, local_files_only=True)


def release_sentencepiece_tokenizer(source: str):
    """The tokenizer of ``source`` as transformers 4.31's slow ``LlamaTokenizer`` encoded text, or
    None when ``source`` has no SentencePiece ``tokenizer.model``.

    transformers 5's ``LlamaTokenizer`` is a converted BPE that splits some text differently from
    SentencePiece itself (" USER", runs of spaces); its ``SentencePieceBackend`` calls the
    ``sentencepiece`` library and, with ``legacy=True`` (4.31's default when the config has no
    ``legacy`` key, as Vicuna v1.3's has not), adds the dummy prefix to every chunk. It adds no
    BOS itself: :func:`handsonvlm.data.image_token_ids` does, as the release's tokenizer did."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    from transformers.utils import cached_file

    model_file = cached_file(source, SENTENCEPIECE_MODEL_FILE, local_files_only=True,
                             _raise_exceptions_for_missing_entries=False)
    if model_file is None:
        return None
    return SentencePieceBackend.from_pretrained(source, local_files_only=True, legacy=True)


def release_text_ids(tokenizer, text: str) -> list[int]:
    """``tokenizer(text, add_special_tokens=False).input_ids`` as the release's transformers 4.31
    slow tokenizer computed it.

    4.31 split the text at every added or special token and stripped the whitespace on both sides
    of the tokens that ``add_tokens`` had added as plain strings (``<tN>``, ``<hand_traj>``), but
    not beside its special tokens (``<s>``, ``</s>``, ``<unk>``, AddedTokens without lstrip/rstrip).
    So "follows: <hand_traj>" loses its space and ".</s>" keeps "." as its own chunk ("▁."). Each
    remaining chunk is encoded on its own by ``tokenizer`` (a legacy SentencePiece tokenizer gives
    every chunk the dummy prefix)."""
    token_ids = added_token_ids(tokenizer)
    if not token_ids:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    plain = token_ids.keys() - set(tokenizer.all_special_tokens)
    # re.split with one capture group: even positions are text, odd positions the tokens found
    parts = _added_token_pattern(tuple(sorted(token_ids))).split(text)
    for i in range(1, len(parts), 2):
        if parts[i] in plain:
            parts[i - 1] = parts[i - 1].rstrip()
            parts[i + 1] = parts[i + 1].lstrip()
    ids: list[int] = []
    for i, part in enumerate(parts):
        if i % 2:
            ids.append(token_ids[part])
        elif part:
            ids += tokenizer(part, add_special_tokens=False)["input_ids"]
    return ids


def added_token_ids(tokenizer) -> dict[str, int]:
    """Every token that text is split at before encoding: the added tokens and the special tokens."""
    specials = tokenizer.all_special_tokens
    return {**dict(zip(specials, tokenizer.convert_tokens_to_ids(specials), strict=True)),
            **tokenizer.get_added_vocab()}


@lru_cache(maxsize=8)
def _added_token_pattern(tokens: tuple[str, ...]) -> re.Pattern:
    """A regex matching any of ``tokens``, the longest first where several start at one place
    (as 4.31's trie split)."""
    alternatives = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    return re.compile(f"({alternatives})")


def special_tokens(tokenizer, cfg: ModelConfig) -> SpecialTokens:
    ids = tokenizer.convert_tokens_to_ids([cfg.hand_token] + [time_token(t) for t in range(cfg.num_time_tokens)])
    return SpecialTokens(hand=ids[0], eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id,
                         bos=tokenizer.bos_token_id, time_tokens=tuple(ids[1:]))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build the tiny tokenizer shipped in configs/tokenizers/tiny")
    parser.add_argument("--build-tiny", action="store_true", required=True)
    parser.add_argument("--out", default=str(TINY_TOKENIZER_DIR))
    args = parser.parse_args(argv)
    tok = build_tiny_tokenizer(Path(args.out))
    print(f"wrote {args.out} (vocab {len(tok)})")


if __name__ == "__main__":
    main()
