"""The one training loop every torch op uses: fine-tuning, distillation, gradual pruning, QAT.

Loss, by what the job's data has:
- labels, no teacher: cross-entropy (`fine_tune`, pruning recovery with labels);
- a teacher and labels: α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1−α)·CE(y, z_s) (Hinton et
  al.; the T² keeps the soft term's gradients on the scale of the hard one);
- a teacher, no labels: the soft term alone (α = 1);
- outputs that are not [batch, classes] logits: mean squared error to the teacher's outputs.

Training is single-threaded and seeded, so a job gives the same model on a rerun.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import EngineError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from engine.context import StepContext

EVAL_LIMIT = 2000


@dataclass
class Loss:
    """What the loop optimises; see the module docstring."""

    teacher: Callable[..., Any] | None = None
    use_labels: bool = True
    alpha: float = 0.5
    temperature: float = 4.0


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
    """Per-epoch loss and accuracy (on the job's data), reported as progress and in details."""

    epochs: list[dict[str, float]] = field(default_factory=list)


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


def loss_value(
    student: torch.Tensor, loss: Loss, labels: torch.Tensor | None, teacher: torch.Tensor | None
) -> torch.Tensor:
    import torch.nn.functional as F

    if teacher is not None and not is_logits(student):
        return F.mse_loss(student, teacher)
    hard = F.cross_entropy(student, labels) if labels is not None and loss.use_labels else None
    if teacher is None:
        if hard is None:
            raise EngineError("training_failed", "Training needs labels or a teacher model.")
        return hard
    t = loss.temperature
    soft = F.kl_div(
        F.log_softmax(student / t, dim=1),
        F.log_softmax(teacher / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
    if hard is None:
        return soft
    return loss.alpha * soft + (1 - loss.alpha) * hard


def evaluate(
    model: Callable[..., Any],
    data: Data,
    teacher: Callable[..., Any] | None = None,
    size: int = 256,
) -> dict[str, float]:
    """Top-1 `accuracy` on the labels and `agreement` with the teacher's top-1, where defined."""
    import torch

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
) -> History:
    """Adam for `epochs` over the data; masked weights stay zero. Leaves the model in eval."""
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
    try:
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr)
        for epoch in range(epochs):
            model.train()
            total, count = 0.0, 0
            for idx in data.batches(batch_size, gen):
                xs = [x[idx] for x in data.inputs]
                target = None
                if loss.teacher is not None:
                    with torch.no_grad():
                        target = first_output(loss.teacher(*xs)).detach()
                labels = data.labels[idx] if data.labels is not None else None
                opt.zero_grad()
                value = loss_value(first_output(model(*xs)), loss, labels, target)
                if extra_loss is not None:
                    value = value + extra_loss()
                if not torch.isfinite(value):
                    raise EngineError(
                        "training_failed",
                        f"The training loss became {float(value)} in epoch {epoch + 1}; lower "
                        "`lr`.",
                    )
                value.backward()
                opt.step()
                if masks:
                    with torch.no_grad():
                        for name, mask in masks.items():
                            masked[name].mul_(mask)
                total += float(value.detach()) * len(idx)
                count += len(idx)
            model.eval()
            row = {"epoch": float(epoch + 1), "loss": round(total / max(count, 1), 6)}
            row.update(evaluate(model, data, loss.teacher))
            history.epochs.append(row)
            if report:
                report(epoch, row)
    finally:
        torch.set_num_threads(threads)
        model.eval()
    return history


def epoch_progress(
    report: Callable[[float, str], None], what: str, epochs: int, lo: float, hi: float
) -> Callable[[int, dict[str, float]], None]:
    """A `fit` callback that reports each epoch's loss/accuracy/agreement as progress lo..hi."""

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        parts = [f"loss {row['loss']:.4f}"]
        parts += [f"{k} {row[k]:.4f}" for k in ("accuracy", "agreement") if k in row]
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
        return Loss(use_labels=True), "cross-entropy on the dataset's labels"
    return (
        Loss(teacher=teacher_model(ctx), use_labels=False, alpha=1.0),
        "distillation from the original model (the dataset has no labels)",
    )
