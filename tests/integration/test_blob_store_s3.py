"""One behaviour contract for both blob stores: the local directory and S3 (a real moto server)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig

from app.config import Settings
from app.db.base import utcnow
from app.db.migrate import upgrade
from app.services import janitor
from app.storage import BlobNotFound, BlobStore
from app.storage import s3 as s3_module
from app.storage.local import LocalBlobStore
from app.storage.s3 import S3BlobStore

pytestmark = pytest.mark.integration

DATA = bytes(range(256)) * 40 + b"tail"
CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the server is up
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 server in a subprocess (moto's standalone server), stopped after the module."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not _answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto server did not start:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def s3_store(url: str, bucket: str, prefix: str = "deploy-a") -> S3BlobStore:
    return S3BlobStore(bucket, endpoint_url=url, prefix=prefix, **CREDENTIALS)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        return LocalBlobStore(tmp_path / "blobs")
    s3 = s3_store(request.getfixturevalue("moto_url"), f"compaas-{uuid.uuid4().hex[:12]}")
    s3.ensure_bucket()
    return s3


def write(path: Path, data: bytes = DATA) -> Path:
    path.write_bytes(data)
    return path


def test_put_then_get(store: BlobStore, tmp_path: Path) -> None:
    source = write(tmp_path / "upload.bin")
    store.put_file("teams/t1/models/m1/model.onnx", source)
    assert not source.exists(), "put_file consumes the local file"
    assert store.exists("teams/t1/models/m1/model.onnx")
    assert store.size("teams/t1/models/m1/model.onnx") == len(DATA)
    store.get_to_path("teams/t1/models/m1/model.onnx", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == DATA


def test_put_replaces(store: BlobStore, tmp_path: Path) -> None:
    store.put_file("k", write(tmp_path / "1", b"old"))
    store.put_file("k", write(tmp_path / "2", b"new!"))
    assert b"".join(store.iter_range("k")) == b"new!"
    assert store.size("k") == 4


def test_empty_blob(store: BlobStore, tmp_path: Path) -> None:
    store.put_file("empty", write(tmp_path / "e", b""))
    assert store.size("empty") == 0
    assert b"".join(store.iter_range("empty")) == b""


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (0, None, DATA),
        (10, None, DATA[10:]),
        (10, 19, DATA[10:20]),
        (5, 5, DATA[5:6]),
        (len(DATA) - 4, len(DATA) + 100, b"tail"),
        (len(DATA), None, b""),
    ],
)
def test_ranges_are_inclusive(
    store: BlobStore, tmp_path: Path, start: int, end: int | None, expected: bytes
) -> None:
    store.put_file("k", write(tmp_path / "f"))
    assert b"".join(store.iter_range("k", start, end)) == expected


def test_ranges_stream_in_chunks(store: BlobStore, tmp_path: Path) -> None:
    store.put_file("k", write(tmp_path / "f"))
    chunks = list(store.iter_range("k", 100, 1099, chunk_size=300))
    assert b"".join(chunks) == DATA[100:1100]
    assert len(chunks) >= 4 and max(len(c) for c in chunks) <= 300


def test_missing_key(store: BlobStore, tmp_path: Path) -> None:
    with pytest.raises(BlobNotFound):
        store.get_to_path("teams/t1/nope", tmp_path / "out")
    with pytest.raises(BlobNotFound):
        store.iter_range("teams/t1/nope")  # before the first chunk, so a 404 can still be sent
    with pytest.raises(BlobNotFound):
        store.size("teams/t1/nope")
    assert not store.exists("teams/t1/nope")
    store.delete("teams/t1/nope")
    assert not (tmp_path / "out").exists()


def test_delete(store: BlobStore, tmp_path: Path) -> None:
    store.put_file("a/b", write(tmp_path / "f"))
    store.delete("a/b")
    assert not store.exists("a/b")


def test_delete_prefix(store: BlobStore, tmp_path: Path) -> None:
    for i, key in enumerate(["a/1", "a/2", "a/sub/3", "ab/4", "b/5"]):
        store.put_file(key, write(tmp_path / str(i), key.encode()))
    assert store.delete_prefix("a/") == 3
    assert not store.exists("a/1") and not store.exists("a/sub/3")
    assert store.exists("ab/4") and store.exists("b/5")
    assert store.delete_prefix("a/") == 0
    assert store.delete_prefix("a") == 1
    assert store.exists("b/5")
    assert store.delete_prefix("nothing/") == 0


def test_iter_blobs_lists_every_key_with_its_size(store: BlobStore, tmp_path: Path) -> None:
    assert list(store.iter_blobs()) == []
    for i, key in enumerate(["a/1", "a/sub/22", "b/333"]):
        store.put_file(key, write(tmp_path / str(i), b"x" * len(key)))
    assert sorted(store.iter_blobs()) == [("a/1", 3), ("a/sub/22", 8), ("b/333", 5)]


def test_the_janitor_deletes_s3_orphans_on_a_second_pass_and_only_its_own(
    moto_url: str, tmp_path: Path
) -> None:
    bucket = f"compaas-{uuid.uuid4().hex[:12]}"
    ours, neighbour = s3_store(moto_url, bucket, "ours"), s3_store(moto_url, bucket, "theirs")
    ours.ensure_bucket()
    ours.put_file("teams/t/models/m/model.onnx", write(tmp_path / "a", b"orphan"))
    neighbour.put_file("teams/t/models/n/model.onnx", write(tmp_path / "b", b"not ours"))
    settings = Settings(
        data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'db'}", orphan_blob_grace_s=10
    )
    upgrade(settings.database_url)
    now = utcnow()
    assert janitor.sweep(settings, ours, now=now).watching == 1
    assert ours.exists("teams/t/models/m/model.onnx")
    done = janitor.sweep(settings, ours, now=now + timedelta(seconds=10))
    assert done.files["orphan_blob"] == 1 and done.bytes["orphan_blob"] == len(b"orphan")
    assert not ours.exists("teams/t/models/m/model.onnx")
    assert neighbour.exists("teams/t/models/n/model.onnx"), "another prefix's blob was touched"


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../outside", "a/../../outside"])
def test_keys_cannot_escape(store: BlobStore, tmp_path: Path, key: str) -> None:
    source = write(tmp_path / "f")
    with pytest.raises(ValueError, match="invalid blob key"):
        store.put_file(key, source)
    assert source.exists()
    with pytest.raises(ValueError):
        store.exists(key)
    with pytest.raises(ValueError):
        store.delete_prefix(key)


def test_prefix_isolates_deployments_sharing_a_bucket(moto_url: str, tmp_path: Path) -> None:
    bucket = f"compaas-{uuid.uuid4().hex[:12]}"
    first, second = s3_store(moto_url, bucket, "one"), s3_store(moto_url, bucket, "two/")
    first.ensure_bucket()
    second.ensure_bucket()  # already there: no error
    first.put_file("k", write(tmp_path / "f", b"first"))
    assert not second.exists("k")
    assert second.delete_prefix("k") == 0
    assert first.client.head_object(Bucket=bucket, Key="one/k")["ContentLength"] == 5


def test_large_files_go_up_in_parts_and_read_back_across_parts(
    moto_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        s3_module,
        "_TRANSFER",
        TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20),
    )
    store = s3_store(moto_url, f"compaas-{uuid.uuid4().hex[:12]}")
    store.ensure_bucket()
    data = (DATA * 1100)[: 12 << 20]
    store.put_file("big.bin", write(tmp_path / "big.bin", data))
    etag = store.client.head_object(Bucket=store.bucket, Key="deploy-a/big.bin")["ETag"]
    assert etag.strip('"').endswith("-3"), f"expected a 3-part upload, ETag {etag}"
    assert store.size("big.bin") == len(data)
    start, end = (5 << 20) - 10, (10 << 20) + 10
    assert (
        b"".join(store.iter_range("big.bin", start, end, chunk_size=1 << 20))
        == data[start : end + 1]
    )
    store.get_to_path("big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data


def test_delete_prefix_deletes_in_batches(
    moto_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_module, "_DELETE_BATCH", 3)
    store = s3_store(moto_url, f"compaas-{uuid.uuid4().hex[:12]}")
    store.ensure_bucket()
    for i in range(8):
        store.put_file(f"jobs/j1/steps/{i}.bin", write(tmp_path / str(i), b"x"))
    store.put_file("jobs/j2/keep.bin", write(tmp_path / "keep", b"y"))
    calls: list[int] = []
    real = store._delete_batch

    def counting(batch: list[dict[str, str]]) -> int:
        calls.append(len(batch))
        return real(batch)

    monkeypatch.setattr(store, "_delete_batch", counting)
    assert store.delete_prefix("jobs/j1/") == 8
    assert calls == [3, 3, 2]
    assert store.exists("jobs/j2/keep.bin")


def test_a_missing_bucket_is_created(moto_url: str) -> None:
    store = s3_store(moto_url, f"compaas-{uuid.uuid4().hex[:12]}")
    assert not any(
        b["Name"] == store.bucket for b in store.client.list_buckets().get("Buckets", [])
    )
    store.ensure_bucket()
    store.client.head_bucket(Bucket=store.bucket)
