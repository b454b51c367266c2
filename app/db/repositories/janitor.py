"""The janitor's queries, across teams: which blob keys have rows, which scratch owners are
current, the orphan candidates it is watching and its reclaimed totals."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import delete, func, select, union_all
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from app.db.models import (
    Artifact,
    Dataset,
    JanitorReclaimed,
    Job,
    JobStatus,
    Model,
    ModelStatus,
    OrphanBlob,
)


class JanitorRepository:
    """Every query the janitor makes; none is scoped to a team (it looks after the whole store)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def _insert(self):  # type: ignore[no-untyped-def]
        return pg_insert if self.session.get_bind().dialect.name == "postgresql" else sqlite_insert

    def keys_with_rows(self, keys: Iterable[str]) -> set[str]:
        """Those of `keys` a model, dataset or artifact row points at."""
        wanted = list(keys)
        if not wanted:
            return set()
        query = union_all(
            *(
                select(table.blob_key).where(table.blob_key.in_(wanted))
                for table in (Model, Dataset, Artifact)
            )
        )
        return set(self.session.execute(query).scalars())

    def candidates(self, keys: Iterable[str]) -> dict[str, datetime]:
        """The orphan candidates among `keys`: when each was first seen without a row."""
        wanted = list(keys)
        if not wanted:
            return {}
        rows = self.session.execute(
            select(OrphanBlob.key, OrphanBlob.first_seen_at).where(OrphanBlob.key.in_(wanted))
        )
        return {key: seen for key, seen in rows.tuples()}

    def watch(self, blobs: list[tuple[str, int]], now: datetime) -> None:
        """Record new candidates (first seen now) and mark known ones as still there."""
        if not blobs:
            return
        values = [
            {"key": k, "size_bytes": s, "first_seen_at": now, "last_seen_at": now} for k, s in blobs
        ]
        statement = self._insert()(OrphanBlob).values(values)
        statement = statement.on_conflict_do_update(
            index_elements=[OrphanBlob.key], set_={"last_seen_at": now}
        )
        self.session.execute(statement)

    def forget(self, keys: Iterable[str]) -> None:
        wanted = list(keys)
        if wanted:
            self.session.execute(delete(OrphanBlob).where(OrphanBlob.key.in_(wanted)))

    def forget_unseen(self, before: datetime) -> int:
        """Drop candidates a complete listing no longer found (deleted by someone else)."""
        result = self.session.execute(delete(OrphanBlob).where(OrphanBlob.last_seen_at < before))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def current_attempts(self, job_ids: Iterable[str]) -> dict[str, int]:
        """job id → the lease token of its running attempt, for the running jobs among job_ids."""
        wanted = list(job_ids)
        if not wanted:
            return {}
        rows = self.session.execute(
            select(Job.id, Job.lease_token).where(
                Job.id.in_(wanted), Job.status == JobStatus.running
            )
        )
        return {job_id: int(token) for job_id, token in rows.tuples()}

    def pending_models(self, model_ids: Iterable[str]) -> set[str]:
        """Those of model_ids still waiting for their inspection."""
        wanted = list(model_ids)
        if not wanted:
            return set()
        query = select(Model.id).where(Model.id.in_(wanted), Model.status == ModelStatus.pending)
        return set(self.session.execute(query).scalars())

    def add_reclaimed(self, kind: str, files: int, size: int, now: datetime) -> None:
        if not files:
            return
        statement = self._insert()(JanitorReclaimed).values(
            kind=kind, files=files, bytes=size, updated_at=now
        )
        table = JanitorReclaimed.__table__.c
        statement = statement.on_conflict_do_update(
            index_elements=[JanitorReclaimed.kind],
            set_={"files": table.files + files, "bytes": table.bytes + size, "updated_at": now},
        )
        self.session.execute(statement)

    def reclaimed(self) -> dict[str, tuple[int, int]]:
        """kind → (files, bytes) removed since the database was created."""
        rows = self.session.execute(
            select(JanitorReclaimed.kind, JanitorReclaimed.files, JanitorReclaimed.bytes)
        )
        return {kind: (int(files), int(size)) for kind, files, size in rows.tuples()}

    def candidate_count(self) -> tuple[int, int]:
        """How many blobs (and bytes) are waiting out their grace period."""
        row = self.session.execute(
            select(func.count(), func.coalesce(func.sum(OrphanBlob.size_bytes), 0))
        ).one()
        return int(row[0]), int(row[1])
