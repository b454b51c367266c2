"""Teams: every team has a name, and no two teams share one (ignoring case)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.db.models import Team
from app.db.repositories import TeamAdminRepository
from app.errors import Conflict, Invalid

TEAM_NAME_MAX = 200  # the column's length


def check_name(name: str) -> str:
    """The name, stripped; Invalid when it is empty, too long or has control characters."""
    clean = name.strip()
    if not clean:
        raise Invalid(
            "invalid_team_name",
            "A team name cannot be empty or only spaces; give one, e.g. "
            "`compaas admin create-team ml-platform`.",
            field="name",
        )
    if len(clean) > TEAM_NAME_MAX:
        raise Invalid(
            "invalid_team_name",
            f"A team name is at most {TEAM_NAME_MAX} characters; this one has {len(clean)}.",
            field="name",
        )
    if not clean.isprintable():
        raise Invalid(
            "invalid_team_name",
            "A team name cannot contain control characters (newlines, tabs, escapes).",
            field="name",
        )
    return clean


def create(session: Session, name: str) -> Team:
    """A new team; Conflict when a team with that name (ignoring case) exists."""
    clean = check_name(name)
    repo = TeamAdminRepository(session)
    existing = repo.teams_named(clean)
    if existing:
        team = existing[0]
        raise Conflict(
            "team_name_taken",
            f"A team named {team.name!r} already exists (id {team.id}). Choose another name, "
            f"or give that team a new key with `compaas admin create-key {team.id}`.",
            field="name",
        )
    return repo.create_team(clean)
