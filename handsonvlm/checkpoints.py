"""Training checkpoints sized for 7B/13B: which files a rank needs, the run's layout, restoring one rank.

A checkpoint is one directory in Ray Train's storage that every rank has uploaded its files into:
DeepSpeed's ``<tag>/`` folder (``mp_rank_00_model_states.pt``: ZeRO-2's whole module, shared;
``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt``: rank r's optimizer partition; ZeRO-3 adds
``zero_pp_rank_<r>_mp_rank_00_model_states.pt``), the training's per-rank state
(``rank_<r>_state.pt``: progress and RNG) and :data:`META_FILE` (the layout, written by rank 0).
At 7B the whole directory is ~95 GB and a rank needs its own partition plus the shared files
(DeepSpeed reads no other rank's file unless ``elastic_checkpoint`` is on, which the presets leave
off): :func:`restore_rank_files` copies exactly those.

DeepSpeed cannot re-partition ZeRO optimizer state for another world size, so a checkpoint only
resumes with the world size and ZeRO stage that wrote it: :func:`check_layout` says so, and what to
do instead (docs/RELIABILITY.md, "Changing the world size").
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import pyarrow.fs as pafs
import torch
import torch.distributed as dist

META_FILE = "handsonvlm_checkpoint.json"
RANK_STATE = "rank_{rank}_state.pt"  # a rank's progress and RNG states, beside DeepSpeed's files
DEEPSPEED_TAG = "ckpt"  # DeepSpeed's checkpoint tag: the folder of its files inside the checkpoint
# The data-parallel rank in a per-rank file name: DeepSpeed's ZeRO partitions and the rank state file.
# Everything else (mp_rank_00_model_states.pt with model parallelism 1, "latest", zero_to_fp32.py, the
# layout) is shared by all ranks.
RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(?P<zero>\d+)_|^rank_(?P<state>\d+)_state\.pt$")
RANK_STATE_FILE = re.compile(r"^rank_\d+_state\.pt$")
MODEL_STATES_SUFFIX = "_model_states.pt"  # DeepSpeed's module states (per rank under ZeRO-3)
FP32_SCRIPT = "zero_to_fp32.py"  # DeepSpeed copies its consolidation script into every checkpoint
MB = 1 << 20
DIGEST_CHARS = 16  # of a sha256 hex digest naming a checkpoint's restore folder


class CheckpointMismatch(RuntimeError):
    """A checkpoint written by another world size or ZeRO stage than the run resuming from it."""


@dataclass(frozen=True)
class CheckpointLayout:
    """What a checkpoint's files are partitioned by; saved as :data:`META_FILE`."""

    world_size: int
    zero_stage: int
    step: int = 0
    deepspeed_tag: str = DEEPSPEED_TAG


def write_layout(directory: str, layout: CheckpointLayout) -> None:
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(asdict(layout), f, indent=1, sort_keys=True)


def list_checkpoint(fs: pafs.FileSystem, path: str) -> list[str]:
    """Every file under the checkpoint directory ``path`` of ``fs``, relative to it ('/'-separated), sorted."""
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    root = path.rstrip("/") + "/"
    return sorted(i.path[len(root):] if i.path.startswith(root) else posixpath.relpath(i.path, path)
                  for i in infos if i.type == pafs.FileType.File)


def rank_of(relative: str) -> int | None:
    """The rank a checkpoint file belongs to (by its name), None for a file every rank reads."""
    match = RANK_FILE.search(posixpath.basename(relative))
    if match is None:
        return None
    return int(match["zero"] if match["zero"] is not None else match["state"])


def files_for_rank(files: list[str], rank: int) -> tuple[list[str], list[str]]:
    """(rank ``rank``'s own files, the shared files) among a checkpoint's relative ``files``."""
    own = [f for f in files if rank_of(f) == rank]
    shared = [f for f in files if rank_of(f) is None]
    return own, shared


def read_layout(fs: pafs.FileSystem, path: str, files: list[str] | None = None) -> CheckpointLayout | None:
    """The checkpoint's layout: its :data:`META_FILE`, or for a checkpoint written before it existed,
    the world size counted from its rank state files and ZeRO-3 told by per-rank model states (the
    stage of a ZeRO-1/2 checkpoint is then taken as 2). None when neither tells."""
    files = list_checkpoint(fs, path) if files is None else files
    if META_FILE in files:
        with fs.open_input_stream(posixpath.join(path, META_FILE)) as f:
            return CheckpointLayout(**json.loads(f.read().decode()))
    state_ranks = {rank_of(f) for f in files if RANK_STATE_FILE.match(posixpath.basename(f))}
    if not state_ranks:
        return None
    partitioned_weights = any(f.endswith(MODEL_STATES_SUFFIX) and rank_of(f) is not None for f in files)
    return CheckpointLayout(world_size=len(state_ranks), zero_stage=3 if partitioned_weights else 2)


def check_layout(layout: CheckpointLayout | None, world_size: int, zero_stage: int, where: str) -> None:
    """Raise :class:`CheckpointMismatch` unless the checkpoint at ``where`` was written by ``world_size``
    ranks with ZeRO stage ``zero_stage`` (nothing to check for an unknown layout)."""
    if layout is None or (layout.world_size, layout.zero_stage) == (world_size, zero_stage):
        return
    tag = layout.deepspeed_tag
    raise CheckpointMismatch(
        f"the checkpoint {where} (step {layout.step}) was written by {layout.world_size} ranks with ZeRO-"
        f"{layout.zero_stage}, this run has {world_size} ranks with ZeRO-{zero_stage}; DeepSpeed cannot "
        "re-partition the optimizer state for another world size or stage. To resume, run with "
        f"train.num_workers={layout.world_size} train.zero_stage={layout.zero_stage} (--num-workers "
        f"{layout.world_size} --zero-stage {layout.zero_stage}). To change them, consolidate the weights with "
        f"DeepSpeed's script (python {FP32_SCRIPT} CKPT_DIR OUT_DIR -t {tag}, on a local copy of the "
        "checkpoint: weights only, the optimizer moments and schedule position are lost) and start a new run "
        "under a new --run-name from them (docs/RELIABILITY.md, 'Changing the world size').")


def restore_dir_for(staging_dir: str, fs: pafs.FileSystem, path: str) -> str:
    """The local folder a checkpoint is restored into on this node: one per checkpoint, shared by the
    node's ranks (the shared files are copied once per node, not once per rank)."""
    digest = hashlib.sha256(f"{fs.type_name}:{path}".encode()).hexdigest()[:DIGEST_CHARS]
    return os.path.join(staging_dir, f"restore-{digest}")


def restore_rank_files(fs: pafs.FileSystem, path: str, files: list[str], local: str, rank: int,
                       with_shared: bool) -> list[str]:
    """Copy rank ``rank``'s own files of the checkpoint ``path`` on ``fs`` (and the shared ones when
    ``with_shared``: one rank per node) into the local folder ``local``, keeping the relative layout.
    Returns the relative paths copied."""
    own, shared = files_for_rank(files, rank)
    chosen = own + (shared if with_shared else [])
    local_fs = pafs.LocalFileSystem()
    for relative in chosen:
        target = os.path.join(local, *relative.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        pafs.copy_files(posixpath.join(path, relative), target, source_filesystem=fs, destination_filesystem=local_fs)
    return chosen


def remove_restore_dir(local: str) -> None:
    shutil.rmtree(local, ignore_errors=True)


def save_rank(engine, directory: str, rank: int, progress: dict, generator: torch.Generator, world_size: int) -> None:
    """Rank ``rank``'s part of a checkpoint in ``directory``: DeepSpeed's files (``engine.save_checkpoint``
    under :data:`DEEPSPEED_TAG`), its ``progress`` and RNG states (:data:`RANK_STATE`), and on rank 0 the
    layout (:data:`META_FILE`) that a resume checks. Every rank calls it (DeepSpeed's save is collective)."""
    engine.save_checkpoint(directory, tag=DEEPSPEED_TAG, client_state={"progress": progress})
    torch.save({"progress": progress, "torch_rng": torch.get_rng_state(), "generator": generator.get_state()},
               os.path.join(directory, RANK_STATE.format(rank=rank)))
    if rank == 0:
        write_layout(directory, CheckpointLayout(world_size=world_size, zero_stage=engine.zero_optimization_stage(),
                                                 step=progress.get("step", 0)))


def load_rank(engine, directory: str, rank: int, generator: torch.Generator) -> dict:
    """Restore what :func:`save_rank` saved (the engine, the global RNG and ``generator``); returns the progress."""
    engine.load_checkpoint(directory, tag=DEEPSPEED_TAG)
    saved = torch.load(os.path.join(directory, RANK_STATE.format(rank=rank)), weights_only=True)
    torch.set_rng_state(saved["torch_rng"])
    generator.set_state(saved["generator"])
    return saved["progress"]


@contextmanager
def rank_checkpoint_dir(fs: pafs.FileSystem, path: str, rank: int, local_rank: int, world_size: int, zero_stage: int,
                        staging_dir: str, log: Callable[[dict, int], None] | None = None) -> Iterator[str]:
    """A local folder holding what rank ``rank`` reads of the checkpoint ``path`` on ``fs``, after checking
    that it was written by ``world_size`` ranks with ``zero_stage`` (:func:`check_layout`,
    on every rank: all of them stop with the same message). Collective when the checkpoint is copied.

    A checkpoint on a local or shared file system is read in place (each rank opens only its own files).
    From object storage, each rank copies its own shards and the node's local rank 0 the shared files into
    one folder per node under ``staging_dir``, instead of every node downloading the whole checkpoint
    (``Checkpoint.as_directory``); the folder is removed once the ranks have loaded. ``log`` gets
    ``restore/copy_s`` and ``restore/rank0_bytes`` (what this rank copied)."""
    files = list_checkpoint(fs, path)
    layout = read_layout(fs, path, files)
    check_layout(layout, world_size, zero_stage, f"{fs.type_name}:{path}")
    if isinstance(fs, pafs.LocalFileSystem):
        yield path
        return
    local = restore_dir_for(staging_dir, fs, path)
    start = time.perf_counter()
    copied = restore_rank_files(fs, path, files, local, rank, with_shared=local_rank == 0)
    dist.barrier()  # the node's shared files are in place
    size = sum(os.path.getsize(os.path.join(local, *f.split("/"))) for f in copied)
    if log is not None:
        log({"restore/copy_s": time.perf_counter() - start, "restore/rank0_bytes": size}, layout.step if layout else 0)
    if rank == 0:
        print(f"[train] restore: rank 0 copied {len(copied)} of the checkpoint's {len(files)} files "
              f"({size / MB:.1f} MB) to {local}", flush=True)
    yield local
    # every rank of the node has loaded (not reached when a load raises: the next try copies into the same folder)
    dist.barrier()
    if local_rank == 0:
        remove_restore_dir(local)
