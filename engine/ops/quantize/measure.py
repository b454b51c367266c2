"""How `quantize` measures a build: fidelity against the step's float input on samples held
out of calibration (selection_split), and what a quality target judges."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.config import QuantizeTarget
from engine.evaluation import EVAL_SAMPLES
from engine.io.datasets import Samples
from engine.onnxgraph import metrics as m
from engine.onnxgraph.runtime import Feed, eval_threads, feeds, make_session, run_all
from engine.ops.quantize.integer import Quantizer, Variant

SENSITIVITY_SAMPLES = 256  # at most, per sensitivity build
SENSITIVITY_MIN_SAMPLES = 8
SENSITIVITY_SCORE_S = 0.5  # float inference time a sensitivity build is scored on
LATENCY_FEEDS = 16
LATENCY_THREADS = 1


# Of a dataset, this share is held out of calibration (and of SmoothQuant's and bias
# correction's statistics): the builds are measured, chosen and judged against a target on
# samples their activation ranges were not fitted to. On the PP-OCR direction classifier, 32
# lines measured on the calibration lines themselves gave 37-52 dB; 64 new lines, 16-18 dB.
# At least SELECT_FLOOR samples are held out (up to half the dataset): on 8 of 32 photos the
# PP-LCNet orientation builds ranked opposite to 64 new photos (S8S8 per-channel 9.1 dB there,
# 15.0 dB on new photos; uint8 activations 10.5 and 12.4 dB). The delivered static build is
# calibrated again on every sample (search.refit), so fewer calibration samples only rank.
SELECT_SHARE = 0.25
SELECT_FLOOR = 16
SELECT_MIN_SAMPLES = 16  # smaller datasets (and synthetic inputs) calibrate and measure on all


def selection_split(samples: Samples, seed: int) -> tuple[Samples, Samples]:
    """(calibration samples, selection samples): disjoint for a dataset of at least
    SELECT_MIN_SAMPLES (SELECT_SHARE held out, at least SELECT_FLOOR up to half, stratified by
    label), else both all of them."""
    n = len(samples)
    if samples.source != "dataset" or n < SELECT_MIN_SAMPLES:
        return samples, samples
    share = max(SELECT_SHARE, min(0.5, SELECT_FLOOR / n))
    return samples.split(share, seed)


class Evaluator:
    """Reference outputs of the float model on the selection samples, and latency feeds."""

    def __init__(self, float_model: Path, quantizer: Quantizer, samples: Samples) -> None:
        ctx = quantizer.ctx
        self.task = ctx.task  # top-1 agreement is a classifier's; an embedding has none
        self.batch = ctx.batch
        self.samples = samples.subset(EVAL_SAMPLES, ctx.seed)
        started = time.perf_counter()
        self.reference = self._run(float_model, self.samples)
        per_sample_s = (time.perf_counter() - started) / max(1, len(self.samples))
        # the sensitivity ranking scores one build per layer: as many samples as the float
        # model runs in SENSITIVITY_SCORE_S (a 480×640 page detector: a few; digits: 256)
        n_small = int(SENSITIVITY_SCORE_S / max(per_sample_s, 1e-9))
        n_small = min(SENSITIVITY_SAMPLES, max(SENSITIVITY_MIN_SAMPLES, n_small))
        self.small = samples.subset(n_small, ctx.seed)
        self.small_reference = self._run(float_model, self.small)
        labels = self.samples.labels
        base = m.quality(self.reference, None, labels, "classification")
        self.float_accuracy: float | None = base.get("accuracy_top1")
        size = self.batch or 1
        take = self.samples.take(max(size, min(LATENCY_FEEDS, len(self.samples))))
        self.latency_feeds: list[Feed] = [f for f, _ in feeds(take, size, pad=True)]

    def _run(self, path: Path, samples: Any) -> list[np.ndarray]:
        return run_all(make_session(path, eval_threads()), samples, self.batch)

    def score(self, path: Path, small: bool = False) -> dict[str, Any]:
        samples, ref = (
            (self.small, self.small_reference)
            if small
            else (
                self.samples,
                self.reference,
            )
        )
        values = m.quality(self._run(path, samples), ref, samples.labels, self.task)
        out = {
            k: values.get(k)
            for k in (
                "cosine_similarity",
                "sqnr_db",
                "sqnr_db_min",
                "sqnr_db_min_slice",
                "agreement_top1",
                "accuracy_top1",
            )
        }
        if self.float_accuracy is not None and values.get("accuracy_top1") is not None:
            out["accuracy_drop"] = round(self.float_accuracy - values["accuracy_top1"], 6)
        out["samples"] = len(samples)
        return {k: v for k, v in out.items() if v is not None or k == "sqnr_db"}


def meets(fidelity: dict[str, Any], target: QuantizeTarget | None) -> bool:
    if target is None:
        return True
    if target.max_accuracy_drop is not None:
        drop = fidelity.get("accuracy_drop")
        return drop is not None and drop <= target.max_accuracy_drop + 1e-9
    if target.min_cosine is not None:
        return float(fidelity.get("cosine_similarity", -1.0)) >= target.min_cosine
    sqnr = worst_sqnr(fidelity)
    assert target.min_sqnr_db is not None
    return sqnr is None or sqnr >= target.min_sqnr_db  # None: outputs exact


def shortfall_db(fidelity: dict[str, Any], target: QuantizeTarget) -> float | None:
    """How far a build is from a fidelity target, in dB (<= 0: met): the SQNR target's gap,
    or for a cosine target the ratio of the angular errors (1 - cosine behaves like the
    inverse SNR for small errors). None for an accuracy target (no dB scale)."""
    if target.min_cosine is not None:
        cosine = float(fidelity.get("cosine_similarity", -1.0))
        if cosine >= target.min_cosine:
            return 0.0
        return 10 * math.log10(max(1e-12, 1 - cosine) / max(1e-12, 1 - target.min_cosine))
    if target.min_sqnr_db is not None:
        sqnr = worst_sqnr(fidelity)
        return 0.0 if sqnr is None else max(0.0, target.min_sqnr_db - sqnr)
    return None


def worst_sqnr(fidelity: dict[str, Any]) -> float | None:
    """The SQNR a target or a warning judges: the worst output slice's where outputs have
    slices (metrics.worst_slice), else the whole output's; None when the outputs are exact."""
    value = fidelity.get("sqnr_db_min", fidelity.get("sqnr_db"))
    return None if value is None else float(value)


def sqnr_key(entry: dict[str, Any]) -> tuple[float, float]:
    sqnr = worst_sqnr(entry)
    return (math.inf if sqnr is None else float(sqnr), float(entry.get("cosine", 1.0)))


@dataclass
class Candidate:
    """One built file: what it is, how faithful, and (once measured side by side) how fast."""

    variant: Variant
    path: Path
    fidelity: dict[str, Any]
    kept_float: list[str]
    met: bool
    latency_ms: float = 0.0
    size_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.size_bytes = self.path.stat().st_size  # the file as built now


def fid_rank(fid: dict[str, Any]) -> tuple[float, float]:
    sqnr = worst_sqnr(fid)
    return (-(math.inf if sqnr is None else float(sqnr)), -float(fid.get("cosine_similarity", 0)))
