"""LocalBlobStore: atomic moves, inclusive ranges, S3-like prefixes, keys that stay in root."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from app.config import Settings
from app.storage import BlobNotFound, get_blob_store
from app.storage.local import LocalBlobStore

DATA = bytes(range(256)) * 40 + b"tail"


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


def write(path: Path, data: bytes = DATA) -> Path:
    path.write_bytes(data)
    return path


def test_put_moves_the_file_in_and_get_copies_it_out(store: LocalBlobStore, tmp_path: Path) -> None:
    source = write(tmp_path / "upload.bin")
    inode = source.stat().st_ino
    store.put_file("teams/t1/models/m1/model.onnx", source)
    assert not source.exists()
    stored = store.root / "teams/t1/models/m1/model.onnx"
    assert stored.stat().st_ino == inode, "same filesystem: renamed, not copied"
    store.get_to_path("teams/t1/models/m1/model.onnx", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == DATA
    assert store.size("teams/t1/models/m1/model.onnx") == len(DATA)
    assert store.exists("teams/t1/models/m1/model.onnx")


def test_put_across_filesystems_copies_then_renames(
    store: LocalBlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write(tmp_path / "upload.bin")
    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        if Path(src) == source:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    store.put_file("a/b.bin", source)
    assert not source.exists()
    assert (store.root / "a/b.bin").read_bytes() == DATA
    assert [p.name for p in (store.root / "a").iterdir()] == ["b.bin"], "no temp file is left"


def test_a_failed_put_leaves_nothing_behind(store: LocalBlobStore, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        store.put_file("a/b.bin", tmp_path / "missing.bin")
    assert not store.exists("a/b.bin")
    assert list((store.root / "a").iterdir()) == []


def test_put_replaces_an_existing_blob(store: LocalBlobStore, tmp_path: Path) -> None:
    store.put_file("k", write(tmp_path / "1", b"old"))
    store.put_file("k", write(tmp_path / "2", b"new!"))
    assert b"".join(store.iter_range("k")) == b"new!"


# Inclusive ranges are checked for both stores by the contract in test_blob_store_s3.py.


def test_iter_range_reads_in_chunks(store: LocalBlobStore, tmp_path: Path) -> None:
    store.put_file("k", write(tmp_path / "f"))
    chunks = list(store.iter_range("k", 100, 1099, chunk_size=300))
    assert [len(c) for c in chunks] == [300, 300, 300, 100]
    assert b"".join(chunks) == DATA[100:1100]


def test_missing_keys(store: LocalBlobStore, tmp_path: Path) -> None:
    with pytest.raises(BlobNotFound):
        store.get_to_path("nope", tmp_path / "out")
    with pytest.raises(BlobNotFound):
        store.iter_range("nope")  # raised before streaming starts, so a 404 can still be sent
    with pytest.raises(BlobNotFound):
        store.size("nope")
    assert not store.exists("nope")
    store.delete("nope")
    assert not (tmp_path / "out").exists()


def test_delete(store: LocalBlobStore, tmp_path: Path) -> None:
    store.put_file("a/b", write(tmp_path / "f"))
    store.delete("a/b")
    assert not store.exists("a/b")


def test_delete_prefix_matches_key_prefixes_like_s3(store: LocalBlobStore, tmp_path: Path) -> None:
    for i, key in enumerate(["a/1", "a/2", "a/sub/3", "ab/4", "b/5"]):
        store.put_file(key, write(tmp_path / str(i)))
    assert store.delete_prefix("a/") == 3
    assert not (store.root / "a").exists(), "emptied directories go too"
    assert store.exists("ab/4") and store.exists("b/5")
    assert store.delete_prefix("a/") == 0
    assert store.delete_prefix("a") == 1
    assert store.exists("b/5")
    assert store.delete_prefix("nothing/here/") == 0
    assert store.root.is_dir()


@pytest.mark.parametrize("key", ["", ".", "/etc/passwd", "../outside", "a/../../outside", "a/../b"])
def test_keys_cannot_escape_the_root(store: LocalBlobStore, tmp_path: Path, key: str) -> None:
    source = write(tmp_path / "f")
    with pytest.raises(ValueError, match="invalid blob key"):
        store.put_file(key, source)
    assert source.exists()
    for call in (store.exists, store.size, store.delete, store.iter_range, store.delete_prefix):
        with pytest.raises(ValueError):
            call(key)


def test_get_blob_store_follows_the_settings(tmp_path: Path) -> None:
    from app.storage.s3 import S3BlobStore

    local = get_blob_store(Settings(_env_file=None, blob_dir=tmp_path / "b"))  # type: ignore[call-arg]
    assert isinstance(local, LocalBlobStore) and local.root == (tmp_path / "b").resolve()
    s3 = get_blob_store(
        Settings(  # type: ignore[call-arg]
            _env_file=None,
            blob_backend="s3",
            s3_bucket="bkt",
            s3_endpoint_url="http://127.0.0.1:9",
        )
    )
    assert isinstance(s3, S3BlobStore) and s3.bucket == "bkt"
