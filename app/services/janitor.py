"""The janitor: removes what crashes leave behind, from the reconciler loop. Idempotent, and safe
to run from several processes at once.

- `upload-*.part` spool files older than the upload timeout (COMPAAS_UPLOAD_DEADLINE_S): the
  API process that was receiving them died (an upload in progress writes to its file, and no
  upload lives longer than the deadline);
- blobs no model, dataset or artifact row points at: listed first (orphan_blobs, with the time
  they were first seen), deleted on a later pass once they have stayed without a row for
  COMPAAS_ORPHAN_BLOB_GRACE_S (an upload or a checkpoint commits its row right after storing
  its blob; the grace period covers that window);
- worker scratch directories (DATA_DIR/tmp/jobs, DATA_DIR/tmp/inspect) whose attempt is no
  longer current: a job directory is named after its job and attempt token and is kept only
  while that token holds the running job's lease; an inspection's while its model is pending.

What it reclaims is logged and added to janitor_reclaimed (the /metrics counters).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import Literal

from app.config import Settings
from app.db.base import utcnow
from app.db.repositories.janitor import JanitorRepository
from app.db.session import session_scope
from app.services.auth import as_utc
from app.storage import BlobStore, get_blob_store

log = logging.getLogger(__name__)

KINDS = ("upload_part", "orphan_blob", "scratch_dir")
BATCH = 500
PART_GLOB = "upload-*.part"  # app.services.spool.Spool names its files so

ScratchKind = Literal["jobs", "inspect"]
_JOB_DIR = re.compile(r"^(?P<job>[0-9a-f-]{36})\.attempt-(?P<token>\d+)\.")
_INSPECT_DIR = re.compile(r"^(?P<model>[0-9a-f-]{36})\.")


# ----------------------------------------------------------------------------- scratch naming


def job_scratch(settings: Settings, job_id: str, token: int) -> Path:
    """A new scratch directory for one attempt of a job, named so the janitor can tell whether
    that attempt is still the current one."""
    return _scratch(settings, "jobs", f"{job_id}.attempt-{token}.")


def inspect_scratch(settings: Settings, model_id: str) -> Path:
    """A new scratch directory for inspecting a model (kept while the model is pending)."""
    return _scratch(settings, "inspect", f"{model_id}.")


def _scratch(settings: Settings, kind: ScratchKind, prefix: str) -> Path:
    root = settings.tmp_dir / kind
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=root, prefix=prefix))


# ----------------------------------------------------------------------------- the sweep


@dataclass
class Reclaimed:
    """What one sweep removed, by kind: files and bytes."""

    files: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    watching: int = 0  # orphan candidates still inside their grace period

    def add(self, kind: str, files: int, size: int) -> None:
        self.files[kind] += files
        self.bytes[kind] += size

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


def sweep(
    settings: Settings, storage: BlobStore | None = None, now: datetime | None = None
) -> Reclaimed:
    """One pass over spool files, scratch directories and blobs; each part runs even if
    another fails (the failure is logged)."""
    now = now or utcnow()
    reclaimed = Reclaimed()
    phases = (
        ("upload_part", lambda: _sweep_parts(settings, now, reclaimed)),
        ("scratch_dir", lambda: _sweep_scratch(settings, now, reclaimed)),
        ("orphan_blob", lambda: _sweep_blobs(settings, storage, now, reclaimed)),
    )
    for kind, phase in phases:
        try:
            phase()
        except Exception:
            log.exception("janitor: the %s sweep failed; will try again", kind)
        if reclaimed.files[kind]:
            with session_scope(settings.database_url) as session:
                JanitorRepository(session).add_reclaimed(
                    kind, reclaimed.files[kind], reclaimed.bytes[kind], now
                )
    if reclaimed.total_bytes or any(reclaimed.files.values()):
        log.info(
            "janitor: reclaimed %d bytes in %d files/dirs (%s)",
            reclaimed.total_bytes,
            sum(reclaimed.files.values()),
            ", ".join(f"{k}: {reclaimed.files[k]} = {reclaimed.bytes[k]} B" for k in KINDS),
        )
    return reclaimed


_due_lock = threading.Lock()
_last_sweep: dict[str, float] = {}


def sweep_if_due(settings: Settings) -> Reclaimed | None:
    """Sweep when COMPAAS_JANITOR_INTERVAL_S has passed since this process's last sweep (the
    reconciler calls this on every pass); never raises."""
    with _due_lock:
        last = _last_sweep.get(settings.database_url)
        if last is not None and time.monotonic() - last < settings.janitor_interval_s:
            return None
        _last_sweep[settings.database_url] = time.monotonic()
    try:
        return sweep(settings)
    except Exception:
        log.exception("janitor pass failed; will try again")
        return None


def _sweep_parts(settings: Settings, now: datetime, reclaimed: Reclaimed) -> None:
    """Spool files whose last write is older than the longest an upload may take."""
    if not settings.tmp_dir.is_dir():
        return
    cutoff = now.timestamp() - settings.upload_deadline_s
    for path in settings.tmp_dir.glob(PART_GLOB):
        try:
            stat = path.lstat()
            if stat.st_mtime >= cutoff:
                continue  # still being written, or finished and being stored
            path.unlink()
        except FileNotFoundError:
            continue  # finished or discarded meanwhile
        reclaimed.add("upload_part", 1, stat.st_size)


def _sweep_scratch(settings: Settings, now: datetime, reclaimed: Reclaimed) -> None:
    """Scratch directories of attempts and inspections that are over."""
    # A directory whose name says nothing (made before scratch directories were named) goes
    # once it is older than any attempt can run.
    unnamed_cutoff = now.timestamp() - 2 * max(
        settings.job_time_limit_s, settings.inspect_time_limit_s, settings.lease_s
    )
    jobs = _subdirs(settings.tmp_dir / "jobs")
    inspections = _subdirs(settings.tmp_dir / "inspect")
    job_dirs = {p: _JOB_DIR.match(p.name) for p in jobs}
    inspect_dirs = {p: _INSPECT_DIR.match(p.name) for p in inspections}
    with session_scope(settings.database_url) as session:
        repo = JanitorRepository(session)
        current = repo.current_attempts(m["job"] for m in job_dirs.values() if m)
        pending = repo.pending_models(m["model"] for m in inspect_dirs.values() if m)
    doomed: list[Path] = []
    for path, match in job_dirs.items():
        if match is None:
            if _mtime(path) < unnamed_cutoff:
                doomed.append(path)
        elif current.get(match["job"]) != int(match["token"]):
            doomed.append(path)
    for path, match in inspect_dirs.items():
        if match is None:
            if _mtime(path) < unnamed_cutoff:
                doomed.append(path)
        elif match["model"] not in pending:
            doomed.append(path)
    for path in doomed:
        size = _tree_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            reclaimed.add("scratch_dir", 1, size)


def _sweep_blobs(
    settings: Settings, storage: BlobStore | None, now: datetime, reclaimed: Reclaimed
) -> None:
    """List every blob; a blob without a row becomes a candidate, and a candidate that has been
    without a row for the grace period is deleted (its row is looked for again first)."""
    store = storage or get_blob_store(settings)
    deadline = now - timedelta(seconds=settings.orphan_blob_grace_s)
    for batch in _batches(store.iter_blobs(), BATCH):
        with session_scope(settings.database_url) as session:
            repo = JanitorRepository(session)
            keys = [key for key, _ in batch]
            owned = repo.keys_with_rows(keys)
            seen = repo.candidates(keys)
            repo.forget(k for k in keys if k in owned and k in seen)
            orphans = [(k, s) for k, s in batch if k not in owned]
            expired = [(k, s) for k, s in orphans if k in seen and as_utc(seen[k]) <= deadline]
            doomed = {k for k, _ in expired}
            watch = [(k, s) for k, s in orphans if k not in doomed]
            repo.watch(watch, now)
        reclaimed.watching += len(watch)
        if expired:
            _delete_orphans(settings, store, expired, reclaimed)
    with session_scope(settings.database_url) as session:
        JanitorRepository(session).forget_unseen(before=now)


def _delete_orphans(
    settings: Settings, store: BlobStore, expired: list[tuple[str, int]], reclaimed: Reclaimed
) -> None:
    """Delete candidates past their grace period that still have no row."""
    with session_scope(settings.database_url) as session:
        repo = JanitorRepository(session)
        owned = repo.keys_with_rows(k for k, _ in expired)
        gone = [(k, s) for k, s in expired if k not in owned]
        for key, size in gone:
            store.delete(key)
            reclaimed.add("orphan_blob", 1, size)
            log.info("janitor: deleted orphan blob %s (%d bytes, no row)", key, size)
        repo.forget(k for k, _ in expired)


def _batches(items: Iterable[tuple[str, int]], size: int) -> Iterator[list[tuple[str, int]]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _subdirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()]


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _tree_bytes(root: Path) -> int:
    total = 0
    for directory, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += Path(directory, name).lstat().st_size
            except FileNotFoundError:
                continue
    return total
