"""Inference settings: the mode-dependent defaults (``inference.resolve_sampling``), the release
evaluator's template rule, top-k sampling, the inference dtype and TF32.

The release sampled with temperature 0.5, top-p 0.9 and HF 4.31 generate's default top-k 50, at most
100 new tokens, in fp16 on a GPU, with the ``llava_v0`` template for a directory named
``handsonvlm-7b`` (docs/MODEL.md "Inference settings"); corrected mode has no top-k, 64 new tokens,
fp32 on CPU / bf16 on CUDA and the model's own template."""

from __future__ import annotations

import math

import pytest
import torch

from handsonvlm import inference
from handsonvlm.config import EvalConfig, PredictConfig, SamplingConfig, load_model_config
from handsonvlm.generation import generate, next_token_probs, sample_next_token
from handsonvlm.inference import (
    answer_jobs,
    build_prompt,
    enable_tf32,
    is_resolved,
    model_name_from_path,
    release_conversation_template,
    resolve_sampling,
    torch_dtype,
)
from handsonvlm.model import HandsOnVLM

CORRECTED = load_model_config("tiny")
RELEASE = load_model_config("tiny", ["model.mode=release"])
RELEASED_DIR = "/models/handsonvlm-7b"  # the name of the released checkpoint on the hub


def settings(cfg) -> dict:
    return {k: getattr(cfg, k) for k in ("top_k", "max_new_tokens", "dtype", "prompt_template",
                                         "temperature", "top_p", "num_samples", "seed")}


# ------------------------------------------------------------------------------------ resolve_sampling
def test_corrected_mode_defaults():
    assert settings(resolve_sampling(EvalConfig(), CORRECTED, RELEASED_DIR, "cpu")) == {
        "top_k": 0, "max_new_tokens": 64, "dtype": "fp32", "prompt_template": "vicuna_v1",
        "temperature": 0.5, "top_p": 0.9, "num_samples": 1, "seed": 0}
    on_gpu = resolve_sampling(EvalConfig(), CORRECTED, RELEASED_DIR, "cuda", bf16_supported=True)
    assert (on_gpu.dtype, on_gpu.prompt_template) == ("bf16", "vicuna_v1")  # the name rule is release mode's
    assert resolve_sampling(EvalConfig(), CORRECTED, None, "cuda:1", bf16_supported=False).dtype == "fp32"


def test_release_mode_defaults():
    notes: list[str] = []
    on_cpu = resolve_sampling(EvalConfig(), RELEASE, RELEASED_DIR, "cpu", notes=notes)
    assert settings(on_cpu) == {
        "top_k": 50, "max_new_tokens": 100, "dtype": "fp32", "prompt_template": "llava_v0",
        "temperature": 0.5, "top_p": 0.9, "num_samples": 1, "seed": 0}
    assert any("fp32 on CPU" in n for n in notes)
    on_gpu = resolve_sampling(EvalConfig(), RELEASE, RELEASED_DIR + "/", "cuda", bf16_supported=True)
    assert (on_gpu.top_k, on_gpu.max_new_tokens, on_gpu.dtype, on_gpu.prompt_template) == (50, 100, "fp16", "llava_v0")
    # no directory (validation in training, a model in memory): the model's own template
    assert resolve_sampling(EvalConfig(), RELEASE, None, "cpu").prompt_template == "vicuna_v1"


def test_release_mode_v1_name_gets_llava_v1_and_unknown_picks_fall_back_with_a_note():
    resolved = resolve_sampling(PredictConfig(), RELEASE, "runs/models/handsonvlm-7b-v1.3", "cpu")
    assert resolved.prompt_template == "llava_v1"
    notes: list[str] = []
    resolved = resolve_sampling(PredictConfig(), RELEASE, "runs/models/handsonvlm-llama-2-7b", "cpu", notes=notes)
    assert resolved.prompt_template == "vicuna_v1"  # llava_llama_2 is not in prompts.TEMPLATES
    assert any("'llava_llama_2'" in n and "no such template" in n for n in notes)


def test_given_values_are_kept():
    given = EvalConfig(top_k=0, max_new_tokens=16, dtype="fp32", prompt_template="vicuna_v1", temperature=0.7)
    resolved = resolve_sampling(given, RELEASE, RELEASED_DIR, "cuda", bf16_supported=True)
    assert settings(resolved) == {"top_k": 0, "max_new_tokens": 16, "dtype": "fp32", "prompt_template": "vicuna_v1",
                                  "temperature": 0.7, "top_p": 0.9, "num_samples": 1, "seed": 0}
    assert resolve_sampling(EvalConfig(prompt_template="llava_v0", top_k=5), CORRECTED).prompt_template == "llava_v0"
    notes: list[str] = []
    assert resolve_sampling(EvalConfig(dtype="fp16"), CORRECTED, device="cpu", notes=notes).dtype == "fp16"
    assert any("fp16 on CPU" in n for n in notes)


def test_resolution_keeps_the_class_and_the_other_fields():
    cfg = EvalConfig(task="vhp", limit=3, gallery=0)
    resolved = resolve_sampling(cfg, CORRECTED)
    assert type(resolved) is EvalConfig and (resolved.task, resolved.limit, resolved.gallery) == ("vhp", 3, 0)
    assert cfg.top_k is None and cfg.max_new_tokens is None  # the input is not changed
    assert is_resolved(resolved) and not is_resolved(cfg)
    assert type(resolve_sampling(PredictConfig(draw="first"), RELEASE)) is PredictConfig
    assert resolve_sampling(resolved, RELEASE) == resolved  # resolving twice changes nothing


def test_bf16_on_a_gpu_without_it_is_an_error_and_bad_values_are_rejected():
    with pytest.raises(ValueError, match="does not support bf16"):
        resolve_sampling(EvalConfig(dtype="bf16"), CORRECTED, device="cuda", bf16_supported=False)
    for kwargs, message in (({"top_k": -1}, "top_k must be >= 0"), ({"dtype": "fp8"}, "eval.dtype must be one of"),
                            ({"prompt_template": "chatml"}, "eval.prompt_template must be one of"),
                            ({"max_new_tokens": 0}, "must be >= 1")):
        with pytest.raises(ValueError, match=message):
            EvalConfig(**kwargs)


def test_dataclass_defaults_leave_the_mode_dependent_fields_open():
    for cls in (SamplingConfig, EvalConfig, PredictConfig):
        cfg = cls()
        assert (cfg.top_k, cfg.max_new_tokens, cfg.dtype, cfg.prompt_template) == (None, None, "auto", None)


# ------------------------------------------------------------------------- the release's template rule
@pytest.mark.parametrize(("path", "name", "template"), [
    ("/models/handsonvlm-7b", "handsonvlm-7b", "llava_v0"),
    ("checkpoints/handsonvlm-13b/", "handsonvlm-13b", "llava_v0"),
    ("runs/models/demo-tiny", "demo-tiny", "llava_v0"),
    ("out/handsonvlm-7b-v1.3/checkpoint-500", "handsonvlm-7b-v1.3_checkpoint-500", "llava_v1"),
    ("llava-v1.5-7b", "llava-v1.5-7b", "llava_v1"),
    ("Llama-2-7b-chat-v1", "Llama-2-7b-chat-v1", "llava_llama_2"),  # "llama-2" is tested before "v1"
    ("mpt-7b", "mpt-7b", "mpt"),
])
def test_release_conversation_template(path, name, template):
    """``HandsOnVLMInference.__init__``: llama-2 -> llava_llama_2, "v1" -> llava_v1, mpt -> mpt, else
    llava_v0, on LLaVA's ``get_model_name_from_path`` lower-cased."""
    assert model_name_from_path(path) == name
    assert release_conversation_template(path) == template


# ------------------------------------------------------------------------------------------ top-k math
LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])  # / temperature 0.5 -> [4, 2, 1, 0, -2]


def test_top_k_then_top_p_by_hand():
    # top-k 3 keeps [4, 2, 1]: softmax = [e^4, e^2, e^1] / 64.705 = [0.84379, 0.11420, 0.04201]
    three = [0.8437947344813395, 0.11419519938459449, 0.04201006613406605, 0.0, 0.0]
    torch.testing.assert_close(next_token_probs(LOGITS, 0.5, 1.0, top_k=3)[0], torch.tensor(three))
    # top-p 0.97 after it: the mass before the third token is 0.958 < 0.97, all three stay
    torch.testing.assert_close(next_token_probs(LOGITS, 0.5, 0.97, top_k=3)[0], torch.tensor(three))
    # top-p 0.9: the third token has 0.958 > 0.9 before it, so it goes; [e^4, e^2] / (e^4 + e^2)
    two = [0.8807970779778824, 0.11920292202211756, 0.0, 0.0, 0.0]
    torch.testing.assert_close(next_token_probs(LOGITS, 0.5, 0.9, top_k=3)[0], torch.tensor(two))
    torch.testing.assert_close(next_token_probs(LOGITS, 0.5, 1.0, top_k=2)[0], torch.tensor(two))
    # top-p 0.9 without top-k: renormalised over all five first, [0.83095, 0.11246, ...] -> the same two
    torch.testing.assert_close(next_token_probs(LOGITS, 0.5, 0.9, top_k=0)[0], torch.tensor(two))
    assert next_token_probs(LOGITS, 0.5, 1.0, top_k=1)[0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_top_k_keeps_ties_and_off_values_change_nothing():
    tied = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(next_token_probs(tied, 1.0, 1.0, top_k=2)[0], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    legacy = torch.softmax(logits / 0.7, -1)  # the computation before top-k existed (top-p 1)
    for k in (0, 50, 80):  # off, or at least the vocabulary
        assert torch.equal(next_token_probs(logits, 0.7, 1.0, top_k=k), legacy / legacy.sum(-1, keepdim=True))


def test_top_k_and_top_p_match_hf_warpers():
    """The order and the rules of HF's TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper,
    which the release's generate() built from temperature 0.5, top_k 50, top_p 0.9."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = 3 * torch.randn(8, 300, generator=torch.Generator().manual_seed(1))
    for temperature, k, p in ((0.5, 50, 0.9), (1.0, 5, 1.0), (0.8, 120, 0.6)):
        scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
        scores = TopKLogitsWarper(k)(None, scores)
        if p < 1:
            scores = TopPLogitsWarper(p)(None, scores)
        torch.testing.assert_close(next_token_probs(logits, temperature, p, top_k=k), torch.softmax(scores, -1))


def test_sampled_frequencies_follow_the_distribution_and_greedy_ignores_top_k():
    n = 200_000
    draws = sample_next_token(LOGITS.expand(n, -1), 0.5, 0.97, torch.Generator().manual_seed(0), top_k=3)
    freq = torch.bincount(draws, minlength=5).double() / n
    expected = torch.tensor([0.8437947344813395, 0.11419519938459449, 0.04201006613406605, 0.0, 0.0],
                            dtype=torch.float64)
    assert (freq - expected).abs().max() < 5 * math.sqrt(0.25 / n)  # 5 sigma at the widest
    assert sample_next_token(LOGITS, 0.0, 0.9, None, top_k=3).tolist() == [0]


# ------------------------------------------------------------------------------ the model with them
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HandsOnVLM(CORRECTED).eval()


def frames_for(model, n=1, seed=0):
    size = model.vision.image_size
    return torch.randn(n, model.cfg.num_obs_frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_top_k_1_samples_the_greedy_tokens(model):
    ids, mask = build_prompt(model, "Where should my hand move to if I want to open the fridge?")
    frames = frames_for(model)
    greedy = generate(model, ids, mask, frames=frames, temperature=0.0, max_new_tokens=12)
    top1 = generate(model, ids, mask, frames=frames, temperature=0.9, top_k=1, z_scale=0.0, max_new_tokens=12, seed=3)
    assert top1.token_ids.tolist() == greedy.token_ids.tolist()
    free = generate(model, ids, mask, frames=frames, temperature=5.0, top_p=1.0, max_new_tokens=12, seed=3)
    assert free.token_ids.tolist() != greedy.token_ids.tolist()  # (an untrained model sampled hot differs)


def test_prompt_template_reaches_the_prompt(model):
    question = "Where should my hand move to if I want to open the fridge?"
    v1 = model.tokenizer.decode(build_prompt(model, question)[0][0].clamp(min=0).tolist())
    v0 = model.tokenizer.decode(build_prompt(model, question, "llava_v0")[0][0].clamp(min=0).tolist())
    assert "USER:" in v1 and "ASSISTANT:" in v1 and "Human:" not in v1
    assert "###Human:" in v0 and v0.rstrip().endswith("###Assistant:") and "USER:" not in v0
    assert model.cfg.prompt_template == "vicuna_v1"  # the model's own config is not changed


def test_answer_jobs_needs_resolved_settings_and_runs_in_bf16_on_cpu(tmp_path):
    torch.manual_seed(0)
    HandsOnVLM(CORRECTED).save_pretrained(tmp_path / "tiny")
    model, device = inference.load_model(tmp_path / "tiny", "cpu", dtype="bf16")
    assert device == "cpu" and model.lm.lm_head.weight.dtype == torch.bfloat16
    assert model.projector.weight.dtype == torch.bfloat16 and model.traj_decoder.dec_out.weight.dtype == torch.bfloat16
    assert model.vision.dtype == torch.float32  # the tower keeps model.vision.dtype
    from handsonvlm.data import rbhp_turns
    from handsonvlm.evaluation import _user_question

    jobs = [{"question": _user_question(rbhp_turns("Where do I put the cup?", model.cfg, with_answer=False)),
             "seed": 5}]
    with pytest.raises(ValueError, match="not resolved"):
        answer_jobs(model, jobs, EvalConfig(), frames=frames_for(model))
    sampling = resolve_sampling(EvalConfig(num_samples=2, max_new_tokens=6, dtype="bf16"), model.cfg)
    (result,) = answer_jobs(model, jobs, sampling, frames=frames_for(model))
    assert len(result["answers"]) == 2 and result["trajectories"].shape == (2, 2, 4, 2)


def test_torch_dtype_rejects_auto():
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        torch_dtype("auto")


def test_enable_tf32_is_a_no_op_without_cuda(monkeypatch):
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert enable_tf32() is False
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (matmul, cudnn)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        assert enable_tf32() is True
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
