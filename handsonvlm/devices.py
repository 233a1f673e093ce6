"""Which device a stage runs on: the rules behind ``train.device``, ``eval.device`` and ``predict.device``.

A preset declares its device (``cuda`` for the 7B/13B presets, ``auto`` for tiny); nothing here looks at
a GPU or at Ray itself: callers pass what they see (a Ray cluster's GPU count now, whether an autoscaler
can add nodes, this machine's CUDA devices), so the rules are plain functions tested without either.
A GPU preset never silently runs on CPU: where GPUs cannot come, the error names the override.
"""

from __future__ import annotations


class DeviceError(RuntimeError):
    """A run configured for GPUs that cannot get them."""


def _gpus(count: float) -> str:
    return f"{count:g} GPU" + ("" if count == 1 else "s")


def resolve_use_gpu(device: str, gpus_available: float, num_workers: int, can_autoscale: bool,
                    what: str = "train", where: str = "this Ray", unit: str = "worker") -> bool:
    """Whether ``num_workers`` workers (``unit``: what they are called in messages) run on GPUs (one
    each), from ``<what>.device``:

    * ``auto``: if ``gpus_available`` covers every worker now;
    * ``cuda``: always; raises :class:`DeviceError` when they are missing and nothing can add them
      (a local Ray: ``can_autoscale`` False), rather than running a GPU preset on CPU;
    * ``cpu``: never."""
    if device == "cpu":
        return False
    if device == "auto":
        return gpus_available >= num_workers
    if gpus_available < num_workers and not can_autoscale:
        raise DeviceError(f"{what}.device=cuda needs {_gpus(num_workers)} (one per {unit}) and {where} has "
                          f"{gpus_available:g}: run it on a GPU cluster (ray job submit ...), or force CPU with "
                          f"--set {what}.device=cpu (slow; meant for smoke tests)")
    return True


def backend_for(use_gpu: bool) -> str:
    """torch.distributed's backend and DeepSpeed's accelerator follow the device."""
    return "nccl" if use_gpu else "gloo"


def eval_actors(device: str, replicas: int | None, gpus_now: float, can_autoscale: bool,
                where: str = "this Ray") -> tuple[bool, int]:
    """``(use_gpu, replicas)`` of the evaluator's model replicas (Ray actors, one GPU each on CUDA), from
    ``eval.device`` and ``eval.replicas`` (None: as many as the cluster has GPUs now, at least one;
    one on CPU):

    * ``cuda``: every replica requests a GPU, so that an autoscaler whose GPU groups start at 0 nodes
      provides them; on a cluster that cannot add nodes (a local Ray) missing GPUs are a
      :class:`DeviceError` naming the override, instead of actors that wait forever;
    * ``auto``: CUDA when the cluster has a GPU for every replica now, else CPU: a convenience for
      local runs, since on an autoscaling cluster "now" may be 0 GPUs (presets that need GPUs say
      ``cuda``);
    * ``cpu``: CPU actors (one CPU each)."""
    wanted = replicas if replicas is not None else max(1, int(gpus_now))
    use_gpu = resolve_use_gpu(device, gpus_now, wanted, can_autoscale, what="eval", where=where, unit="replica")
    return use_gpu, wanted if replicas is not None or use_gpu else 1


# what a CPU evaluation leaves to Ray Data's read tasks: CPU replicas that took every CPU would wait,
# idle, for rows that no read task can be scheduled to produce (a silent hang on a 2-CPU machine)
READ_CPUS = 1.0


def cpus_per_cpu_replica(cluster_cpus: float, replicas: int) -> float:
    """The CPUs each of ``replicas`` CPU model replicas requests on a Ray of ``cluster_cpus``: one, or
    an equal share of what is left after :data:`READ_CPUS` for the reads when one each would not leave
    it (2 replicas on 2 CPUs: 0.5 each). PyTorch's threads do not follow Ray's accounting: this only
    keeps the actors and the reads schedulable together."""
    return min(1.0, max(cluster_cpus - READ_CPUS, READ_CPUS) / replicas)


def check_local_device(device: str, cuda_devices: int, override: str = "--device cpu") -> None:
    """Raise :class:`DeviceError` when ``device`` (``cuda``, ``cuda:N``, a resolved ``predict.device``)
    needs a CUDA device this machine (``cuda_devices`` visible) does not have, naming ``override``."""
    if not str(device).startswith("cuda"):
        return
    index = int(str(device).partition(":")[2] or 0)
    if index >= cuda_devices:
        raise DeviceError(f"device {device}: this machine has {_gpus(cuda_devices)} visible to PyTorch; "
                          f"run on a GPU machine, or force CPU with {override} (slow)")
