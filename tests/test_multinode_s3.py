"""A training job on a two-node Ray cluster with everything on S3-compatible object storage (issue 15).

Two raylets on this machine (`ray start --head` and `ray start --address`), each with its own
working directory and temp dir, on loopback addresses of their own (127.0.0.2 and 127.0.0.3: Ray
rewrites 127.0.0.1 in a cluster address to the host's outbound address, these it keeps), and an
S3 server (moto's, pinned in requirements.txt) on 127.0.0.1. The nodes share nothing but the
object store, the MLflow sqlite file (one machine), the test's fault marker and DeepSpeed's op
build cache (TORCH_EXTENSIONS_DIR). One `ray job submit` trains with `train.placement=spread`:
shards read from `s3://BUCKET/data`, Ray Train checkpoints in `s3://BUCKET/ray_results`, the export
written to `s3://BUCKET/models`, MLflow artifacts in `s3://BUCKET/mlflow`. The fault hook of
pipelines/train_worker.py kills the last rank after step 3; the head advertises one CPU more than
the worker node, so SPREAD puts bundle 0 (rank 0) on the head and the last rank on the worker
node, which the test checks from the killed pid.
Credentials are fake values that the run must never record (the secret scan of test_reliability).
Everything the test starts is ended by process group and PID (never `ray stop`, which would end
every Ray of the machine, this session's included).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
from conftest import REPO_ROOT
from test_job_submit import free_ports, submit
from test_reliability import FAKE_SECRETS, secret_findings
from test_train_job import metric_history

from pipelines import tracking
from preprocessing import storage

BUCKET = "handsonvlm-test"
REGION = "us-east-1"
FAKE_ACCESS_KEY_ID = "fakeAccessKeyId-do-not-log-52c1"
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
HEAD_CPUS, WORKER_CPUS = 3, 2  # unequal, so that SPREAD's first bundle (rank 0) goes to the head
FAULT_STEP, CHECKPOINT_EVERY, MAX_STEPS = 3, 2, 4
STOP_GRACE_S = 5  # then SIGKILL: a throwaway cluster (its temp dirs are removed) needs no orderly exit


# ---------------------------------------------------------------------------------------------
# processes: started in sessions of their own, ended by process group, then leftovers by PID
# ---------------------------------------------------------------------------------------------
def descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(proc.pid).children(recursive=True)
    return []


def stop(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to the process group ``proc`` leads, SIGKILL after ``grace_s``, then every descendant
    seen before that is still alive (Ray starts its workers in process groups of their own)."""
    children = descendants(proc)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    for child in children + descendants(proc):
        with contextlib.suppress(psutil.Error):
            if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                child.kill()


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while True:
        try:
            found = check()
        except OSError:
            found = None
        if found:
            return found
        if (proc is not None and proc.poll() is not None) or time.time() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: not ready after {timeout} s\n{tail}")
        time.sleep(0.5)


@pytest.fixture()
def s3_env(tmp_path):
    """moto's S3 server on 127.0.0.1 and the environment that points the AWS SDKs, pyarrow and
    MLflow at it (fake credentials)."""
    (port,) = free_ports(1)
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path / "s3_server.log"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for("S3 server", lambda: urllib.request.urlopen(endpoint, timeout=2).status == 200, 60, server, log)
        yield {"AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": REGION,
               "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY_ID,
               "AWS_SECRET_ACCESS_KEY": FAKE_SECRETS["AWS_SECRET_ACCESS_KEY"]}
    finally:
        stop(server, grace_s=10)


def alive_nodes(dashboard: str) -> dict[str, dict]:
    """{node id: the State API's record} of the cluster's alive nodes."""
    with urllib.request.urlopen(f"{dashboard}/api/v0/nodes?limit=100&detail=true", timeout=5) as reply:
        nodes = json.loads(reply.read())["data"]["result"]["result"]
    return {n["node_id"]: n for n in nodes if n["state"] == "ALIVE"}


@pytest.fixture()
def two_nodes(tmp_path, s3_env):
    """A head (resource node_a) and a worker node (node_b) on loopback, each with its own working
    directory and temp dir, the S3 environment in both; the dashboard and job API on 127.0.0.1."""
    ray = str(Path(sys.executable).parent / "ray")
    gcs_port, dashboard_port, client_port, *ports = free_ports(15)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # RAY_API_SERVER_ADDRESS: Ray Train's PlacementGroupCleaner asks the State API of "the" Ray of the
    # machine, and this session has a local Ray of its own beside the cluster: name the cluster's.
    env.update(s3_env, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_API_SERVER_ADDRESS=dashboard,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    nodes, procs = {}, []

    def start(name: str, ip: str, cpus: int, worker_ports: int, *args: str) -> None:
        temp_dir = tempfile.mkdtemp(prefix=f"ray{name[-1]}", dir="/tmp")  # short: Unix socket paths are limited
        work = tmp_path / name
        work.mkdir()
        agent, agent_grpc, metrics, manager, objects, runtime_env = (ports.pop() for _ in range(6))
        argv = [ray, "start", "--block", f"--node-ip-address={ip}", f"--num-cpus={cpus}",
                f"--resources={json.dumps({name: 1})}", "--object-store-memory=500000000",
                f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--metrics-export-port={metrics}", f"--node-manager-port={manager}",
                f"--object-manager-port={objects}", f"--runtime-env-agent-port={runtime_env}",
                f"--min-worker-port={worker_ports}", f"--max-worker-port={worker_ports + 999}",
                "--disable-usage-stats", f"--temp-dir={temp_dir}", *args]
        log = tmp_path / f"{name}.log"
        with log.open("w") as out:
            procs.append(subprocess.Popen(argv, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        nodes[name] = {"temp_dir": Path(temp_dir), "log": log, "proc": procs[-1]}

    try:
        start("node_a", HEAD_IP, HEAD_CPUS, 23000, "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
              f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={client_port}")
        wait_for("head node", lambda: urllib.request.urlopen(f"{dashboard}/api/version", timeout=2).status == 200,
                 90, procs[0], nodes["node_a"]["log"])
        start("node_b", WORKER_IP, WORKER_CPUS, 24000, f"--address={HEAD_IP}:{gcs_port}")
        alive = wait_for("two alive nodes", lambda: len(alive_nodes(dashboard)) == 2 and alive_nodes(dashboard),
                         90, procs[1], nodes["node_b"]["log"])
        for node_id, record in alive.items():
            name = "node_a" if "node_a" in record["resources_total"] else "node_b"
            nodes[name]["node_id"] = node_id
        yield {"env": env, "address": dashboard, "nodes": nodes}
    finally:
        stopped = []
        for proc in reversed(procs):  # the worker node first: it leaves a live head in good order
            stopping = time.perf_counter()
            stop(proc)
            stopped.append(f"{time.perf_counter() - stopping:.1f} s")
        print(f"[multinode-s3] nodes stopped in {', '.join(stopped)}")
        for node in nodes.values():
            shutil.rmtree(node["temp_dir"], ignore_errors=True)


def s3_keys(s3_env: dict, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name=REGION,
                          aws_access_key_id=s3_env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=s3_env["AWS_SECRET_ACCESS_KEY"])
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def worker_logs_of(node: dict, pid: int) -> list[Path]:
    """The Ray core worker log files a node wrote for the process ``pid`` (named ..._<pid>.log)."""
    return sorted(node["temp_dir"].glob(f"session_*/logs/python-core-worker-*_{pid}.log"))


# ---------------------------------------------------------------------------------------------
# fast checks of the pieces (no cluster)
# ---------------------------------------------------------------------------------------------
def test_placement_is_validated_and_maps_to_ray_strategies():
    from handsonvlm.config import PLACEMENTS, TrainConfig
    from pipelines.train import PLACEMENT_STRATEGIES

    assert TrainConfig().placement == "pack"
    assert set(PLACEMENT_STRATEGIES) == set(PLACEMENTS) and PLACEMENT_STRATEGIES["spread"] == "SPREAD"
    with pytest.raises(ValueError, match="train.placement must be one of"):
        TrainConfig(placement="scatter")


def test_export_paths_keep_uris_and_make_local_folders_absolute(tmp_path, monkeypatch):
    from pipelines.train import export_path_for

    assert export_path_for("s3://bucket/models", "run-a") == "s3://bucket/models/run-a"
    monkeypatch.chdir(tmp_path)
    assert export_path_for("runs/models", "run-a") == str(tmp_path / "runs" / "models" / "run-a")


def test_worker_nodes_tag_names_distinct_nodes_sorted(monkeypatch):
    import ray

    class Context:
        def get_node_id(self):
            return "ffee01"

    class Client:
        tags = {}

        def set_tag(self, run_id, key, value):
            self.tags[(run_id, key)] = value

    monkeypatch.setattr(ray, "get_runtime_context", Context)
    logger = tracking.WorkerLogger(None, rank=0)
    assert logger.tag_worker_nodes() == "ffee01"  # no process group: this worker alone
    logger.client, logger.run_id = Client(), "run-1"
    assert logger.tag_worker_nodes() == "ffee01"
    assert Client.tags == {("run-1", tracking.WORKER_NODES_TAG): "ffee01"}


# ---------------------------------------------------------------------------------------------
# the two-node run
# ---------------------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_node_training_on_s3_survives_a_killed_worker(synth_data, two_nodes, s3_env, tmp_path, monkeypatch):
    import boto3
    from mlflow.tracking import MlflowClient

    from handsonvlm.model import CONFIG_FILE, HandsOnVLM

    started = time.perf_counter()
    for key, value in s3_env.items():  # this process lists and reads the bucket too
        monkeypatch.setenv(key, value)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    root = f"s3://{BUCKET}"
    data, results, models = f"{root}/data", f"{root}/ray_results", f"{root}/models"
    storage.upload_dir(str(synth_data), data)

    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # one file on this one machine, shared by the nodes
    client = MlflowClient(tracking_uri=mlflow_uri)
    client.create_experiment(tracking.EXPERIMENT, artifact_location=f"{root}/mlflow")

    name = f"mn-{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "fault_fired"
    runtime_env = {"env_vars": {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": mlflow_uri,
                                "HANDSONVLM_FAULT_KILL_AT_STEP": str(FAULT_STEP),
                                "HANDSONVLM_FAULT_MARKER": str(marker)}}
    job = submit("--address", two_nodes["address"], "--working-dir", str(REPO_ROOT),
                 "--runtime-env-json", json.dumps(runtime_env), "--",
                 "python", "pipelines/train.py", "--config", "tiny", "--data", data, "--run-name", name,
                 "--storage", results, "--max-steps", str(MAX_STEPS), "--max-failures", "1",
                 "--set", f"train.export_dir={models}", "--set", "train.placement=spread",
                 "--set", "train.log_model=upload",  # auto would record an S3 export by its URI only
                 "--set", "train.micro_batch_size=2", "--set", "train.log_every=1",
                 "--set", f"train.checkpoint_every={CHECKPOINT_EVERY}", "--set", "train.lr=3e-3",
                 env=two_nodes["env"], timeout=420)
    log = job.stdout + job.stderr
    (tmp_path / "job.log").write_text(log)
    trained = time.perf_counter()
    print(f"\n[multinode-s3] upload + job: {trained - started:.1f} s (rc {job.returncode})")
    assert job.returncode == 0, log[-5000:]
    assert "succeeded" in job.stdout

    # the workers ran on both nodes, and the worker killed after step 3 was the one on node_b
    nodes = two_nodes["nodes"]
    run, history = metric_history(mlflow_uri, name)
    assert run.info.status == "FINISHED"
    worker_nodes = run.data.tags[tracking.WORKER_NODES_TAG].split(",")
    assert worker_nodes == sorted({nodes["node_a"]["node_id"], nodes["node_b"]["node_id"]})
    fired = marker.read_text()
    assert f"killed after step {FAULT_STEP}" in fired, fired
    pid = int(fired.split(" pid ")[1].split()[0])
    assert worker_logs_of(nodes["node_b"], pid) and not worker_logs_of(nodes["node_a"], pid), fired

    # ... and the run resumed from the last checkpoint, once
    assert f"resumed at step {CHECKPOINT_EVERY}" in log
    assert history[tracking.RESTARTS_METRIC] == {CHECKPOINT_EVERY: 1.0}
    assert sorted(history["train/loss"]) == list(range(1, MAX_STEPS + 1))

    # everything is on the S3 endpoint: shards (the run's dataset inputs), checkpoints, export, MLflow artifacts
    shards = [k for k in s3_keys(s3_env, "data/samples/train/") if k.endswith(".parquet")]
    assert len(shards) == 2, shards
    sources = {json.loads(i.dataset.source)["uri"] for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert f"{data}/samples/train" in sources, sources
    checkpoints = sorted({k.split("/")[2] for k in s3_keys(s3_env, f"ray_results/{name}/checkpoint_")
                          if k.count("/") >= 3})  # files in checkpoint folders, not the manager's snapshot
    assert checkpoints, s3_keys(s3_env, f"ray_results/{name}/")
    exported = [k for k in s3_keys(s3_env, f"models/{name}/") if not k.endswith("/")]
    assert {f"models/{name}/model.safetensors", f"models/{name}/{CONFIG_FILE}"} <= set(exported), exported
    assert run.info.artifact_uri == f"{root}/mlflow/{run.info.run_id}/artifacts"
    artifacts = [k for k in s3_keys(s3_env, f"mlflow/{run.info.run_id}/artifacts/model/") if not k.endswith("/")]
    assert {k.rsplit("/", 1)[1] for k in artifacts} == {k.rsplit("/", 1)[1] for k in exported}, artifacts
    assert run.data.tags["model_path"] == run.data.tags["model_uri"] == f"{models}/{name}"

    # the last checkpoint is the finished run's, and the export on S3 loads as a model
    import torch

    with storage.local_dir(f"{results}/{name}/{checkpoints[-1]}") as checkpoint:
        state = torch.load(Path(checkpoint) / "rank_0_state.pt", weights_only=True)
    assert state["progress"]["step"] == MAX_STEPS
    with storage.local_dir(f"{models}/{name}") as export:
        model = HandsOnVLM.from_pretrained(export)
        assert sum(p.numel() for p in model.parameters()) > 0
        config_texts = [p.read_text() for p in Path(export).rglob("*.json")]
        weights = (Path(export) / "model.safetensors").read_bytes()
    # ... and so does its registered version, downloaded from the MLflow artifacts on S3
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv(tracking.MODEL_CACHE_ENV, str(tmp_path / "model_cache"))
    registered = tracking.resolve_model(run.data.tags["registered_model"])
    assert (Path(registered) / "model.safetensors").read_bytes() == weights
    HandsOnVLM.from_pretrained(registered)

    # no credential in the run's params, tags, exported configs or any log of the job and both nodes
    secrets = {**FAKE_SECRETS, "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY_ID}
    findings = secret_findings(run.data.params, "param") + secret_findings(run.data.tags, "tag")
    findings += [f"param/tag holds {k}" for k, v in secrets.items()
                 if any(v in str(x) for x in [*run.data.params.values(), *run.data.tags.values()])]
    findings += [f"exported config holds {k}" for k, v in secrets.items() if any(v in t for t in config_texts)]
    findings += [f"job log holds {k}" for k, v in secrets.items() if v in log]
    for node_name, node in nodes.items():
        for path in node["temp_dir"].glob("session_*/logs/**/*"):
            if path.is_file():
                text = path.read_text(errors="replace")
                findings += [f"{node_name} log {path.name} holds {k}" for k, v in secrets.items() if v in text]
    assert findings == []
    print(f"[multinode-s3] checks: {time.perf_counter() - trained:.1f} s; killed pid {pid} on node_b; "
          f"checkpoints {checkpoints}")
