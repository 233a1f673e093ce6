"""Storage helpers work the same on local paths and on non-local URIs (fsspec's memory://)."""

import pyarrow as pa

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
