"""How the training workers talk to each other on GPUs: NCCL/EFA environment defaults, the
process-group timeout of the groups DeepSpeed creates, and ZeRO++ hpZ's placement rule.

One definition, read by the launcher (pipelines/train.py puts :func:`nccl_env` into the Ray Train
workers' runtime environment) and by the worker (:func:`set_subgroup_timeout`,
:func:`check_hpz_placement`). docs/CLUSTER.md, "Networking", explains each value. Nothing here
imports torch at module level, so the launcher can use it without the training stack.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta

# NCCL/libfabric defaults of every GPU training worker; a variable already set in the launcher's
# environment (e.g. ``ray job submit --runtime-env-json '{"env_vars": {"NCCL_DEBUG": "INFO"}}'``) wins.
NCCL_ENV_DEFAULTS = {
    # NCCL's warnings (a network plugin that failed to load, a fallback to sockets) reach the worker
    # logs; INFO prints the chosen transport per channel when debugging a slow or hung run.
    "NCCL_DEBUG": "WARN",
    # torch's watchdog aborts a collective older than train.pg_timeout_s and ends the process, so Ray
    # Train sees a failed worker and restarts the group from its checkpoint instead of hanging on.
    # (Ray sets it too when unset; torch >= 2.2 reads this name, NCCL_ASYNC_ERROR_HANDLING is deprecated.)
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    # Bootstrap and socket traffic on the host's own interface: the containers run with the host's
    # network, which also has loopback and docker bridges (prefix match, "^" excludes).
    "NCCL_SOCKET_IFNAME": "^lo,docker",
    # EFA through aws-ofi-nccl (cluster/Dockerfile): libfabric's EFA provider with GPUDirect RDMA (p4d,
    # p4de, p5). On a node without EFA the plugin finds no provider and NCCL falls back to its own
    # sockets transport (one WARN line): set FI_PROVIDER to keep another libfabric provider.
    "FI_PROVIDER": "efa",
    "FI_EFA_USE_DEVICE_RDMA": "1",
    # Ray and PyTorch fork worker processes; libfabric must not let a child touch registered memory.
    "FI_EFA_FORK_SAFE": "1",
}


def nccl_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """:data:`NCCL_ENV_DEFAULTS`, each overridden by ``environ``'s value (default: ``os.environ``)."""
    environ = os.environ if environ is None else environ
    return {name: environ.get(name, default) for name, default in NCCL_ENV_DEFAULTS.items()}


def set_subgroup_timeout(seconds: int) -> None:
    """Make ``seconds`` the timeout of every process group created from now on in this process.

    Ray Train creates the world group with ``TorchConfig(timeout_s=train.pg_timeout_s)``, but a later
    ``torch.distributed.new_group`` without a timeout (DeepSpeed's groups: ZeRO++ hpZ's partition groups,
    its data-parallel clones) takes torch's built-in default instead, 10 minutes for NCCL and 30 for
    gloo. DeepSpeed passes no timeout, so the defaults are set where torch reads them."""
    from torch.distributed import distributed_c10d

    timeout = timedelta(seconds=seconds)
    distributed_c10d.default_pg_timeout = timeout
    if distributed_c10d.default_pg_nccl_timeout is not None:  # None in a torch built without NCCL
        distributed_c10d.default_pg_nccl_timeout = timeout


def check_hpz_placement(hpz_partition_size: int | None, local_world_size: int, world_size: int) -> None:
    """hpZ groups are runs of consecutive ranks (DeepSpeed), and Ray Train numbers the ranks node by node:
    the groups stay inside nodes, where hpZ's all-gathers are meant to run, only when every node holds a
    multiple of the group size. Raises ValueError otherwise (e.g. 16 workers packed 8 + 4 + 4 with groups
    of 8)."""
    if (hpz_partition_size or 1) <= 1:
        return
    if world_size % hpz_partition_size or local_world_size % hpz_partition_size:
        raise ValueError(f"train.zero_hpz_partition_size={hpz_partition_size}: this node holds {local_world_size} "
                         f"of the {world_size} workers, not a multiple of it, so an hpZ group would span nodes; "
                         "give every node the same number of workers (train.placement=spread, or whole nodes "
                         "with train.num_workers a multiple of the GPUs per node) or change the group size")
