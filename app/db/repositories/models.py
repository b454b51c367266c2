from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
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
