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
