"""The blob store protocol: where uploaded models, datasets and artifacts live."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol


class BlobNotFound(Exception):
    """The key is not in the store."""


class BlobStore(Protocol):
    """Byte storage addressed by key ("teams/<team>/models/<id>/model.onnx")."""

    def put_file(self, key: str, path: Path) -> None:
        """Move a finished local file into the store (the local file is consumed)."""

    def get_to_path(self, key: str, path: Path) -> None:
        """Copy the blob to a local path."""

    def iter_range(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> Iterator[bytes]:
        """Yield bytes start..end (inclusive; None means to the end)."""

    def size(self, key: str) -> int: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every blob under prefix; return how many."""

    def iter_blobs(self) -> Iterator[tuple[str, int]]:
        """Every key in the store with its size in bytes (the janitor's listing)."""
