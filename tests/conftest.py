"""Test-wide settings: offline, CPU-only, Ray without auth on loopback, shared real data paths."""

from __future__ import annotations

import os
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
