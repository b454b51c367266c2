"""Held-out fidelity: the figure the best-epoch rule keeps (`fidelity_metric`), the samples it
is scored on (`Holdout`), and what a training op reports about it (`History`, details, the
warning when no epoch beat the input).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.io.datasets import Samples
from engine.onnxgraph.metrics import is_classifier_output, quality
from engine.onnxgraph.runtime import feeds
from engine.torchgraph.program import flatten

if TYPE_CHECKING:
    from torch import nn

    from engine.context import StepContext

HOLDOUT_LIMIT = 512  # held-out samples the best-epoch rule scores after every epoch
HOLDOUT_BATCH = 64
# The held-out fidelity of each task, as the step metrics name it, and in words.
FIDELITY_NAMES = {
    "accuracy_top1": "accuracy",
    "agreement_top1": "top-1 agreement",
    "cosine_similarity": "cosine",
    "sqnr_db": "SQNR",
}


@dataclass
class History:
    """Per-epoch loss and accuracy (on the job's data) and held-out fidelity, and the best
    epoch, reported as progress and in details."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    metric: str | None = None  # the held-out fidelity the best epoch is chosen by
    start: float | None = None  # the input's held-out fidelity (epoch 0), when it counts
    best: float | None = None
    best_epoch: int | None = None  # 0: no epoch beat the input, which is what the model holds
    best_trained: float | None = None  # the best held-out fidelity after a training epoch
    stopped: str | None = None  # why training ended early (a non-finite loss)
    threads: int | None = None  # the CPU threads torch trained on (train.fit sets them)


def fidelity_metric(task: str, reference: Sequence[np.ndarray], labels: np.ndarray | None) -> str:
    """The figure the best-epoch rule keeps: classification → accuracy (labels) or top-1
    agreement with the original; embedding → mean cosine; generic → SQNR (dB)."""
    if task == "classification" and is_classifier_output(reference):
        return "accuracy_top1" if labels is not None else "agreement_top1"
    if task == "embedding":
        return "cosine_similarity"
    return "sqnr_db"


def fidelity_digits(metric: str, *values: float | None) -> int:
    """Decimals that tell the figures apart (3 for ratios, 1 for dB; at most 6)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    digits = 1 if metric == "sqnr_db" else 3
    while digits < 6 and len({round(v, digits) for v in finite}) < len(set(finite)):
        digits += 1
    return digits


def fidelity_value(metric: str, value: float | None, digits: int | None = None) -> str:
    """A held-out figure's value for a message: `0.912`, `31.2 dB`, `exact`, `not finite`."""
    if value is None or math.isnan(value) or value == -math.inf:
        return "not finite"
    if metric == "sqnr_db" and value == math.inf:
        return "exact"
    text = f"{value:.{digits or fidelity_digits(metric, value)}f}"
    return f"{text} dB" if metric == "sqnr_db" else text


def format_fidelity(metric: str, value: float | None, digits: int | None = None) -> str:
    """A held-out figure for a message: `cosine 0.912`, `SQNR 31.2 dB`."""
    return f"{FIDELITY_NAMES[metric]} {fidelity_value(metric, value, digits)}"


def fidelity_change(
    metric: str, before: float | None, after: float | None, *, since: str = "", until: str = ""
) -> str:
    """Two held-out figures for a message, in decimals that tell them apart:
    `cosine 0.955{since} → 0.655{until}`."""
    digits = fidelity_digits(metric, before, after)
    return (
        f"{format_fidelity(metric, before, digits)}{since} → "
        f"{fidelity_value(metric, after, digits)}{until}"
    )


def fidelity_figure(value: float | None) -> float | None:
    """A held-out figure for details (JSON): rounded; None when infinite or not finite."""
    return round(value, 6) if value is not None and math.isfinite(value) else None


@dataclass
class Holdout:
    """The samples every step is measured on and the original's outputs on them: the
    best-epoch rule scores a model's fidelity here (`score`, higher is better)."""

    samples: Samples
    input_names: list[str]
    reference: list[np.ndarray]
    task: str
    batch: int | None
    held_out: bool  # False: nothing was held out, they are training samples too

    @property
    def metric(self) -> str:
        return fidelity_metric(self.task, self.reference, self.samples.labels)

    @property
    def where(self) -> str:
        if self.held_out:
            return "held-out samples"
        return "the evaluation samples (also trained on: evaluation.holdout is 0)"

    def outputs(self, model: Callable[..., Any], device: Any = "cpu") -> list[np.ndarray]:
        """The model's outputs on the samples (fed on `device`), as numpy (a fixed batch is
        padded)."""
        import torch

        parts: list[list[np.ndarray]] = []
        with torch.no_grad():
            for feed, rows in feeds(
                self.samples, self.batch or HOLDOUT_BATCH, pad=bool(self.batch)
            ):
                xs = [
                    torch.from_numpy(np.ascontiguousarray(feed[n])).to(device)
                    for n in self.input_names
                ]
                outs = [o.detach().cpu() for o in flatten(model(*xs))]
                parts.append(
                    [(o.float() if o.is_floating_point() else o).numpy()[:rows] for o in outs]
                )
        return [np.concatenate(column) for column in zip(*parts, strict=True)]

    def score_outputs(self, outputs: list[np.ndarray]) -> float:
        """The held-out fidelity of these outputs; −inf when they are not finite."""
        if not all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f"):
            return -math.inf
        value = quality(outputs, self.reference, self.samples.labels, self.task).get(self.metric)
        if value is None:  # SQNR of an exact copy
            return math.inf if self.metric == "sqnr_db" else -math.inf
        return float(value)

    def score(self, model: nn.Module) -> float:
        """The model's held-out fidelity (in eval mode; its mode is restored), fed on the
        device the model is on."""
        training = model.training
        device = next((p.device for p in model.parameters()), "cpu")
        model.eval()
        try:
            return self.score_outputs(self.outputs(model, device))
        finally:
            model.train(training)


def holdout_check(ctx: StepContext) -> Holdout | None:
    """The step's evaluation samples (at most HOLDOUT_LIMIT) with the original's outputs on
    them; None where the pipeline gave none (a handler called on its own)."""
    samples, reference = ctx.eval_samples, ctx.eval_reference
    if samples is None or reference is None or not len(samples):
        return None
    if any(len(r) != len(samples) for r in reference):
        return None  # an output without a batch axis: no per-sample reference
    k = min(len(samples), HOLDOUT_LIMIT)
    return Holdout(
        samples.take(k),
        [spec.name for spec in ctx.inputs],
        [r[:k] for r in reference],
        ctx.task,
        ctx.batch,
        ctx.held_out,
    )


def history_details(history: History, holdout: Holdout | None) -> dict[str, Any]:
    """What a training op's details say about its run: per-epoch rows (epoch 0: the input's
    held-out fidelity), the best epoch and the held-out figures it was chosen by."""
    details: dict[str, Any] = {"epochs": history.epochs, "threads": history.threads}
    if holdout is not None and history.metric is not None:
        details["best_epoch"] = history.best_epoch
        details["held_out"] = {
            "metric": history.metric,
            "samples": len(holdout.samples),
            "held_out": holdout.held_out,
            "start": fidelity_figure(history.start),
            "best": fidelity_figure(history.best),
        }
        if history.stopped:
            details["stopped"] = history.stopped
    return details


def training_warning(what: str, history: History, holdout: Holdout, kept: str) -> str | None:
    """The warning when no epoch beat the input (best epoch 0): both figures, what was kept."""
    if history.best_epoch != 0 or history.metric is None:
        return None
    start, after = history.start, history.best_trained
    worse = after is None or start is None or not after >= start
    verb = "made the result worse" if worse else "did not improve the result"
    change = fidelity_change(history.metric, start, after, until=" after the best epoch")
    text = f"{what} {verb} on {holdout.where} ({change}); kept {kept}."
    if history.stopped:
        text += f" {history.stopped}: lower `lr`."
    return text
