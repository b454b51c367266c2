"""Issue #16 item 5: the headline compression ratio is measured on what is shipped (a packed
archive when the last step makes one), with its basis named; steps' warnings are labelled and
listed once for the job."""

from __future__ import annotations

from engine.evaluation import compression_basis, ratios
from engine.quality import step_warnings

ORIGINAL = {"size_bytes": 1000, "latency_ms_p50": 2.0, "accuracy_top1": 0.9}


def test_a_weight_share_archive_is_the_headline() -> None:
    final = {"size_bytes": 990, "archive_size_bytes": 25, "latency_ms_p50": 2.0}
    final["accuracy_top1"] = 0.89
    assert compression_basis(final) == ("cpz", 25)
    out = ratios(ORIGINAL, final)
    assert out["compression_ratio"] == 40.0
    assert out["onnx_compression_ratio"] == round(1000 / 990, 4)
    assert out["accuracy_drop"] == 0.01


def test_packed_binary_weights_are_the_headline() -> None:
    final = {"size_bytes": 1000, "packed_size_bytes": 50, "latency_ms_p50": 1.0}
    assert compression_basis(final) == ("cbin", 50)
    assert ratios(ORIGINAL, final)["compression_ratio"] == 20.0


def test_without_a_packed_file_the_onnx_is_the_headline() -> None:
    final = {"size_bytes": 250, "latency_ms_p50": 1.0}
    assert compression_basis(final) == ("onnx", 250)
    out = ratios(ORIGINAL, final)
    assert out["compression_ratio"] == 4.0 and "onnx_compression_ratio" not in out


def test_step_warnings_are_labelled_and_deduplicated() -> None:
    steps = [
        (0, "prune", ["Top-1 agreement is 0.9.", "No epoch beat the input."]),
        (1, "distill", None),
        (2, "quantize", ["Top-1 agreement is 0.9.", "Slower here."]),
    ]
    assert step_warnings(steps) == [
        "steps 0 (prune), 2 (quantize): Top-1 agreement is 0.9.",
        "step 0 (prune): No epoch beat the input.",
        "step 2 (quantize): Slower here.",
    ]
    assert step_warnings([(0, "prune", ["a", "a"])]) == ["step 0 (prune): a"]
