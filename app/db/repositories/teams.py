from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from app.db.models import ApiKey, Team


class TeamAdminRepository:
    """Teams and keys (administration and authentication; not team-scoped by nature)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def create_team(self, name: str) -> Team:
        team = Team(name=name)
        self.session.add(team)
        self.session.flush()
        return team

    def get_team(self, team_id: str) -> Team | None:
        return self.session.get(Team, team_id)

    def find_teams(self, id_or_name: str) -> list[Team]:
        """The team with this id, else every team with this name."""
        team = self.get_team(id_or_name)
        if team is not None:
            return [team]
        return list(self.session.scalars(select(Team).where(Team.name == id_or_name)))

    def teams_named(self, name: str) -> list[Team]:
        """Every team whose name is `name`, ignoring case."""
        query = select(Team).where(func.lower(Team.name) == name.lower())
        return list(self.session.scalars(query))

    def add_key(
        self, team_id: str, prefix: str, key_hash: str, expires_at: datetime | None = None
    ) -> ApiKey:
        key = ApiKey(team_id=team_id, prefix=prefix, key_hash=key_hash, expires_at=expires_at)
        self.session.add(key)
        self.session.flush()
        return key

    def key_for_hash(self, key_hash: str) -> tuple[ApiKey, Team] | None:
        """The key with this hash and its team, revoked and expired keys included."""
        stmt = (
            select(ApiKey, Team)
            .join(Team, ApiKey.team_id == Team.id)
            .where(ApiKey.key_hash == key_hash)
        )
        row = self.session.execute(stmt).first()
        return (row[0], row[1]) if row is not None else None

    def touch_key(self, key_id: str, now: datetime, not_since: datetime) -> bool:
        """Set last_used_at = now unless it is already at or after `not_since`."""
        stmt = (
            update(ApiKey)
            .where(
                ApiKey.id == key_id,
                or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < not_since),
            )
            .values(last_used_at=now)
            .execution_options(synchronize_session=False)
        )
        return bool(self.session.execute(stmt).rowcount)  # type: ignore[attr-defined]

    def list_keys(self, team_id: str | None = None) -> list[tuple[ApiKey, Team]]:
        stmt = select(ApiKey, Team).join(Team, ApiKey.team_id == Team.id)
        if team_id is not None:
            stmt = stmt.where(ApiKey.team_id == team_id)
        stmt = stmt.order_by(ApiKey.created_at, ApiKey.id)
        return [(key, team) for key, team in self.session.execute(stmt)]

    def find_keys(self, id_or_prefix: str, key_hash: str | None = None) -> list[ApiKey]:
        """Keys with this id or prefix (or, given the whole key, this hash)."""
        conditions = [ApiKey.id == id_or_prefix, ApiKey.prefix == id_or_prefix]
        if key_hash is not None:
            conditions.append(ApiKey.key_hash == key_hash)
        return list(self.session.scalars(select(ApiKey).where(or_(*conditions))))

    def revoke_key(self, key: ApiKey, now: datetime) -> None:
        key.revoked_at = now
        self.session.flush()
