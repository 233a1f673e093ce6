"""The training job on a local Ray: 2 workers, DeepSpeed ZeRO-2 and ZeRO-3, checkpoints, resume,
export and MLflow (all real, on the tiny preset and a small SynthKitchens tree)."""

from __future__ import annotations

import json
import shutil
import uuid

import pytest
import torch

from pipelines import preprocess, train

pytestmark = pytest.mark.ray


@pytest.fixture()
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def run_training(data, tmp_path, run_name, *extra):
    return train.main(["--config", "tiny", "--data", str(data), "--run-name", run_name,
                       "--storage", str(tmp_path / "ray_results"),
                       "--set", f"train.export_dir={tmp_path / 'models'}", "--set", "train.micro_batch_size=2",
                       "--set", "train.log_every=1", "--set", "train.lr=3e-3", *extra])


def metric_history(uri, run_name):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("handsonvlm")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`handsonvlm.run_name` = '{run_name}'")
    assert len(runs) == 1
    run = runs[0]
    history = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
               for key in run.data.metrics}
    return run, history


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_train_checkpoint_resume_export_and_mlflow(synth_data, tmp_path, mlflow_uri, zero_stage, capsys):
    from handsonvlm.model import HandsOnVLM

    name = f"t{zero_stage}-{uuid.uuid4().hex[:8]}"
    staging = tmp_path / "staging"
    assert run_training(synth_data, tmp_path, name, "--max-steps", "8", "--zero-stage", str(zero_stage),
                        "--set", "train.checkpoint_every=4", "--set", "train.keep_checkpoints=1",
                        "--set", f"train.checkpoint_staging_dir={staging}") == 0
    run, history = metric_history(mlflow_uri, name)
    # keep_checkpoints=1: of the checkpoints at steps 4 and 8 only the last is kept; the shards were staged in
    # checkpoint_staging_dir and deleted there after the upload
    kept = sorted(p.name for p in (tmp_path / "ray_results" / name).glob("checkpoint_*") if p.is_dir())
    assert len(kept) == 1, kept
    assert staging.is_dir() and not list(staging.iterdir())
    layout = json.loads((tmp_path / "ray_results" / name / kept[0] / "handsonvlm_checkpoint.json").read_text())
    assert layout == {"world_size": 2, "zero_stage": zero_stage, "step": 8, "deepspeed_tag": "ckpt"}
    assert history["checkpoint/total_bytes"][8] > history["checkpoint/rank0_bytes"][8] > 0
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "train/text_loss", "train/traj_loss", "train/kl_loss", "train/lr", "train/samples_per_s"):
        assert sorted(history[key]) == list(range(1, 9)), key
    fixed = history["eval/fixed_batch_loss"]
    assert sorted(fixed) == [0, 4, 8] and fixed[8] < fixed[0]  # the loss goes down on a fixed batch
    assert sorted(history["val/vhp/ade"]) == sorted(history["val/rbhp/coverage"]) == [4, 8]  # validation, ZeRO-2 and 3
    assert run.data.tags["zero_stage"] == str(zero_stage) and run.data.tags["world_size"] == "2"
    assert run.data.params["model.name"] == "tiny" and run.data.params["train.zero_stage"] == str(zero_stage)

    # the same run name resumes from the last checkpoint: the restored model gives the same loss
    assert run_training(synth_data, tmp_path, name, "--max-steps", "8", "--zero-stage", str(zero_stage)) == 0
    _, history = metric_history(mlflow_uri, name)
    assert history["restore/fixed_batch_loss"][8] == pytest.approx(fixed[8], rel=1e-6, abs=1e-7)

    # another world size stops before any worker starts, saying what to do; the MLflow run is left as it was
    capsys.readouterr()
    assert run_training(synth_data, tmp_path, name, "--max-steps", "8", "--zero-stage", str(zero_stage),
                        "--num-workers", "1") == 2
    error = capsys.readouterr().err
    assert f"written by 2 ranks with ZeRO-{zero_stage}" in error and "train.num_workers=2" in error, error
    run, _ = metric_history(mlflow_uri, name)
    assert run.info.status == "FINISHED"

    # the exported model loads without DeepSpeed or Ray
    model = HandsOnVLM.from_pretrained(tmp_path / "models" / name)
    assert isinstance(model, HandsOnVLM) and model.cfg.name == "tiny"
    from mlflow.tracking import MlflowClient

    artifacts = {a.path for a in MlflowClient(mlflow_uri).list_artifacts(run.info.run_id, "model")}
    assert "model/model.safetensors" in artifacts  # log_model auto: a small local export is uploaded
    assert run.data.tags["model_uri"] == str(tmp_path / "models" / name)


def test_resuming_mid_run_gives_the_uninterrupted_result(synth_data, tmp_path, mlflow_uri):
    """Stop at step 3, resume to step 6: same fixed-batch loss as 6 steps in one go (exact data
    position, optimizer, scheduler and RNG restore)."""
    straight, split = f"s-{uuid.uuid4().hex[:8]}", f"r-{uuid.uuid4().hex[:8]}"
    common = ("--set", "train.checkpoint_every=3", "--set", "train.epochs=4")
    assert run_training(synth_data, tmp_path, straight, "--max-steps", "6", *common) == 0
    assert run_training(synth_data, tmp_path, split, "--max-steps", "3", *common) == 0
    assert run_training(synth_data, tmp_path, split, "--max-steps", "6", *common) == 0
    _, a = metric_history(mlflow_uri, straight)
    _, b = metric_history(mlflow_uri, split)
    assert b["eval/fixed_batch_loss"][6] == pytest.approx(a["eval/fixed_batch_loss"][6], rel=1e-5)
    torch.testing.assert_close(torch.tensor(b["train/loss"][6]), torch.tensor(a["train/loss"][6]), rtol=1e-5, atol=1e-6)


def test_feature_cache_gives_the_online_result(synth_data, tmp_path, mlflow_uri):
    """Training from cached float32 vision features equals training from frames (CLIP online)."""
    data = tmp_path / "data"  # the cache goes into a copy: the session's data stays frames-only
    shutil.copytree(synth_data, data)
    assert preprocess.main(["--stage", "features", "--out", str(data), "--model-config", "tiny",
                            "--feature-dtype", "float32", "--splits", "train"]) == 0
    online, cached = f"on-{uuid.uuid4().hex[:8]}", f"fc-{uuid.uuid4().hex[:8]}"
    assert run_training(data, tmp_path, online, "--max-steps", "2", "--set", "train.feature_cache=off") == 0
    assert run_training(data, tmp_path, cached, "--max-steps", "2", "--set", "train.feature_cache=on") == 0
    _, a = metric_history(mlflow_uri, online)
    _, b = metric_history(mlflow_uri, cached)
    for step in (1, 2):
        assert b["train/loss"][step] == pytest.approx(a["train/loss"][step], rel=1e-5)
    assert b["eval/fixed_batch_loss"][2] == pytest.approx(a["eval/fixed_batch_loss"][2], rel=1e-5)


def test_tune_sweep_logs_one_parent_run_with_a_nested_run_per_trial(synth_data, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from pipelines import tune

    space = tmp_path / "space.yaml"
    space.write_text("metric: val_vhp_ade\nmode: min\nparams:\n  train.lr: {grid: [1.0e-3, 3.0e-3]}\n")
    sweep = f"sw-{uuid.uuid4().hex[:6]}"
    assert tune.main(["--config", "tiny", "--search-space", str(space), "--data", str(synth_data), "--max-steps", "1",
                      "--name", sweep, "--storage", str(tmp_path / "ray_results"),
                      "--set", f"train.export_dir={tmp_path / 'models'}", "--set", "train.micro_batch_size=2",
                      "--set", "train.val_clips=2"]) == 0
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("handsonvlm")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.sweep = '{sweep}'")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert sorted(r.data.params["train.lr"] for r in runs) == ["0.001", "0.003"]
    assert all("eval/fixed_batch_loss" in r.data.metrics for r in runs)

    (parent,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`handsonvlm.run_name` = '{sweep}'")
    assert parent.data.tags["stage"] == "sweep" and parent.info.status == "FINISHED"
    assert parent.data.params["search_space.params.train.lr.grid"] == "[0.001, 0.003]"
    nested = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_id for r in nested) == sorted(r.info.run_id for r in runs)
    # the sweep selects on the validation ADE of the trials' last checkpoints, not on the fixed training batch
    # (after one step both trials may tie on it: no clip has its hand tokens yet, all score the baseline)
    best_ade = min(r.data.metrics["val/vhp/ade"] for r in runs)
    assert parent.data.tags["best_metric"] == "val_vhp_ade"
    assert parent.data.tags["best_trial_run_id"] in {r.info.run_id for r in runs
                                                     if r.data.metrics["val/vhp/ade"] == best_ade}
    assert parent.data.metrics["best/val_vhp_ade"] == pytest.approx(best_ade)
    assert not client.search_registered_models()  # trials are candidates: none is registered
    for r in runs:  # nor uploaded (train.log_model=uri): the run says where the trial's export is
        assert not client.list_artifacts(r.info.run_id, "model") and r.data.tags["model_uri"].startswith(str(tmp_path))
