"""Reliability and security (issue 8): faults, preemption, bad input, untrusted files, services and
resource bounds, each checked on real (tiny) runs.

Runs that must be killed, or that need a Ray of their own (an 80 MB object store, a fault-injecting
environment), are subprocesses in their own session: they start their own local Ray (RAY_ADDRESS
removed from their environment), and only their process group is ever killed.
docs/RELIABILITY.md describes the guarantees and quotes the numbers these tests print.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT, isolated_env
from test_train_job import metric_history

from pipelines import preprocess
from preprocessing import storage
from preprocessing.quarantine import REASONS
from synthkitchens.generate import generate, preprocess_source_args

SMALL_OBJECT_STORE = 80 * 1024 * 1024  # Ray's minimum is 75 MiB
PREEMPT_SHARD_SIZE = 1  # one action per shard: many shards, so the job can be caught half-way
PREEMPT_FRAME_HEIGHT = 128  # forces a decode + resize + re-encode of every frame (slower shards)
FAKE_SECRETS = {"AWS_SECRET_ACCESS_KEY": "fakeAwsSecret-do-not-log-7f3a9c",
                "HF_TOKEN": "hf_fakeTokenDoNotLog9b2e",
                "PGPASSWORD": "fake-pg-password-41d8"}
SECRET_KEY_WORDS = ("token", "password", "secret", "api_key", "apikey", "credential", "access_key")


# ---------------------------------------------------------------------------------------------
# helpers: subprocesses with the process-tree RSS, tree sizes
# ---------------------------------------------------------------------------------------------
class IsolatedRun:
    """A subprocess in its own session and process group, with the summed RSS of its process tree
    (its Ray included) sampled every 0.2 s."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str]):
        self.log_path = log_path
        self.log = log_path.open("w")  # closed by close(), which every use reaches (context manager)
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.pids: set[int] = {self.proc.pid}
        self.peak_total_rss = 0
        self.peak_process_rss = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.proc.pid)
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                procs = []
            total = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                self.pids.add(p.pid)
                total += rss
                self.peak_process_rss = max(self.peak_process_rss, rss)
            self.peak_total_rss = max(self.peak_total_rss, total)
            self._stop.wait(0.2)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.seconds = time.perf_counter() - self.started
            self.close()

    def kill(self) -> None:
        """SIGKILL the process group this run leads, as a preemption would. Ray puts its workers in
        process groups of their own, so those are ended by PID in close()."""
        with contextlib.suppress(psutil.Error):
            self.pids.update(p.pid for p in psutil.Process(self.proc.pid).children(recursive=True))
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.seconds = time.perf_counter() - self.started
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._sampler.join(timeout=5)
        self.log.close()
        # Anything of this run that left the process group (none expected) is ended by PID.
        for pid in self.pids:
            try:
                p = psutil.Process(pid)
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    p.kill()
            except psutil.Error:
                pass

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def samples_command(tree: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "pipelines/preprocess.py", *preprocess_source_args(tree), "--out", str(out),
            "--stage", "samples", "--no-progress", "--num-cpus", "2", *extra]


def done_markers(out: Path) -> list[Path]:
    return sorted((out / "_state" / "samples").glob("*/*.json"))


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def shard_tables(out: Path) -> dict[str, object]:
    return {f"{p.parent.name}/{p.name}": pq.read_table(p) for p in sorted((out / "samples").glob("*/*"))}


# ---------------------------------------------------------------------------------------------
# preemption of preprocessing, and a run over a tree larger than the object store
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big_tree(tmp_path_factory):
    """6 videos; 4 of them also as extracted rgb_frames (~25 MB each), so the tree outgrows an
    80 MB object store; the other 2 are decoded from MP4."""
    tree = tmp_path_factory.mktemp("big_synth")
    generate(str(tree), videos=6, actions_per_video=4, seed=3, rgb_frames=4, workers=1)
    return tree


def indexed_output(tree: Path, out: Path) -> Path:
    """An output root with the index stage done (no Ray needed)."""
    assert preprocess.main([*preprocess_source_args(tree), "--out", str(out), "--stage", "index", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def uninterrupted(big_tree, tmp_path_factory):
    """The samples stage in one go, in a subprocess whose Ray has an 80 MB object store."""
    out = indexed_output(big_tree, tmp_path_factory.mktemp("uninterrupted"))
    run = IsolatedRun(samples_command(big_tree, out, "--shard-size", str(PREEMPT_SHARD_SIZE), "--frame-height",
                                      str(PREEMPT_FRAME_HEIGHT), "--object-store-memory", str(SMALL_OBJECT_STORE)),
                      out / "job.log", isolated_env())
    rc = run.wait(timeout=300)
    assert rc == 0, run.output()[-3000:]
    return out, run


def test_preprocessing_a_tree_larger_than_the_object_store(big_tree, uninterrupted):
    out, run = uninterrupted
    input_bytes = tree_bytes(big_tree / "EPIC-KITCHENS")
    sample_bytes = tree_bytes(out / "samples")
    m = manifest(out)
    print(f"\n[resource] input tree {input_bytes / 2**20:.1f} MiB, object store {SMALL_OBJECT_STORE / 2**20:.0f} MiB, "
          f"samples written {sample_bytes / 2**20:.1f} MiB in {run.seconds:.1f} s; peak RSS: whole process tree "
          f"{run.peak_total_rss / 2**20:.0f} MiB, largest process {run.peak_process_rss / 2**20:.0f} MiB "
          f"({len(run.pids)} processes)")
    assert input_bytes > SMALL_OBJECT_STORE
    actions = sum(len(pd.read_csv(big_tree / "annotations" / f"EPIC_100_{s}.csv")) for s in ("train", "validation"))
    written = sum(m["splits"][s]["samples"]["written"] for s in ("train", "validation"))
    assert written == actions  # nothing dropped for lack of memory
    assert sum(m["splits"][s]["samples"]["frame_sources"].get("rgb_frames", 0) for s in m["splits"]) > 0
    # Media never passes through the object store (a task decodes and writes one shard and returns a
    # summary), so a process holds about one shard of frames, not the tree: its peak stays well
    # below the input it streamed through on top of the fixed cost of an idle Ray worker.
    assert run.peak_process_rss < input_bytes + 1024 * 2**20


def test_preprocessing_killed_midway_resumes_to_the_same_shards(big_tree, uninterrupted, tmp_path, ray_local):
    reference_out, _ = uninterrupted
    out = indexed_output(big_tree, tmp_path / "preempted")
    total_shards = len(done_markers(reference_out))

    run = IsolatedRun(samples_command(big_tree, out, "--shard-size", str(PREEMPT_SHARD_SIZE), "--frame-height",
                                      str(PREEMPT_FRAME_HEIGHT)), tmp_path / "killed.log", isolated_env())
    deadline = time.monotonic() + 240
    while len(done_markers(out)) < 2 and run.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    run.kill()
    finished_before_kill = {p.name: p.stat().st_mtime_ns for p in done_markers(out)}
    shards_before_kill = {p: (out / "samples" / p.parent.name / (p.stem + ".parquet")).stat().st_mtime_ns
                          for p in done_markers(out)}
    print(f"\n[preemption] killed after {run.seconds:.1f} s with {len(finished_before_kill)} of {total_shards} "
          f"shards done")
    assert 0 < len(finished_before_kill) < total_shards, run.output()[-3000:]
    assert not (out / "manifest.json").exists() or "samples" not in manifest(out).get("stages", {})

    started = time.perf_counter()
    assert preprocess.main([*preprocess_source_args(big_tree), "--out", str(out), "--stage", "samples", "--no-progress",
                            "--shard-size", str(PREEMPT_SHARD_SIZE), "--frame-height", str(PREEMPT_FRAME_HEIGHT)]) == 0
    print(f"[preemption] re-run finished the remaining shards in {time.perf_counter() - started:.1f} s")

    # exactly the uninterrupted result: same shard files, same rows, no duplicates, none missing
    got, want = shard_tables(out), shard_tables(reference_out)
    assert sorted(got) == sorted(want)
    for name, table in want.items():
        assert got[name].equals(table), name
    ids = [i for t in got.values() for i in t.column("sample_id").to_pylist()]
    assert len(ids) == len(set(ids))
    # the shards finished before the kill were reused, not redone
    for marker, mtime in shards_before_kill.items():
        assert marker.stat().st_mtime_ns == finished_before_kill[marker.name]
        assert (out / "samples" / marker.parent.name / (marker.stem + ".parquet")).stat().st_mtime_ns == mtime
    stats = manifest(out)["splits"]
    assert sum(s["samples"]["shards_reused"] for s in stats.values()) == len(finished_before_kill)
    assert sum(s["samples"]["shards_processed"] for s in stats.values()) == total_shards - len(finished_before_kill)
    # no partial write of the killed run is left next to the shards
    leftovers = [p for p in out.rglob(f"*{storage.PARTIAL_WRITE_MARK}*")]
    assert leftovers == []


# ---------------------------------------------------------------------------------------------
# bad input: the catalogue items test_preprocess_job.py does not build
# ---------------------------------------------------------------------------------------------
def corrupt_label(labels_dir: Path, uid: int, value: float) -> None:
    path = labels_dir / f"label_{uid}.pkl"
    label = pickle.loads(path.read_bytes())
    side = next(iter(label["hand_trajs"]))
    label["hand_trajs"][side]["traj"][2, 0] = value
    path.write_bytes(pickle.dumps(label))


def test_mixed_sources_unicode_inf_and_missing_columns(tmp_path, ray_local):
    """A tree mixing MP4 and rgb_frames sources (one video with both, one with frames only, one
    with the MP4 only), a missing and a corrupt JPEG, a unicode narration, an inf trajectory, and a
    split CSV that lacks columns: each bad item is one quarantine row, the rest is written."""
    tree = tmp_path / "mixed"
    generate(str(tree), videos=3, actions_per_video=3, seed=2, rgb_frames=2, workers=1)
    epic_root, annotations = tree / "EPIC-KITCHENS", tree / "annotations"
    both, frames_only, mp4_only = "P01_01", "P01_02", "P01_03"
    (epic_root / "P01" / "videos" / f"{frames_only}.MP4").unlink()
    assert not (epic_root / "P01" / "rgb_frames" / mp4_only).exists()

    train_csv = annotations / "EPIC_100_train.csv"
    train = pd.read_csv(train_csv, keep_default_na=False, dtype=str)
    unicode_id = train.narration_id[train.video_id == both].iloc[1]
    unicode_text = "take cup ☕ — tasse à café, 杯子"
    train.loc[train.narration_id == unicode_id, "narration"] = unicode_text
    train.to_csv(train_csv, index=False, encoding="utf-8")
    inf_id = train.narration_id[train.video_id == frames_only].iloc[0]
    corrupt_label(tree / "hoi_forecast" / "ek100" / "labels", int(train.index[train.narration_id == inf_id][0]), np.inf)
    # the test split's CSV without its timestamp and frame columns
    bad_csv = tmp_path / "test_split_missing_columns.csv"
    bad_csv.write_text("narration_id,participant_id,video_id\nP01_01_100,P01,P01_01\n")

    out = tmp_path / "out"
    common = [*preprocess_source_args(tree), "--out", str(out), "--no-progress", "--splits", "train,validation,test",
              "--csv", f"test={bad_csv}"]
    assert preprocess.main([*common, "--stage", "index"]) == 0

    # break one observed JPEG of each rgb_frames video, chosen from the index so that each breaks
    # exactly one action (a frame no other action of the video observes)
    index = pd.concat([pd.read_parquet(out / "index" / s / "part-00000.parquet") for s in ("train", "validation")])
    expected = {inf_id: "bad_trajectory", str(bad_csv): "bad_csv"}
    for video, reason in ((both, "frame_missing"), (frames_only, "frame_corrupt")):
        rows = index[index.video_id == video]
        others = {int(i) for _, r in rows.iloc[1:].iterrows() for i in r.obs_frame_idx}
        victim = rows.iloc[0]
        frame = next(int(i) for i in victim.obs_frame_idx if int(i) not in others)
        jpeg = epic_root / "P01" / "rgb_frames" / video / f"frame_{frame:010d}.jpg"
        if reason == "frame_missing":
            jpeg.unlink()
        else:
            jpeg.write_bytes(b"\xff\xd8 not really a jpeg")
        expected[victim.narration_id] = reason
    assert preprocess.main([*common, "--stage", "samples"]) == 0

    quarantine = storage.read_parquet_dir(str(out / "quarantine")).to_pylist()
    assert {row["item"]: row["reason"] for row in quarantine} == expected
    assert all(row["detail"] for row in quarantine)

    samples = pd.concat([pd.read_parquet(out / "samples" / s) for s in ("train", "validation")])
    all_actions = set(train.narration_id) | set(pd.read_csv(annotations / "EPIC_100_validation.csv").narration_id)
    assert set(samples.narration_id) == all_actions - set(expected)  # the rest is intact
    sources = samples.groupby("video_id").frame_source.agg(set).to_dict()
    assert sources == {both: {"rgb_frames"}, frames_only: {"rgb_frames"}, mp4_only: {"video"}}
    assert samples.set_index("narration_id").loc[unicode_id, "narration"] == unicode_text
    rgb = samples[samples.frame_source == "rgb_frames"].iloc[0]
    assert rgb.obs_jpeg[-1] == (epic_root / rgb.obs_frame_path[-1]).read_bytes()  # used as they are
    m = manifest(out)
    assert m["splits"]["test"]["index"]["written"] == 0 and m["splits"]["test"]["samples"]["shards"] == 0
    assert m["stages"]["index"]["quarantined_total"]["bad_csv"] == 1
    assert all(reason in REASONS for reason in expected.values())


# ---------------------------------------------------------------------------------------------
# untrusted files: nothing in the code can execute what it reads
# ---------------------------------------------------------------------------------------------
SOURCE_DIRS = ("handsonvlm", "preprocessing", "pipelines", "bench")


def python_sources() -> list[Path]:
    return [p for d in SOURCE_DIRS for p in sorted((REPO_ROOT / d).rglob("*.py"))]


def calls(source: str, name: str) -> list[str]:
    """The argument text of every ``name(...)`` call (balanced parentheses, may span lines); a
    longer name ending the same way (``safe_pickle.loads``) is not a match."""
    found = []
    for match in re.finditer(r"(?<![\w.])" + re.escape(name) + r"\(", source):
        depth, i = 1, match.end()
        while depth and i < len(source):
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            i += 1
        found.append(source[match.end():i - 1])
    return found


def unsafe_deserialisation(text: str, rel: str) -> list[str]:
    """Every call in the source ``text`` (of file ``rel``, relative to the repository) that could
    execute what it reads."""
    problems = []
    for args in calls(text, "torch.load"):
        if not re.search(r"weights_only\s*=\s*True", args):
            problems.append(f"{rel}: torch.load({args.strip()[:60]}) without weights_only=True")
    if rel != "preprocessing/safe_pickle.py":
        for name in ("pickle.load", "pickle.loads", "cPickle.load", "dill.load", "joblib.load",
                     "np.load", "numpy.load"):
            for args in calls(text, name):
                if name.endswith("np.load") and re.search(r"allow_pickle\s*=\s*False", args):
                    continue
                problems.append(f"{rel}: {name}({args.strip()[:60]}) outside preprocessing/safe_pickle.py")
    for args in calls(text, "yaml.load"):
        problems.append(f"{rel}: yaml.load({args.strip()[:60]}): use yaml.safe_load")
    if re.search(r"\byaml\.(unsafe_load|full_load)\b|Loader\s*=\s*yaml\.(Full|Unsafe)?Loader\b", text):
        problems.append(f"{rel}: unsafe YAML loader")
    return problems


def test_no_unsafe_deserialisation_in_the_code():
    sources = python_sources()
    assert len(sources) > 20
    problems = [p for path in sources
                for p in unsafe_deserialisation(path.read_text(), path.relative_to(REPO_ROOT).as_posix())]
    assert problems == []


def test_the_scan_catches_planted_unsafe_calls():
    planted = ("state = torch.load(path)\nx = torch.load(\n    path, map_location='cpu')\n"
               "y = torch.load(path, weights_only=True)\n")
    assert len(unsafe_deserialisation(planted, "pipelines/planted.py")) == 2
    assert calls("cfg = yaml.load(open(p))", "yaml.load") == ["open(p)"]
    assert calls("label = safe_pickle.loads(data)", "pickle.loads") == []
    assert calls("label = pickle.loads(data)", "pickle.loads") == ["data"]
    assert len(unsafe_deserialisation("label = pickle.loads(data)", "pipelines/planted.py")) == 1
    assert unsafe_deserialisation("label = pickle.loads(data)", "preprocessing/safe_pickle.py") == []


def test_models_are_saved_as_safetensors_only(tmp_path):
    from handsonvlm.config import load_model_config
    from handsonvlm.model import HandsOnVLM

    HandsOnVLM(load_model_config("tiny")).save_pretrained(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").rglob("*") if p.is_file())
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))], files


# ---------------------------------------------------------------------------------------------
# the end of a good run: a model upload the artifact store refuses
# ---------------------------------------------------------------------------------------------
def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound, then closed: nothing listens there afterwards
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refused_model_upload_ends_the_run_failed_and_says_why(tmp_path, monkeypatch):
    """pipelines/train.publish_and_finish, what the launcher runs after ``fit()``, against an MLflow
    experiment whose artifact store (S3 through boto3) is an endpoint that refuses connections: the
    run ends FAILED with the tag ``error`` and the error comes back for the job's message and exit code;
    with ``train.log_model=uri`` the same export is recorded by its URI and registered from it."""
    from mlflow.tracking import MlflowClient

    from pipelines import tracking, train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for key, value in {"MLFLOW_TRACKING_URI": uri, "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}",
                       "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard",
                       tracking.MODEL_CACHE_ENV: str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(uri)
    experiment = client.create_experiment("refusing-store", artifact_location="s3://bucket/x")
    export = tmp_path / "models" / "run-a"
    export.mkdir(parents=True)
    (export / "model.safetensors").write_bytes(os.urandom(4096))
    (export / "config.json").write_text("{}")
    settings = {"log_model": "auto", "register_model": "handsonvlm"}  # auto: a small local export is uploaded

    run_id = client.create_run(experiment).info.run_id
    start = time.perf_counter()
    ok, model_uri, error = train.publish_and_finish(client, run_id, True, str(export), settings)
    elapsed = time.perf_counter() - start
    run = client.get_run(run_id)
    assert not ok and model_uri is None and run.info.status == "FAILED", run.info.status
    assert run.data.tags[train.ERROR_TAG] == error[:tracking.MAX_TAG_LENGTH]
    assert "recording it in MLflow failed" in error and str(export) in error and "--run-name" in error
    assert run.data.tags[tracking.MODEL_URI_TAG] == str(export)  # where the intact export is, on record
    assert not client.search_registered_models()
    print(f"refused upload reported in {elapsed:.1f} s: {error[:160]}")

    # a training that failed is FAILED with its own error, and nothing is uploaded
    failed_id = client.create_run(experiment).info.run_id
    assert train.publish_and_finish(client, failed_id, False, str(export), settings, "training failed: boom") == (
        False, None, "training failed: boom")
    failed = client.get_run(failed_id)
    assert failed.info.status == "FAILED" and failed.data.tags[train.ERROR_TAG] == "training failed: boom"

    # log_model uri: nothing goes through the refusing store; the version's source is the export itself
    uri_id = client.create_run(experiment).info.run_id
    ok, model_uri, error = train.publish_and_finish(client, uri_id, True, str(export), {**settings, "log_model": "uri"})
    assert ok and error is None and model_uri == "models:/handsonvlm/1"
    assert client.get_run(uri_id).info.status == "FINISHED"
    assert client.get_model_version("handsonvlm", "1").source == str(export)
    resolved = Path(tracking.resolve_model("models:/handsonvlm/1"))
    assert (resolved / "model.safetensors").read_bytes() == (export / "model.safetensors").read_bytes()


# ---------------------------------------------------------------------------------------------
# a training worker killed mid-run; no secrets in what the run records
# ---------------------------------------------------------------------------------------------
FAULT_STEP, CHECKPOINT_EVERY, MAX_STEPS = 3, 2, 4


@pytest.fixture(scope="module")
def faulted_training(synth_data, tmp_path_factory):
    """pipelines/train.py --max-failures 1 in its own Ray, with the fault hook of
    pipelines/train_worker.py killing the last rank right after step 3 (checkpoints at steps 2 and 4),
    and fake secrets in its environment."""
    work = tmp_path_factory.mktemp("faulted")
    name = f"fault-{uuid.uuid4().hex[:8]}"
    uri = f"sqlite:///{work / 'mlflow.db'}"
    marker = work / "fault_fired"
    env = isolated_env(MLFLOW_TRACKING_URI=uri, HANDSONVLM_FAULT_KILL_AT_STEP=str(FAULT_STEP),
                       HANDSONVLM_FAULT_MARKER=str(marker), **FAKE_SECRETS)
    argv = [sys.executable, "pipelines/train.py", "--config", "tiny", "--data", str(synth_data), "--run-name", name,
            "--storage", str(work / "ray_results"), "--max-steps", str(MAX_STEPS), "--max-failures", "1",
            "--num-cpus", "2", "--set", f"train.export_dir={work / 'models'}", "--set", "train.micro_batch_size=2",
            "--set", "train.log_every=1", "--set", f"train.checkpoint_every={CHECKPOINT_EVERY}",
            "--set", "train.lr=3e-3"]
    run = IsolatedRun(argv, work / "train.log", env)
    rc = run.wait(timeout=540)
    print(f"\n[fault] training with one worker killed after step {FAULT_STEP}: {run.seconds:.1f} s, "
          f"peak RSS of the process tree {run.peak_total_rss / 2**20:.0f} MiB")
    return {"rc": rc, "run": run, "name": name, "uri": uri, "marker": marker, "work": work}


@pytest.mark.ray
def test_training_survives_a_killed_worker(faulted_training):
    f = faulted_training
    log = f["run"].output()
    assert f["rc"] == 0, log[-4000:]
    assert f["marker"].exists() and f"killed after step {FAULT_STEP}" in f["marker"].read_text()
    assert f"resumed at step {CHECKPOINT_EVERY}" in log  # from the last checkpoint before the kill

    run, history = metric_history(f["uri"], f["name"])
    assert run.info.status == "FINISHED"
    assert history["train/restarts"] == {CHECKPOINT_EVERY: 1.0}  # the restart is on record
    assert sorted(history["train/loss"]) == list(range(1, MAX_STEPS + 1))  # the same step count
    assert sorted(history["eval/fixed_batch_loss"]) == [0, *range(CHECKPOINT_EVERY, MAX_STEPS + 1, CHECKPOINT_EVERY)]
    # the restored model is the checkpointed one: the same loss on the fixed batch
    restored, saved = history["restore/fixed_batch_loss"], history["eval/fixed_batch_loss"]
    assert restored[CHECKPOINT_EVERY] == pytest.approx(saved[CHECKPOINT_EVERY], rel=1e-6)
    # steps redone after the restart reproduce the values logged before the kill
    from mlflow.tracking import MlflowClient

    step3 = [m.value for m in MlflowClient(f["uri"]).get_metric_history(run.info.run_id, "train/loss")
             if m.step == FAULT_STEP]
    assert 1 <= len(step3) <= 2 and max(step3) == pytest.approx(min(step3), rel=1e-5)
    # the last checkpoint is the finished run's
    import torch

    checkpoints = sorted(p for p in (f["work"] / "ray_results" / f["name"]).glob("checkpoint_*") if p.is_dir())
    state = torch.load(checkpoints[-1] / "rank_0_state.pt", weights_only=True)
    assert state["progress"]["step"] == MAX_STEPS
    assert (f["work"] / "models" / f["name"] / "model.safetensors").exists()


def secret_findings(items: dict[str, str], where: str) -> list[str]:
    found = []
    for key, value in items.items():
        if any(word in key.lower() for word in SECRET_KEY_WORDS):
            found.append(f"{where}: secret-looking key {key}")
        for secret in FAKE_SECRETS.values():
            if secret in str(value) or secret in key:
                found.append(f"{where}: {key} holds a secret value")
        if re.search(r"(password|token|secret|api_key)\s*[=:]\s*\S+", str(value), re.I):
            found.append(f"{where}: {key} looks like a credential assignment")
    return found


@pytest.mark.ray
def test_no_secrets_in_mlflow_params_tags_configs_or_logs(faulted_training):
    f = faulted_training
    assert f["rc"] == 0, f["run"].output()[-4000:]
    run, _ = metric_history(f["uri"], f["name"])
    assert len(run.data.params) > 20  # the whole resolved config was logged, so the scan has something to read
    findings = secret_findings(run.data.params, "param") + secret_findings(run.data.tags, "tag")
    for path in (f["work"] / "models" / f["name"]).rglob("*.json"):  # config, tokenizer files
        findings += [f"exported {path.name} holds {k}" for k, v in FAKE_SECRETS.items() if v in path.read_text()]
    log = f["run"].output()
    findings += [f"training log holds {k}" for k, v in FAKE_SECRETS.items() if v in log]
    assert findings == []


def test_the_secret_scan_catches_planted_secrets():
    planted = {"train.lr": "0.001", "aws_secret_access_key": "x", "note": f"key {FAKE_SECRETS['HF_TOKEN']}",
               "uri": "postgresql://mlflow:password=hunter2@db"}
    assert len(secret_findings(planted, "param")) == 3


# ---------------------------------------------------------------------------------------------
# services bound to loopback
# ---------------------------------------------------------------------------------------------
@pytest.mark.ray
def test_local_ray_serves_no_dashboard_beyond_loopback(ray_local):
    """The pipelines' local Ray (pipelines.common.init_ray, which this session's Ray comes from)
    answers no dashboard API on any non-loopback socket of its processes."""
    import urllib.request

    me = psutil.Process()
    listening = []
    for p in me.children(recursive=True):
        try:
            listening += [c.laddr for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    assert listening  # the session's Ray is up and its sockets are visible
    exposed = [a for a in listening if a.ip not in ("127.0.0.1", "::1")]
    dashboards = []
    for address in exposed:
        host = "127.0.0.1" if address.ip in ("0.0.0.0", "::") else address.ip
        try:
            body = urllib.request.urlopen(f"http://{host}:{address.port}/api/version", timeout=2).read(2000)
        except Exception:
            continue
        if b"ray_version" in body:
            dashboards.append(address)
    assert dashboards == []


# ---------------------------------------------------------------------------------------------
# evaluation of a clip that never emits a hand token
# ---------------------------------------------------------------------------------------------
def never_hand_or_eos(model) -> None:
    """Make the LM unable to emit <hand_traj> or the end token (the logits of both are -inf), as
    an untrained or broken model that rambles until the token limit."""
    import torch

    banned = torch.tensor([model.tokens.hand, model.tokens.eos])

    def ban(_module, _inputs, logits):
        return logits.index_fill(-1, banned.to(logits.device), float("-inf"))

    model.lm.lm_head.register_forward_hook(ban)


def test_generation_without_hand_tokens_stops_at_the_token_limit():
    import torch

    from handsonvlm.config import load_model_config
    from handsonvlm.data import encode_conversation, pad_sequences, rbhp_turns
    from handsonvlm.generation import generate as generate_tokens
    from handsonvlm.model import HandsOnVLM

    torch.manual_seed(0)
    model = HandsOnVLM(load_model_config("tiny")).eval()
    never_hand_or_eos(model)
    turns = rbhp_turns("Where should my hand move if I want to drink?", model.cfg, with_answer=False)
    ids = [encode_conversation(model.tokenizer, turns, model.cfg)[0]]
    input_ids, mask = pad_sequences(ids, model.tokens.pad, side="left")
    size = model.vision.image_size
    frames = torch.zeros(1, model.cfg.num_obs_frames, 3, size, size)
    result = generate_tokens(model, input_ids, mask, frames=frames, num_samples=2, max_new_tokens=12, temperature=0.7)
    assert result.token_ids.shape == (1, 2, 12)
    assert result.hand_counts.tolist() == [[0, 0]] and not result.complete.any()
    assert torch.isnan(result.trajectories).all()


TOKENLESS_CLIPS = 3


@pytest.fixture(scope="module")
def tokenless_evaluation(tmp_path_factory, ray_local, synth_data):
    """pipelines/evaluate.py over 3 clips with an untrained tiny model that can emit neither
    <hand_traj> nor the end token (6 new tokens at most)."""
    import torch

    from handsonvlm.config import load_model_config
    from handsonvlm.model import HandsOnVLM
    from pipelines import evaluate

    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("tiny-untrained")
    HandsOnVLM(load_model_config("tiny")).save_pretrained(model_dir)

    def rambling(model, jobs, frames, settings):  # pickled by value into the Ray Data actors
        import torch as _torch

        from pipelines import evaluate as evaluate_job

        if not getattr(model, "_never_hand", False):
            banned = _torch.tensor([model.tokens.hand, model.tokens.eos])
            model.lm.lm_head.register_forward_hook(
                lambda _m, _i, logits: logits.index_fill(-1, banned.to(logits.device), float("-inf")))
            model._never_hand = True
        return evaluate_job.generate_for_jobs(model, jobs, frames, settings)

    run_name = f"eval-tokenless-{uuid.uuid4().hex[:6]}"
    rc = evaluate.main(["--model", str(model_dir), "--data", str(synth_data), "--split", "train", "--task", "vhp",
                        "--limit", str(TOKENLESS_CLIPS), "--max-new-tokens", "6", "--num-samples", "1",
                        "--temperature", "0", "--run-name", run_name, "--gallery", "0", "--no-mlflow"],
                       generate_fn=rambling)
    assert rc == 0
    out_dir = synth_data / "eval" / run_name
    return {"metrics": json.loads((out_dir / "metrics.json").read_text())["metrics"],
            "predictions": pq.read_table(out_dir / "predictions.parquet").to_pylist()}


@pytest.mark.ray
def test_evaluation_counts_a_tokenless_clip_as_failed(tokenless_evaluation):
    metrics, predictions = tokenless_evaluation["metrics"], tokenless_evaluation["predictions"]
    assert metrics["vhp/n_clips"] == TOKENLESS_CLIPS and metrics["vhp/n_failed"] == TOKENLESS_CLIPS
    assert metrics["vhp/coverage"] == 0.0 and metrics["vhp/complete_only/n_clips"] == 0
    assert np.isfinite(metrics["vhp/ade"])  # scored as the last-position baseline, not dropped
    assert len(predictions) == TOKENLESS_CLIPS
    for p in predictions:
        assert p["error"].startswith("no complete") and p["hand_counts"] == [0] and p["complete"] == [False]
        assert np.isnan(np.asarray(p["trajectories"], float)).all()


@pytest.mark.ray
def test_tokenless_clips_are_not_counted_as_errors(tokenless_evaluation):
    assert tokenless_evaluation["metrics"]["vhp/n_errors"] == 0  # documented: n_errors = generation raised
