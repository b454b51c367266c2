"""Recipes hash their canonical content; provenance envelopes verify only for the untouched
artifact and statement, signed by a trusted key."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from engine.config import QuantizeConfig
from engine.provenance import (
    ProvenanceError,
    keyid,
    pae,
    sign_envelope,
    statement,
    verify_envelope,
)
from engine.recipe import (
    RecipeEdited,
    build_recipe,
    canonical_json,
    check_recipe,
    content_hash,
    library_versions,
    version_differences,
)

MODEL = {"sha256": "a" * 64, "format": "onnx"}
DATASET = {"sha256": "b" * 64, "format": "npz"}


def _recipe(**change: object) -> dict[str, object]:
    args: dict[str, object] = {
        "model": MODEL,
        "dataset": DATASET,
        "pipeline": [{"op": "quantize", "mode": "dynamic"}],
        "evaluation": {"task": "classification", "holdout": None},
        "export": ["onnx"],
        "seed": 7,
        "versions": library_versions(),
    }
    return build_recipe(**{**args, **change})  # type: ignore[arg-type]


def test_recipe_fills_every_default_and_hashes_its_canonical_content() -> None:
    recipe = _recipe()
    step = recipe["pipeline"][0]  # type: ignore[index]
    assert step == QuantizeConfig(op="quantize", mode="dynamic").to_dict()
    assert set(step) == set(QuantizeConfig.model_fields)  # every field, defaults included
    assert recipe["evaluation"] == {"task": "classification", "holdout": 0.0}  # no step trains
    trains = _recipe(pipeline=[{"op": "fine_tune"}])
    assert trains["evaluation"]["holdout"] == 0.3  # type: ignore[index]
    versions = recipe["versions"]
    assert {"compaas", "torch", "onnxruntime", "onnx", "torch-pruning", "numpy"} <= set(versions)  # type: ignore[arg-type]
    body = {k: v for k, v in recipe.items() if k != "content_sha256"}
    canonical = canonical_json(body).decode()
    assert canonical == json.dumps(json.loads(canonical), sort_keys=True, separators=(",", ":"))
    assert '"holdout":0,' in canonical  # integral floats are written as ints
    assert recipe["content_sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert check_recipe(json.loads(json.dumps(recipe))).seed == 7
    # key order and integral floats written as ints (a JSON round trip elsewhere) do not matter
    shuffled = dict(reversed(list(recipe.items())))
    shuffled["evaluation"] = {"holdout": 0, "task": "classification"}
    assert content_hash(shuffled) == recipe["content_sha256"]


def test_an_edited_recipe_is_told_apart() -> None:
    recipe = _recipe()
    edited = copy.deepcopy(recipe)
    edited["seed"] = 8
    with pytest.raises(RecipeEdited) as caught:
        check_recipe(edited)
    assert caught.value.given == recipe["content_sha256"]
    assert caught.value.actual == content_hash(edited) != recipe["content_sha256"]
    assert _recipe(seed=8)["content_sha256"] == caught.value.actual


def test_version_differences_name_each_package() -> None:
    ran = {"torch": "2.12.0", "numpy": "2.0.0", "onnx": None}
    now = {"torch": "2.13.0", "numpy": "2.0.0", "onnx": "1.17.0"}
    assert version_differences(ran, now) == ["torch 2.12.0 → 2.13.0"]
    assert version_differences(None, now) == []


def _signed(tmp_path: Path, key: Ed25519PrivateKey) -> tuple[Path, dict[str, object]]:
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"\x08\x07model bytes" * 100)
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    recipe = _recipe()
    document = statement(
        subject_name=artifact.name,
        subject_sha256=digest,
        recipe=recipe,
        job={"id": "job-1", "artifact_id": "art-1", "role": "final", "step_index": None},
    )
    return artifact, sign_envelope(document, key)


def test_a_signed_statement_verifies_and_any_change_fails_the_named_check(
    tmp_path: Path,
) -> None:
    key = Ed25519PrivateKey.generate()
    artifact, envelope = _signed(tmp_path, key)
    payload = json.loads(base64.b64decode(envelope["payload"]))  # type: ignore[arg-type]
    assert payload["_type"] == "https://in-toto.io/Statement/v1"
    assert payload["predicate"]["buildDefinition"]["resolvedDependencies"] == [
        {"name": "model", "digest": {"sha256": MODEL["sha256"]}},
        {"name": "dataset", "digest": {"sha256": DATASET["sha256"]}},
    ]
    sig = envelope["signatures"][0]  # type: ignore[index]
    assert sig["keyid"] == keyid(key.public_key())
    key.public_key().verify(
        base64.b64decode(sig["sig"]),
        pae(envelope["payloadType"], base64.b64decode(envelope["payload"])),  # type: ignore[arg-type]
    )

    verified = verify_envelope(envelope, artifact, [key.public_key()])
    assert verified.sha256 == payload["subject"][0]["digest"]["sha256"]
    assert verified.recipe_sha256 == _recipe()["content_sha256"]

    data = bytearray(artifact.read_bytes())
    data[10] ^= 1
    changed = tmp_path / "changed.onnx"
    changed.write_bytes(bytes(data))
    with pytest.raises(ProvenanceError) as caught:
        verify_envelope(envelope, changed, [key.public_key()])
    assert caught.value.check == "digest"

    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(ProvenanceError) as caught:
        verify_envelope(envelope, artifact, [other])
    assert caught.value.check == "signature"

    payload["subject"][0]["digest"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    forged = {**envelope, "payload": base64.b64encode(json.dumps(payload).encode()).decode()}
    with pytest.raises(ProvenanceError) as caught:
        verify_envelope(forged, changed, [key.public_key()])
    assert caught.value.check == "signature"

    with pytest.raises(ProvenanceError) as caught:
        verify_envelope({"payload": "%%%"}, artifact, [key.public_key()])
    assert caught.value.check == "format"
