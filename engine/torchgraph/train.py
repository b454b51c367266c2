"""The one training loop every torch op uses: fine-tuning, distillation, gradual pruning, QAT.

Loss, by what the job's data has and its evaluation task (`loss_kind`):
- no teacher: cross-entropy on the labels (`fine_tune`, pruning recovery with labels);
- classification with [batch, classes] logits: α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) +
  (1−α)·CE(y, z_s) (Hinton et al.; the T² keeps the soft term's gradients on the scale of the
  hard one); without labels the soft term alone (α = 1);
- embedding: 1 − cosine(student, teacher) per sample, averaged over the outputs, plus
  `mse_weight` × the normalised MSE below;
- generic (and classification outputs that are not logits): each output's MSE to the
  teacher's divided by the variance of the teacher's output, averaged over all outputs.

The best-epoch rule (`Holdout`): given held-out samples, `fit` scores their fidelity to the
original model before training (epoch 0, the input) and after every epoch and ends in the best
state; a later epoch must be strictly better to replace it.

Training is single-threaded and seeded, so a job gives the same model on a rerun.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import EngineError
from engine.io.datasets import Samples
from engine.onnxgraph.metrics import is_classifier_output, quality
from engine.onnxgraph.runtime import feeds
from engine.torchgraph.program import flatten

if TYPE_CHECKING:
    import torch
    from torch import nn

    from engine.context import StepContext

EVAL_LIMIT = 2000
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
class Loss:
    """What the loop optimises; see the module docstring."""

    teacher: Callable[..., Any] | None = None
    use_labels: bool = True
    alpha: float = 0.5
    temperature: float = 4.0
    task: str = "classification"
    mse_weight: float = 0.0  # embedding: weight of the normalised MSE added to 1 − cosine


@dataclass
class Data:
    """The job's samples as tensors: one per model input, and the labels if any."""

    inputs: list[torch.Tensor]
    labels: torch.Tensor | None
    batch: int | None  # a fixed batch size the model was exported with

    def __len__(self) -> int:
        return len(self.inputs[0])

    def batches(self, size: int, generator: torch.Generator | None) -> Iterator[Any]:
        import torch

        n = len(self)
        size = self.batch or size
        order = torch.randperm(n, generator=generator) if generator else torch.arange(n)
        for i in range(0, n, size):
            idx = order[i : i + size]
            if self.batch and len(idx) != self.batch:
                continue  # a fixed-batch model takes only full batches
            if generator is not None and len(idx) < 2:
                continue  # BatchNorm cannot train on one sample
            yield idx


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


def job_data(ctx: StepContext, limit: int | None = None) -> Data:
    """The context's samples (optionally a reproducible subset) as torch tensors."""
    import torch

    samples = ctx.samples.subset(limit, ctx.seed) if limit else ctx.samples
    xs = [torch.from_numpy(np.ascontiguousarray(samples.inputs[spec.name])) for spec in ctx.inputs]
    labels = None
    if samples.labels is not None and samples.labels.ndim == 1:
        labels = torch.from_numpy(np.asarray(samples.labels, dtype=np.int64))
    return Data(xs, labels, ctx.batch)


def first_output(outputs: Any) -> torch.Tensor:
    """The model's first output (exported graphs may return a tuple)."""
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def is_logits(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.shape[1] > 1


# ----------------------------------------------------------------------------- losses


def loss_kind(loss: Loss, outputs: Sequence[torch.Tensor]) -> str:
    """What `loss_value` computes on these outputs: cross_entropy, kl, cosine or mse."""
    if loss.teacher is None:
        return "cross_entropy"
    if loss.task == "embedding":
        return "cosine"
    if loss.task == "classification" and outputs and is_logits(outputs[0]):
        return "kl"
    return "mse"


def loss_name(loss: Loss, outputs: Sequence[torch.Tensor], labels: bool) -> str:
    """The loss as details.loss names it: cross_entropy, kl(+cross_entropy), cosine(+mse), mse."""
    kind = loss_kind(loss, outputs)
    if kind == "kl" and labels and loss.use_labels and loss.alpha < 1:
        return "kl+cross_entropy"
    if kind == "cosine" and loss.mse_weight > 0:
        return "cosine+mse"
    return kind


def describe_loss(name: str, loss: Loss) -> str:
    """One line for a `loss_name`: what the student is trained on."""
    return {
        "cross_entropy": "cross-entropy on the dataset's labels",
        "kl": f"KL to the teacher's softened outputs (T = {loss.temperature:g})",
        "kl+cross_entropy": f"{loss.alpha:g} × KL to the teacher's softened outputs (T = "
        f"{loss.temperature:g}) + {1 - loss.alpha:g} × cross-entropy on the labels",
        "cosine": "1 − cosine to the teacher's output",
        "cosine+mse": f"1 − cosine to the teacher's output + {loss.mse_weight:g} × MSE "
        "normalised by the teacher output's variance",
        "mse": "MSE to the teacher's outputs, each divided by the teacher output's variance",
    }[name]


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, -1)


def _pairs(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(student, teacher) output pairs that can carry a gradient (floating point)."""
    return [
        (s, t.detach().to(s.dtype))
        for s, t in zip(student, teacher, strict=True)
        if s.is_floating_point()
    ]


def normalised_mse(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Mean over the outputs of MSE(student, teacher) / Var(teacher)."""
    import torch
    import torch.nn.functional as F

    terms = []
    for s, t in _pairs(student, teacher):
        scale = t.var(unbiased=False) if t.numel() > 1 else t.new_zeros(())
        scale = scale + 1e-6 * t.pow(2).mean() + 1e-12  # a constant output has no variance
        terms.append(F.mse_loss(s, t) / scale)
    return torch.stack(terms).mean()


def cosine_distance(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Mean over the outputs of the per-sample 1 − cosine(student, teacher)."""
    import torch
    import torch.nn.functional as F

    terms = [
        (1 - F.cosine_similarity(_rows(s), _rows(t), dim=1, eps=1e-8)).mean()
        for s, t in _pairs(student, teacher)
    ]
    return torch.stack(terms).mean()


def loss_value(
    student: Sequence[torch.Tensor],
    loss: Loss,
    labels: torch.Tensor | None,
    teacher: Sequence[torch.Tensor] | None,
) -> torch.Tensor:
    """The loss on one batch: the student's outputs (all of them), the teacher's, the labels."""
    import torch.nn.functional as F

    kind = loss_kind(loss, student)
    hard = labels if loss.use_labels else None
    if kind == "cross_entropy" or teacher is None:
        if hard is None:
            raise EngineError("training_failed", "Training needs labels or a teacher model.")
        return F.cross_entropy(student[0], hard)
    if kind == "cosine":
        value = cosine_distance(student, teacher)
        if loss.mse_weight > 0:
            value = value + loss.mse_weight * normalised_mse(student, teacher)
        return value
    if kind == "mse":
        return normalised_mse(student, teacher)
    t = loss.temperature
    soft = F.kl_div(
        F.log_softmax(student[0] / t, dim=1),
        F.log_softmax(teacher[0].detach() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
    if hard is None:
        return soft
    return loss.alpha * soft + (1 - loss.alpha) * F.cross_entropy(student[0], hard)


# ----------------------------------------------------------------------------- held-out fidelity


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

    def outputs(self, model: Callable[..., Any]) -> list[np.ndarray]:
        """The model's outputs on the samples, as numpy (a fixed batch is padded)."""
        import torch

        parts: list[list[np.ndarray]] = []
        with torch.no_grad():
            for feed, rows in feeds(
                self.samples, self.batch or HOLDOUT_BATCH, pad=bool(self.batch)
            ):
                xs = [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.input_names]
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
        """The model's held-out fidelity (in eval mode; its mode is restored)."""
        training = model.training
        model.eval()
        try:
            return self.score_outputs(self.outputs(model))
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
    details: dict[str, Any] = {"epochs": history.epochs}
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
    digits = fidelity_digits(history.metric, start, after)
    text = (
        f"{what} {verb} on {holdout.where} ({format_fidelity(history.metric, start, digits)} → "
        f"{fidelity_value(history.metric, after, digits)} after the best epoch); kept {kept}."
    )
    if history.stopped:
        text += f" {history.stopped}: lower `lr`."
    return text


# ----------------------------------------------------------------------------- the loop


def evaluate(
    model: Callable[..., Any],
    data: Data,
    teacher: Callable[..., Any] | None = None,
    size: int = 256,
    task: str = "classification",
) -> dict[str, float]:
    """Top-1 `accuracy` on the labels and `agreement` with the teacher's top-1, where defined
    (classification logits; nothing for other tasks)."""
    import torch

    if task != "classification":
        return {}
    correct = agree = total = 0
    with torch.no_grad():
        for idx in data.batches(size, None):
            if total >= EVAL_LIMIT:
                break
            xs = [x[idx] for x in data.inputs]
            out = first_output(model(*xs))
            if not is_logits(out):
                return {}
            if data.labels is not None:
                correct += int((out.argmax(1) == data.labels[idx]).sum())
            if teacher is not None:
                agree += int((out.argmax(1) == first_output(teacher(*xs)).argmax(1)).sum())
            total += len(idx)
    row = {}
    if total and data.labels is not None:
        row["accuracy"] = round(correct / total, 6)
    if total and teacher is not None:
        row["agreement"] = round(agree / total, 6)
    return row


class _Best:
    """The best-epoch rule: scores the model on the held-out samples, snapshots the best."""

    def __init__(self, model: nn.Module, holdout: Holdout, history: History) -> None:
        self.model, self.holdout, self.history = model, holdout, history
        self.state: dict[str, Any] | None = None
        self.last = -1
        history.metric = holdout.metric

    def consider(self, epoch: int) -> dict[str, Any]:
        value = self.holdout.score(self.model)
        history = self.history
        if epoch == 0:
            history.start = value
        elif history.best_trained is None or value > history.best_trained:
            history.best_trained = value
        if history.best is None or value > history.best:
            history.best, history.best_epoch = value, epoch
            self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.last = epoch
        return {"epoch": float(epoch), f"held_out_{history.metric}": fidelity_figure(value)}

    def restore(self) -> None:
        if self.state is None:
            raise EngineError(
                "training_failed",
                f"{self.history.stopped or 'Training did not finish an epoch'}; lower `lr`.",
            )
        if self.history.best_epoch != self.last:
            self.model.load_state_dict(self.state)


def _schedule(opt: Any, kind: str, steps: int) -> Any:
    """The learning-rate schedule: constant, or cosine decay to zero over `steps` batches."""
    import torch

    if kind == "constant":
        return None
    total = max(steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )


def fit(
    model: nn.Module,
    data: Data,
    loss: Loss,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    masks: dict[str, torch.Tensor] | None = None,
    report: Callable[[int, dict[str, float]], None] | None = None,
    params: Any = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    holdout: Holdout | None = None,
    start_counts: bool = True,
    schedule: str = "constant",
) -> History:
    """Adam for `epochs` over the data; masked weights stay zero. Leaves the model in eval.

    With `holdout` the best-epoch rule applies: the held-out fidelity is scored before training
    (epoch 0, unless `start_counts` is False: a student with fresh weights) and after every
    epoch, the model ends in its best state, and a non-finite loss ends training (the best
    state is kept, `History.stopped` says why) instead of failing it. `schedule`: "constant"
    or "cosine" (decay to zero over the run).
    """
    import torch

    history = History()
    if epochs <= 0:
        return history
    if loss.teacher is None and (data.labels is None or not loss.use_labels):
        raise EngineError(
            "dataset_needs_labels",
            "Training without a teacher needs a dataset with a `labels` array.",
        )
    named = dict(model.named_parameters())
    masked = {name: named[name] for name in (masks or {})}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    best = _Best(model, holdout, history) if holdout is not None else None
    try:
        if best is not None and start_counts:
            history.epochs.append(best.consider(0))
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr)
        per_epoch = sum(1 for _ in data.batches(batch_size, None))
        scheduler = _schedule(opt, schedule, epochs * per_epoch)
        for epoch in range(epochs):
            model.train()
            total, count = 0.0, 0
            for idx in data.batches(batch_size, gen):
                xs = [x[idx] for x in data.inputs]
                target = None
                if loss.teacher is not None:
                    with torch.no_grad():
                        target = [t.detach() for t in flatten(loss.teacher(*xs))]
                labels = data.labels[idx] if data.labels is not None else None
                opt.zero_grad()
                value = loss_value(flatten(model(*xs)), loss, labels, target)
                if extra_loss is not None:
                    value = value + extra_loss()
                if not torch.isfinite(value):
                    message = f"The training loss became {float(value)} in epoch {epoch + 1}"
                    if best is None:
                        raise EngineError("training_failed", f"{message}; lower `lr`.")
                    history.stopped = message
                    break
                value.backward()
                opt.step()
                if scheduler is not None:
                    scheduler.step()
                if masks:
                    with torch.no_grad():
                        for name, mask in masks.items():
                            masked[name].mul_(mask)
                total += float(value.detach()) * len(idx)
                count += len(idx)
            if history.stopped:
                break
            model.eval()
            row: dict[str, Any] = {
                "epoch": float(epoch + 1),
                "loss": round(total / max(count, 1), 6),
            }
            row.update(evaluate(model, data, loss.teacher, task=loss.task))
            if best is not None:
                row.update(best.consider(epoch + 1))
            history.epochs.append(row)
            if report:
                report(epoch, row)
        if best is not None:
            best.restore()
    finally:
        torch.set_num_threads(threads)
        model.eval()
    return history


def epoch_progress(
    report: Callable[[float, str], None], what: str, epochs: int, lo: float, hi: float
) -> Callable[[int, dict[str, float]], None]:
    """A `fit` callback that reports each epoch's loss/accuracy/agreement and held-out
    fidelity as progress lo..hi."""

    def on_epoch(epoch: int, row: dict[str, Any]) -> None:
        parts = [f"loss {row['loss']:.4f}"]
        parts += [f"{k} {row[k]:.4f}" for k in ("accuracy", "agreement") if k in row]
        for metric in FIDELITY_NAMES:
            if f"held_out_{metric}" in row:
                value = row[f"held_out_{metric}"]
                parts.append(f"held-out {format_fidelity(metric, value)}")
        report(
            lo + (hi - lo) * (epoch + 1) / epochs,
            f"{what} epoch {epoch + 1}/{epochs}: " + ", ".join(parts),
        )

    return on_epoch


def load_lifted(path: Any) -> tuple[torch.fx.GraphModule, list[str]]:
    """A .pt2 as a trainable GraphModule with real layers (lift.lift_modules)."""
    from engine.io.formats import load_exported_program
    from engine.torchgraph.lift import lift_modules

    gm, outputs = lift_modules(load_exported_program(path))
    return gm.eval(), outputs


def teacher_module(ctx: StepContext) -> torch.fx.GraphModule:
    """The job's original model (a .pt2 upload) as a frozen module, for distillation."""
    if ctx.source_model is None or ctx.source_format != "pt2":
        raise EngineError(
            "unsupported_op",
            "Distillation uses the original model as the teacher and needs it as a .pt2.",
        )
    gm, _ = load_lifted(ctx.source_model)
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm


def frozen(gm: Callable[..., Any]) -> Callable[..., Any]:
    """Call a module without recording gradients."""
    import torch

    def run(*xs: torch.Tensor) -> Any:
        with torch.no_grad():
            return gm(*xs)

    return run


def teacher_model(ctx: StepContext) -> Callable[..., Any]:
    """The job's original model, frozen, as a function of the inputs."""
    return frozen(teacher_module(ctx))


def recovery_loss(ctx: StepContext, data: Data) -> tuple[Loss, str]:
    """Labels → cross-entropy; none → distillation from the original. With a description."""
    if data.labels is not None:
        return Loss(use_labels=True, task=ctx.task), "cross-entropy on the dataset's labels"
    return (
        Loss(teacher=teacher_model(ctx), use_labels=False, alpha=1.0, task=ctx.task),
        "distillation from the original model (the dataset has no labels)",
    )
