"""Open zip archives from uploads with bounds checked before any member is read.

One rule for the API's sniffing and the sandbox's loading: the member count, each member's and
the total uncompressed size, the compression ratio, and overlapping members (the trick behind
non-recursive zip bombs) are checked from the central directory alone. Reads are capped at the
size the directory declared, so a lying header cannot inflate past it.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from engine.errors import EngineError

MiB = 1024 * 1024


@dataclass(frozen=True)
class ZipLimits:
    """Bounds on an archive: members, uncompressed bytes in all and per member, and ratio."""

    max_members: int = 10_000
    max_total_bytes: int = 4096 * MiB
    max_member_bytes: int = 4096 * MiB
    max_ratio: float = 200.0
    # Below this size a member may compress by any ratio (tiny JSON files compress well).
    ratio_floor_bytes: int = 1 * MiB


def _bomb(detail: str, field: str) -> EngineError:
    return EngineError(
        "archive_too_large",
        f"{detail} The archive is refused before it is unpacked. Upload the archive as it was "
        "written by torch.export.save / np.savez, or ask your operator to raise the limits.",
        field=field,
    )


def check_archive(zf: zipfile.ZipFile, limits: ZipLimits, file_size: int, field: str) -> None:
    """Raise archive_too_large when the central directory breaks a bound; reads no member."""
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise _bomb(
            f"The archive has {len(infos)} members; at most {limits.max_members} are accepted.",
            field,
        )
    total = 0
    spans: list[tuple[int, int, str]] = []
    for info in infos:
        if info.file_size > limits.max_member_bytes:
            raise _bomb(
                f"Member {info.filename!r} unpacks to {info.file_size} bytes; at most "
                f"{limits.max_member_bytes} are accepted per member.",
                field,
            )
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > limits.ratio_floor_bytes and ratio > limits.max_ratio:
            raise _bomb(
                f"Member {info.filename!r} unpacks {ratio:.0f}-fold "
                f"({info.compress_size} → {info.file_size} bytes); at most "
                f"{limits.max_ratio:.0f}-fold is accepted.",
                field,
            )
        total += info.file_size
        if total > limits.max_total_bytes:
            raise _bomb(
                f"The archive unpacks to more than {limits.max_total_bytes} bytes in all.",
                field,
            )
        spans.append((info.header_offset, info.header_offset + info.compress_size, info.filename))
    spans.sort()
    for (start_a, end_a, name_a), (start_b, _end_b, name_b) in zip(spans, spans[1:], strict=False):
        # Member b's local header must start after member a's data ends.
        if start_b < end_a or start_b == start_a:
            raise _bomb(f"Members {name_a!r} and {name_b!r} overlap in the file.", field)
    if spans and spans[-1][1] > file_size:
        raise _bomb(f"Member {spans[-1][2]!r} claims data past the end of the file.", field)
    if sum(info.compress_size for info in infos) > file_size:
        raise _bomb("The members claim more compressed data than the file holds.", field)


@contextmanager
def open_zip(
    path: str | Path, limits: ZipLimits, field: str = "file", damaged_code: str = "invalid_model"
) -> Iterator[zipfile.ZipFile]:
    """zipfile.ZipFile on `path`, after check_archive; a damaged archive raises damaged_code."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            check_archive(zf, limits, path.stat().st_size, field)
            yield zf
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise EngineError(
            damaged_code,
            f"The file is a damaged or truncated zip archive ({exc}). Upload the complete file.",
            field=field,
        ) from exc


def read_member(zf: zipfile.ZipFile, name: str, max_bytes: int, field: str = "file") -> bytes:
    """A member's bytes, refusing members that declare or produce more than max_bytes."""
    info = zf.getinfo(name)
    if info.file_size > max_bytes:
        raise _bomb(
            f"Member {name!r} unpacks to {info.file_size} bytes; at most {max_bytes} are read.",
            field,
        )
    with zf.open(info) as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _bomb(f"Member {name!r} unpacks past {max_bytes} bytes.", field)
    return data
