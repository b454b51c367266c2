"""How results are evaluated: the fixed measurement set, the artifact check, ratios, warnings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import EngineError
from engine.io.datasets import Samples
from engine.onnxgraph import metrics as m
from engine.onnxgraph.runtime import (
    Feed,
    eval_threads,
    feeds,
    make_session,
    run_all,
    session_outputs_finite,
)

# Samples every evaluation draws from the job's data (the pipeline's step metrics and the
# quantizer's target checks alike, so a target met in the search is met in the step metrics).
EVAL_SAMPLES = 2000
LATENCY_SAMPLES = 16


@dataclass
class Evaluation:
    """The fixed inputs every model of the job is measured on, and the original's outputs."""

    task: str
    samples: Samples
    latency_feeds: list[Feed]
    batch: int | None
    threads: int
    reference: list[np.ndarray] | None = None
    # what every metrics block says it was measured on (engine.measured_on.describe)
    measured_on: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_samples(
        cls, data: Samples, task: str, batch: int | None, threads: int, seed: int
    ) -> Evaluation:
        """Draw the measurement samples and latency feeds from `data`, reproducibly."""
        return cls(
            task, data.subset(EVAL_SAMPLES, seed), _latency_feeds(data, batch), batch, threads
        )

    def outputs(self, path: Path) -> list[np.ndarray]:
        """The model's outputs on the measurement samples."""
        return run_all(make_session(path, eval_threads()), self.samples, self.batch)

    def measure(self, path: Path) -> tuple[dict[str, Any], list[np.ndarray]]:
        """Size, latency, peak memory and quality (against `reference`) of one ONNX model."""
        outputs = self.outputs(path)
        values = m.static_metrics(path, self.batch, self.latency_feeds[0])
        values.update(m.latency(path, self.latency_feeds, self.threads))
        peak = m.peak_memory(path, self.latency_feeds[0], self.threads)
        if peak is not None:
            values["peak_memory_bytes"] = peak
        values.update(m.quality(outputs, self.reference, self.samples.labels, self.task))
        if self.measured_on:
            values["measured_on"] = dict(self.measured_on)
        return values, outputs


def _latency_feeds(samples: Samples, batch: int | None) -> list[Feed]:
    size = batch or 1
    subset = samples.take(max(size, min(LATENCY_SAMPLES, len(samples))))
    return [f for f, _ in feeds(subset, size, pad=True)]


def verify_artifact(path: Path, feed: Feed) -> list[str]:
    """Re-open a produced model in a fresh session and run it once; warnings if it is not finite."""
    try:
        outputs = make_session(path).run(None, feed)
    except Exception as exc:
        text = " ".join(str(exc).split())[:400]
        raise EngineError(
            "artifact_check_failed",
            f"The produced model {path.name} does not run in onnxruntime ({type(exc).__name__}: "
            f"{text}), so it was not delivered. Try another mode or dtype.",
        ) from exc
    if not session_outputs_finite(outputs):
        return [f"{path.name} produced non-finite outputs (inf/NaN) on a sample input."]
    return []


# A step that ships a packed file beside the dense ONNX (which is only its decoded form) names
# its size in the step's metrics: (metrics key, the file's format).
PACKED_SIZES = (("archive_size_bytes", "cpz"), ("packed_size_bytes", "cbin"))


def compression_basis(final: dict[str, Any]) -> tuple[str, int]:
    """The file the headline compression ratio is measured on, and its size: the packed file
    when the last step ships one (weight_share's archive, binary/ternary packing), else the ONNX."""
    for key, fmt in PACKED_SIZES:
        if isinstance(final.get(key), int) and final[key] > 0:
            return fmt, final[key]
    return "onnx", final["size_bytes"]


def ratios(original: dict[str, Any], final: dict[str, Any]) -> dict[str, Any]:
    """Compression ratio (of what is shipped), speedup and accuracy drop of the final model
    against the original; `onnx_compression_ratio` too when a packed file is what ships."""
    drop = None
    if "accuracy_top1" in original and "accuracy_top1" in final:
        drop = round(original["accuracy_top1"] - final["accuracy_top1"], 6)
    basis, size = compression_basis(final)
    out = {
        "compression_ratio": round(original["size_bytes"] / size, 4),
        "speedup": round(original["latency_ms_p50"] / final["latency_ms_p50"], 4),
        "accuracy_drop": drop,
    }
    if basis != "onnx":
        out["onnx_compression_ratio"] = round(original["size_bytes"] / final["size_bytes"], 4)
    return out


def fidelity_warnings(values: dict[str, Any]) -> list[str]:
    """A step's warnings when its outputs drift noticeably from the original's."""
    out = []
    if values.get("agreement_top1", 1.0) < 0.98:
        out.append(
            f"Top-1 agreement with the original is {values['agreement_top1']:.3f} (< 0.98): "
            "the result changes predictions noticeably."
        )
    if values.get("cosine_similarity", 1.0) < 0.99:
        out.append(
            f"Output cosine similarity to the original is {values['cosine_similarity']:.4f}."
        )
    worst = values.get("sqnr_db_min")
    if worst is not None and worst < m.SLICE_SQNR_WARN_DB and "[" in values["sqnr_db_min_slice"]:
        out.append(
            f"One output slice is badly reproduced: {values['sqnr_db_min_slice']} has SQNR "
            f"{worst:.1f} dB (< {m.SLICE_SQNR_WARN_DB:.0f} dB) while the whole outputs have "
            f"{values.get('sqnr_db')} dB. A channel of a small range next to channels of a large "
            "one (e.g. class scores concatenated with box coordinates) is the usual cause; give "
            "the quantize step a target (`min_sqnr_db` judges the worst slice)."
        )
    return out


def data_warnings(
    data: Samples, task: str, batch: int | None, *, trains: bool, holdout: float
) -> list[str]:
    """What the job's data leaves unmeasured or optimistic (no dataset, no labels, fixed batch)."""
    out = []
    if data.source == "synthetic":
        out.append(
            "No dataset was given: calibration used synthetic random-normal inputs and accuracy "
            "was not measured; the fidelity metrics compare outputs on those synthetic inputs "
            "only. Attach a dataset (with labels) for calibration and accuracy."
        )
    elif task == "classification" and data.labels is None:
        out.append(
            "The dataset has no `labels` array: accuracy was not measured, only fidelity to the "
            "original on the dataset's inputs."
        )
    if batch is not None and batch > 1:
        out.append(
            f"The model was exported with a fixed batch size of {batch}: it is evaluated in "
            f"batches of {batch} and latency is per batch of {batch}, not per sample. Export "
            "with a dynamic batch dim (torch.export.Dim) for batch-1 latency."
        )
    if trains and holdout == 0 and data.source == "dataset":
        out.append(
            "The pipeline trains on the job's dataset and evaluation.holdout is 0, so the "
            "metrics are measured on the training samples and may be optimistic."
        )
    return out


def output_warnings(task: str, reference: list[np.ndarray]) -> list[str]:
    """A warning when a classification model's output is not [batch, classes]."""
    if task == "classification" and not m.is_classifier_output(reference):
        return [
            "The model's first output is not shaped [batch, classes], so accuracy and top-1 "
            "agreement were not measured; fidelity metrics compare all outputs."
        ]
    return []


def speed_warnings(speedup: float, batch: int | None, threads: int) -> list[str]:
    """A warning when the result ran slower than the original."""
    if speedup < m.SLOWER:
        return [
            f"The result ran slower than the original here (speedup {speedup:.2f}× at "
            f"batch {batch or 1}, {threads} thread(s)). Integer kernels pay off on CPUs "
            "with VNNI/dot-product instructions and on larger layers."
        ]
    return []
