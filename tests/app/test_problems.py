"""Domain errors (app/errors.py) become RFC 9457 problems with their kind's status."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.api.problems import problem_for
from app.errors import AppError, Conflict, Invalid, LimitReached, NotFound, not_found


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (Invalid("invalid_cursor", "bad cursor", field="cursor"), 422),
        (not_found("model", "abc"), 404),
        (Conflict("model_in_use", "in use"), 409),
        (LimitReached("too_many_active_jobs", "wait"), 429),
    ],
)
def test_each_kind_has_its_status(error: AppError, status: int) -> None:
    problem = problem_for(error)
    body = problem.body("/v1/x")
    assert problem.status == status == body["status"]
    assert body["code"] == error.code
    assert body["type"].endswith(error.code)
    assert body.get("field") == error.field
    assert body["instance"] == "/v1/x"


def test_not_found_reads_as_before() -> None:
    body = problem_for(not_found("dataset", "d1")).body()
    assert isinstance(not_found("dataset", "d1"), NotFound)
    assert body["title"] == "Not found"
    assert (
        body["detail"] == "No dataset with id 'd1' in your team. List yours with GET /v1/datasets."
    )


def test_retry_after_becomes_a_header_and_extras_stay_in_the_body() -> None:
    error = Conflict("model_not_ready", "wait", field="model_id", retry_after=2, input="x")
    problem = problem_for(error)
    assert problem.headers == {"Retry-After": "2"}
    assert problem.body()["input"] == "x"
    assert problem_for(Invalid("x", "y")).headers is None


def test_paths_in_the_detail_are_redacted(tmp_path: Path) -> None:
    detail = f"cannot read {tmp_path}/spool/upload.bin: truncated"
    assert str(tmp_path) not in problem_for(Invalid("x", detail)).body()["detail"]
