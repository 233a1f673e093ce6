"""`ray start --head` on loopback + preprocess -> train -> evaluate as three `ray job submit` jobs.

The cluster path of docs/CLUSTER.md on one machine: each stage is its own job, the stages hand on
their outputs through paths, and MLflow (sqlite here, named by MLFLOW_TRACKING_URI in the jobs'
runtime env as on a cluster) ends up with the training run and the evaluation run linked to it.
The cluster is stopped afterwards even when the test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
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


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.fixture()
def head_node(tmp_path):
    """A head node of its own (own temp dir, own process group), stopped by killing that group:
    ``ray stop`` would also kill the test session's local Ray, and with it this process."""
    # `python` in the job entrypoint must be this environment's interpreter, as on a cluster image
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    ray = str(Path(sys.executable).parent / "ray")
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Unix socket paths are limited
    # The session's local Ray already holds the default agent ports: give this node free ones.
    agent_port, agent_grpc_port, metrics_port = free_ports(3)
    head = subprocess.Popen([ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={GCS_PORT}",
                             f"--dashboard-agent-listen-port={agent_port}",
                             f"--dashboard-agent-grpc-port={agent_grpc_port}",
                             f"--metrics-export-port={metrics_port}",
                             "--num-cpus=2", "--object-store-memory=1000000000", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={DASHBOARD_PORT}", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    address = f"http://127.0.0.1:{DASHBOARD_PORT}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError as exc:
                if head.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"head node did not start: {head.stdout.read()[-2000:]}") from exc
                time.sleep(1)
        yield env, address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(900)  # three jobs, each importing torch/Ray on a 2-CPU machine
def test_three_stages_submitted_as_ray_jobs(head_node, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines import tracking
    from synthkitchens.generate import generate, preprocess_source_args

    env, address = head_node
    tree, data, models = tmp_path / "synth", tmp_path / "data", tmp_path / "models"
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    generate(str(tree), videos=3, actions_per_video=4, seed=0, workers=1)  # 2 train shards: one per worker
    # the entry points run unchanged on a cluster; only the job's runtime env says where MLflow is
    runtime_env = {"env_vars": {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": mlflow_uri}}
    common = ["--address", address, "--working-dir", str(REPO_ROOT),
              "--runtime-env-json", json.dumps(runtime_env), "--"]
    pre = submit(*common, "python", "pipelines/preprocess.py", *preprocess_source_args(tree), "--out", str(data),
                 "--no-progress", env=env, timeout=300)
    assert pre.returncode == 0, pre.stdout[-3000:] + pre.stderr[-3000:]

    name = f"job-{uuid.uuid4().hex[:8]}"
    run = submit(*common, "python", "pipelines/train.py", "--config", "tiny", "--data", str(data),
                 "--run-name", name, "--max-steps", "2", "--storage", str(tmp_path / "ray_results"),
                 "--set", f"train.export_dir={models}", "--set", "train.micro_batch_size=2",
                 "--set", "train.log_every=1", env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[train] step 2/2" in run.stdout and "succeeded" in run.stdout
    assert (models / name / "model.safetensors").exists()
    shutil.rmtree(tmp_path / "ray_results", ignore_errors=True)

    eval_name = f"eval-{name}"
    evaluation = submit(*common, "python", "pipelines/evaluate.py", "--model", str(models / name), "--data", str(data),
                        "--split", "train", "--task", "vhp", "--num-samples", "1", "--limit", "2",
                        "--max-new-tokens", "8", "--batch-size", "2", "--replicas", "1", "--gallery", "1",
                        "--run-name", eval_name, env=env, timeout=600)
    assert evaluation.returncode == 0, evaluation.stdout[-3000:] + evaluation.stderr[-3000:]
    assert "succeeded" in evaluation.stdout
    summary = json.loads((data / "eval" / eval_name / "metrics.json").read_text())

    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    assert experiment is not None
    (train_run,) = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'train'")
    (eval_run,) = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'eval'")
    assert train_run.info.status == eval_run.info.status == "FINISHED"
    assert train_run.data.tags[tracking.RUN_NAME_TAG] == name
    assert any(key.startswith("train/") for key in train_run.data.metrics), train_run.data.metrics
    assert "model" in {a.path for a in client.list_artifacts(train_run.info.run_id)}
    assert eval_run.data.tags["train_run_id"] == train_run.info.run_id
    assert eval_run.data.metrics["vhp/n_clips"] == 2 and "vhp/coverage" in eval_run.data.metrics
    assert summary["mlflow_run_id"] == eval_run.info.run_id
