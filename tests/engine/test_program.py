"""engine.torchgraph.program: a torch step's failed re-export carries that step's error code."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from engine.config import FineTuneConfig
from engine.context import StepContext
from engine.errors import EngineError
from engine.io.datasets import load_dataset, match_inputs
from engine.io.formats import onnx_io
from engine.ops.training import fine_tune
from engine.torchgraph.program import flatten


def test_a_fine_tune_whose_re_export_fails_is_a_training_failure(
    mlp_files: dict[str, Path], tmp_path: Path
) -> None:
    """The step trains, then cannot save its .pt2 (its output folder does not exist): the job
    reports training_failed naming the fine-tuned model, not prune_failed."""
    inputs, outputs = onnx_io(onnx.load(str(mlp_files["onnx"])))
    samples = match_inputs(load_dataset(mlp_files["npz"]), inputs, outputs=outputs)
    ctx = StepContext(
        index=0,
        workdir=tmp_path,
        output=tmp_path / "missing" / "step0_fine_tune.pt2",
        inputs=inputs,
        samples=samples.take(64),
        batch=None,
    )
    with pytest.raises(EngineError) as caught:
        fine_tune(FineTuneConfig(epochs=1), mlp_files["pt2"], ctx)
    assert caught.value.code == "training_failed"
    assert "fine-tuned model could not be re-exported" in caught.value.detail
    assert caught.value.field == "pipeline"


def test_flatten_walks_nested_outputs() -> None:
    assert flatten((1, [2, (3,)], 4)) == [1, 2, 3, 4]
    assert flatten(5) == [5]
