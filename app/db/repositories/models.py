from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import Model, ModelStatus


class ModelInspectionRepository:
    """Queries the worker runs on an uploaded model by id while it inspects it."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def pending(self, model_id: str) -> Model | None:
        """The model while it still waits for inspection; None once it is ready or invalid."""
        model = self.session.get(Model, model_id)
        return model if model is not None and model.status == ModelStatus.pending else None

    def record(self, model_id: str, **values: Any) -> None:
        """Store the inspection's outcome, only if no other attempt stored one first."""
        self.session.execute(
            update(Model)
            .where(Model.id == model_id, Model.status == ModelStatus.pending)
            .values(updated_at=utcnow(), **values)
        )

    def mark_published(self, model_id: str) -> None:
        """Note that the model's inspection message was just published."""
        self.session.execute(
            update(Model)
            .where(Model.id == model_id, Model.status == ModelStatus.pending)
            .values(published_at=utcnow(), publish_count=Model.publish_count + 1)
            .execution_options(synchronize_session=False)
        )

    def mark_held(self, ids: list[str]) -> None:
        """Note that the broker was just seen holding these rows' messages (not a publish)."""
        if ids:
            self.session.execute(
                update(Model)
                .where(Model.id.in_(ids))
                .values(published_at=utcnow())
                .execution_options(synchronize_session=False)
            )

    def lock_if_unpublished(self, model_id: str) -> bool:
        """Lock the model's row, waiting for a reconciler pass that holds it; True if it is
        still pending and was never published (else someone else published it: leave it)."""
        stmt = (
            select(Model.published_at)
            .where(Model.id == model_id, Model.status == ModelStatus.pending)
            .with_for_update()
        )
        found = self.session.execute(stmt).first()
        return found is not None and found[0] is None

    def lock_unpublished(
        self, published_before: datetime, limit: int
    ) -> list[tuple[str, datetime | None, int]]:
        """Pending models last published before then, or never published and created before
        then (the upload's request may be publishing it right now), locked, oldest first:
        (id, published_at, publish_count)."""
        stmt = (
            select(Model.id, Model.published_at, Model.publish_count)
            .where(
                Model.status == ModelStatus.pending,
                or_(
                    and_(Model.published_at.is_(None), Model.created_at < published_before),
                    Model.published_at < published_before,
                ),
            )
            .order_by(Model.id)
            .with_for_update(skip_locked=True)
            .limit(limit)
        )
        return [(i, at, count) for i, at, count in self.session.execute(stmt)]

    def blob_keys_of_team(self, team_id: str, model_ids: set[str]) -> dict[str, str]:
        """Blob keys of the team's models among `model_ids` (another team's ids are absent)."""
        if not model_ids:
            return {}
        rows = self.session.execute(
            select(Model.id, Model.blob_key).where(
                Model.team_id == team_id, Model.id.in_(model_ids)
            )
        )
        return {model_id: key for model_id, key in rows}
