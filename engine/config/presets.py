"""Named pipelines (GET /v1/presets) and merging a request's overrides into their steps."""

from __future__ import annotations

from typing import Any

from engine.config.base import PipelineError

PRESETS: dict[str, dict[str, Any]] = {
    "edge-int8": {
        "description": "Static INT8 QDQ calibrated on your dataset; weight granularity and "
        "activation type (int8/uint8) chosen by measurement.",
        "pipeline": [{"op": "quantize", "mode": "static", "dtype": "int8"}],
    },
    "fp16": {
        "description": "Float16 weights and activations; inputs/outputs stay float32.",
        "pipeline": [{"op": "quantize", "dtype": "fp16"}],
    },
    "int4-weights": {
        "description": (
            "Weight-only INT4 (onnxruntime MatMulNBits, blocks of 32) for MatMul/Gemm-heavy "
            "models such as transformers; activations stay float."
        ),
        "pipeline": [{"op": "quantize", "mode": "weight_only", "dtype": "int4"}],
    },
    "tiny": {
        "description": (
            "Smallest and fastest: half the channels removed in 3 rounds with training, "
            "distilled from the original, then the fastest static INT8 build that keeps the "
            "outputs (cosine >= 0.99) (.pt2 upload and a labelled or unlabelled dataset)."
        ),
        "pipeline": [
            {
                "op": "prune",
                "criterion": "magnitude",
                "granularity": "channels",
                "sparsity": 0.5,
                "schedule": {"kind": "gradual", "steps": 3, "epochs_per_step": 3},
            },
            {"op": "distill", "epochs": 10, "temperature": 4.0, "alpha": 0.5},
            # the fastest int8 build that keeps cosine >= 0.99 (on an AVX2 worker the most
            # faithful one, int8 activations, ran at 1.9x where uint8 activations run >= 2x)
            {"op": "quantize", "mode": "static", "dtype": "int8", "prefer": "speed"},
        ],
    },
    "deep-compression": {
        "description": (
            "Deep Compression (Han et al.): 94% of the weights pruned in 6 rounds with "
            "training, 5-bit per-layer weight sharing and Huffman coding into a compact "
            "archive (storage/over-the-air size; the dense ONNX runs anywhere)."
        ),
        "pipeline": [
            {
                "op": "prune",
                "criterion": "magnitude",
                "granularity": "unstructured",
                "sparsity": 0.94,
                "scope": "global",
                "include_last_layer": True,
                "schedule": {"kind": "gradual", "steps": 6, "epochs_per_step": 10},
                "fine_tune_epochs": 20,
                "lr": 0.002,
            },
            {"op": "weight_share", "bits": 5},
        ],
    },
}


# `preset: "auto"` is not a fixed pipeline: a search within a budget (engine.config.auto).
AUTO_PRESET: dict[str, Any] = {
    "description": (
        "Pareto search over the catalog for the best model within a budget: give 'budget' "
        "(max_accuracy_drop, min_cosine, min_sqnr_db, max_size_bytes, max_latency_ms), "
        "'objective' (size | latency | balanced) and optionally 'search' "
        "(max_minutes, max_candidates)."
    ),
    "pipeline": None,
    "example": {
        "preset": "auto",
        "budget": {"max_accuracy_drop": 0.01},
        "objective": "size",
        "search": {"max_minutes": 15, "max_candidates": 12},
    },
}


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def preset_pipeline(
    name: str, overrides: dict[str, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """A preset's steps with `overrides` merged in: keys are an op name (every step with that
    op) or a step index ("0", "1", ...); values are config fields (nested dicts merge)."""
    if name not in PRESETS:
        raise PipelineError(
            "unknown_preset",
            f"Unknown preset {name!r}; valid presets: {', '.join(sorted([*PRESETS, 'auto']))} "
            "(auto takes a 'budget' instead of steps).",
            "preset",
        )
    steps = [dict(step) for step in PRESETS[name]["pipeline"]]
    for key, change in (overrides or {}).items():
        if not isinstance(change, dict):
            raise PipelineError(
                "invalid_overrides",
                f"overrides[{key!r}] must be an object of config fields",
                "overrides",
            )
        if key.isdigit():
            hits = [int(key)] if int(key) < len(steps) else []
        else:
            hits = [i for i, step in enumerate(steps) if step["op"] == key]
        if not hits:
            ops = ", ".join(f"{i} ({step['op']})" for i, step in enumerate(steps))
            raise PipelineError(
                "invalid_overrides",
                f"overrides key {key!r} matches no step of preset {name!r}; its steps are {ops}.",
                f"overrides.{key}",
            )
        if "op" in change:
            raise PipelineError(
                "invalid_overrides", "overrides cannot change a step's op", f"overrides.{key}.op"
            )
        for i in hits:
            steps[i] = _merge(steps[i], change)
    return steps
