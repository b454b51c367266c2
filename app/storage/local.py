"""Blobs as files under one root directory (the embedded default)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from app.storage.base import BlobNotFound


class LocalBlobStore:
    """Keys are relative POSIX paths under root; writes land atomically (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        pure = PurePosixPath(key)
        if not pure.parts or pure.is_absolute() or ".." in pure.parts:
            raise ValueError(f"invalid blob key {key!r}: use a relative path without '..'")
        return self.root.joinpath(*pure.parts)

    def _file(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise BlobNotFound(key)
        return path

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, target)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        # Another filesystem: copy next to the target, then rename, so readers never see half.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        Path(path).unlink(missing_ok=True)

    def get_to_path(self, key: str, path: Path) -> None:
        shutil.copyfile(self._file(key), path)

    def iter_range(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> Iterator[bytes]:
        return self._read(self._file(key), start, end, chunk_size)

    @staticmethod
    def _read(source: Path, start: int, end: int | None, chunk_size: int) -> Iterator[bytes]:
        with source.open("rb") as fh:
            fh.seek(start)
            remaining = None if end is None else end - start + 1
            while remaining is None or remaining > 0:
                chunk = fh.read(chunk_size if remaining is None else min(chunk_size, remaining))
                if not chunk:
                    return
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    def size(self, key: str) -> int:
        return self._file(key).stat().st_size

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def iter_blobs(self) -> Iterator[tuple[str, int]]:
        for directory, _dirs, files in os.walk(self.root):
            for name in files:
                path = Path(directory, name)
                try:
                    size = path.lstat().st_size
                except FileNotFoundError:  # deleted while we walked
                    continue
                yield path.relative_to(self.root).as_posix(), size

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key that starts with prefix, as S3 does ("a/b" also matches "a/bc")."""
        self._path(prefix)
        head = prefix.rpartition("/")[0]
        base = self._path(head) if head else self.root
        if not base.is_dir():
            return 0
        count = 0
        dirs: list[Path] = [base] if base != self.root else []
        for path in base.rglob("*"):
            key = path.relative_to(self.root).as_posix()
            if path.is_dir() and not path.is_symlink():
                dirs.append(path)
            elif key.startswith(prefix):
                path.unlink(missing_ok=True)
                count += 1
        for directory in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
            key = directory.relative_to(self.root).as_posix() + "/"
            if key.startswith(prefix):
                with contextlib.suppress(OSError):  # not empty: holds keys outside the prefix
                    directory.rmdir()
        return count
