"""Recipes over the API, in process with no worker: a job's recipe names its inputs by sha256
and its fully resolved pipeline; posted back unchanged it makes the same job, edited it is
refused; other teams see nothing. And the deployment's signing key: made once, kept, 0600."""

from __future__ import annotations

import copy
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from app.main import create_app
from app.signing import SIGNING_KEY_FILE
from engine.config import preset_pipeline
from engine.provenance import private_pem
from engine.recipe import content_hash
from tests.conftest import Stack, problem, settings_from


@pytest.fixture(scope="module")
def dataset(api_stack: Stack, api_team: dict[str, str], digits_files: dict[str, Path]) -> str:
    resp = api_stack.upload("datasets", digits_files["npz"], api_team)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def _job(stack: Stack, team: dict[str, str], **body: Any) -> dict[str, Any]:
    resp = stack.client.post("/v1/jobs", json=body, headers=team)
    assert resp.status_code == 202, resp.text
    return dict(resp.json())


def _recipe(stack: Stack, team: dict[str, str], job_id: str) -> dict[str, Any]:
    resp = stack.client.get(f"/v1/jobs/{job_id}/recipe", headers=team)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def test_recipe_resolves_the_preset_and_runs_again_as_the_same_job(
    api_stack: Stack,
    api_team: dict[str, str],
    api_digits: dict[str, dict[str, Any]],
    dataset: str,
) -> None:
    model = api_digits["onnx"]
    job = _job(
        api_stack,
        api_team,
        model_id=model["id"],
        dataset_id=dataset,
        preset="edge-int8",
        overrides={"quantize": {"per_channel": False}},
        seed=11,
    )
    recipe = _recipe(api_stack, api_team, job["id"])
    assert recipe["model"] == {"sha256": model["sha256"], "format": "onnx"}
    data = api_stack.client.get(f"/v1/datasets/{dataset}", headers=api_team).json()
    assert recipe["dataset"]["sha256"] == data["sha256"]
    [step] = recipe["pipeline"]
    methods = api_stack.client.get("/v1/methods").json()["items"]
    fields = next(m["schema"]["properties"] for m in methods if m["op"] == "quantize")
    assert set(step) == set(fields)  # every field of the op, defaults filled in
    assert step == {**step, **preset_pipeline("edge-int8")[0], "per_channel": False}
    assert recipe["evaluation"] == {
        "task": "classification",
        "holdout": 0.0,
        "floor": None,  # the task's default floor
        "allow_below_floor": False,
    }
    assert recipe["export"] == ["onnx"] and recipe["seed"] == 11
    assert recipe["versions"] is None  # no worker has run it yet
    assert recipe["content_sha256"] == content_hash(recipe)

    again = _job(api_stack, api_team, recipe=recipe)
    assert again["model_id"] == model["id"] and again["dataset_id"] == dataset
    assert again["seed"] == 11 and again["preset"] is None
    assert [s["config"] for s in again["steps"]] == recipe["pipeline"]
    assert _recipe(api_stack, api_team, again["id"]) == recipe  # the same job, the same hash


def test_edited_misplaced_and_foreign_recipes_are_refused(
    api_stack: Stack,
    api_team: dict[str, str],
    api_other_team: dict[str, str],
    api_digits: dict[str, dict[str, Any]],
    dataset: str,
) -> None:
    client = api_stack.client
    pipeline = [{"op": "quantize", "mode": "dynamic"}]
    job = _job(api_stack, api_team, model_id=api_digits["onnx"]["id"], pipeline=pipeline)
    recipe = _recipe(api_stack, api_team, job["id"])

    edited = copy.deepcopy(recipe)
    edited["pipeline"][0]["per_channel"] = not edited["pipeline"][0]["per_channel"]
    body = problem(
        client.post("/v1/jobs", json={"recipe": edited}, headers=api_team), 422, "recipe_edited"
    )
    assert body["field"] == "recipe.content_sha256"
    assert "unchanged" in body["detail"] and "instead of 'recipe'" in body["detail"]
    tampered = {**recipe, "content_sha256": "0" * 64}
    problem(
        client.post("/v1/jobs", json={"recipe": tampered}, headers=api_team), 422, "recipe_edited"
    )

    odd = copy.deepcopy(recipe)  # re-hashed, but holding a setting this service does not have
    odd["evaluation"]["bogus"] = 1
    odd["content_sha256"] = content_hash(odd)
    body = problem(
        client.post("/v1/jobs", json={"recipe": odd}, headers=api_team), 422, "invalid_recipe"
    )
    assert body["field"] == "recipe.evaluation.bogus"

    both = {"recipe": recipe, "pipeline": pipeline}
    body = problem(client.post("/v1/jobs", json=both, headers=api_team), 422, "validation_error")
    assert body["field"] == "pipeline"
    wrong_model = {"recipe": recipe, "model_id": api_digits["pt2"]["id"]}
    body = problem(
        client.post("/v1/jobs", json=wrong_model, headers=api_team), 422, "recipe_model_mismatch"
    )
    assert api_digits["pt2"]["sha256"] in body["detail"]
    problem(
        client.post("/v1/jobs", json={"recipe": recipe, "dataset_id": dataset}, headers=api_team),
        422,
        "validation_error",
    )
    problem(
        client.post("/v1/jobs", json={"pipeline": pipeline}, headers=api_team),
        422,
        "validation_error",
    )

    # another team: the job and its recipe do not exist; its model is not theirs either
    problem(client.get(f"/v1/jobs/{job['id']}/recipe", headers=api_other_team), 404, "not_found")
    body = problem(
        client.post("/v1/jobs", json={"recipe": recipe}, headers=api_other_team),
        404,
        "recipe_model_not_found",
    )
    assert body["field"] == "recipe.model.sha256"
    assert recipe["model"]["sha256"] in body["detail"] and "POST /v1/models" in body["detail"]
    foreign = {"recipe": recipe, "model_id": api_digits["onnx"]["id"]}
    problem(client.post("/v1/jobs", json=foreign, headers=api_other_team), 404, "not_found")


def test_a_recipe_from_other_versions_runs_with_a_warning(
    api_stack: Stack, api_team: dict[str, str], api_digits: dict[str, dict[str, Any]]
) -> None:
    pipeline = [{"op": "quantize", "dtype": "fp16"}]
    job = _job(api_stack, api_team, model_id=api_digits["onnx"]["id"], pipeline=pipeline)
    assert job["warnings"] == []
    recipe = _recipe(api_stack, api_team, job["id"])
    recipe["versions"] = {"compaas": "0.0.1", "numpy": "1.0.0"}
    recipe["content_sha256"] = content_hash(recipe)
    again = _job(api_stack, api_team, recipe=recipe)
    [warning] = [w for w in again["warnings"] if "other versions" in w]
    assert "compaas 0.0.1 →" in warning and "numpy 1.0.0 →" in warning


def test_keys_are_served_and_the_embedded_key_is_made_once_with_mode_0600(
    api_stack: Stack, tmp_path: Path
) -> None:
    served = api_stack.client.get("/v1/keys").json()["items"]
    [current] = [k for k in served if k["current"]]
    assert current["algorithm"] == "ed25519"
    assert current["public_key_pem"].startswith("-----BEGIN PUBLIC KEY-----")

    env = {"COMPAAS_MODE": "embedded", "COMPAAS_DATA_DIR": str(tmp_path / "var")}
    env |= {"COMPAAS_DATABASE_URL": "", "COMPAAS_BROKER_URL": "", "COMPAAS_RUN_RECONCILER": "false"}
    key_file = tmp_path / "var" / SIGNING_KEY_FILE
    assert not key_file.exists()
    first = create_app(settings_from(env))  # first start: the key is made
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    made = key_file.read_bytes()
    with TestClient(first) as client:
        keyid = client.get("/v1/keys").json()["items"][0]["keyid"]
    with TestClient(create_app(settings_from(env))) as client:  # second start: the same key
        assert client.get("/v1/keys").json()["items"][0]["keyid"] == keyid
    assert key_file.read_bytes() == made
    assert keyid != current["keyid"]  # each deployment has its own


def test_production_signs_with_the_configured_key_or_says_how_to_make_one(
    tmp_path: Path,
) -> None:
    env = {
        "COMPAAS_MODE": "production",
        "COMPAAS_DATA_DIR": str(tmp_path),
        "COMPAAS_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "COMPAAS_BROKER_URL": "filesystem://",
        "COMPAAS_API_KEY_PEPPER": "p" * 40,
        "COMPAAS_RUN_RECONCILER": "false",
    }
    with TestClient(create_app(settings_from(env))) as client:
        body = problem(client.get("/v1/keys"), 503, "signing_key_unconfigured")
        assert "COMPAAS_SIGNING_KEY_FILE" in body["detail"] and "openssl genpkey" in body["detail"]
    assert not (tmp_path / SIGNING_KEY_FILE).exists()  # nothing is generated in production

    current, retired = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    (tmp_path / "current.pem").write_bytes(private_pem(current))
    from engine.provenance import keyid, public_pem

    (tmp_path / "retired.pem").write_text(public_pem(retired.public_key()))
    env |= {
        "COMPAAS_SIGNING_KEY_FILE": str(tmp_path / "current.pem"),
        "COMPAAS_SIGNING_PREVIOUS_PUBLIC_KEYS": str(tmp_path / "retired.pem"),
    }
    with TestClient(create_app(settings_from(env))) as client:
        items = client.get("/v1/keys").json()["items"]
    assert [(k["keyid"], k["current"]) for k in items] == [
        (keyid(current.public_key()), True),
        (keyid(retired.public_key()), False),
    ]


def test_a_recipe_outlives_its_model_and_finds_the_same_bytes_uploaded_again(
    api_stack: Stack,
    api_team: dict[str, str],
    api_digits: dict[str, dict[str, Any]],
    digits_files: dict[str, Path],
) -> None:
    client = api_stack.client
    copy_of = api_stack.upload("models", digits_files["onnx"], api_team, name="digits-copy")
    model = api_stack.inspect_here(copy_of.json()["id"], api_team)
    pipeline = [{"op": "quantize", "dtype": "fp16"}]
    job = _job(api_stack, api_team, model_id=model["id"], pipeline=pipeline)
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=api_team).status_code == 200
    assert client.delete(f"/v1/models/{model['id']}", headers=api_team).status_code == 204

    recipe = _recipe(api_stack, api_team, job["id"])
    assert recipe["model"]["sha256"] == model["sha256"] == api_digits["onnx"]["sha256"]
    again = _job(api_stack, api_team, recipe=recipe)
    assert again["model_id"] != model["id"]  # the team's other upload of the same bytes
    found = client.get(f"/v1/models/{again['model_id']}", headers=api_team).json()
    assert found["sha256"] == model["sha256"] and found["status"] == "ready"

    body = problem(
        client.post("/v1/jobs", json={"recipe": {**recipe, "note": "x"}}, headers=api_team),
        422,
        "validation_error",
    )
    assert body["field"].startswith("recipe")
