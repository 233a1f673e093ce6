"""Released HandsOnVLM checkpoint (``HandsOnVLMForCausalLM``) -> our ``HandsOnVLM`` module layout.

Maps the released key names (read from ``Kami-code/HandsOnVLM-release`` at commit 89b7721) onto
ours, drops what the release saved but never trained, checks the release's added-token ids, and
reads safetensors/bin state-dict files, whole or sharded, safely and one tensor at a time (also for
``train.init_weights``). ``python -m handsonvlm.compat templates --release-repo PATH --out FILE``
reads the release's question/answer templates from a clone into a ``data.templates`` file
(:mod:`handsonvlm.templates`). Provenance, the full mapping table and the vocabulary rules:
docs/MODEL.md, "The released checkpoint's key mapping".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

from handsonvlm.constants import NUM_TIME_TOKENS, POINT_DIM, RELEASE_DECODER_HIDDEN, RELEASE_DECODER_LATENT, time_token
from handsonvlm.templates import (
    PROJECT_TEMPLATES,
    TemplateError,
    TemplateSet,
    differing_lists,
    release_templates,
    save_templates,
)

# ---- release vocabulary -------------------------------------------------------------------------
RELEASE_BASE_VOCAB_SIZE = 32000  # Vicuna v1.3 / LLaMA
RELEASE_NUM_TIME_TOKENS = NUM_TIME_TOKENS  # LITA num_time_tokens
HAND_TOKEN = "<hand_traj>"
RELEASE_HAND_TOKEN_ID = RELEASE_BASE_VOCAB_SIZE + RELEASE_NUM_TIME_TOKENS  # 32100
RELEASE_VOCAB_SIZE = RELEASE_HAND_TOKEN_ID + 1  # 32101

# ---- release module sizes (shape arithmetic; see release_decoder_shapes) -------------------------
RELEASE_COORD_DIM = 64  # lita_llama_hoi_encoder.coord_dim
RELEASE_BBOX_DIM = 4
RELEASE_FUSION_DIM = 1024  # feat_fusion / downproject width (CLIP width in the hoi variant)
RELEASE_TIME_EMBEDDING_LEN = 20  # handsonvlm.py: max_len = 20

# ---- key prefixes ---------------------------------------------------------------------------------
RELEASE_DECODER_PREFIX = "hand_traj_decoder.hand_traj_decoder."
RELEASE_CLIP_PREFIX = "model.vision_tower.vision_tower.vision_model."
OURS_VISION_PREFIX = "vision.encoder."
OURS_DECODER_PREFIX = "traj_decoder."

_LLAMA_LAYER_LEAF = (r"(self_attn\.[qkvo]_proj\.weight|mlp\.(?:gate|up|down)_proj\.weight"
                     r"|input_layernorm\.weight|post_attention_layernorm\.weight)")
_WB = r"(weight|bias)"


class Rule(NamedTuple):
    """``pattern`` (full match on the released key) -> ``replacement`` (``re`` template; None = drop)."""

    pattern: str
    replacement: str | None
    group: str  # lm | projector | vision | traj_decoder | unused | buffer


_RD = re.escape(RELEASE_DECODER_PREFIX)
_RC = re.escape(RELEASE_CLIP_PREFIX)
_OD = re.escape(OURS_DECODER_PREFIX)

RELEASE_TO_OURS: list[Rule] = [
    Rule(r"model\.embed_tokens\.weight", "lm.model.embed_tokens.weight", "lm"),
    Rule(r"model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq", None, "buffer"),
    Rule(rf"model\.layers\.(\d+)\.{_LLAMA_LAYER_LEAF}", r"lm.model.layers.\1.\2", "lm"),
    Rule(r"model\.norm\.weight", "lm.model.norm.weight", "lm"),
    Rule(r"lm_head\.weight", "lm.lm_head.weight", "lm"),
    Rule(rf"model\.mm_projector\.{_WB}", r"projector.\1", "projector"),
    Rule(rf"{_RC}embeddings\.position_ids", None, "buffer"),
    Rule(rf"{_RC}(.+)", OURS_VISION_PREFIX + r"\1", "vision"),
    Rule(rf"{_RD}cvae\.enc_MLP\.0\.{_WB}", OURS_DECODER_PREFIX + r"enc_in.\1", "traj_decoder"),
    Rule(rf"{_RD}cvae\.linear_means\.{_WB}", OURS_DECODER_PREFIX + r"enc_mu.\1", "traj_decoder"),
    Rule(rf"{_RD}cvae\.linear_log_var\.{_WB}", OURS_DECODER_PREFIX + r"enc_logvar.\1", "traj_decoder"),
    Rule(rf"{_RD}cvae\.dec_MLP\.0\.{_WB}", OURS_DECODER_PREFIX + r"dec_in.\1", "traj_decoder"),
    Rule(rf"{_RD}cvae\.dec_MLP\.2\.{_WB}", OURS_DECODER_PREFIX + r"dec_out.\1", "traj_decoder"),
    Rule(rf"{_RD}mlp\.0\.{_WB}", OURS_DECODER_PREFIX + r"fc1.\1", "traj_decoder"),
    Rule(rf"{_RD}mlp\.2\.{_WB}", OURS_DECODER_PREFIX + r"fc2.\1", "traj_decoder"),
    Rule(rf"{_RD}mlp\.4\.{_WB}", OURS_DECODER_PREFIX + r"fc_out.\1", "traj_decoder"),
    Rule(rf"hand_traj_positional_embedding\.{_WB}", None, "unused"),
    Rule(r"time_embedding", None, "unused"),
    Rule(rf"bbox_to_feature\.[02]\.{_WB}", None, "unused"),
    Rule(rf"feat_fusion\.0\.{_WB}", None, "unused"),
    Rule(rf"downproject\.{_WB}", None, "unused"),
]

OURS_TO_RELEASE: list[tuple[str, str]] = [
    (r"lm\.model\.embed_tokens\.weight", "model.embed_tokens.weight"),
    (rf"lm\.model\.layers\.(\d+)\.{_LLAMA_LAYER_LEAF}", r"model.layers.\1.\2"),
    (r"lm\.model\.norm\.weight", "model.norm.weight"),
    (r"lm\.lm_head\.weight", "lm_head.weight"),
    (rf"projector\.{_WB}", r"model.mm_projector.\1"),
    (rf"{re.escape(OURS_VISION_PREFIX)}(.+)", RELEASE_CLIP_PREFIX + r"\1"),
    (rf"{_OD}enc_in\.{_WB}", RELEASE_DECODER_PREFIX + r"cvae.enc_MLP.0.\1"),
    (rf"{_OD}enc_mu\.{_WB}", RELEASE_DECODER_PREFIX + r"cvae.linear_means.\1"),
    (rf"{_OD}enc_logvar\.{_WB}", RELEASE_DECODER_PREFIX + r"cvae.linear_log_var.\1"),
    (rf"{_OD}dec_in\.{_WB}", RELEASE_DECODER_PREFIX + r"cvae.dec_MLP.0.\1"),
    (rf"{_OD}dec_out\.{_WB}", RELEASE_DECODER_PREFIX + r"cvae.dec_MLP.2.\1"),
    (rf"{_OD}fc1\.{_WB}", RELEASE_DECODER_PREFIX + r"mlp.0.\1"),
    (rf"{_OD}fc2\.{_WB}", RELEASE_DECODER_PREFIX + r"mlp.2.\1"),
    (rf"{_OD}fc_out\.{_WB}", RELEASE_DECODER_PREFIX + r"mlp.4.\1"),
]

_COMPILED_RELEASE = [(re.compile(rule.pattern), rule) for rule in RELEASE_TO_OURS]
_COMPILED_OURS = [(re.compile(pattern), replacement) for pattern, replacement in OURS_TO_RELEASE]
_MAX_KEYS_IN_ERROR = 20


class UnknownReleaseKeyError(ValueError):
    """A key matched no mapping rule (neither mapped nor deliberately dropped)."""

    def __init__(self, keys: Iterable[str], direction: str = "released"):
        self.keys = sorted(keys)
        shown = ", ".join(self.keys[:_MAX_KEYS_IN_ERROR])
        more = f" (+{len(self.keys) - _MAX_KEYS_IN_ERROR} more)" if len(self.keys) > _MAX_KEYS_IN_ERROR else ""
        super().__init__(f"{len(self.keys)} {direction} key(s) match no rule in handsonvlm.compat: {shown}{more}")


def _match_release(key: str) -> tuple[Rule, re.Match] | None:
    for compiled, rule in _COMPILED_RELEASE:
        match = compiled.fullmatch(key)
        if match is not None:
            return rule, match
    return None


def release_to_ours(state_dict: Mapping[str, torch.Tensor], include_vision: bool = False
                    ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a released state dict into our layout.

    Returns (mapped, dropped): ``mapped`` has our names (tensors are not copied), ``dropped`` the
    sorted released keys deliberately ignored (unused modules, non-persistent buffers and, unless
    ``include_vision``, the CLIP tower). Raises ``UnknownReleaseKeyError`` naming any other key.
    """
    mapped: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        found = _match_release(key)
        if found is None:
            unknown.append(key)
            continue
        rule, match = found
        if rule.replacement is None or (rule.group == "vision" and not include_vision):
            dropped.append(key)
            continue
        new_key = match.expand(rule.replacement)
        if new_key in mapped:
            raise ValueError(f"two released keys map to {new_key!r}")
        mapped[new_key] = tensor
    if unknown:
        raise UnknownReleaseKeyError(unknown)
    return mapped, sorted(dropped)


def ours_to_release(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``release_to_ours`` for the mapped keys; raises on keys outside the mapping."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        for compiled, replacement in _COMPILED_OURS:
            match = compiled.fullmatch(key)
            if match is not None:
                out[match.expand(replacement)] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise UnknownReleaseKeyError(unknown, direction="our")
    return out


# ---- shapes of the release's non-LLaMA, non-CLIP parameters (shape arithmetic) -------------------

def release_decoder_shapes(hidden_size: int, kind: str = "cvae", hidden: int = RELEASE_DECODER_HIDDEN,
                           latent: int = RELEASE_DECODER_LATENT) -> dict[str, tuple[int, ...]]:
    """Released key -> shape of the trajectory decoder for LLM width D = ``hidden_size`` (Dc = D/2)."""
    cond = hidden_size // 2
    p = RELEASE_DECODER_PREFIX
    if kind == "cvae":
        layers = {"cvae.enc_MLP.0": (hidden, POINT_DIM + cond), "cvae.linear_means": (latent, hidden),
                  "cvae.linear_log_var": (latent, hidden), "cvae.dec_MLP.0": (hidden, latent + cond),
                  "cvae.dec_MLP.2": (POINT_DIM, hidden)}
    elif kind == "mlp":
        layers = {"mlp.0": (hidden, cond), "mlp.2": (hidden, hidden), "mlp.4": (POINT_DIM, hidden)}
    else:
        raise ValueError(f"unknown decoder kind {kind!r}")
    shapes: dict[str, tuple[int, ...]] = {}
    for name, (out_features, in_features) in layers.items():
        shapes[f"{p}{name}.weight"] = (out_features, in_features)
        shapes[f"{p}{name}.bias"] = (out_features,)
    return shapes


def release_unused_shapes(hidden_size: int) -> dict[str, tuple[int, ...]]:
    """Released key -> shape of the modules that exist in the checkpoint but never get a gradient."""
    half_coord = RELEASE_COORD_DIM // 2
    return {
        "hand_traj_positional_embedding.weight": (hidden_size // 2, POINT_DIM),
        "hand_traj_positional_embedding.bias": (hidden_size // 2,),
        "time_embedding": (RELEASE_TIME_EMBEDDING_LEN, hidden_size),
        "bbox_to_feature.0.weight": (half_coord, RELEASE_BBOX_DIM),
        "bbox_to_feature.0.bias": (half_coord,),
        "bbox_to_feature.2.weight": (RELEASE_COORD_DIM, half_coord),
        "bbox_to_feature.2.bias": (RELEASE_COORD_DIM,),
        "feat_fusion.0.weight": (RELEASE_FUSION_DIM, RELEASE_FUSION_DIM + RELEASE_COORD_DIM),
        "feat_fusion.0.bias": (RELEASE_FUSION_DIM,),
        "downproject.weight": (RELEASE_FUSION_DIM, RELEASE_FUSION_DIM),
        "downproject.bias": (RELEASE_FUSION_DIM,),
    }


# ---- reading the released files --------------------------------------------------------------------
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_GLOB = "pytorch_model*.bin"
ADDED_TOKENS_FILE = "added_tokens.json"


class StoredTensor(NamedTuple):
    """One tensor of a state-dict file, not read yet: its key, its shape (from the file's header or
    memory map) and ``read()``, which returns it as a CPU tensor. ``read`` is valid until the iterator
    that yielded it moves past its file."""

    key: str
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]


def state_dict_files(path: str | Path) -> tuple[list[Path], dict[str, str] | None]:
    """The state-dict files at ``path`` and the index's key -> file map (None without an index).

    ``path`` is one ``.safetensors`` / ``.bin`` file, or a LOCAL folder holding, in this order of
    preference: ``model.safetensors.index.json`` + shards, ``model.safetensors``,
    ``pytorch_model.bin.index.json`` + shards, ``pytorch_model*.bin``. An index may only name files
    inside its folder. Raises FileNotFoundError saying what it looked for."""
    path = Path(path)
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise FileNotFoundError(f"no weights there: {path} is neither a weights file nor a local folder")
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        if (path / index_name).is_file():
            weight_map: dict[str, str] = json.loads((path / index_name).read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
            outside = [shard for shard in shards if Path(shard).name != shard]
            if outside:
                raise ValueError(f"{path / index_name} names a shard outside the directory: {outside[0]!r}")
            return [path / shard for shard in shards], weight_map
        if index_name == SAFETENSORS_INDEX and (path / SAFETENSORS_SINGLE).is_file():
            return [path / SAFETENSORS_SINGLE], None
    bins = sorted(path.glob(BIN_GLOB))
    if bins:
        return bins, None
    raise FileNotFoundError(f"no weights there: no {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, {BIN_INDEX} or "
                            f"{BIN_GLOB} in {path}")


@contextmanager
def _open_tensors(file: Path) -> Iterator[list[StoredTensor]]:
    """The tensors of one file, unread, valid while the ``with`` block keeps the file open."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt", device="cpu") as f:
            # file order (offset_keys): a whole read is sequential; the header alone gives the shapes
            yield [StoredTensor(key, tuple(f.get_slice(key).get_shape()), lambda key=key: f.get_tensor(key))
                   for key in f.offset_keys()]
        return
    # weights_only: tensors and plain containers only, never arbitrary pickled objects; mmap: a
    # tensor's pages are read when it is used, so shapes cost nothing
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict):
        raise ValueError(f"{file} does not hold a state dict")
    yield [StoredTensor(key, tuple(tensor.shape), lambda tensor=tensor: tensor) for key, tensor in state.items()]


def stored_tensors(path: str | Path) -> Iterator[StoredTensor]:
    """Every tensor at ``path`` (see :func:`state_dict_files`), one file open at a time, none read.

    Checked before a file's tensors are yielded: no key repeats an earlier one, and a sharded
    checkpoint's file holds exactly the keys its index assigns to it (ValueError otherwise)."""
    files, weight_map = state_dict_files(path)
    listed_by_file: dict[str, set[str]] = {}
    for key, shard in (weight_map or {}).items():
        listed_by_file.setdefault(shard, set()).add(key)
    seen: set[str] = set()
    for file in files:
        with _open_tensors(file) as tensors:
            keys = {t.key for t in tensors}
            clash = seen & keys
            if clash:
                raise ValueError(f"{file} repeats {len(clash)} key(s) already loaded, e.g. {sorted(clash)[0]!r}")
            seen |= keys
            if weight_map is not None:
                listed = listed_by_file[file.name]
                missing, extra = listed - keys, keys - listed
                if missing or extra:
                    raise ValueError(f"the index and its shards disagree: {file.name} lacks {len(missing)} listed "
                                     f"key(s) {sorted(missing)[:3]} and holds {len(extra)} unlisted key(s) "
                                     f"{sorted(extra)[:3]}")
            yield from tensors


def load_release_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """Read the released shards from a LOCAL directory (see :func:`state_dict_files`), keys unchanged,
    tensors on CPU."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"not a local checkpoint directory: {directory}")
    return {t.key: t.read() for t in stored_tensors(directory)}


def load_release_checkpoint(directory: str | Path, include_vision: bool = False,
                            check_vocab: bool = True) -> dict[str, torch.Tensor]:
    """Released checkpoint directory -> state dict in our layout (see ``release_to_ours``).

    If ``check_vocab`` and the directory holds the slow tokenizer's ``added_tokens.json``, the
    time/hand token ids are verified with ``check_release_vocab`` first.
    """
    directory = Path(directory)
    if check_vocab and (directory / ADDED_TOKENS_FILE).is_file():
        check_release_vocab(AddedTokensVocab.from_file(directory / ADDED_TOKENS_FILE))
    mapped, _dropped = release_to_ours(load_release_state_dict(directory), include_vision=include_vision)
    return mapped


# ---- vocabulary check ------------------------------------------------------------------------------

def release_added_token_ids() -> dict[str, int]:
    """The release's added tokens and their ids: <t0>..<t99> -> 32000..32099, <hand_traj> -> 32100."""
    ids = {time_token(t): RELEASE_BASE_VOCAB_SIZE + t for t in range(RELEASE_NUM_TIME_TOKENS)}
    ids[HAND_TOKEN] = RELEASE_HAND_TOKEN_ID
    return ids


class AddedTokensVocab:
    """Minimal ``convert_tokens_to_ids`` over an ``added_tokens.json`` mapping (unknown -> None)."""

    def __init__(self, token_to_id: Mapping[str, int]):
        self.token_to_id = dict(token_to_id)

    @classmethod
    def from_file(cls, path: str | Path) -> AddedTokensVocab:
        return cls(json.loads(Path(path).read_text()))

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self.token_to_id.get(tokens)
        return [self.token_to_id.get(token) for token in tokens]


def check_release_vocab(tokenizer) -> None:
    """Raise AssertionError unless ``tokenizer`` maps <t0>..<t99> to 32000..32099 and <hand_traj> to 32100.

    ``tokenizer`` needs only ``convert_tokens_to_ids(list[str])`` (an HF tokenizer or ``AddedTokensVocab``).
    """
    expected = release_added_token_ids()
    got = tokenizer.convert_tokens_to_ids(list(expected))
    wrong = [(token, want, have) for (token, want), have in zip(expected.items(), got) if have != want]
    if wrong:
        shown = ", ".join(f"{token}: expected {want}, got {have}" for token, want, have in wrong[:5])
        raise AssertionError(f"tokenizer does not match the released vocabulary ({len(wrong)} token(s) wrong): {shown}")


def load_release_weights(model, directory: str | Path, include_vision: bool = False) -> list[str]:
    """Load a released checkpoint into a built ``HandsOnVLM`` (its config must match the release's
    sizes: ``configs/vicuna-7b.yaml`` / ``vicuna-13b.yaml`` with ``model.mode=release``).

    Every parameter except the frozen vision tower (loaded from ``model.vision.pretrained``, or
    from the checkpoint with ``include_vision=True``) must be present. Returns the keys of the
    model that kept their initial values (the vision tower's, unless included).
    """
    mapped = load_release_checkpoint(directory, include_vision=include_vision)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    not_loaded = [k for k in missing if not k.startswith(OURS_VISION_PREFIX)]
    if model.lm.config.tie_word_embeddings:
        not_loaded = [k for k in not_loaded if k != "lm.lm_head.weight"]
    if unexpected or not_loaded:
        raise ValueError(f"released checkpoint does not fit the model: missing {not_loaded[:5]}"
                         f"{'...' if len(not_loaded) > 5 else ''}, unexpected {unexpected[:5]}")
    return sorted(missing)


# ---- command line -----------------------------------------------------------------------------------
def templates_command(release_repo: str, out: str, rev: str | None = None) -> TemplateSet:
    """``templates`` subcommand: the release's question/answer templates from a clone at
    ``release_repo`` (working tree, or ``rev`` / ``HEAD`` of a bare git dir) written to ``out``
    as a ``data.templates`` file; prints each list's count and whether it matches the project's."""
    templates = release_templates(release_repo, rev=rev)
    path = save_templates(templates, out)
    differing = set(differing_lists(templates, PROJECT_TEMPLATES))
    print(f"templates from {templates.source} -> {path}")
    for name, values in templates.lists().items():
        print(f"  {name:<28} {len(values):>2}  {'differs from' if name in differing else 'same as'} the project's")
    print(f"use it with: --set data.templates={path}")
    return templates


def main(argv: list[str] | None = None) -> int:
    """``python -m handsonvlm.compat SUBCOMMAND ...``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m handsonvlm.compat",
                                     description="Tools for the released HandsOnVLM (Kami-code/HandsOnVLM-release).")
    commands = parser.add_subparsers(dest="command", required=True)
    templates = commands.add_parser(
        "templates", help="read the release's question/answer templates into a data.templates JSON file",
        description="Parse handsonvlm/constants.py and handsonvlm/dataset/epic_dataset.py of a release clone "
                    "(with ast: nothing is imported or run) and write their template lists as JSON.")
    templates.add_argument("--release-repo", required=True, metavar="PATH",
                           help="a checkout of the release, or a bare git dir (then HEAD, or --rev)")
    templates.add_argument("--rev", default=None, help="read the files at this git revision (git show REV:path)")
    templates.add_argument("--out", required=True, metavar="FILE", help="the JSON file to write, e.g. templates.json")
    args = parser.parse_args(argv)
    try:
        templates_command(args.release_repo, args.out, rev=args.rev)
    except (FileNotFoundError, TemplateError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
