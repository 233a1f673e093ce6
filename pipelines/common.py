"""Shared set-up for the Ray entry points: logging and connecting to (or starting) Ray."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from handsonvlm.devices import DeviceError, backend_for, resolve_use_gpu  # noqa: F401 (the entry points' names)
from preprocessing import storage

DEFAULT_OBJECT_STORE_BYTES = 1 << 30  # a bounded store leaves room for workers on small machines
LOCAL_DASHBOARD_HOST = "127.0.0.1"
DRIVER_ENV_FOR_WORKERS = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "MLFLOW_TRACKING_URI")

# A private local Ray runs on one machine without a dashboard, hence without Ray's State API. Two Ray
# Train helpers assume a cluster; on a cluster (`ray job submit`) its own settings apply instead.
LOCAL_RAY_ENV = {
    # The preemption watcher follows node drains (spot instances), which a local Ray never has. Ray creates
    # it restartable with actor handles as constructor arguments, which Ray core reports as an ERROR line
    # on every training (core_worker.cc "constructor arguments in the object store", ray-project/ray#53727).
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray Train's PlacementGroupCleaner asks the State API every second whether the training controller
    # still lives. Left to guess, the State API client of a worker picks "the" Ray instance of the machine
    # (ConnectionError and a traceback when several run, e.g. tests beside a job) and that instance's
    # dashboard address, where another Ray's dashboard may answer that our controller does not exist, and
    # the cleaner would remove our placement group. An address nothing listens on makes every query fail
    # fast and harmlessly instead.
    "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:0",
}
# ... and each failed query logs a warning from that logger, about one per second of training. The cleaner
# is of no use here anyway (it frees a dead controller's resources on a cluster that outlives it; a local
# Ray ends with its driver), so its warnings are silenced in the workers of a local Ray.
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


LOCAL_RAY = {"started": False}  # set by init_ray when it starts a private local Ray (no autoscaler)


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
    if address and address != "local":
        # On a cluster (or under `ray job submit`) the job's runtime env applies; adding one here
        # would conflict with it.
        ray.init(address=address)
        return
    env_vars = {**LOCAL_RAY_ENV, **{k: os.environ[k] for k in DRIVER_ENV_FOR_WORKERS if k in os.environ}}
    # No dashboard locally; should one be turned on, it listens on loopback only (Ray's own default
    # is also 127.0.0.1, pinned here so that a changed default cannot expose it).
    # logging_level WARNING: Ray's INFO lines on the driver ("Started a local Ray instance", Ray Data's
    # start/plan/finish of each execution) repeat in every stage of a run; the stages print their own.
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory,
             include_dashboard=False, dashboard_host=LOCAL_DASHBOARD_HOST, log_to_driver=True,
             logging_level=logging.WARNING,
             runtime_env={"env_vars": env_vars, "worker_process_setup_hook": configure_local_worker_logging})
    LOCAL_RAY["started"] = True


def configure_local_worker_logging() -> None:
    """Ray's ``worker_process_setup_hook`` of a local Ray (see :func:`init_ray`), run in each worker
    process before its tasks and actors: mutes the PlacementGroupCleaner, see :data:`LOCAL_RAY_ENV`."""
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)


def add_ray_flags(parser: argparse.ArgumentParser) -> None:
    """``--ray-address`` and ``--num-cpus``, the arguments of :func:`init_ray` every Ray entry point takes."""
    parser.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")


def positive_int(text: str) -> int:
    """argparse type for counts that must be >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def absolute_uri(uri: str) -> str:
    """A local path made absolute (Ray workers and Tune trials run in other directories); a URI as is."""
    return storage.join(uri) if storage.is_local(uri) else uri


def add_preset_flags(parser: argparse.ArgumentParser, section: str, default: str) -> None:
    """``--config PRESET`` and repeatable ``--set SECTION.KEY=VALUE`` for an entry point that reads
    one section of a preset (see :func:`load_config_section`); ``default`` says what a missing
    ``--config`` means."""
    parser.add_argument("--config", help=f"preset name in configs/ or a YAML path (default: {default})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a key of the preset's {section}: section, e.g. {section}.seed=1")


def load_config_section(parser: argparse.ArgumentParser, args: argparse.Namespace, cls, section: str,
                        names) -> object:
    """The typed ``section`` of ``args.config``, then ``args.set``, then the flags ``names`` of
    :func:`handsonvlm.config.add_section_flags` (later wins). A bad key or value is a usage error
    (argparse exits with 2), as a bad flag is."""
    from handsonvlm.config import load_section, section_overrides

    foreign = [item for item in args.set if not item.startswith(f"{section}.")]
    if foreign:
        parser.error(f"--set takes {section}.* keys only, got {foreign}")
    try:
        return load_section(cls, args.config, section, [*args.set, *section_overrides(args, section, names)])
    except (ValueError, TypeError, FileNotFoundError) as exc:
        parser.error(str(exc))


def trained_preset(model_dir: str, default: str) -> str:
    """The preset an exported model was trained from: each preset names its model after itself
    (``model.name``), which the export keeps; ``default`` when that name is not a preset in configs/
    (or ``model_dir`` is no export)."""
    from handsonvlm.config import CONFIG_DIR
    from handsonvlm.inference import ModelLoadError, read_model_config

    try:
        name = read_model_config(model_dir).name
    except (ModelLoadError, OSError):
        return default
    return name if Path(name).name == name and (CONFIG_DIR / f"{name}.yaml").is_file() else default
