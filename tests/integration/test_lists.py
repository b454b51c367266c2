"""Lists are cursor-paginated, newest first, and scoped to the caller's team, on Postgres (the
keyset order on its timestamps). A delete then a 404 is in tests/api/test_deletes.py."""

from __future__ import annotations

import io

import numpy as np
import pytest

from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration


def _dataset(stack: Stack, headers: dict[str, str], n: int) -> str:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((n, 3), np.float32))
    resp = stack.client.post(
        "/v1/datasets", files={"file": (f"d{n}.npz", buf.getvalue())}, headers=headers
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def test_cursor_pagination_walks_every_item_once(pg_stack: Stack) -> None:
    _, headers = pg_stack.new_team("lists")
    _, other = pg_stack.new_team("lists-other")
    created = [_dataset(pg_stack, headers, n) for n in range(1, 6)]
    _dataset(pg_stack, other, 7)

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        url = "/v1/datasets?limit=2" + (f"&cursor={cursor}" if cursor else "")
        body = pg_stack.client.get(url, headers=headers).json()
        pages += 1
        seen += [d["id"] for d in body["items"]]
        assert len(body["items"]) <= 2
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(reversed(created))  # newest first, no repeats, nothing missing
    other_ids = [
        d["id"] for d in pg_stack.client.get("/v1/datasets", headers=other).json()["items"]
    ]
    assert len(other_ids) == 1 and other_ids[0] not in created
