from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The `compaas example digits` files: a CNN trained on sklearn's digits, exported twice."""
    from worker.engine.examples import write_digits_example

    out = tmp_path_factory.mktemp("digits")
    write_digits_example(out)
    return {
        "pt2": out / "digits_cnn.pt2",
        "onnx": out / "digits_cnn.onnx",
        "npz": out / "digits.npz",
    }


@pytest.fixture(scope="session")
def mlp_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The digits MLP 64-300-100-10 (flat [N, 64] inputs) as .pt2 and .onnx, and its .npz."""
    from worker.engine.examples import write_digits_mlp

    written = write_digits_mlp(tmp_path_factory.mktemp("mlp"))
    return {"pt2": written["pt2"], "onnx": written["onnx"], "npz": written["npz"]}


@pytest.fixture(scope="session")
def transformer(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 2-block transformer encoder trained on a token-order task (ONNX/.pt2 + tokens.npz)."""
    from worker.engine.examples import write_token_transformer

    return write_token_transformer(tmp_path_factory.mktemp("transformer"))


@pytest.fixture(scope="session")
def separable(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A depthwise-separable CNN trained on digits (ONNX/.pt2 + npz)."""
    from worker.engine.examples import write_separable_cnn

    return write_separable_cnn(tmp_path_factory.mktemp("separable"))
