"""The evaluation job end to end on SynthKitchens with a tiny model, on a local Ray."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines import evaluate

pytestmark = pytest.mark.ray

LIMIT = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from handsonvlm.config import load_model_config
    from handsonvlm.model import HandsOnVLM

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("models") / "tiny-eval"
    HandsOnVLM(load_model_config("tiny")).save_pretrained(directory)
    return directory


def test_derangement_has_no_fixed_points():
    for n in (2, 3, 7):
        perm = evaluate.derangement(n, np.random.default_rng(n))
        assert sorted(perm.tolist()) == list(range(n)) and not (perm == np.arange(n)).any()


def test_missing_points_fall_back_to_the_last_position():
    fh = np.random.default_rng(0).random((2, 2, 5, 2))
    pred = np.full((2, 3, 2, 4, 2), np.nan)
    pred[0, 0] = 0.5
    filled = evaluate.fill_missing(pred, fh)
    assert np.isfinite(filled).all() and (filled[0, 0] == 0.5).all()
    np.testing.assert_allclose(filled[1, 2, :, 3], fh[1, :, 0])


def test_metrics_policies_on_synthetic_predictions():
    from handsonvlm.metrics import trajectory_metrics

    rng = np.random.default_rng(1)
    N, K = 5, 3
    fh = rng.random((N, 2, 5, 2)) * 0.9
    clips = {f"c{n}": {"future_hands": fh[n], "future_valid": np.array([True, n % 2 == 0])} for n in range(N)}
    pred = rng.random((N, K, 2, 4, 2)) * 0.9
    complete = np.ones((N, K), bool)
    preds = [{"sample_id": f"c{n}", "trajectories": pred[n].reshape(-1).tolist(), "complete": complete[n].tolist(),
              "error": ""} for n in range(N)]
    full = evaluate.variant_metrics(preds, clips, K)
    expected = trajectory_metrics(pred, fh[:, :, 1:], np.stack([c["future_valid"] for c in clips.values()]))
    for key, value in expected.items():  # all complete: both policies equal the plain metrics
        np.testing.assert_allclose(full[key], value, rtol=1e-9)
        np.testing.assert_allclose(full[f"complete_only/{key}"], value, rtol=1e-9)
    assert full["coverage"] == 1.0 and full["n_failed"] == 0

    pred[0, 1:] = np.nan  # clip 0: one complete sample; clip 1: none (failed)
    pred[1] = np.nan
    pred[1, 0, :, :2] = 0.3  # an incomplete sample with 2 points
    complete[0, 1:] = complete[1] = False
    preds = [{**p, "trajectories": pred[n].reshape(-1).tolist(), "complete": complete[n].tolist()}
             for n, p in enumerate(preds)]
    preds[2]["error"] = "RuntimeError: boom"
    preds[2]["trajectories"] = [float("nan")] * (K * 16)
    preds[2]["complete"] = [False] * K
    part = evaluate.variant_metrics(preds, clips, K)
    assert part["n_failed"] == 2 and part["n_errors"] == 1 and part["complete_only/n_clips"] == 3
    np.testing.assert_allclose(part["coverage"], (1 / 3 + 0 + 0 + 1 + 1) / 5)
    assert part["coverage_all_k"] == 2 / 5 and np.isfinite(part["ade"])
    kept = [0, 3, 4]
    ade0 = trajectory_metrics(pred[0, :1][None], fh[:1, :, 1:], clips["c0"]["future_valid"][None])
    rest = trajectory_metrics(pred[3:], fh[3:, :, 1:], np.stack([clips[f"c{n}"]["future_valid"] for n in (3, 4)]))
    weight = ade0["n_traj"] + rest["n_traj"]
    np.testing.assert_allclose(part["complete_only/ade"],
                               (ade0["ade"] * ade0["n_traj"] + rest["ade"] * rest["n_traj"]) / weight)
    assert part["complete_only/n_valid"] == sum(clips[f"c{n}"]["future_valid"].sum() for n in kept)


def test_learning_ratios_and_table():
    metrics = {"vhp/ade": 0.06, "vhp/baseline_constant_velocity/ade": 0.1, "vhp/shuffled/ade": 0.15,
               "vhp/n_clips": 4.0, "vhp/coverage": 1.0,
               "rbhp/ade": 0.05, "rbhp/baseline_constant_velocity/ade": 0.0}  # no shuffled, degenerate baseline
    vhp = evaluate.learning_ratios(metrics, "vhp")
    assert vhp == {"vhp/ade_over_constant_velocity": pytest.approx(0.6), "vhp/shuffled_over_true_ade": pytest.approx(2.5)}
    assert evaluate.learning_ratios(metrics, "rbhp") == {}
    table = evaluate.summary_table({**metrics, **vhp}, ("vhp", "rbhp"), ["constant_velocity"]).splitlines()
    assert table[0].endswith("ade / cv | shuffled / true")
    assert table[2].endswith("0.60x | 2.50x") and table[3].endswith("- | -")


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
            k = settings["num_samples"]
            return [{"answers": ["<hand_traj>" * 4] * k, "trajectories": np.full((k, 2, 4, 2), 0.5),
                     "complete": np.ones(k, bool), "hand_counts": np.full(k, 4)}]
        return evaluate.generate_for_jobs(model, jobs, frames, settings)

    rc = evaluate.main(["--model", str(model_dir), "--data", str(synth_data), "--split", "train", "--task", "both",
                        "--num-samples", "2", "--shuffle-questions", "--limit", str(LIMIT), "--max-new-tokens", "16",
                        "--batch-size", "4", "--run-name", "eval-test", "--gallery", "3"], generate_fn=flaky)
    assert rc == 0

    (run,) = client.search_runs([exp_id], filter_string="tags.stage = 'eval'")
    assert run.data.tags["train_run_id"] == train_run.info.run_id and run.data.tags["train_run_name"] == "tiny-eval"
    m, params = run.data.metrics, run.data.params
    assert run.info.status == "FINISHED"
    assert params["num_samples"] == "2" and params["limit"] == str(LIMIT) and params["task"] == "both"
    for key in ("vhp/ade", "vhp/fde", "vhp/wde", "vhp/min_ade", "vhp/complete_only/ade", "vhp/coverage",
                "vhp/shuffled/coverage", "vhp/shuffled/ade", "rbhp/n_clips", "rbhp/coverage"):
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

    out_dir = synth_data / "eval" / "eval-test"
    summary = json.loads((out_dir / "metrics.json").read_text())
    assert summary["mlflow_run_id"] == run.info.run_id and "vhp/coverage" in summary["metrics"]

    table = pq.read_table(out_dir / "predictions.parquet")
    preds = table.to_pylist()
    for task, n in (("vhp", LIMIT), ("rbhp", int(m["rbhp/n_clips"]))):
        for variant in ("question", "shuffled"):
            mine = [p for p in preds if p["task"] == task and p["variant"] == variant]
            assert len(mine) == n and len({p["sample_id"] for p in mine}) == n
    shuffled = [p for p in preds if p["variant"] == "shuffled"]
    assert all(p["question_from"] != p["sample_id"] for p in shuffled)
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
