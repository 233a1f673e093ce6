"""Where each stage's output lives under the preprocessing root ``OUT`` (a local path or a URI).

The one definition of the data layout that docs/DATA.md documents; every reader and writer builds
its paths here::

    index/<split>/part-00000.parquet                 the action table of a split
    samples/<split>/<shard_id>.parquet               training shards (<shard_id> = <video_id>-<k>)
    features/<key>/<split>/<shard_id>.parquet        frozen-vision feature cache of one tower
    quarantine/*.parquet                             every rejected item with its reason
    _state/<stage>/[<key>/]<split>/<shard_id>.json   done markers (outside the shard directories)
    manifest.json                                    counts per split and stage
    eval/<run_name>/                                 evaluation outputs (metrics, predictions, gallery)
"""

from __future__ import annotations

from preprocessing import storage

INDEX_DIR = "index"
SAMPLES_DIR = "samples"
FEATURES_DIR = "features"
QUARANTINE_DIR = "quarantine"
STATE_DIR = "_state"  # done markers live outside the shard directories so readers never see them
EVAL_DIR = "eval"
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "part-00000.parquet"
SHARD_SUFFIX = ".parquet"
# Rows per Parquet row group of a sample shard: training reads random clips a row group at a time
# (preprocessing.training_data.RowStore), so a miss decodes 16 clips' JPEGs (~3 MB), not a shard.
SAMPLES_ROW_GROUP_ROWS = 16


def shard_id(uri: str) -> str:
    """``.../samples/train/P01_01-0.parquet`` -> ``P01_01-0`` (the same id in every stage's directory)."""
    name = str(uri).rsplit("/", 1)[-1]
    return name[: -len(SHARD_SUFFIX)] if name.endswith(SHARD_SUFFIX) else name


def shard_name(shard: str) -> str:
    """``P01_01-0`` -> ``P01_01-0.parquet``."""
    return f"{shard}{SHARD_SUFFIX}"


def data_root(path: str) -> str:
    """The output root ``OUT`` that ``path`` names: ``OUT`` itself or its ``samples/`` folder, the two
    forms ``--data`` of training and evaluation accept (a trailing slash is dropped). A ``samples``
    folder that holds a ``samples/`` folder of its own is a root."""
    path = str(path).rstrip("/") or "/"
    parent, _, name = path.rpartition("/")
    if name == SAMPLES_DIR and parent and not storage.is_dir(storage.join(path, SAMPLES_DIR)):
        return parent
    return path


def manifest_path(out: str) -> str:
    return storage.join(out, MANIFEST_FILE)


def index_path(out: str, split: str) -> str:
    return storage.join(out, INDEX_DIR, split, INDEX_FILE)


def samples_dir(out: str, split: str) -> str:
    return storage.join(out, SAMPLES_DIR, split)


def quarantine_dir(out: str) -> str:
    return storage.join(out, QUARANTINE_DIR)


def index_quarantine_path(out: str) -> str:
    return storage.join(out, QUARANTINE_DIR, "index.parquet")


def samples_state_dir(out: str, split: str) -> str:
    return storage.join(out, STATE_DIR, SAMPLES_DIR, split)


def sample_shard_paths(out: str, split: str, shard: str) -> dict[str, str]:
    """The three files of one sample shard: the shard, its quarantine and its done marker."""
    return {
        "samples": storage.join(samples_dir(out, split), shard_name(shard)),
        "quarantine": storage.join(out, QUARANTINE_DIR, f"samples-{split}-{shard_name(shard)}"),
        "done": storage.join(samples_state_dir(out, split), f"{shard}.json"),
    }


def sample_quarantine_prefix(split: str) -> str:
    return f"samples-{split}-"


def feature_root(out: str, key: str) -> str:
    return storage.join(out, FEATURES_DIR, key)


def feature_shard_paths(out: str, key: str, split: str, shard: str) -> dict[str, str]:
    """The three files of one feature shard of tower ``key``."""
    return {
        "features": storage.join(feature_root(out, key), split, shard_name(shard)),
        "quarantine": storage.join(out, QUARANTINE_DIR, f"features-{key}-{split}-{shard_name(shard)}"),
        "done": storage.join(out, STATE_DIR, FEATURES_DIR, key, split, f"{shard}.json"),
    }


def eval_dir(out: str, run_name: str) -> str:
    return storage.join(out, EVAL_DIR, run_name)
