"""API keys end to end: the real `compaas admin` CLI against the API on one embedded data dir.

The CLI runs in this process (`app.cli.main`, with the environment a fresh process would see)
except where being another process is the point: the pepper shared by the CLI and the API, and
concurrent first starts."""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import update

from app.cli import main as cli_main
from app.config import Settings
from app.db.base import utcnow
from app.db.models import ApiKey
from app.db.session import session_scope
from app.main import create_app
from app.security import PEPPER_FILE, data_dir_pepper
from app.services.auth import LAST_USED_RESOLUTION, as_utc, authenticate

ROOT = Path(__file__).resolve().parents[2]


class Embedded:
    """One embedded data dir (SQLite), no pepper configured: what `compaas up` users get."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("COMPAAS_")}
        self.env.update(COMPAAS_DATA_DIR=str(data_dir), PYTHONPATH=str(ROOT))

    def cli(
        self, *args: str, check: bool = True, own_process: bool = False
    ) -> subprocess.CompletedProcess[str]:
        command = ["compaas", "admin", *args]
        if own_process:
            return subprocess.run(
                [sys.executable, "-m", "app.cli", "admin", *args],
                env=self.env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=check,
            )
        data_dir_pepper.cache_clear()  # read from the data dir again, as a new process would
        out, err = io.StringIO(), io.StringIO()
        with pytest.MonkeyPatch.context() as env:
            for name in [k for k in os.environ if k.startswith("COMPAAS_")]:
                env.delenv(name)
            env.setenv("COMPAAS_DATA_DIR", str(self.data_dir))
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = cli_main(["admin", *args])
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
        result = subprocess.CompletedProcess(command, code, out.getvalue(), err.getvalue())
        if check:
            result.check_returncode()
        return result

    def cli_json(self, *args: str, own_process: bool = False) -> Any:
        return json.loads(self.cli(*args, "--json", own_process=own_process).stdout)

    def settings(self) -> Settings:
        return Settings(
            mode="embedded",
            data_dir=self.data_dir,
            database_url="",
            broker_url="",
            api_key_pepper="",
            ops_token="",
            run_reconciler=False,
        )

    def client(self) -> TestClient:
        """A freshly built API process (its pepper read again from the data dir)."""
        data_dir_pepper.cache_clear()
        return TestClient(create_app(self.settings()))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def embedded(tmp_path: Path) -> Embedded:
    return Embedded(tmp_path / "var")


@pytest.mark.slow
def test_embedded_pepper_is_generated_once_private_and_shared_by_cli_and_api(
    embedded: Embedded,
) -> None:
    first = embedded.cli_json("create-team", "alpha", own_process=True)
    pepper_file = embedded.data_dir / PEPPER_FILE
    pepper = pepper_file.read_text()
    assert len(pepper) == 64 and int(pepper, 16) >= 0
    assert stat.S_IMODE(pepper_file.stat().st_mode) == 0o600
    second = embedded.cli_json("create-team", "beta", own_process=True)
    assert pepper_file.read_text() == pepper  # not regenerated

    # two "restarts" of the API: keys made by the CLI before keep working
    for _ in range(2):
        client = embedded.client()
        for issued in (first, second):
            assert client.get("/v1/models", headers=bearer(issued["api_key"])).status_code == 200


def test_production_refuses_an_empty_or_short_pepper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPAAS_DATABASE_URL", "postgresql+psycopg://db/compaas")
    monkeypatch.setenv("COMPAAS_BROKER_URL", "redis://redis:6379/0")
    for pepper in ("", "x" * 31):
        with pytest.raises(ValidationError, match="COMPAAS_API_KEY_PEPPER"):
            Settings(mode="production", api_key_pepper=pepper)
    assert Settings(mode="production", api_key_pepper="x" * 32).api_key_pepper == "x" * 32


def test_revoked_key_gets_401_and_the_team_s_other_keys_keep_working(
    embedded: Embedded,
) -> None:
    team = embedded.cli_json("create-team", "alpha")
    other = embedded.cli_json("create-key", "alpha")
    client = embedded.client()
    assert client.get("/v1/models", headers=bearer(team["api_key"])).status_code == 200

    out = embedded.cli("revoke-key", team["prefix"]).stdout
    assert team["key_id"] in out and "revoked" in out

    resp = client.get("/v1/models", headers=bearer(team["api_key"]))
    assert resp.status_code == 401
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.headers["www-authenticate"].startswith("Bearer")
    body = resp.json()
    assert body["code"] == "invalid_api_key"
    assert "revoked" in body["detail"] and "compaas admin create-key" in body["detail"]
    assert client.get("/v1/models", headers=bearer(other["api_key"])).status_code == 200

    keys = {k["id"]: k for k in embedded.cli_json("list-keys", "alpha")}
    assert keys[team["key_id"]]["status"] == "revoked"
    assert keys[team["key_id"]]["revoked_at"] is not None
    assert keys[other["key_id"]]["status"] == "active"

    again = embedded.cli("revoke-key", team["key_id"])  # by id this time; idempotent
    assert "already revoked" in again.stdout
    unknown = embedded.cli("revoke-key", "cmp_nosuchkey", check=False)
    assert unknown.returncode == 1 and "list-keys" in unknown.stderr

    # the whole key works as well as its prefix
    embedded.cli("revoke-key", other["api_key"])
    assert client.get("/v1/models", headers=bearer(other["api_key"])).status_code == 401


def test_expired_key_gets_401_saying_it_expired(embedded: Embedded) -> None:
    team = embedded.cli_json("create-team", "alpha", "--expires-in-days", "30")
    expires = as_utc(datetime.fromisoformat(team["expires_at"]))
    assert timedelta(days=29) < expires - utcnow() <= timedelta(days=30)
    client = embedded.client()
    assert client.get("/v1/models", headers=bearer(team["api_key"])).status_code == 200

    # move the expiry into the past instead of waiting a month
    with session_scope(embedded.settings().database_url) as session:
        session.execute(
            update(ApiKey)
            .where(ApiKey.id == team["key_id"])
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    resp = client.get("/v1/models", headers=bearer(team["api_key"]))
    assert resp.status_code == 401
    assert resp.headers["content-type"] == "application/problem+json"
    body = resp.json()
    assert body["code"] == "api_key_expired"
    assert team["prefix"] in body["detail"] and "expired" in body["detail"]
    assert "compaas admin create-key" in body["detail"]
    [row] = embedded.cli_json("list-keys", team["team_id"])
    assert row["status"] == "expired"

    refused = embedded.cli("create-key", "alpha", "--expires-in-days", "0", check=False)
    assert refused.returncode == 2 and "≥ 1" in refused.stderr


def test_an_unknown_key_is_told_apart_from_a_missing_one(embedded: Embedded) -> None:
    embedded.cli_json("create-team", "alpha")
    client = embedded.client()
    missing = client.get("/v1/models")
    assert missing.status_code == 401 and missing.json()["code"] == "unauthorized"
    for key in ("cmp_" + "A" * 43, "not-a-compaas-key"):
        resp = client.get("/v1/models", headers=bearer(key))
        assert resp.status_code == 401 and resp.json()["code"] == "invalid_api_key"


def test_last_used_is_recorded_at_most_once_a_minute(embedded: Embedded) -> None:
    team = embedded.cli_json("create-team", "alpha")
    [row] = embedded.cli_json("list-keys")
    assert row["last_used_at"] is None

    client = embedded.client()
    for _ in range(5):  # polling
        assert client.get("/v1/models", headers=bearer(team["api_key"])).status_code == 200
    [row] = embedded.cli_json("list-keys")
    first_use = row["last_used_at"]
    assert first_use is not None

    # within the resolution nothing is written; past it, the new time is
    settings = embedded.settings()
    pepper = data_dir_pepper(settings.data_dir.resolve())
    used = datetime.fromisoformat(first_use)
    for later, expect_write in (
        (LAST_USED_RESOLUTION / 2, False),
        (LAST_USED_RESOLUTION + timedelta(seconds=5), True),
    ):
        with session_scope(settings.database_url) as session:
            authenticate(session, team["api_key"], pepper, now=used + later)
        [row] = embedded.cli_json("list-keys")
        expected = (used + later).isoformat(timespec="seconds") if expect_write else first_use
        assert row["last_used_at"] == expected


def test_list_keys_text_shows_every_column(embedded: Embedded) -> None:
    a = embedded.cli_json("create-team", "alpha", "--expires-in-days", "7")
    b = embedded.cli_json("create-team", "beta")
    out = embedded.cli("list-keys").stdout
    header = out.splitlines()[0].split()
    assert header[:4] == ["PREFIX", "ID", "TEAM", "STATUS"]
    assert {"CREATED", "LAST", "USED", "EXPIRES", "REVOKED"} <= set(header)
    assert a["prefix"] in out and b["prefix"] in out and a["expires_at"] in out
    only_beta = embedded.cli("list-keys", "beta").stdout
    assert b["prefix"] in only_beta and a["prefix"] not in only_beta
    assert "api_key" not in out and a["api_key"] not in out  # keys are never shown again


def test_concurrent_first_starts_agree_on_one_pepper(tmp_path: Path) -> None:
    code = "import sys; from pathlib import Path; from app.security import data_dir_pepper; "
    code += "print(data_dir_pepper(Path(sys.argv[1])))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    peppers = {proc.communicate()[0].strip() for proc in procs}
    assert peppers == {(tmp_path / PEPPER_FILE).read_text()}
    assert [p.name for p in tmp_path.iterdir()] == [PEPPER_FILE]  # no temp files left
