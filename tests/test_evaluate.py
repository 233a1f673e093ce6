"""pipelines/evaluate.py: its settings (no Ray) and the job end to end on SynthKitchens with a tiny
model, on a local Ray. The metric policy itself: tests/test_evaluation.py."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines import evaluate

LIMIT = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from handsonvlm.config import load_model_config
    from handsonvlm.model import HandsOnVLM

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("models") / "tiny-eval"
    HandsOnVLM(load_model_config("tiny")).save_pretrained(directory)
    return directory


def _exported(directory, name: str):
    """A directory that looks like an export of a model named ``name`` (its config only)."""
    from handsonvlm.model import CONFIG_FILE

    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps({"name": name}))
    return str(directory)


def test_flags_override_the_preset_and_set(tmp_path):
    args = evaluate.parse_args(["--model", _exported(tmp_path / "m", "tiny"), "--data", "d", "--set", "eval.seed=3",
                                "--set", "eval.batch_size=2", "--seed", "5", "--task", "vhp", "--shuffle-questions"])
    assert args.config == "tiny" and args.eval.tasks == ("vhp",)
    assert (args.eval.seed, args.eval.batch_size, args.eval.shuffle_questions) == (5, 2, True)  # flags win over --set
    assert args.eval.shuffle_frames is False
    assert evaluate.parse_args(["--model", _exported(tmp_path / "m", "tiny"), "--data", "d",
                                "--shuffle-frames"]).eval.shuffle_frames is True
    assert (args.eval.num_samples, args.eval.max_new_tokens, args.eval.limit) == (1, None, None)  # the preset's eval:
    assert (args.eval.top_k, args.eval.dtype, args.eval.prompt_template) == (None, "auto", None)  # mode-dependent


def test_sampling_flags_reach_the_settings(tmp_path):
    args = evaluate.parse_args(["--model", _exported(tmp_path / "m", "tiny"), "--data", "d", "--top-k", "7",
                                "--dtype", "fp32", "--prompt-template", "llava_v0", "--max-new-tokens", "20"])
    assert (args.eval.top_k, args.eval.dtype, args.eval.prompt_template, args.eval.max_new_tokens) == \
        (7, "fp32", "llava_v0", 20)


@pytest.mark.parametrize("bad", [["--temperature", "-1"], ["--top-p", "0"], ["--limit", "0"], ["--config", "nope"],
                                 ["--device", "gpu"], ["--replicas", "0"],
                                 ["--set", "eval.unknown=1"], ["--set", "model.mode=release"], ["--top-k", "-1"],
                                 ["--dtype", "fp8"], ["--prompt-template", "chatml"]])
def test_bad_settings_are_usage_errors(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.parse_args(["--model", "m", "--data", "d", *bad])
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err


def test_the_default_preset_is_the_models(tmp_path):
    assert evaluate.parse_args(["--model", _exported(tmp_path / "a", "vicuna-7b"), "--data", "d"]).config == "vicuna-7b"
    for model in (_exported(tmp_path / "b", "my-own-model"), str(tmp_path / "missing")):
        assert evaluate.parse_args(["--model", model, "--data", "d"]).config == "tiny"


def test_replicas_go_where_eval_device_says():
    from handsonvlm.devices import DeviceError, eval_actors

    # cuda: a GPU per replica, requested even while the autoscaling cluster has none (its GPU groups start at 0)
    assert eval_actors("cuda", None, 0, can_autoscale=True) == (True, 1)
    assert eval_actors("cuda", None, 4, can_autoscale=False) == (True, 4)  # default: the GPUs there are now
    assert eval_actors("cuda", 8, 2, can_autoscale=True) == (True, 8)
    with pytest.raises(DeviceError, match=r"eval\.device=cuda needs 1 GPU \(one per replica\) and this Ray has 0: "
                                          r".* --set eval\.device=cpu"):
        eval_actors("cuda", None, 0, can_autoscale=False)  # a local Ray gets no GPUs later
    with pytest.raises(DeviceError, match=r"needs 3 GPUs .* has 2"):
        eval_actors("cuda", 3, 2, can_autoscale=False)
    # auto: GPUs when the cluster has one per replica now, else CPUs
    assert eval_actors("auto", None, 2, can_autoscale=False) == (True, 2)
    assert eval_actors("auto", None, 0, can_autoscale=True) == (False, 1)
    assert eval_actors("auto", 4, 2, can_autoscale=False) == (False, 4)
    # cpu: one replica unless told, whatever GPUs there are
    assert eval_actors("cpu", None, 8, can_autoscale=False) == (False, 1)
    assert eval_actors("cpu", 3, 8, can_autoscale=False) == (False, 3)


def test_presets_declare_the_eval_device(tmp_path):
    from handsonvlm.config import EvalConfig, load_section

    for preset, device in (("vicuna-7b", "cuda"), ("vicuna-13b", "cuda"), ("tiny", "auto")):
        assert load_section(EvalConfig, preset, "eval").device == device, preset
    args = evaluate.parse_args(["--model", _exported(tmp_path / "m", "vicuna-7b"), "--data", "d", "--device", "cpu",
                                "--replicas", "2"])
    assert (args.eval.device, args.eval.replicas) == ("cpu", 2)


def test_cuda_evaluation_without_gpus_fails_before_starting_ray(model_dir, tmp_path, capsys, monkeypatch):
    import ray

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    started = ray.is_initialized()
    rc = evaluate.main(["--model", str(model_dir), "--data", str(tmp_path / "no-data"), "--device", "cuda",
                        "--no-mlflow"])
    err = capsys.readouterr().err
    assert rc == evaluate.EXIT_ERROR and "eval.device=cuda needs 1 GPU (one per replica) and this machine has 0" in err
    assert "--set eval.device=cpu" in err and ray.is_initialized() == started  # no local Ray was started for it


@pytest.mark.ray
def test_evaluation_job(synth_data, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    rows, _ = evaluate.read_clips(str(synth_data / "samples" / "train"))
    bad = rows[0]["sample_id"]
    from pipelines import tracking

    client = tracking.client()
    exp_id = tracking.experiment_id(client)
    train_run = client.create_run(exp_id, run_name="tiny-eval", tags={"stage": "train", "model_path": str(model_dir),
                                                                      tracking.RUN_NAME_TAG: "tiny-eval"})

    good = rows[1]["sample_id"]

    def flaky(model, jobs, frames, settings):  # pickled into the actors: one clip raises, one is answered
        if any(job["sample_id"] == bad for job in jobs):
            raise RuntimeError(f"injected failure for {bad}")
        if len(jobs) == 1 and jobs[0]["sample_id"] == good:  # a complete answer, as a trained model gives
            k = settings.num_samples
            return [{"answers": ["<hand_traj>" * 4] * k, "trajectories": np.full((k, 2, 4, 2), 0.5),
                     "complete": np.ones(k, bool), "hand_counts": np.full(k, 4)}]
        return evaluate.generate_for_jobs(model, jobs, frames, settings)

    rc = evaluate.main(["--model", str(model_dir), "--data", str(synth_data), "--split", "train", "--task", "both",
                        "--num-samples", "2", "--shuffle-questions", "--shuffle-frames", "--limit", str(LIMIT),
                        "--max-new-tokens", "16",
                        "--batch-size", "4", "--run-name", "eval-test", "--gallery", "3"], generate_fn=flaky)
    assert rc == 0

    (run,) = client.search_runs([exp_id], filter_string="tags.stage = 'eval'")
    assert run.data.tags["train_run_id"] == train_run.info.run_id and run.data.tags["train_run_name"] == "tiny-eval"
    m, params = run.data.metrics, run.data.params
    assert run.info.status == "FINISHED"
    assert params["num_samples"] == "2" and params["limit"] == str(LIMIT) and params["task"] == "both"
    assert params["config"] == "tiny" and params["max_new_tokens"] == "16" and params["shuffle_questions"] == "True"
    assert params["shuffle_frames"] == "True"
    assert (params["device"], params["replicas"]) == ("cpu", "1")  # tiny: eval.device auto on a Ray without GPUs
    # the resolved settings (corrected mode on CPU) are what is logged, not the dataclass's None/auto
    assert (params["top_k"], params["dtype"], params["prompt_template"]) == ("0", "fp32", "vicuna_v1")
    for key in ("vhp/ade", "vhp/fde", "vhp/wde", "vhp/min_ade", "vhp/complete_only/ade", "vhp/coverage",
                "vhp/shuffled/coverage", "vhp/shuffled/ade", "rbhp/n_clips", "rbhp/coverage",
                "vhp/shuffled_frames/ade", "vhp/shuffled_frames/coverage", "vhp/shuffled_frames/n_clips",
                "rbhp/shuffled_frames/ade"):
        assert key in m, key
    assert m["vhp/n_clips"] == LIMIT
    assert 1 <= m["rbhp/n_clips"] <= LIMIT
    assert 0.0 <= m["vhp/coverage"] <= 1.0
    assert np.isfinite(m["vhp/baseline_constant_velocity/ade"])
    assert np.isfinite(m["vhp/ade"])  # missing points are scored as the last position
    assert m["vhp/coverage"] >= 1 / LIMIT and m["vhp/complete_only/n_clips"] >= 1
    assert np.isfinite(m["vhp/complete_only/ade"])
    assert m["vhp/n_failed"] >= 1 and m["vhp/n_errors"] >= 1 and m["vhp/shuffled/n_failed"] >= 1
    assert m["vhp/ade_over_constant_velocity"] == pytest.approx(m["vhp/ade"] / m["vhp/baseline_constant_velocity/ade"])
    assert m["vhp/shuffled_over_true_ade"] == pytest.approx(m["vhp/shuffled/ade"] / m["vhp/ade"])
    assert m["vhp/shuffled_frames/n_clips"] == LIMIT and m["vhp/shuffled_frames/n_failed"] >= 1
    assert m["vhp/shuffled_frames_over_true_ade"] == pytest.approx(m["vhp/shuffled_frames/ade"] / m["vhp/ade"])

    out_dir = synth_data / "eval" / "eval-test"
    summary = json.loads((out_dir / "metrics.json").read_text())
    assert summary["mlflow_run_id"] == run.info.run_id and "vhp/coverage" in summary["metrics"]
    assert "vhp/shuffled_frames_over_true_ade" in summary["metrics"]

    table = pq.read_table(out_dir / "predictions.parquet")
    preds = table.to_pylist()
    for task, n in (("vhp", LIMIT), ("rbhp", int(m["rbhp/n_clips"]))):
        for variant in ("question", "shuffled", "shuffled_frames"):
            mine = [p for p in preds if p["task"] == task and p["variant"] == variant]
            assert len(mine) == n and len({p["sample_id"] for p in mine}) == n
    shuffled = [p for p in preds if p["variant"] == "shuffled"]
    assert all(p["question_from"] != p["sample_id"] and p["frames_from"] == p["sample_id"] for p in shuffled)
    # --shuffle-frames: the clip's own question over another clip's frames (a derangement per task)
    for task in ("vhp", "rbhp"):
        frames = [p for p in preds if p["task"] == task and p["variant"] == "shuffled_frames"]
        own = {p["sample_id"]: p for p in preds if p["task"] == task and p["variant"] == "question"}
        assert all(p["frames_from"] != p["sample_id"] and p["question_from"] == p["sample_id"] for p in frames)
        assert sorted(p["frames_from"] for p in frames) == sorted(own)
        assert all((p["question"], p["seed"]) == (own[p["sample_id"]]["question"], own[p["sample_id"]]["seed"])
                   for p in frames)
    failed = [p for p in preds if p["sample_id"] == bad]
    assert failed and all("injected failure" in p["error"] for p in failed)
    ok = [p for p in preds if p["sample_id"] != bad]
    assert all(p["error"] is None or p["error"].startswith("no complete") for p in ok)
    answered = [p for p in preds if p["sample_id"] == good]
    assert answered and all(p["error"] is None and all(p["complete"]) for p in answered)
    assert all(len(p["answers"]) == 2 and np.asarray(p["trajectories"], float).shape == (2, 2, 4, 2) for p in ok)

    pngs = sorted((out_dir / "gallery").glob("*.png"))
    assert len(pngs) >= 4 and any(p.name.startswith("vhp_") for p in pngs)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"predictions.parquet", "metrics.json", "gallery"} <= artifacts
