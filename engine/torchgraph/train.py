"""The one training loop every torch op uses: fine-tuning, distillation, gradual pruning, QAT.

`fit` runs Adam over the job's data on a `Loss` (torchgraph.losses), with a constant or cosine
learning-rate schedule; pruned weights stay zero under their masks.

The best-epoch rule: given held-out samples (`Holdout`, torchgraph.fidelity), `fit` scores
their fidelity to the original model before training (epoch 0, the input) and after every
epoch and ends in the best state; a later epoch must be strictly better to replace it.

Training is single-threaded and seeded, so a job gives the same model on a rerun.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import EngineError
from engine.torchgraph.augment import Plan
from engine.torchgraph.augment import apply as apply_augment
from engine.torchgraph.device import place
from engine.torchgraph.fidelity import (
    FIDELITY_NAMES,
    History,
    Holdout,
    fidelity_figure,
    format_fidelity,
)
from engine.torchgraph.losses import Loss, is_logits, loss_value
from engine.torchgraph.program import flatten

if TYPE_CHECKING:
    import torch
    from torch import nn

    from engine.context import StepContext

EVAL_LIMIT = 2000


@dataclass
class Data:
    """The job's samples as tensors: one per model input, and the labels if any."""

    inputs: list[torch.Tensor]
    labels: torch.Tensor | None
    batch: int | None  # a fixed batch size the model was exported with

    def __len__(self) -> int:
        return len(self.inputs[0])

    def to(self, device: str) -> Data:
        """The same samples on `device`."""
        labels = self.labels.to(device) if self.labels is not None else None
        return dataclasses.replace(self, inputs=[x.to(device) for x in self.inputs], labels=labels)

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


# Adam's step when a training op's `lr` is left unset: 1e-3 for the CNNs and MLPs trained
# here; less on a model with attention (a pretrained transformer). all-MiniLM-L6-v2 with 30 %
# of its heads and FFN channels pruned, distilled 8 epochs on 717 sentences, held-out cosine
# on sentences of other topics: 0.906 at 5e-5, 0.923 at 2e-4, 0.922 at 5e-4, 0.908 at 1e-3
# (docs/pipelines.md).
DEFAULT_LR = 1e-3
TRANSFORMER_LR = 2e-4


def lr_for(given: float | None, gm: torch.fx.GraphModule) -> float:
    """The op's `lr` when given, else default_lr(gm)."""
    return given if given is not None else default_lr(gm)


def default_lr(gm: torch.fx.GraphModule) -> float:
    """The learning rate for `gm` when none is given: TRANSFORMER_LR where
    engine.torchgraph.blocks finds attention, DEFAULT_LR otherwise."""
    from engine.torchgraph.blocks import attention_blocks

    # a graph the block finder cannot follow is not taken for attention
    return TRANSFORMER_LR if attention_blocks(gm) is not None else DEFAULT_LR


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
    augment: Plan | None = None,
    device: str = "cpu",
    threads: int = 1,
) -> History:
    """Adam for `epochs` over the data; masked weights stay zero. Leaves the model in eval.

    With `holdout` the best-epoch rule applies: the held-out fidelity is scored before training
    (epoch 0, unless `start_counts` is False: a student with fresh weights) and after every
    epoch, the model ends in its best state, and a non-finite loss ends training (the best
    state is kept, `History.stopped` says why) instead of failing it. `schedule`: "constant"
    or "cosine" (decay to zero over the run). `augment` varies the training batches
    (engine.torchgraph.augment; distillation only: the teacher labels each variant). `device`:
    where the model, the teacher (a `frozen` one) and the batches are for the run; the model is
    back on the CPU after it.
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
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # a fixed count: a rerun gives the same model
    history.threads = torch.get_num_threads()
    torch.manual_seed(seed)
    teacher = loss.teacher.module if isinstance(loss.teacher, Frozen) else None
    back_to_cpu = place(device, [model, teacher], params)
    best = _Best(model, holdout, history) if holdout is not None else None
    try:
        data = data.to(device)
        masks = {name: mask.to(device) for name, mask in (masks or {}).items()}
        if best is not None and start_counts:
            history.epochs.append(best.consider(0))
        gen = torch.Generator().manual_seed(seed)
        varied = torch.Generator().manual_seed(seed + 1)
        opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr)
        per_epoch = sum(1 for _ in data.batches(batch_size, None))
        scheduler = _schedule(opt, schedule, epochs * per_epoch)
        for epoch in range(epochs):
            model.train()
            total, count = 0.0, 0
            for idx in data.batches(batch_size, gen):
                xs = [x[idx] for x in data.inputs]
                if augment is not None and loss.teacher is not None:
                    xs = apply_augment(augment, xs, varied)
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
        torch.set_num_threads(previous)
        back_to_cpu()
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


class Frozen:
    """A module called without recording gradients (a teacher; `fit` moves it with the model)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *xs: torch.Tensor) -> Any:
        import torch

        with torch.no_grad():
            return self.module(*xs)


def frozen(gm: nn.Module) -> Frozen:
    """Call a module without recording gradients."""
    return Frozen(gm)


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
