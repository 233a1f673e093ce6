"""Loading an export in its target dtype (``HandsOnVLM.from_pretrained``, used by ``inference.load_model``:
evaluation, predict, export reload): no random fp32 init, weights assigned from safetensors.

* **memory**: a LLaMA-shaped HandsOnVLM of ~1.0B parameters (hidden 2048, 20 layers, intermediate 5504,
  the tiny tokenizer's vocabulary and vision tower) exported in bf16 (a 2.0 GB file) is loaded in bf16 in
  a fresh process whose peak RSS (``ru_maxrss``: the imports included) must stay under 1.3 x the file.
  The old path (an fp32 model with random init, then a copy of the weights) needed the fp32 model and
  the file at once, ~3 x. The export is written without materialising an fp32 model: built on the
  meta device, cast there, given bf16 storage and filled with constants. ``MALLOC_MMAP_THRESHOLD_`` is
  fixed as in tests/test_zero3_init.py, so that RSS measures live tensors.
* **values**: on the tiny model the new path equals the old fp32 path bit for bit in fp32 (weights,
  buffers such as the rotary ``inv_freq`` after the meta construction, losses, greedy generation), and
  in bf16 holds exactly the fp32 weights rounded to bf16, with outputs within bf16 tolerance.
* flash-attention only with half precision; a missing weight is an error; ``lm_head`` runs on the
  supervised positions only.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import isolated_env

from handsonvlm.config import ModelConfig, load_model_config
from handsonvlm.data import Example, collate, encode_conversation, pad_sequences, rbhp_turns, vhp_turns
from handsonvlm.generation import generate
from handsonvlm.model import (
    CONFIG_FILE,
    FALLBACK_ATTENTION,
    FLASH_ATTENTION,
    IGNORE_INDEX,
    WEIGHTS_FILE,
    HandsOnVLM,
    inference_attention,
)

BIG_LM = {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 20, "num_attention_heads": 16,
          "num_key_value_heads": 16}
BIG_MIN_PARAMS = 10 ** 9
MAX_RSS_RATIO = 1.3  # peak RSS of the loading process / the bf16 weights file
MMAP_THRESHOLD = str(1 << 20)
FILL_LEVELS = 251  # tensor i of the big export holds (i % FILL_LEVELS + 1) / FILL_SCALE: exact in bf16
FILL_SCALE = 256
CHILD_TIMEOUT_S = 300
BF16_TOLERANCE = {"rtol": 1.6e-2, "atol": 1e-2}  # torch.testing's bf16 rtol; atol for values near 0
NARRATIONS = ("take cup", "open bottle")


# ---------------------------------------------------------------- the big export, in child processes
def _big_config() -> ModelConfig:
    return load_model_config("tiny", [f"model.lm.config.{k}={v}" for k, v in BIG_LM.items()])


def _fill_value(index: int) -> float:
    return (index % FILL_LEVELS + 1) / FILL_SCALE


def _build_big_export(directory: str) -> None:
    """Write the ~1B export in bf16 (the tower in its own dtype) without an fp32 model or random init."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = HandsOnVLM(_big_config())
    for _, child in model.named_children():  # the tower is not a child: it keeps model.vision.dtype
        child.to(torch.bfloat16)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for index, (_, tensor) in enumerate(sorted(model.state_dict(keep_vars=True).items())):
            if tensor.is_floating_point():
                tensor.fill_(_fill_value(index))
    model.save_pretrained(directory)


def _load_big_export(directory: str, out: str) -> None:
    """Load the export in bf16; record the peak RSS right after, then what was loaded."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model = HandsOnVLM.from_pretrained(directory, dtype=torch.bfloat16)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    state = sorted(model.state_dict(keep_vars=True).items())
    wrong = [name for index, (name, tensor) in enumerate(state) if tensor.is_floating_point()
             and not bool((tensor == _fill_value(index)).all())]
    reference = LlamaRotaryEmbedding(model.lm.config).inv_freq
    result = {"peak_rss": peak, "params": sum(p.numel() for p in model.parameters()),
              "lm_dtypes": sorted({str(p.dtype) for p in model.parameters()}), "tower_dtype": str(model.vision.dtype),
              "wrong_values": wrong, "meta": [name for name, tensor in state if tensor.is_meta],
              "inv_freq_exact": bool(torch.equal(model.lm.model.rotary_emb.inv_freq, reference)),
              "inv_freq_dtype": str(model.lm.model.rotary_emb.inv_freq.dtype)}
    Path(out).write_text(json.dumps(result))


def _child(role: str, *args: str) -> None:
    env = isolated_env(MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, role, *args], env=env, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


@pytest.mark.slow  # two child processes, a 2 GB file: ~30 s on 2 CPUs
def test_a_1b_bf16_export_loads_within_1_3x_its_file_size(tmp_path):
    export, out = tmp_path / "export", tmp_path / "load.json"
    _child("build", str(export))
    _child("load", str(export), str(out))
    result = json.loads(out.read_text())
    size = (export / WEIGHTS_FILE).stat().st_size
    print(f"\n{result['params']:,} parameters, {size / 2 ** 30:.2f} GiB file, peak RSS loading in bf16 "
          f"{result['peak_rss'] / 2 ** 30:.2f} GiB = {result['peak_rss'] / size:.2f} x the file")
    assert result["params"] > BIG_MIN_PARAMS
    assert result["peak_rss"] < MAX_RSS_RATIO * size, result["peak_rss"] / size
    assert result["lm_dtypes"] == ["torch.bfloat16"] and result["tower_dtype"] == "torch.float32"
    assert result["meta"] == [] and result["wrong_values"] == []
    assert result["inv_freq_exact"] and result["inv_freq_dtype"] == "torch.float32"  # computed, not loaded


# ---------------------------------------------------------------- the tiny model, in this process
def _old_fp32_load(directory: Path) -> HandsOnVLM:
    """The loading path before meta construction: an fp32 model with random init, then the weights copied in."""
    from safetensors.torch import load_file

    cfg = ModelConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    cfg.lm.tokenizer = str(directory)
    model = HandsOnVLM(cfg)
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=False)
    return model.eval()


def _batch(model: HandsOnVLM) -> dict:
    g = torch.Generator().manual_seed(0)
    size = model.vision.image_size
    examples = []
    for i, narration in enumerate(NARRATIONS):
        turns = vhp_turns(narration, model.cfg) if i == 0 else rbhp_turns("Where do I pour the oil?", model.cfg)
        ids, labels = encode_conversation(model.tokenizer, turns, model.cfg)
        examples.append(Example(ids, labels, torch.randn(model.cfg.num_obs_frames, 3, size, size, generator=g),
                                torch.rand(2, model.cfg.num_future_points, 2, generator=g), torch.tensor([True, True])))
    return collate(examples, model.tokens.pad)


def _outputs(model: HandsOnVLM, batch: dict) -> dict:
    """The training losses and CVAE reconstructions, and greedy generation (tokens, trajectories)."""
    with torch.no_grad():
        out = model(**batch, generator=torch.Generator().manual_seed(0))
        ids = [encode_conversation(model.tokenizer, vhp_turns(n, model.cfg, with_answer=False), model.cfg)[0]
               for n in NARRATIONS]
        input_ids, mask = pad_sequences(ids, model.tokens.pad, side="left")
        gen = generate(model, input_ids, mask, frames=batch["frames"], temperature=0.0, max_new_tokens=12)
    return {"loss": out["loss"].float(), "text_loss": out["text_loss"].float(), "pred": out["pred"].float(),
            "tokens": gen.token_ids, "trajectories": gen.trajectories.float()}


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("loading") / "tiny"
    HandsOnVLM(load_model_config("tiny")).save_pretrained(directory)
    return directory


def _tensors(model: HandsOnVLM) -> dict:
    """Every parameter and buffer, persistent or not, the tower's included."""
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    named.update({f"vision.{k}": v for k, v in [*model.vision.named_parameters(), *model.vision.named_buffers()]})
    return named


def test_fp32_load_equals_the_old_path_bit_for_bit(export):
    old, new = _old_fp32_load(export), HandsOnVLM.from_pretrained(export).eval()
    old_tensors, new_tensors = _tensors(old), _tensors(new)
    assert sorted(old_tensors) == sorted(new_tensors) and "lm.model.rotary_emb.inv_freq" in new_tensors
    assert not [k for k in old_tensors if not torch.equal(old_tensors[k], new_tensors[k])]
    assert all(new_tensors[k].dtype == old_tensors[k].dtype for k in old_tensors)
    expected, got = _outputs(old, _batch(old)), _outputs(new, _batch(new))
    for key in expected:  # bit for bit (NaN: a trajectory point without its hand token, in both)
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, equal_nan=True, msg=key)


def test_bf16_load_holds_the_rounded_weights_and_stays_within_bf16_tolerance(export):
    old, new = _old_fp32_load(export), HandsOnVLM.from_pretrained(export, dtype=torch.bfloat16).eval()
    old_state, new_state = old.state_dict(), new.state_dict()
    for key, value in new_state.items():
        want = old_state[key] if key.startswith("vision.") else old_state[key].to(torch.bfloat16)
        assert value.dtype == want.dtype and torch.equal(value, want), key
    assert new.vision.dtype == torch.float32  # the tiny preset's model.vision.dtype
    assert new.lm.model.rotary_emb.inv_freq.dtype == torch.float32
    expected, got = _outputs(old, _batch(old)), _outputs(new, _batch(new))
    for key in ("loss", "text_loss", "pred"):
        torch.testing.assert_close(got[key], expected[key], **BF16_TOLERANCE)


def test_the_tower_keeps_its_configured_dtype_whatever_the_load_dtype(tmp_path):
    torch.manual_seed(0)
    HandsOnVLM(load_model_config("tiny", ["model.vision.dtype=bfloat16"])).save_pretrained(tmp_path / "bf16-tower")
    model = HandsOnVLM.from_pretrained(tmp_path / "bf16-tower", dtype=torch.float32)
    assert model.vision.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_missing_weight_is_an_error(export, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for item in export.iterdir():
        if item.name != WEIGHTS_FILE:
            (broken / item.name).write_bytes(item.read_bytes())
    state = load_file(str(export / WEIGHTS_FILE))
    del state["projector.weight"]
    save_file(state, str(broken / WEIGHTS_FILE))
    with pytest.raises(RuntimeError, match=r"missing \['projector.weight'\]"):
        HandsOnVLM.from_pretrained(broken)


def test_flash_attention_runs_only_in_half_precision_on_cuda():
    assert inference_attention("sdpa", torch.float32, "cpu") == "sdpa"
    assert inference_attention(FLASH_ATTENTION, torch.float32, "cuda") == FALLBACK_ATTENTION
    assert inference_attention(FLASH_ATTENTION, torch.bfloat16, "cpu") == FALLBACK_ATTENTION
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        assert inference_attention(FLASH_ATTENTION, torch.float16, "cuda:0") == FALLBACK_ATTENTION


def test_a_flash_attention_export_loaded_in_fp32_generates_with_sdpa(export, tmp_path, caplog):
    from handsonvlm.inference import load_model

    flash = tmp_path / "flash"
    flash.mkdir()
    for item in export.iterdir():
        (flash / item.name).write_bytes(item.read_bytes())
    cfg = json.loads((flash / CONFIG_FILE).read_text())
    cfg["lm"]["attn_implementation"] = FLASH_ATTENTION  # as training writes it where flash-attn imports
    (flash / CONFIG_FILE).write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="handsonvlm.model"):
        model, _ = load_model(flash, "cpu", dtype="fp32")
    warnings = [r for r in caplog.records if r.name == "handsonvlm.model" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and FLASH_ATTENTION in warnings[0].getMessage()
    assert model.lm.config._attn_implementation == FALLBACK_ATTENTION
    got = _outputs(model, _batch(model))  # generation runs (flash-attention would raise on fp32, or without CUDA)
    assert got["tokens"].numel() > 0


def test_lm_head_sees_only_the_supervised_positions(export):
    model = HandsOnVLM.from_pretrained(export).eval()
    batch = _batch(model)
    rows = []
    handle = model.lm.lm_head.register_forward_hook(lambda module, args, output: rows.append(args[0].shape))
    try:
        with torch.no_grad():
            model(**batch, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    visual = model.visual_tokens(batch["frames"])
    seq = model.embed_inputs(batch["input_ids"], batch["attention_mask"], visual, batch["future_hands"],
                             batch["labels"])
    supervised = int((seq["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert rows == [torch.Size([supervised, model.hidden_size])]
    assert 0 < supervised < seq["labels"].numel() - visual.shape[0] * visual.shape[1]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    if sys.argv[1] == "build":
        _build_big_export(sys.argv[2])
    else:
        _load_big_export(sys.argv[2], sys.argv[3])
