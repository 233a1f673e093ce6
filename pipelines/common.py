"""Shared set-up for the Ray entry points: logging and connecting to (or starting) Ray."""

from __future__ import annotations

import argparse
import logging
import os

DEFAULT_OBJECT_STORE_BYTES = 1 << 30  # a bounded store leaves room for workers on small machines
LOCAL_DASHBOARD_HOST = "127.0.0.1"


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def init_ray(address: str | None = None, num_cpus: int | None = None,
             object_store_memory: int | None = DEFAULT_OBJECT_STORE_BYTES) -> None:
    """Connect to a cluster, or start a private local Ray.

    Under ``ray job submit`` (or with ``--ray-address``/``RAY_ADDRESS``) the job joins the cluster
    and resource arguments are ignored, as Ray requires. Otherwise a local Ray is started with a
    bounded object store; ``address="local"`` also ignores a stale ``ray_current_cluster`` file.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env_vars = {k: os.environ[k] for k in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE",
                                           "MLFLOW_TRACKING_URI") if k in os.environ}
    if address and address != "local":
        # On a cluster (or under `ray job submit`) the job's runtime env applies; adding one here
        # would conflict with it.
        ray.init(address=address)
        return
    # No dashboard locally; should one be turned on, it listens on loopback only (Ray's own default
    # is also 127.0.0.1, pinned here so that a changed default cannot expose it).
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory,
             include_dashboard=False, dashboard_host=LOCAL_DASHBOARD_HOST, log_to_driver=True,
             runtime_env={"env_vars": env_vars} if env_vars else None)


def positive_int(text: str) -> int:
    """argparse type for counts that must be >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
