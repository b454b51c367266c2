from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import SettingsDep
from app.signing import public_keys

router = APIRouter(prefix="/v1", tags=["provenance"])


@router.get("/keys")
def list_keys(settings: SettingsDep) -> dict[str, Any]:
    """The public keys that provenance statements are signed with (PEM, keyid); no API key
    needed. Save one as a .pem (or this whole answer) for `compaas verify --key`."""
    return {
        "items": [
            {
                "keyid": key.keyid,
                "algorithm": "ed25519",
                "public_key_pem": key.pem,
                "current": key.current,
            }
            for key in public_keys(settings)
        ]
    }
