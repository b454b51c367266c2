"""app.logs: one configuration for API, worker and reconciler; the standard library's loggers
come out through structlog, as JSON lines or the console format, with the ids bound around
them; the API's request ids (no server: a small app behind the same middleware)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app import logs
from app.api import problems
from app.api.telemetry import REQUEST_SECONDS, RequestTelemetry


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Put the root logger and structlog back as they were (other tests share the process)."""
    monkeypatch.delenv(logs.ENV_FORMAT, raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    structlog.contextvars.clear_contextvars()  # ids an earlier test's in-process job left bound
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


@pytest.mark.usefixtures("restore_logging")
def test_stdlib_loggers_come_out_as_json_with_the_bound_ids() -> None:
    out = io.StringIO()
    assert logs.configure("worker", "json", stream=out) == "json"
    stdlib = logging.getLogger("worker.runner")
    with logs.bind(job_id="job-1", attempt=2):
        stdlib.info("step %s started", 0)
        logs.bind_more(step=0)
        logs.get_logger("app.test").warning("structlog too", extra_field=3)
        try:
            raise ValueError("boom")
        except ValueError:
            stdlib.exception("failed")
    stdlib.info("after")
    first, second, third, after = lines(out)
    assert first["event"] == "step 0 started"
    assert first["job_id"] == "job-1" and first["attempt"] == 2
    assert (first["level"], first["logger"], first["process"]) == (
        "info",
        "worker.runner",
        "worker",
    )
    assert first["timestamp"].endswith("Z")
    assert second["event"] == "structlog too" and second["extra_field"] == 3
    assert second["step"] == 0 and second["level"] == "warning"
    assert third["event"] == "failed" and "ValueError: boom" in third["exception"]
    assert "job_id" not in after and "step" not in after, "bind restores the context"


@pytest.mark.usefixtures("restore_logging")
def test_a_terminal_gets_the_console_format_unless_json_is_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tty = Terminal()
    assert logs.configure("api", stream=tty) == "console"
    logging.getLogger("app.x").info("hello %s", "there")
    text = tty.getvalue()
    assert "hello there" in text and not text.lstrip().startswith("{")
    assert logs.configure("api", stream=io.StringIO()) == "json", "not a terminal: JSON"
    monkeypatch.setenv(logs.ENV_FORMAT, "json")
    assert logs.resolve_format(None, Terminal()) == "json"
    monkeypatch.setenv(logs.ENV_FORMAT, "console")
    assert logs.resolve_format(None, io.StringIO()) == "console"
    with pytest.raises(ValueError, match="auto, json or console"):
        logs.resolve_format("yaml")


@pytest.mark.usefixtures("restore_logging")
def test_configuring_twice_keeps_one_handler_and_leaves_others_alone() -> None:
    root = logging.getLogger()
    other = logging.NullHandler()
    root.addHandler(other)
    logs.configure("api", "json", stream=io.StringIO())
    out = io.StringIO()
    logs.configure("api", "json", stream=out)
    assert [h for h in root.handlers if h.get_name() == "compaas"] == [root.handlers[-1]]
    assert other in root.handlers
    logging.getLogger("x").info("once")
    assert [line["event"] for line in lines(out)] == ["once"]


def count(route: str, method: str, status: str) -> float:
    """The request histogram's observation count for one series."""
    wanted = {"route": route, "method": method, "status": status}
    for family in REQUEST_SECONDS.collect():
        for sample in family.samples:
            if sample.name.endswith("_count") and sample.labels == wanted:
                return sample.value
    return 0.0


@pytest.mark.usefixtures("restore_logging")
def test_requests_get_an_id_an_access_line_and_a_latency_by_route_template() -> None:
    out = io.StringIO()
    logs.configure("api", "json", stream=out)
    inner = FastAPI()
    problems.install(inner)

    @inner.get("/things/{thing_id}")
    def thing(thing_id: str) -> dict[str, str]:
        logging.getLogger("app.things").info("reading %s", thing_id)
        return {"id": thing_id}

    @inner.get("/boom")
    def boom() -> None:
        raise RuntimeError("boom")

    route = "/things/{thing_id}"
    before = count(route, "GET", "2xx"), count("unmatched", "GET", "4xx")
    client = TestClient(RequestTelemetry(inner), raise_server_exceptions=False)
    given = client.get("/things/a", headers={"X-Request-ID": "req-42"})
    assert given.headers["x-request-id"] == "req-42"
    made = client.get("/things/b")
    assert len(made.headers["x-request-id"]) == 32
    odd = client.get("/things/c", headers={"X-Request-ID": "bad id\twith spaces"})
    assert odd.headers["x-request-id"] != "bad id\twith spaces"
    assert client.get("/nowhere/x").status_code == 404
    failed = client.get("/boom", headers={"X-Request-ID": "req-500"})
    assert failed.status_code == 500 and failed.headers["x-request-id"] == "req-500"
    assert failed.json()["request_id"] == "req-500", "a 500 names the id its log lines carry"
    assert "req-500" in failed.json()["detail"]
    assert count(route, "GET", "2xx") == before[0] + 3, "one series for every /things/{id}"
    assert count("unmatched", "GET", "4xx") == before[1] + 1
    assert count("/boom", "GET", "5xx") >= 1

    found = lines(out)
    inside = next(line for line in found if line["event"] == "reading a")
    assert inside["request_id"] == "req-42", "lines logged while handling carry the id"
    access = [line for line in found if line["logger"] == "compaas.access"]
    first = access[0]
    assert first["request_id"] == "req-42" and first["route"] == route
    assert first["status"] == 200 and first["path"] == "/things/a" and first["duration_ms"] >= 0
    assert {line["route"] for line in access} == {route, "unmatched", "/boom"}
    assert next(line for line in access if line["route"] == "/boom")["level"] == "warning"
    trace = next(line for line in found if line["event"].startswith("unhandled error"))
    assert trace["request_id"] == "req-500" and "RuntimeError: boom" in trace["exception"]


@pytest.mark.usefixtures("restore_logging")
def test_the_access_log_can_be_turned_off(tmp_path: Path) -> None:
    from app.config import Settings
    from app.main import create_app

    access = logging.getLogger("compaas.access")
    for enabled, level in ((False, logging.WARNING), (True, logging.NOTSET)):
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            data_dir=tmp_path,
            run_reconciler=False,
            access_log=enabled,
            log_format="json",
        )
        create_app(settings)
        assert access.level == level
    access.setLevel(logging.NOTSET)
