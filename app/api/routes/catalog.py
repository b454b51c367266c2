from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from engine.config import OPS, PRESETS
from engine.config.presets import AUTO_PRESET

router = APIRouter(prefix="/v1", tags=["catalog"])


@router.get("/methods")
def list_methods() -> dict[str, Any]:
    """Every op with its config's JSON schema (the same classes the engine parses)."""
    return {
        "items": [
            {
                "op": name,
                "version": cls.model_fields["version"].default,
                "description": (cls.__doc__ or "").strip(),
                "schema": cls.model_json_schema(),
            }
            for name, cls in sorted(OPS.items())
        ]
    }


@router.get("/presets")
def list_presets() -> dict[str, Any]:
    """Named pipelines that can be given as `preset` in POST /v1/jobs."""
    presets = {**PRESETS, "auto": AUTO_PRESET}
    return {"items": [{"name": name, **preset} for name, preset in sorted(presets.items())]}
