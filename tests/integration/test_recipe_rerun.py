"""A finished job's recipe, run again on the real stack, gives the same metrics and the same
artifact bytes; each artifact's signed provenance statement passes `compaas verify`, and
fails it once one byte of the artifact changes."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Stack, problem

pytestmark = pytest.mark.integration

# One-shot magnitude pruning of the ONNX weights: no training, no sampling, no search, so the
# same inputs and seed give the same bytes (the test checks it rather than assuming it).
PIPELINE = [
    {"op": "prune", "criterion": "magnitude", "granularity": "unstructured", "sparsity": 0.5}
]
# measured, not timed: equal on a re-run of the same artifact on the same samples
EXACT = ("size_bytes", "params", "nonzero_params", "sparsity", "macs")
FIDELITY = ("accuracy_top1", "agreement_top1", "cosine_similarity", "sqnr_db", "max_abs_error")


def _verify(artifact: Path, statement: Path, keys: Path) -> subprocess.CompletedProcess[str]:
    """The real `compaas verify`, in its own process."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "verify",
            str(artifact),
            str(statement),
            "--key",
            str(keys),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )


def _final(job: dict[str, Any]) -> dict[str, Any]:
    [art] = [a for a in job["artifacts"] if a["role"] == "final" and a["format"] == "onnx"]
    return art


def test_recipe_reruns_to_the_same_artifact_and_its_provenance_verifies(
    pg_stack: Stack, digits_files: dict[str, Path], tmp_path: Path
) -> None:
    client = pg_stack.client
    _, team = pg_stack.new_team("recipe")
    _, other = pg_stack.new_team("recipe-other")
    model = pg_stack.wait_model(
        pg_stack.upload("models", digits_files["onnx"], team).json()["id"], team
    )
    dataset = pg_stack.upload("datasets", digits_files["npz"], team).json()
    body = {"model_id": model["id"], "dataset_id": dataset["id"], "pipeline": PIPELINE, "seed": 3}
    resp = client.post("/v1/jobs", json=body, headers=team)
    assert resp.status_code == 202, resp.text
    first = pg_stack.wait_job(resp.json()["id"], team)
    assert first["status"] == "succeeded", first

    recipe = client.get(f"/v1/jobs/{first['id']}/recipe", headers=team).json()
    assert recipe["model"]["sha256"] == model["sha256"]
    assert recipe["dataset"]["sha256"] == dataset["sha256"]
    assert recipe["seed"] == 3 and recipe["pipeline"][0]["sparsity"] == 0.5
    versions = recipe["versions"]  # the worker's, recorded when it ran the job
    assert versions["torch"] and versions["onnxruntime"] and versions["onnx"]
    assert versions["compaas"] and versions["numpy"] and "torch-pruning" in versions

    resp = client.post("/v1/jobs", json={"recipe": recipe}, headers=team)
    assert resp.status_code == 202, resp.text
    second = pg_stack.wait_job(resp.json()["id"], team)
    assert second["status"] == "succeeded", second
    assert not [w for w in second["warnings"] if "other versions" in w]  # same worker
    assert client.get(f"/v1/jobs/{second['id']}/recipe", headers=team).json() == recipe
    assert _final(second)["sha256"] == _final(first)["sha256"]
    for side in ("original", "final"):
        a, b = first["metrics"][side], second["metrics"][side]
        for name in EXACT:
            assert a.get(name) == b.get(name), (side, name)
        for name in FIDELITY:
            if a.get(name) is not None:
                assert b[name] == pytest.approx(a[name], rel=1e-6, abs=1e-9), (side, name)
    ratios = first["metrics"]["ratios"], second["metrics"]["ratios"]
    assert ratios[0]["compression_ratio"] == ratios[1]["compression_ratio"]
    assert ratios[0]["accuracy_drop"] == pytest.approx(ratios[1]["accuracy_drop"], abs=1e-9)

    # provenance: signed statement, verified offline by the real CLI
    art = _final(first)
    resp = client.get(f"/v1/artifacts/{art['id']}/download", headers=team)
    artifact = tmp_path / "final.onnx"
    artifact.write_bytes(resp.content)
    envelope = client.get(f"/v1/artifacts/{art['id']}/provenance", headers=team).json()
    statement = tmp_path / "final.intoto.json"
    statement.write_text(json.dumps(envelope))
    keys = tmp_path / "keys.json"
    keys.write_text(client.get("/v1/keys").text)
    payload = json.loads(base64.b64decode(envelope["payload"]))
    assert payload["subject"][0]["digest"]["sha256"] == art["sha256"]
    build = payload["predicate"]["buildDefinition"]
    assert build["internalParameters"]["recipe_sha256"] == recipe["content_sha256"]
    assert build["externalParameters"]["recipe"] == recipe
    assert [d["digest"]["sha256"] for d in build["resolvedDependencies"]] == [
        model["sha256"],
        dataset["sha256"],
    ]

    ok = _verify(artifact, statement, keys)
    assert ok.returncode == 0, ok.stderr
    assert art["sha256"] in ok.stdout and recipe["content_sha256"] in ok.stdout
    pem = tmp_path / "key.pem"
    pem.write_text(json.loads(keys.read_text())["items"][0]["public_key_pem"])
    assert _verify(artifact, statement, pem).returncode == 0

    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    changed = tmp_path / "changed.onnx"
    changed.write_bytes(bytes(data))
    assert hashlib.sha256(data).hexdigest() != art["sha256"]
    bad = _verify(changed, statement, keys)
    assert bad.returncode == 1
    assert "FAILED digest check" in bad.stderr and art["sha256"] in bad.stderr

    # the statement re-pointed at the changed file no longer carries a valid signature
    payload["subject"][0]["digest"]["sha256"] = hashlib.sha256(data).hexdigest()
    forged = {**envelope, "payload": base64.b64encode(json.dumps(payload).encode()).decode()}
    statement.write_text(json.dumps(forged))
    bad = _verify(changed, statement, keys)
    assert bad.returncode == 1 and "FAILED signature check" in bad.stderr

    # another team sees neither the recipe nor the provenance
    problem(client.get(f"/v1/jobs/{first['id']}/recipe", headers=other), 404, "not_found")
    problem(client.get(f"/v1/artifacts/{art['id']}/provenance", headers=other), 404, "not_found")
