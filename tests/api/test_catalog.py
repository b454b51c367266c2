"""The catalog: presets and every op's JSON schema, as clients discover them."""

from __future__ import annotations

from tests.conftest import Stack


def test_catalog_lists_presets_and_methods(api_stack: Stack, api_team: dict[str, str]) -> None:
    presets = api_stack.client.get("/v1/presets", headers=api_team).json()["items"]
    names = {p["name"] for p in presets}
    assert {"edge-int8", "fp16", "int4-weights", "tiny", "deep-compression"} <= names
    tiny = next(p for p in presets if p["name"] == "tiny")
    assert [s["op"] for s in tiny["pipeline"]] == ["prune", "distill", "quantize"]
    methods = api_stack.client.get("/v1/methods", headers=api_team).json()["items"]
    ops = {m["op"]: m for m in methods}
    assert {"prune", "quantize", "distill", "fine_tune", "low_rank", "weight_share"} <= set(ops)
    assert "temperature" in ops["distill"]["schema"]["properties"]
    assert ops["prune"]["schema"]["properties"]["criterion"]["enum"] == [
        "auto",
        "magnitude",
        "gradient",
        "entropy",
        "activation",
        "random",
    ]
