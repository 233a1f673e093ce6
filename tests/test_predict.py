"""pipelines/predict.py on a tiny exported model: video and frame-directory input, typed settings, JSON,
overlays, errors. The library pieces it calls are tested in test_inference.py."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from test_inference import EPIC_SIZE, FULL_HD, NUM_VIDEO_FRAMES, write_video

from handsonvlm.config import PredictConfig, load_model_config
from handsonvlm.constants import EPIC_FRAME_HEIGHT, EPIC_FRAME_WIDTH, NUM_OBS_FRAMES
from handsonvlm.data import Example, collate, encode_conversation, rbhp_turns
from handsonvlm.image import preprocess_frames
from handsonvlm.model import HandsOnVLM
from pipelines import predict
from pipelines.predict import main, parse_args
from preprocessing.media import read_video

QUESTION = "Where should my hand move to if I want to pour the oil?"
W, H = EPIC_SIZE


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model fine-tuned on one clip of the test video (so greedy decoding answers with 4 hand
    tokens), exported; and the video itself."""
    root = tmp_path_factory.mktemp("predict")
    video = write_video(root / "clip.mp4")
    torch.manual_seed(0)
    model = HandsOnVLM(load_model_config("tiny"))
    frames = preprocess_frames(read_video(video, at=2.5).frames, image_size=model.vision.image_size)
    ids, labels = encode_conversation(model.tokenizer, rbhp_turns(QUESTION, model.cfg), model.cfg)
    target = torch.tensor([[[0.6, 0.5], [0.65, 0.5], [0.7, 0.55], [0.75, 0.6]],
                           [[0.3, 0.6], [0.3, 0.6], [0.28, 0.62], [0.25, 0.65]]])
    batch = collate([Example(ids, labels, frames, target, torch.tensor([True, True]))], model.tokens.pad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(120):
        out = model(**batch, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    model.save_pretrained(root / "model")
    return root, root / "model", video


def run_cli(capsys, args):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_video_prediction_writes_json_mp4_and_png(setup, capsys, tmp_path):
    _, model_dir, video = setup
    out, png, js = tmp_path / "o" / "overlay.mp4", tmp_path / "overlay.png", tmp_path / "pred.json"
    code, stdout, stderr = run_cli(capsys, ["--model", str(model_dir), "--video", str(video), "--question", QUESTION,
                                            "--at", "2.5", "--temperature", "0", "--out", str(out),
                                            "--png", str(png), "--json", str(js)])
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    doc = json.loads(lines[-1])  # the JSON document is the last stdout line
    assert json.loads(js.read_text()) == doc
    assert lines[0].startswith("A[0]: ") and doc["answers"][0] in lines[0]
    assert set(doc) >= {"question", "answers", "trajectories", "hands", "complete", "times_s",
                        "observed_frame_times_s"}
    assert doc["question"] == QUESTION and doc["hands"] == ["right", "left"]
    assert doc["times_s"] == [0.25, 0.5, 0.75, 1.0] and doc["frame_size"] == [W, H]
    assert np.asarray(doc["trajectories"], dtype=np.float64).shape == (1, 2, 4, 2)
    assert len(doc["answers"]) == len(doc["complete"]) == 1
    # The fine-tuned model answers with its 4 hand tokens, so there is a trajectory to draw.
    assert doc["complete"] == [True] and "<hand_traj>" in doc["answers"][0], doc["answers"]
    assert np.isfinite(np.asarray(doc["trajectories"], dtype=np.float64)).all()
    assert doc["drawn"] == {"mode": "mean", "samples": [0]}
    # the corrected mode's resolved settings are what ran and what the document shows
    assert {k: doc["sampling"][k] for k in ("top_k", "max_new_tokens", "dtype", "prompt_template", "mode")} == \
        {"top_k": 0, "max_new_tokens": 64, "dtype": "fp32", "prompt_template": "vicuna_v1", "mode": "corrected"}
    # Frames nearest to 0.25, 0.5, ..., 2.5 s of a 30 fps video.
    np.testing.assert_allclose(doc["observed_frame_times_s"], np.arange(1, 11) * 0.25, atol=1 / 60 + 1e-6)
    assert doc["source"]["at_s"] == 2.5 and doc["source"]["frame_indices"][-1] == 75

    import decord

    reader = decord.VideoReader(str(out))
    assert len(reader) == 10 + 4  # observed frames, then the trajectory revealed point by point
    assert reader[0].shape == (540, 960, 3)
    image = cv2.imread(str(png))
    assert image is not None and image.shape == (540, 960, 3)

    # Greedy decoding is deterministic.
    code, stdout2, _ = run_cli(capsys, ["--model", str(model_dir), "--video", str(video), "--question", QUESTION,
                                        "--at", "2.5", "--temperature", "0"])
    assert code == 0 and json.loads(stdout2.strip().splitlines()[-1])["trajectories"] == doc["trajectories"]


def test_default_at_is_the_last_frame_and_sampling_gives_k_answers(setup, capsys):
    _, model_dir, video = setup
    code, stdout, stderr = run_cli(capsys, ["--model", str(model_dir), "--video", str(video), "--question", QUESTION,
                                            "--num-samples", "3", "--temperature", "0.7", "--seed", "3",
                                            "--max-new-tokens", "40"])
    assert code == 0, stderr
    doc = json.loads(stdout.strip().splitlines()[-1])
    assert doc["source"]["frame_indices"][-1] == NUM_VIDEO_FRAMES - 1
    assert len(doc["answers"]) == len(doc["complete"]) == 3
    assert np.asarray(doc["trajectories"], dtype=np.float64).shape == (3, 2, 4, 2)  # null -> nan keeps the shape
    assert doc["complete"] == [c == 4 for c in doc["hand_token_counts"]]
    assert any(doc["complete"]) and doc["drawn"]["samples"] == [k for k, ok in enumerate(doc["complete"]) if ok]
    points = np.asarray(doc["trajectories"], dtype=np.float64)
    assert np.isfinite(points[np.asarray(doc["complete"])]).all()
    assert len({json.dumps(t) for t in doc["trajectories"]}) > 1  # the CVAE draws differ between samples


def test_incomplete_answer_is_reported_with_nulls_and_not_drawn(setup, capsys, tmp_path):
    _, model_dir, video = setup
    png = tmp_path / "none.png"
    # 5 new tokens end the answer before its first hand token.
    code, stdout, stderr = run_cli(capsys, ["--model", str(model_dir), "--video", str(video), "--question", QUESTION,
                                            "--temperature", "0", "--max-new-tokens", "5", "--png", str(png)])
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    doc = json.loads(lines[-1])
    assert doc["complete"] == [False] and doc["hand_token_counts"] == [0] and doc["drawn"] is None
    assert doc["trajectories"] == [[[[None, None]] * 4] * 2]
    assert "incomplete" in lines[0] and "sample 0 is incomplete" in stderr
    assert any("no sample is complete" in n for n in doc["notes"])
    assert cv2.imread(str(png)).shape == (540, 960, 3)


def test_frames_directory_with_three_jpegs(setup, capsys, tmp_path):
    _, model_dir, video = setup
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    reader_frames = read_video(video, at=1.0).frames
    for i, frame in enumerate(reader_frames[-3:]):
        cv2.imwrite(str(frames_dir / f"frame_{i + 8:04d}.jpg"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    (frames_dir / "notes.txt").write_text("not an image")
    png = tmp_path / "frames.png"
    code, stdout, stderr = run_cli(capsys, ["--model", str(model_dir), "--frames", str(frames_dir),
                                            "--question", QUESTION, "--temperature", "0", "--png", str(png),
                                            "--max-new-tokens", "40"])
    assert code == 0, stderr
    doc = json.loads(stdout.strip().splitlines()[-1])
    assert doc["source"]["files"] == ["frame_0008.jpg"] * 8 + ["frame_0009.jpg", "frame_0010.jpg"]
    assert any("repeated 7 more time(s)" in n for n in doc["notes"])
    assert len(doc["observed_frame_times_s"]) == 10
    assert np.asarray(doc["trajectories"], dtype=np.float64).shape == (1, 2, 4, 2)
    assert cv2.imread(str(png)).shape == (540, 960, 3)


@pytest.mark.parametrize("case", ["missing", "past_end", "not_a_video", "no_model", "empty_dir", "cuda_without_gpu"])
def test_bad_input_fails_cleanly(setup, capsys, tmp_path, case):
    root, model_dir, video = setup
    source = ["--video", str(video)]
    extra, model = [], str(model_dir)
    if case == "missing":
        source = ["--video", str(tmp_path / "nope.mp4")]
    elif case == "past_end":
        extra = ["--at", "7.5"]
    elif case == "not_a_video":
        bad = tmp_path / "bad.mp4"
        bad.write_text("this is not a video")
        source = ["--video", str(bad)]
    elif case == "no_model":
        model = str(tmp_path)
    elif case == "empty_dir":
        (tmp_path / "empty").mkdir()
        source = ["--frames", str(tmp_path / "empty")]
    elif case == "cuda_without_gpu":
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        extra = ["--device", "cuda"]
    code, stdout, stderr = run_cli(capsys, ["--model", model, *source, "--question", QUESTION, *extra])
    assert code == predict.EXIT_ERROR and stdout == ""
    assert stderr.startswith("predict.py: error: ") and "Traceback" not in stderr
    expected = {"missing": "not found", "past_end": "past the end", "not_a_video": "cannot read video",
                "no_model": "not an exported HandsOnVLM model", "empty_dir": "no .jpg",
                "cuda_without_gpu": "has 0 GPUs visible to PyTorch; run on a GPU machine, or force CPU with "
                                    "--device cpu"}[case]
    assert expected in stderr, stderr


def test_a_cuda_device_must_exist_here():
    from handsonvlm.devices import DeviceError, check_local_device

    check_local_device("cpu", 0)
    check_local_device("cuda", 1)
    check_local_device("cuda:1", 2)
    with pytest.raises(DeviceError, match=r"device cuda:1: this machine has 1 GPU visible"):
        check_local_device("cuda:1", 1)
    with pytest.raises(DeviceError, match=r"--device cpu"):
        check_local_device("cuda", 0)


def test_usage_errors_exit_via_argparse(setup, capsys):
    _, model_dir, video = setup
    frames_args = ["--model", str(model_dir), "--frames", ".", "--question", QUESTION, "--at", "1"]
    with pytest.raises(SystemExit) as exc:
        main(frames_args)
    assert exc.value.code == 2 and "--at only applies to --video" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--video", str(video), "--frames", ".", "--question", QUESTION])


def test_full_hd_video_reaches_the_model_at_shard_size(setup, capsys, tmp_path, monkeypatch):
    """A 1920x1080 clip is resized as the samples stage resizes (456x256), coordinates stay full-frame."""
    _, model_dir, _ = setup
    fps = 10  # few 1080p frames keep the test fast
    video = write_video(tmp_path / "full_hd.mp4", num_frames=3 * fps, size=FULL_HD, fps=fps)
    seen, answer = [], predict.inference.predict

    def spy(model, frames, *args, **kwargs):
        seen.append(frames.shape)
        return answer(model, frames, *args, **kwargs)

    monkeypatch.setattr(predict.inference, "predict", spy)
    code, stdout, stderr = run_cli(capsys, ["--model", str(model_dir), "--video", str(video), "--question", QUESTION,
                                            "--temperature", "0", "--max-new-tokens", "5"])
    assert code == 0, stderr
    assert seen == [(NUM_OBS_FRAMES, EPIC_FRAME_HEIGHT, EPIC_FRAME_WIDTH, 3)]
    assert json.loads(stdout.strip().splitlines()[-1])["frame_size"] == list(FULL_HD)
    assert "centre crop" not in stderr  # 16:9 is the training aspect


def test_settings_come_from_defaults_preset_and_flags(tmp_path, capsys):
    base = ["--model", "m", "--video", "v.mp4", "--question", QUESTION]
    _, cfg = parse_args(base)
    assert cfg == PredictConfig()
    preset = tmp_path / "mine.yaml"
    preset.write_text("predict:\n  num_samples: 3\n  temperature: 0.2\n  draw: first\n")
    _, cfg = parse_args([*base, "--config", str(preset), "--temperature", "0", "--at", "1.5", "--device", "cpu"])
    assert (cfg.num_samples, cfg.temperature, cfg.draw, cfg.at, cfg.device) == (3, 0.0, "first", 1.5, "cpu")
    for flags, message in ((["--temperature", "-1"], "temperature must be >= 0"),
                           (["--top-p", "0"], "top_p must be in (0, 1]"),
                           (["--top-k", "-2"], "top_k must be >= 0"),
                           (["--dtype", "fp8"], "invalid choice"),
                           (["--num-samples", "0"], "must be >= 1"),
                           (["--config", "no-such-preset"], "no preset")):
        with pytest.raises(SystemExit) as exc:
            parse_args([*base, *flags])
        assert exc.value.code == 2 and message in capsys.readouterr().err, flags


def test_release_mode_export_gets_the_release_settings(setup, capsys, tmp_path):
    """The same weights exported as a release-mode model in a directory named like the released one:
    top-k 50, 100 new tokens, the llava_v0 template (the release evaluator's rule), fp32 on CPU."""
    import shutil

    from handsonvlm.model import CONFIG_FILE

    _, model_dir, video = setup
    released = tmp_path / "handsonvlm-7b"
    shutil.copytree(model_dir, released)
    cfg = json.loads((released / CONFIG_FILE).read_text())
    (released / CONFIG_FILE).write_text(json.dumps({**cfg, "mode": "release"}))
    code, stdout, stderr = run_cli(capsys, ["--model", str(released), "--video", str(video), "--question", QUESTION,
                                            "--temperature", "0", "--device", "cpu"])
    assert code == 0, stderr
    doc = json.loads(stdout.strip().splitlines()[-1])
    assert {k: doc["sampling"][k] for k in ("top_k", "max_new_tokens", "dtype", "prompt_template", "mode")} == \
        {"top_k": 50, "max_new_tokens": 100, "dtype": "fp32", "prompt_template": "llava_v0", "mode": "release"}
    assert any("fp32 on CPU" in n for n in doc["notes"]) and "fp32 on CPU" in stderr
    code, stdout, stderr = run_cli(capsys, ["--model", str(released), "--video", str(video), "--question", QUESTION,
                                            "--temperature", "0", "--prompt-template", "vicuna_v1", "--top-k", "0",
                                            "--max-new-tokens", "40"])
    assert code == 0, stderr
    sampling = json.loads(stdout.strip().splitlines()[-1])["sampling"]
    assert (sampling["top_k"], sampling["max_new_tokens"], sampling["prompt_template"]) == (0, 40, "vicuna_v1")
