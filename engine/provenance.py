"""Provenance of an artifact: an in-toto Statement (SLSA v1 predicate) in a signed DSSE envelope.

The statement's subject is the artifact's sha256; its predicate holds the recipe, the recipe's
content hash, the materials (model and dataset sha256) and the builder's versions. The envelope
is signed with an ed25519 key over DSSE's pre-authentication encoding, so `verify_envelope`
needs only the public key and the two files: it runs offline.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from engine.recipe import HASH_FIELD, canonical_json

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUILD_TYPE = "https://github.com/compaas/compaas/recipe/v1"
BUILDER_ID = "https://github.com/compaas/compaas"


class ProvenanceError(ValueError):
    """A statement that does not verify; `check` names what failed."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(detail)
        self.check = check
        self.detail = detail


def keyid(public_key: Ed25519PublicKey) -> str:
    """sha256 (hex) of the key's DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def public_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ProvenanceError("key", "the public key is not an ed25519 key")
    return key


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ProvenanceError("key", "the signing key is not an ed25519 private key")
    return key


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature covers."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def statement(
    *,
    subject_name: str,
    subject_sha256: str,
    recipe: Mapping[str, Any],
    job: Mapping[str, Any],
) -> dict[str, Any]:
    """The in-toto statement for one artifact made by the job that `recipe` describes.

    `job`: `{id, artifact_id, role, step_index, started_on, finished_on}` (invocation metadata).
    """
    materials = [{"name": "model", "digest": {"sha256": recipe["model"]["sha256"]}}]
    if recipe.get("dataset"):
        materials.append({"name": "dataset", "digest": {"sha256": recipe["dataset"]["sha256"]}})
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject_name, "digest": {"sha256": subject_sha256}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"recipe": dict(recipe)},
                "internalParameters": {"recipe_sha256": recipe[HASH_FIELD]},
                "resolvedDependencies": materials,
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": dict(recipe.get("versions") or {})},
                "metadata": {
                    "invocationId": job["id"],
                    "startedOn": job.get("started_on"),
                    "finishedOn": job.get("finished_on"),
                },
                "byproducts": [
                    {
                        "name": "artifact",
                        "content": {
                            "id": job.get("artifact_id"),
                            "role": job.get("role"),
                            "step_index": job.get("step_index"),
                        },
                    }
                ],
            },
        },
    }


def sign_envelope(document: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """A DSSE envelope around the statement's canonical JSON, signed with `key`."""
    payload = canonical_json(document)
    signature = key.sign(pae(PAYLOAD_TYPE, payload))
    return {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [
            {"keyid": keyid(key.public_key()), "sig": base64.b64encode(signature).decode()}
        ],
    }


@dataclass(frozen=True)
class Verified:
    """What a verified statement says."""

    keyid: str
    subject_name: str
    sha256: str
    recipe_sha256: str | None


def verify_envelope(
    envelope: Mapping[str, Any], artifact: Path, keys: Iterable[Ed25519PublicKey]
) -> Verified:
    """Check the signature (one of `keys`) and that `artifact`'s sha256 is the subject's digest;
    ProvenanceError names the check that failed: format, signature or digest."""
    try:
        payload = base64.b64decode(envelope["payload"], validate=True)
        payload_type = envelope["payloadType"]
        signatures = list(envelope["signatures"])
        document = json.loads(payload)
        subjects = document["subject"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ProvenanceError(
            "format", f"not a DSSE envelope holding an in-toto statement ({exc})"
        ) from exc
    if payload_type != PAYLOAD_TYPE or document.get("_type") != STATEMENT_TYPE:
        raise ProvenanceError(
            "format", f"payloadType {payload_type!r} / _type is not an in-toto statement"
        )
    by_id = {keyid(k): k for k in keys}
    signer = None
    for entry in signatures:
        key = by_id.get(str(entry.get("keyid")))
        if key is None:
            continue
        try:
            key.verify(base64.b64decode(entry.get("sig", "")), pae(payload_type, payload))
        except (InvalidSignature, ValueError):
            continue
        signer = str(entry["keyid"])
        break
    if signer is None:
        ids = ", ".join(str(s.get("keyid")) for s in signatures) or "none"
        known = ", ".join(by_id) or "none"
        raise ProvenanceError(
            "signature",
            f"no valid signature by a trusted key (statement signed by: {ids}; trusted: "
            f"{known}); the statement was altered or signed by another deployment",
        )
    digest = hashlib.sha256()
    with artifact.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    actual = digest.hexdigest()
    named = [s for s in subjects if s.get("digest", {}).get("sha256") == actual]
    if not named:
        expected = ", ".join(s.get("digest", {}).get("sha256", "?") for s in subjects)
        raise ProvenanceError(
            "digest",
            f"{artifact.name} has sha256 {actual}, the statement's subject has {expected}: the "
            "file is not the artifact the statement is about (changed or another file)",
        )
    predicate = document.get("predicate") or {}
    internal = predicate.get("buildDefinition", {}).get("internalParameters", {})
    return Verified(signer, str(named[0].get("name")), actual, internal.get("recipe_sha256"))
