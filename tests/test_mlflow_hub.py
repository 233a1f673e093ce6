"""MLflow as the place to compare runs, against a real local sqlite store (no mocks): validation
metrics during training, the Model Registry and ``models:/`` / ``runs:/`` model URIs, dataset
inputs, system metrics and the evaluation's table and images. The Tune sweep's parent and nested
runs: tests/test_train_job.py (the sweep it runs anyway)."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines import evaluate, predict, tracking, train

pytestmark = pytest.mark.ray

VAL_CLIPS = 2
EVAL_FLAGS = ["--split", "validation", "--limit", "2", "--max-new-tokens", "8", "--gallery", "1", "--temperature", "0"]


@pytest.fixture()
def mlflow_uri(tmp_path, monkeypatch):
    """A fresh sqlite store; the working directory (artifact root, model cache) under tmp_path."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(tracking.SYSTEM_METRICS_INTERVAL_ENV, "0.2")  # a short run still gets samples
    return uri


def test_validation_leaves_training_untouched_and_is_deterministic(synth_data):
    from handsonvlm.config import load_model_config
    from handsonvlm.model import HandsOnVLM
    from handsonvlm.validation import COLUMNS, ValidationSet, validate

    (shard,) = sorted((synth_data / "samples" / "validation").glob("*.parquet"))
    rows = pq.read_table(shard, columns=COLUMNS).to_pylist()[:VAL_CLIPS]
    torch.manual_seed(0)
    model = HandsOnVLM(load_model_config("tiny")).train()
    validation = ValidationSet(rows, model.cfg, seed=0)
    rng_before = torch.get_rng_state()
    first = validate(model, validation, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng_before) and model.training
    second = validate(model, validation, torch.device("cpu"))
    for task in ("vhp", "rbhp"):
        for name in ("ade", "fde", "coverage"):
            assert first[f"val/{task}/{name}"] == second[f"val/{task}/{name}"], (task, name)
    assert 0.0 <= first["val/vhp/coverage"] <= 1.0 and math.isfinite(first["val/vhp/ade"])


def test_training_validates_registers_and_evaluates_from_the_registry(synth_data, tmp_path, mlflow_uri, monkeypatch):
    from handsonvlm.inference import ModelLoadError

    # a 4-step run trains for about a second: sample system metrics every 0.2 s, not every 10 s (the default)
    monkeypatch.setenv(tracking.SYSTEM_METRICS_INTERVAL_ENV, "0.2")

    name = f"hub-{uuid.uuid4().hex[:8]}"
    assert train.main(["--config", "tiny", "--data", str(synth_data), "--run-name", name, "--max-steps", "4",
                       "--storage", str(tmp_path / "ray_results"), "--set", f"train.export_dir={tmp_path / 'models'}",
                       "--set", "train.micro_batch_size=2", "--set", "train.checkpoint_every=2",
                       "--set", f"train.val_clips={VAL_CLIPS}"]) == 0
    client = tracking.client()
    exp_id = tracking.experiment_id(client)
    (run,) = client.search_runs([exp_id], filter_string=f"tags.`{tracking.RUN_NAME_TAG}` = '{name}'")
    run_id = run.info.run_id

    # validation: a step series per task at every checkpoint
    for key in ("val/vhp/ade", "val/rbhp/ade", "val/vhp/fde", "val/rbhp/coverage"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [2, 4], key
    assert "system/cpu_utilization_percentage" in run.data.metrics

    # dataset inputs: the training shards and the validation clips' shard
    inputs = {tag.value: d.dataset for d in run.inputs.dataset_inputs for tag in d.tags
              if tag.key == "mlflow.data.context"}
    assert set(inputs) == {"training", "validation"}
    assert inputs["training"].name == "train" and "samples/train" in inputs["training"].source
    assert inputs["validation"].digest and inputs["validation"].digest != inputs["training"].digest

    # the registry: version 1 of "handsonvlm", made from this run's model artifact
    (version,) = client.search_model_versions("name = 'handsonvlm'")
    assert str(version.version) == "1" and version.run_id == run_id and version.source.endswith("/model")
    assert run.data.tags["registered_model"] == "models:/handsonvlm/1"

    # the same metrics from the export folder and from the registered model
    export = str(tmp_path / "models" / name)
    by_folder = evaluate.run(evaluate.parse_args(["--model", export, "--data", str(synth_data),
                                                  "--run-name", f"{name}-folder", *EVAL_FLAGS]))
    by_registry = evaluate.run(evaluate.parse_args(["--model", "models:/handsonvlm/1", "--data", str(synth_data),
                                                    "--run-name", f"{name}-registry", *EVAL_FLAGS]))
    assert by_registry["metrics"].keys() == by_folder["metrics"].keys()
    for key, value in by_folder["metrics"].items():
        assert np.isclose(by_registry["metrics"][key], value, equal_nan=True), key
    eval_run = client.get_run(by_registry["run_id"])
    assert eval_run.data.tags["train_run_id"] == run_id and eval_run.data.tags["model_uri"] == "models:/handsonvlm/1"
    assert [d.dataset.name for d in eval_run.inputs.dataset_inputs] == ["validation"]
    artifacts = {a.path for a in client.list_artifacts(eval_run.info.run_id)}
    assert {"predictions.json", "predictions.parquet", "images"} <= artifacts
    assert any(a.path.endswith(".png") for a in client.list_artifacts(eval_run.info.run_id, "images"))

    # predict.py takes the same URIs (here on the observed frames of a validation clip)
    frames = tmp_path / "frames"
    frames.mkdir()
    (shard,) = sorted((synth_data / "samples" / "validation").glob("*.parquet"))
    for i, jpeg in enumerate(pq.read_table(shard, columns=["obs_jpeg"]).column("obs_jpeg")[0].as_py()):
        (frames / f"{i:02d}.jpg").write_bytes(jpeg)
    assert predict.main(["--model", "models:/handsonvlm/1", "--frames", str(frames), "--question", "Where to?",
                         "--temperature", "0", "--max-new-tokens", "8"]) == 0

    # aliases and run URIs resolve to the same weights; a wrong URI is one error line
    client.set_registered_model_alias("handsonvlm", "champion", "1")
    weights = (tmp_path / "models" / name / "model.safetensors").read_bytes()
    for uri in ("models:/handsonvlm@champion", f"runs:/{run_id}/model"):
        assert (Path(tracking.resolve_model(uri)) / "model.safetensors").read_bytes() == weights, uri
    with pytest.raises(ModelLoadError, match="cannot resolve"):
        tracking.resolve_model("models:/handsonvlm/7")
    assert predict.main(["--model", "models:/handsonvlm@nope", "--frames", str(frames), "--question", "q"]) == 2
