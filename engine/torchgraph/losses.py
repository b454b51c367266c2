"""What the training loop optimises (`Loss`), chosen by what the job's data has and its
evaluation task (`loss_kind`):
- no teacher: cross-entropy on the labels (`fine_tune`, pruning recovery with labels);
- classification with [batch, classes] logits: α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) +
  (1−α)·CE(y, z_s) (Hinton et al.; the T² keeps the soft term's gradients on the scale of the
  hard one); without labels the soft term alone (α = 1);
- embedding: 1 − cosine(student, teacher) per sample, averaged over the outputs, plus
  `mse_weight` × the normalised MSE below;
- generic (and classification outputs that are not logits): each output's MSE to the
  teacher's divided by the variance of the teacher's output, averaged over all outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.errors import EngineError

if TYPE_CHECKING:
    import torch


@dataclass
class Loss:
    """What the loop optimises; see the module docstring."""

    teacher: Callable[..., Any] | None = None
    use_labels: bool = True
    alpha: float = 0.5
    temperature: float = 4.0
    task: str = "classification"
    mse_weight: float = 0.0  # embedding: weight of the normalised MSE added to 1 − cosine


def is_logits(t: torch.Tensor) -> bool:
    """A [batch, classes] output with more than one class: what KL and top-1 apply to."""
    return t.dim() == 2 and t.shape[1] > 1


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
