"""pipelines/evaluate.py: its settings (no Ray) and the job end to end on SynthKitchens with a tiny
model, on a local Ray. The metric policy itself: tests/test_evaluation.py."""

from __future__ import annotations

import json

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


def test_cpu_replicas_leave_a_cpu_for_the_reads():
    """2 CPU replicas of 1 CPU each on a 2-CPU Ray left no CPU for Ray Data's read tasks: the actors
    waited, idle, for rows forever (the demo's evaluation hung this way)."""
    from handsonvlm.devices import cpus_per_cpu_replica

    assert cpus_per_cpu_replica(2, 2) == 0.5  # 1 CPU left for the reads
    assert cpus_per_cpu_replica(2, 1) == 1.0
    assert cpus_per_cpu_replica(16, 4) == 1.0  # plenty: one each
    assert cpus_per_cpu_replica(4, 4) == 0.75
    for cpus, replicas in [(2, 2), (3, 5), (8, 8), (2, 1)]:
        assert cpus - replicas * cpus_per_cpu_replica(cpus, replicas) >= 1.0
