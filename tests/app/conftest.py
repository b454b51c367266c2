"""Real auto searches for the report tests (charts, page, dashboard): run once per test process
on the digits CNN (ONNX upload: post-training candidates only, a few seconds each) and returned
as the API returns the job, so the report is checked against details the engine wrote."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from app.schemas.jobs import JobRead
from engine.pipeline import compress


def job_read(result: dict[str, Any], job_id: str) -> dict[str, Any]:
    """An engine result as `GET /v1/jobs/{id}` returns the finished job (the fields the worker
    stores, worker/runner.py, through the API's JobRead and its JSON)."""
    now = datetime(2026, 12, 1, 5, 0, tzinfo=UTC)
    steps = [
        {
            "index": s["index"],
            "op": s["op"],
            "config": s["config"],
            "status": "succeeded",
            "metrics": s.get("metrics"),
            "quality": s.get("quality"),
            "warnings": s.get("warnings") or None,
            "details": s.get("details") or None,
            "artifact_id": None,
            "started_at": now,
            "finished_at": now,
        }
        for s in result["steps"]
    ]
    job = JobRead.model_validate(
        {
            "id": job_id,
            "model_id": "model-digits",
            "dataset_id": "dataset-digits",
            "status": "succeeded",
            "progress": 1.0,
            "current_step": None,
            "preset": "auto",
            "evaluation": {"task": "classification", "holdout": 0.3},
            "export": ["onnx"],
            "seed": 0,
            "steps": steps,
            "metrics": {
                "original": result["original"],
                "final": result["final"],
                "ratios": result["ratios"],
                "evaluation": result.get("evaluation"),
            },
            "quality": result["quality"],
            "artifacts": [],
            "warnings": list(result.get("warnings") or []),
            "error": None,
            "attempts": 1,
            "created_at": now,
            "started_at": now,
            "finished_at": now,
        }
    )
    return job.model_dump(mode="json")


@pytest.fixture(scope="session")
def auto_jobs(
    digits_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """Two auto jobs on the digits CNN, as tests/engine/test_auto_search.py runs them:
    `met` (max_accuracy_drop 0.02, objective size, at most 3 candidates: one is delivered,
    the rest skipped as dominated) and `impossible` (max_size_bytes 1 % of the original and no
    accuracy drop: the original is delivered, with a warning)."""
    onnx, npz = digits_files["onnx"], digits_files["npz"]
    budgets = {
        # 0.02, not 0.01: the 4-bit candidate's drop is about 0.01 (0.011 on one CPU, under 0.01
        # on another), and whether it meets decides whether the rest are skipped as dominated
        "met": ({"max_accuracy_drop": 0.02}, 3),
        "impossible": ({"max_size_bytes": onnx.stat().st_size // 100, "max_accuracy_drop": 0.0}, 2),
    }
    jobs = {}
    for name, (budget, limit) in budgets.items():
        step = {"op": "auto", "budget": budget, "objective": "size",
                "search": {"max_candidates": limit}}  # fmt: skip
        workdir = tmp_path_factory.mktemp(f"auto-{name}")
        result = compress(onnx, [step], dataset_path=npz, workdir=workdir)
        jobs[name] = job_read(result, f"job-auto-{name}")
    return jobs
