"""The training ops' configs: fine_tune (supervised) and distill (teacher-student)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from engine.config.base import Backend, OpConfig, training_lr

LrSchedule = Literal["constant", "cosine"]


class _TrainsTorch(OpConfig):
    """An op that trains the torch model on the job's dataset."""

    def backends(self) -> tuple[Backend, ...]:
        return ("torch",)

    def trains(self) -> bool:
        return True


class FineTuneConfig(_TrainsTorch):
    """Supervised recovery training on the dataset's labels (Adam, cross-entropy); the epoch
    with the best held-out fidelity is kept, the step's input when no epoch beats it."""

    op: Literal["fine_tune"] = "fine_tune"
    epochs: int = Field(5, ge=1, le=200)
    lr: float | None = training_lr()
    batch_size: int = Field(64, ge=1, le=4096)
    lr_schedule: LrSchedule = Field(
        "cosine", description="learning rate: constant, or cosine decay to zero over the run"
    )

    def needs_dataset(self) -> str | None:
        return "fine_tune trains on it"

    def needs_labels(self) -> str | None:
        return "fine_tune is supervised (use distill to train without labels)"


class DistillConfig(_TrainsTorch):
    """Teacher–student distillation; the teacher is the job's original model.

    The loss follows the evaluation task: classification logits α·T²·KL(softmax(z_t/T) ‖
    softmax(z_s/T)) + (1−α)·CE(y, z_s) (without labels α = 1); embedding 1 − cosine to the
    teacher's output (+ `mse_weight` × normalised MSE); generic: each output's MSE divided by
    the teacher output's variance. The epoch with the best held-out fidelity is kept. The
    student is the pipeline's current model (`student: "current"`), the original with every
    hidden layer's width scaled by `width` and freshly initialised (`student: "width"`), or
    another uploaded .pt2 (`student_model_id`).
    `feature_layers` pairs [student layer, teacher layer] add an MSE loss between their outputs
    after a learned 1×1 projection, weighted by `feature_weight`.
    """

    op: Literal["distill"] = "distill"
    student: Literal["current", "width", "model"] = "current"
    width: float = Field(0.5, gt=0, le=1, description="student: width — kept fraction of channels")
    student_model_id: str | None = Field(None, description="student: model — an uploaded .pt2")
    temperature: float = Field(4.0, gt=0, le=100)
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the soft (teacher) term")
    epochs: int = Field(10, ge=1, le=500)
    lr: float | None = training_lr()
    batch_size: int = Field(64, ge=1, le=4096)
    feature_layers: list[tuple[str, str]] = Field(
        default_factory=list, description="[student layer, teacher layer] pairs"
    )
    feature_weight: float = Field(1.0, ge=0, le=100)
    mse_weight: float = Field(
        0.0,
        ge=0,
        le=100,
        description="embedding task: weight of an MSE term (normalised by the teacher "
        "output's variance) added to 1 − cosine",
    )
    lr_schedule: LrSchedule | None = Field(
        None,
        description="learning rate: constant, or cosine decay to zero over the run; unset: "
        "cosine for a trained student (current, model), constant for a fresh width student",
    )
    hidden_weight: float = Field(
        1.0,
        ge=0,
        le=100,
        description="weight of the hidden-state loss: each LayerNorm output of the student "
        "learns the teacher's (MSE / the teacher's variance) when both have as many, of the "
        "same shapes (a pruned transformer keeps its residual width); 0 turns it off",
    )

    augment: Literal["auto", "on", "off"] = Field(
        "auto",
        description="vary the training samples (text: token dropout and mixing; images: flip, "
        "crop, noise) and distil on the teacher's outputs for the variants; auto: on when the "
        "dataset has fewer than 5,000 samples",
    )

    @model_validator(mode="after")
    def _student_source(self) -> DistillConfig:
        if (self.student == "model") != (self.student_model_id is not None):
            raise ValueError(
                "give student_model_id exactly when student is 'model' (an uploaded .pt2)"
            )
        return self

    def torch_field(self) -> str | None:
        return "student"

    def schedule(self) -> LrSchedule:
        """The learning-rate schedule to train with (see lr_schedule)."""
        if self.lr_schedule is not None:
            return self.lr_schedule
        return "constant" if self.student == "width" else "cosine"

    def needs_dataset(self) -> str | None:
        return "the student learns the teacher's outputs on its samples"
