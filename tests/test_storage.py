"""Storage helpers work the same on local paths and on non-local URIs (fsspec's memory://)."""

from pathlib import Path

import pyarrow as pa
import pytest

from preprocessing import storage


def test_roundtrip_on_local_and_memory_filesystems(tmp_path):
    for root in (str(tmp_path / "local"), "memory://handsonvlm-test/root"):
        uri = storage.join(root, "a", "b.json")
        storage.write_json_atomic(uri, {"x": 1})
        assert storage.exists(uri) and storage.read_json(uri) == {"x": 1}
        table = pa.table({"v": [1, 2, 3]})
        storage.write_parquet_atomic(table, storage.join(root, "t", "p0.parquet"))
        storage.write_parquet_atomic(table, storage.join(root, "t", "p1.parquet"))
        assert storage.read_parquet_dir(storage.join(root, "t")).column("v").to_pylist() == [1, 2, 3, 1, 2, 3]
        assert [u.rsplit("/", 1)[-1] for u in storage.list_files(storage.join(root, "t"), ".parquet")] == \
            ["p0.parquet", "p1.parquet"]
        assert storage.read_parquet_dir(storage.join(root, "absent")) is None
        with storage.local_copy(uri) as path, open(path) as f:
            assert f.read().strip().startswith("{")
    # atomic local writes leave no temporary files behind
    assert sorted(p.name for p in (tmp_path / "local" / "a").iterdir()) == ["b.json"]


def test_directories_copy_to_and_from_non_local_uris(tmp_path):
    """upload_dir / download_dir / write_dir / local_dir: a nested folder (a model export) round-trips
    through memory:// unchanged, and local destinations are written in place."""
    source = tmp_path / "export"
    (source / "sub").mkdir(parents=True)
    (source / "config.json").write_text('{"a": 1}')
    (source / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    files = {p.relative_to(source).as_posix(): p.read_bytes() for p in source.rglob("*") if p.is_file()}

    def tree(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    remote = "memory://handsonvlm-test/models/run-a"
    storage.upload_dir(str(source), remote)
    assert storage.is_dir(remote) and storage.read_bytes(storage.join(remote, "sub", "weights.bin")) == \
        files["sub/weights.bin"]
    storage.download_dir(remote, str(tmp_path / "back"))
    assert tree(tmp_path / "back") == files
    with storage.local_dir(remote) as local:
        assert tree(Path(local)) == files
    with storage.local_dir(str(source)) as local:  # a local folder is used in place
        assert local == str(source)

    def save(directory):  # as HandsOnVLM.save_pretrained writes an export
        storage.upload_dir(str(source), directory)

    storage.write_dir("memory://handsonvlm-test/models/run-b", save)
    assert storage.read_json("memory://handsonvlm-test/models/run-b/config.json") == {"a": 1}
    storage.write_dir(str(tmp_path / "in-place"), save)
    assert tree(tmp_path / "in-place") == files
    storage.upload_dir(str(source), str(source))  # onto itself: nothing to do
    assert tree(source) == files
    with pytest.raises(FileNotFoundError):
        storage.download_dir("memory://handsonvlm-test/absent", str(tmp_path / "none"))
