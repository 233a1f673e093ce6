"""Paths that may be local directories or any pyarrow/fsspec URI (``s3://``, ``gs://``, ``file://``).

Every stage reads and writes through these helpers so the same command works on a laptop and on
a cluster whose shards live in object storage. Writes are atomic: a reader (or a re-run after a
crash) sees either the whole file or no file, which is what makes the stages resumable.
Directories (:func:`upload_dir`, :func:`write_dir`: a model export) are copied file by file.

``s3://`` goes through pyarrow's S3 filesystem, which takes credentials, region and endpoint from
the environment as the AWS SDKs do (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` for an S3-compatible store such as MinIO), and so do
Ray Train's checkpoint uploads and MLflow's S3 artifact store (boto3; ``MLFLOW_S3_ENDPOINT_URL``).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_local(uri: str) -> bool:
    return "://" not in str(uri) or str(uri).startswith("file://")


def _local_path(uri: str) -> str:
    uri = str(uri)
    return os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or URI.

    pyarrow's native filesystems (s3, gs, hdfs, abfs) are used where they exist; any other scheme
    goes through fsspec (``memory://``, ``az://`` with adlfs, ...).
    """
    if is_local(uri):
        return pafs.LocalFileSystem(), _local_path(uri)
    try:
        return pafs.FileSystem.from_uri(str(uri))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        import fsspec

        fs, path = fsspec.core.url_to_fs(str(uri))
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(uri: str, *parts: str) -> str:
    if is_local(uri):
        return os.path.join(_local_path(uri), *parts)
    return posixpath.join(str(uri), *parts)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files directly under a directory URI (sorted; empty if the directory does not exist)."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))
    return [join(uri, n) for n in names]


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


PARTIAL_WRITE_MARK = ".tmp-"  # in the name of a local write in progress (or killed mid-way)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write a whole file so that readers never see a partial one."""
    fs, path = resolve(uri)
    parent = posixpath.dirname(path) if not is_local(uri) else os.path.dirname(path)
    fs.create_dir(parent, recursive=True)
    if is_local(uri):
        tmp = f"{path}{PARTIAL_WRITE_MARK}{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:  # a single object PUT is atomic on object stores
        with fs.open_output_stream(path) as f:
            f.write(data)


def write_json_atomic(uri: str, obj) -> None:
    write_bytes_atomic(uri, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


def read_json(uri: str):
    return json.loads(read_bytes(uri).decode("utf-8"))


def write_parquet_atomic(table: pa.Table, uri: str, row_group_size: int = 256, compression: str = "zstd") -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size, compression=compression)
    write_bytes_atomic(uri, buf.getvalue())


def read_parquet_dir(uri: str, columns: list[str] | None = None) -> pa.Table | None:
    """All ``*.parquet`` files directly under ``uri`` as one table (None if there are none)."""
    files = list_files(uri, ".parquet")
    if not files:
        return None
    tables = []
    for f in files:
        fs, path = resolve(f)
        tables.append(pq.read_table(path, filesystem=fs, columns=columns))
    return pa.concat_tables(tables, promote_options="default")


@contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local filesystem path for ``uri`` (remote files are downloaded to a temporary file).

    decord needs a real file; local inputs are used in place.
    """
    if is_local(uri):
        yield _local_path(uri)
        return
    fs, path = resolve(uri)
    suffix = os.path.splitext(path)[1]
    with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
        with fs.open_input_stream(path) as src:
            shutil.copyfileobj(src, tmp)
        tmp.flush()
        yield tmp.name


def upload_dir(local: str, uri: str) -> None:
    """Copy the local directory ``local`` and everything under it to the directory ``uri`` (a local
    path or URI), creating it; files already there under the same names are replaced."""
    fs, path = resolve(uri)
    source = os.path.abspath(local)
    if is_local(uri) and source == path:
        return
    fs.create_dir(path, recursive=True)
    pafs.copy_files(source, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(uri: str, local: str) -> None:
    """Copy the directory ``uri`` and everything under it to the local directory ``local``."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no directory at {uri}")
    os.makedirs(local, exist_ok=True)
    pafs.copy_files(path, os.path.abspath(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def write_dir(uri: str, write: Callable[[str], object]) -> None:
    """``write(directory)`` with a local directory whose contents end up at ``uri``: a local ``uri``
    is written in place; for a URI, ``write`` fills a temporary directory that is then uploaded
    (e.g. ``write_dir("s3://bucket/models/run", model.save_pretrained)``)."""
    if is_local(uri):
        write(_local_path(uri))
        return
    with tempfile.TemporaryDirectory(prefix="handsonvlm-upload-") as scratch:
        write(scratch)
        upload_dir(scratch, uri)


@contextmanager
def local_dir(uri: str) -> Iterator[str]:
    """A local directory holding what the directory ``uri`` holds: a local one is used in place, a
    remote one is downloaded to a temporary directory (removed afterwards)."""
    if is_local(uri):
        yield _local_path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="handsonvlm-download-") as scratch:
        download_dir(uri, scratch)
        yield scratch
