"""Issue #17 through the REST API on a real worker: preset "auto" on the digits CNN returns
the best model within the budget with its candidates and Pareto front, and a Pareto point's
recipe runs as a normal job with one call."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import Stack
from tests.integration.methods import Client

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def api(pg_stack: Stack) -> Client:
    _, headers = pg_stack.new_team("auto")
    return Client(pg_stack, headers)


def test_auto_job_on_the_digits_cnn(api: Client, digits_files: dict[str, Path]) -> None:
    job = api.run(
        digits_files["onnx"],
        digits_files["npz"],
        preset="auto",
        # 0.02: the 4-bit weight_share candidate's drop is about 0.01 (0.011 on one CPU), and
        # at a 0.01 budget whether it meets decided what two candidates could deliver
        budget={"max_accuracy_drop": 0.02},
        objective="size",
        search={"max_candidates": 2},
    )
    assert job["preset"] == "auto" and job["quality"]["verdict"] == "ok"
    (step,) = job["steps"]
    details = step["details"]
    chosen = details["chosen"]
    assert chosen["candidate"] is not None, job["warnings"]
    metrics = job["metrics"]
    drop = metrics["original"]["accuracy_top1"] - metrics["final"]["accuracy_top1"]
    assert drop <= 0.02
    final = metrics["final"]
    delivered = final.get("archive_size_bytes") or final["size_bytes"]
    assert delivered < metrics["original"]["size_bytes"] / 3
    measured = [c for c in details["candidates"] if c["status"] == "measured"]
    assert 1 <= len(measured) <= 2 and all(c["seconds"] > 0 for c in measured)
    assert details["pareto"]
    # The chosen point, as a normal job from its recipe: one call, the same model.
    point = next(p for p in details["pareto"] if p["candidate"] == chosen["candidate"])
    resp = api.stack.client.post("/v1/jobs", json={"recipe": point["recipe"]}, headers=api.headers)
    assert resp.status_code == 202, resp.text
    again = api.stack.wait_job(resp.json()["id"], api.headers, timeout=600)
    assert again["status"] == "succeeded", again["error"]
    assert [s["op"] for s in again["steps"]] == [s["op"] for s in point["recipe"]["pipeline"]]
    size_again = (
        again["metrics"]["final"].get("archive_size_bytes")
        or again["metrics"]["final"]["size_bytes"]
    )
    assert size_again == point["metrics"].get("archive_size_bytes", point["metrics"]["size_bytes"])


def test_impossible_budget_succeeds_with_the_original(
    api: Client, digits_files: dict[str, Path]
) -> None:
    size = digits_files["onnx"].stat().st_size
    job = api.run(
        digits_files["onnx"],
        digits_files["npz"],
        preset="auto",
        budget={"max_size_bytes": size // 100, "max_accuracy_drop": 0.0},
        search={"max_candidates": 1},
    )
    assert job["status"] == "succeeded" and job["quality"]["verdict"] == "ok"
    details = job["steps"][0]["details"]
    assert details["chosen"] == {"candidate": None, "name": "original"}
    (closest,) = [c for c in details["candidates"] if c["status"] == "measured"]
    (warning,) = [w for w in job["warnings"] if "No candidate met the whole budget" in w]
    assert f"candidate {closest['index']} ({closest['name']})" in warning
    metrics = job["metrics"]
    assert metrics["final"]["size_bytes"] == metrics["original"]["size_bytes"]
    assert metrics["final"]["accuracy_top1"] == metrics["original"]["accuracy_top1"]
