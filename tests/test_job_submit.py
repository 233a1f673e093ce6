"""`ray start --head` on loopback + `ray job submit` of a short training: the cluster path works.

The cluster is stopped afterwards even when the test fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.ray

GCS_PORT = 6390
DASHBOARD_PORT = 8275


def ray_cli(*args, env, timeout=120):
    ray = str(Path(sys.executable).parent / "ray")
    return subprocess.run([ray, *args], env=env, capture_output=True, text=True, timeout=timeout)


def submit(*args, env, timeout):
    """``ray job submit``, retried while the new head's job agent is still starting (a few seconds)."""
    for _ in range(20):
        done = ray_cli("job", "submit", *args, env=env, timeout=timeout)
        if "No available agent" not in done.stderr:
            return done
        time.sleep(3)
    return done


@pytest.fixture()
def head_node(tmp_path):
    # `python` in the job entrypoint must be this environment's interpreter, as on a cluster image
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    started = ray_cli("start", "--head", "--node-ip-address=127.0.0.1", f"--port={GCS_PORT}", "--num-cpus=2",
                      "--object-store-memory=1000000000", "--dashboard-host=127.0.0.1",
                      f"--dashboard-port={DASHBOARD_PORT}", "--disable-usage-stats", env=env)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        yield env, f"http://127.0.0.1:{DASHBOARD_PORT}"
    finally:
        ray_cli("stop", "--force", env=env)


def test_training_submitted_as_a_ray_job(head_node, tmp_path):
    from preprocessing.synthetic import generate

    env, address = head_node
    tree, data = tmp_path / "synth", tmp_path / "data"
    generate(str(tree), videos=3, actions_per_video=4, seed=0, workers=1)  # 2 train shards: one per worker
    # preprocess as a job too, then train: the entry points run unchanged on a cluster
    common = ["--address", address, "--working-dir", str(REPO_ROOT),
              "--runtime-env-json", '{"env_vars": {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}}', "--"]
    pre = submit(*common, "python", "pipelines/preprocess.py", "--epic-root", str(tree / "EPIC-KITCHENS"),
                  "--annotations", str(tree / "annotations"), "--labels", str(tree / "hoi_forecast" / "ek100"),
                  "--questions", str(tree / "handsonvlm_assets"), "--out", str(data), "--no-progress",
                  env=env, timeout=300)
    assert pre.returncode == 0, pre.stdout[-3000:] + pre.stderr[-3000:]
    name = f"job-{uuid.uuid4().hex[:8]}"
    run = submit(*common, "python", "pipelines/train.py", "--config", "tiny", "--data", str(data),
                  "--run-name", name, "--max-steps", "2", "--storage", str(tmp_path / "ray_results"),
                  "--set", f"train.export_dir={tmp_path / 'models'}", "--set", "train.micro_batch_size=2",
                  "--set", "train.log_every=1", "--no-mlflow", env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[train] step 2/2" in run.stdout and "succeeded" in run.stdout
    assert (tmp_path / "models" / name / "model.safetensors").exists()
    shutil.rmtree(tmp_path / "ray_results", ignore_errors=True)
