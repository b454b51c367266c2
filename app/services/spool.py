"""A file arriving in chunks: written to a local spool file and hashed while it comes in."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Upload:
    """A received file: spooled on local disk, hashed while it streamed in."""

    path: Path
    filename: str | None
    size: int
    sha256: str
    fields: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


class Spool:
    """An open spool file in `spool_dir`; `finish` makes it an Upload, `discard` removes it."""

    def __init__(self, spool_dir: Path) -> None:
        spool_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=spool_dir, prefix="upload-", suffix=".part")
        self.path = Path(name)
        self.size = 0
        self._out = os.fdopen(fd, "wb")
        self._digest = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self._digest.update(chunk)
        self._out.write(chunk)

    def finish(self, filename: str | None, fields: dict[str, str]) -> Upload:
        self._out.close()
        return Upload(self.path, filename, self.size, self._digest.hexdigest(), fields)

    def discard(self) -> None:
        self._out.close()
        self.path.unlink(missing_ok=True)
