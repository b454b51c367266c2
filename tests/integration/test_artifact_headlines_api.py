"""Issue #16 item 5 on a worker: a deep-compression job's headline ratio is the archive's (with
its basis named), its steps' warnings are in the job's list, and every artifact downloads
under its own `<model>-<job>-<step>-<op>.<ext>` name (RFC 6266)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from app.services.artifact_names import short_id
from tests.conftest import Stack
from tests.integration.methods import Client

pytestmark = pytest.mark.integration

# One-shot 94 % pruning without recovery training: quick, and its step output drifts from the
# original (so the step warns); the archive still decodes to exactly the measured model.
OVERRIDES = {"prune": {"schedule": {"kind": "one_shot"}, "fine_tune_epochs": 0}}


@pytest.fixture(scope="module")
def finished(sqlite_stack: Stack, digits_files: dict[str, Path]) -> tuple[Client, dict[str, Any]]:
    _, headers = sqlite_stack.new_team("headlines")
    api = Client(sqlite_stack, headers)
    job = api.run(
        digits_files["pt2"],
        digits_files["npz"],
        preset="deep-compression",
        overrides=OVERRIDES,
        evaluation={"task": "classification", "allow_below_floor": True},
    )
    return api, job


def test_headline_ratio_is_the_archives_and_names_its_basis(
    finished: tuple[Client, dict[str, Any]],
) -> None:
    api, job = finished
    assert [s["op"] for s in job["steps"]] == ["prune", "weight_share"]
    metrics = job["metrics"]
    original, final, ratios = metrics["original"], metrics["final"], metrics["ratios"]
    assert metrics["compression_basis"] == "cpz"
    archive = api.artifact(job, "cpz")
    assert len(archive) == final["archive_size_bytes"]
    assert ratios["compression_ratio"] == round(original["size_bytes"] / len(archive), 4)
    # the dense ONNX is still reported, under its own name, and is far less compressed
    assert ratios["onnx_compression_ratio"] == round(
        original["size_bytes"] / final["size_bytes"], 4
    )
    assert ratios["compression_ratio"] > 5 * ratios["onnx_compression_ratio"]
    print(
        f"deep-compression (one-shot, no training) on the digits CNN: compression_ratio "
        f"{ratios['compression_ratio']} (cpz), onnx_compression_ratio "
        f"{ratios['onnx_compression_ratio']}"
    )


def test_step_warnings_are_in_the_jobs_warnings(finished: tuple[Client, dict[str, Any]]) -> None:
    _, job = finished
    warned = [(s["index"], s["op"], w) for s in job["steps"] for w in s["warnings"] or []]
    assert warned, "94 % pruning without training should drift from the original"
    for index, op, warning in warned:
        labelled = [w for w in job["warnings"] if w.endswith(warning)]
        assert len(labelled) == 1, (warning, job["warnings"])
        assert re.match(rf"steps? (\d+ \(\w+\), )*{index} \({op}\)", labelled[0])
    assert len(job["warnings"]) == len(set(job["warnings"]))


def _filename(disposition: str) -> str:
    match = re.fullmatch(
        r'attachment; filename="([^"\\]*)"; filename\*=UTF-8\'\'(\S+)', disposition
    )
    assert match, disposition
    fallback, encoded = match.groups()
    assert fallback == unquote(encoded)  # an ASCII model name: both forms agree
    return fallback


def test_every_artifact_downloads_under_its_own_name(
    finished: tuple[Client, dict[str, Any]],
) -> None:
    api, job = finished
    model = api.stack.client.get(f"/v1/models/{job['model_id']}", headers=api.headers).json()
    stem = f"{model['name']}-{short_id(job['id'])}"
    names = {}
    for art in job["artifacts"]:
        url = f"/v1/artifacts/{art['id']}"
        download = api.stack.client.get(f"{url}/download", headers=api.headers)
        assert download.status_code == 200, download.text
        names[art["id"]] = _filename(download.headers["content-disposition"])
        envelope = api.stack.client.get(f"{url}/provenance", headers=api.headers).json()
        statement = json.loads(base64.b64decode(envelope["payload"]))
        assert statement["subject"][0]["name"] == names[art["id"]]
    assert len(set(names.values())) == len(job["artifacts"])
    (checkpoint,) = [a for a in job["artifacts"] if a["role"] == "checkpoint"]
    expected = {
        f"{stem}-step0-prune.{checkpoint['format']}",  # one-shot pruning runs on the ONNX
        f"{stem}-final-weight_share.onnx",
        f"{stem}-final-weight_share.cpz",
    }
    assert set(names.values()) == expected
