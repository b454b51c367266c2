"""Engine fixtures: the digits models are trained once per session (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mlp_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The digits MLP (flat [N, 64] inputs) as .pt2 and .onnx, and digits_flat.npz."""
    from worker.engine.examples import write_digits_mlp

    written = write_digits_mlp(tmp_path_factory.mktemp("mlp"))
    return {"pt2": written["pt2"], "onnx": written["onnx"], "npz": written["npz"]}
