"""Test-wide settings: offline, CPU-only, Ray without auth on loopback, shared real data paths."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HANDSONVLM_SHARED", REPO_ROOT.parent / "shared"))
EPIC_ANNOTATIONS = SHARED / "data" / "epic100_annotations"
HANDSONVLM_ASSETS = SHARED / "data" / "handsonvlm_assets"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, 1 GiB object store, no dashboard)."""
    import ray

    from pipelines.common import init_ray

    init_ray(num_cpus=2, object_store_memory=1 << 30)
    yield ray
    ray.shutdown()


RENDEZVOUS_FILE_ENV = "HANDSONVLM_TEST_RENDEZVOUS"


def rendezvous_env(directory: Path, world: int) -> dict[str, str]:
    """The environment of a test's torch.distributed ranks (add RANK and LOCAL_RANK per process): a
    file rendezvous in ``directory`` for :func:`init_gloo_from_env`. A free port picked by the parent
    could be taken by another process (a Ray of an earlier test) before rank 0 bound it: EADDRINUSE on
    rank 0 and the other rank waiting until the test's timeout. MASTER_ADDR/PORT are still set, since
    DeepSpeed's init_distributed looks for them, but nothing binds the port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {RENDEZVOUS_FILE_ENV: str(Path(directory) / "rendezvous"), "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def init_gloo_from_env() -> None:
    """In a rank started with :func:`rendezvous_env`: the gloo process group through its file."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="file://" + os.environ[RENDEZVOUS_FILE_ENV],
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def run_to_completion(commands: list[tuple[list[str], dict[str, str], Path]], timeout: float) -> None:
    """Start every ``(argv, env, log)`` at once (the ranks of one job must all be up to meet), wait for all of
    them up to ``timeout`` seconds each, kill what is still running, and fail with the log tail of the
    first process that did not exit 0."""
    procs = []
    for argv, env, log_path in commands:
        log = open(log_path, "w")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    for (proc, _), (_, _, log_path) in zip(procs, commands):
        assert proc.returncode == 0, Path(log_path).read_text()[-4000:]


def isolated_env(**extra: str) -> dict[str, str]:
    """The test environment minus RAY_ADDRESS (so that a subprocess starts a Ray of its own instead
    of joining this session's), with the repository importable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory, ray_local) -> Path:
    """Preprocessed SynthKitchens shared by the session: 3 videos x 4 actions, seed 0, i.e. 2 train
    shards (one per training worker) and 1 validation shard, written by the real preprocessing
    job. Read-only by convention: write evaluation outputs under unique run names and caches into
    a copy."""
    from pipelines import preprocess
    from synthkitchens.generate import generate, preprocess_source_args

    root = tmp_path_factory.mktemp("synth_data")
    tree, out = root / "synth", root / "data"
    generate(str(tree), videos=3, actions_per_video=4, seed=0, workers=1)
    assert preprocess.main([*preprocess_source_args(tree), "--out", str(out), "--no-progress"]) == 0
    return out


# ---- what an operator reads: repeated and error-level lines of a run's output -------------------
MAX_REPEATS = 2  # the two training workers may each print the same line once
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
RAY_PROCESS_PREFIX = re.compile(r"^\(\w+ pid=\d+(?:, ip=[\d.]+)?\)\s*")  # "(RayTrainWorker pid=12) " of log_to_driver
TIMESTAMPS = re.compile(r"^\[?\d{4}[-/]\d\d[-/]\d\d[ T][\d:,.]+(?: [A-Z] \d+ \d+\])?\s*")
RAY_CPP_ERROR = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,.]+ E \d+ \d+\]")
ERROR_WORD = re.compile(r"\bERROR\b")
PROGRESS_LINE = re.compile(r"^\[train\] step \d+/\d+ ")


def message(line: str) -> str:
    """A line of the combined output without colours, Ray's process prefix and timestamps: what
    repeats when the same message is printed again."""
    line = RAY_PROCESS_PREFIX.sub("", ANSI_ESCAPE.sub("", line).strip())
    return TIMESTAMPS.sub("", line)
TQDM_LINE = re.compile(r"\d+%\|")  # a progress bar's redraws


def noisy_lines(output: str) -> tuple[dict[str, int], list[str]]:
    """What an operator should not see in a run's combined output: the messages printed more than
    :data:`MAX_REPEATS` times (progress lines and blank lines aside) and the error-level lines."""
    lines = [message(line) for line in output.splitlines() if line.strip()]
    counted = Counter(line for line in lines if line and not PROGRESS_LINE.match(line) and not TQDM_LINE.search(line))
    repeated = {line: n for line, n in counted.items() if n > MAX_REPEATS}
    errors = [line for line in output.splitlines() if RAY_CPP_ERROR.search(line) or ERROR_WORD.search(line)]
    return repeated, errors
