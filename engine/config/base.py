"""What every op config shares: the base class, the backends an op runs on, the request error."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.errors import EngineError

Backend = Literal["onnx", "torch"]


def training_lr() -> Any:
    """The `lr` field of an op that trains: unset picks by the model
    (engine.torchgraph.train.default_lr)."""
    return Field(
        None,
        gt=0,
        le=1,
        description="Adam learning rate; unset: 1e-3, or 2e-4 on a model with attention (a "
        "pretrained transformer)",
    )


class PipelineError(EngineError):
    """A request that cannot run as asked: a stable code, the field at fault (a step, an
    override, the export), and `extra` members for the API's problem body (e.g. valid_ops)."""

    def __init__(self, code: str, detail: str, field: str, **extra: Any) -> None:
        super().__init__(code, detail, field=field)
        self.extra = extra


class OpConfig(BaseModel):
    """Base for op configs: strict keys, a type tag (`op`) and a schema version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: str
    version: Literal[1] = Field(1, description="config schema version; 1 is the only one")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def backends(self) -> tuple[Backend, ...]:
        """Where this op can run: on the ONNX graph, on the torch model (a .pt2), or either.

        Ops that train, or that change layer shapes, need the torch model; the pipeline keeps
        one only while the upload is a .pt2 and every earlier step ran on torch.
        """
        return ("onnx",)

    def keeps_torch(self) -> bool:
        """Whether running on torch still leaves a torch model for later steps."""
        return True

    def torch_field(self) -> str | None:
        """The config field that makes this op need the torch model, for error messages."""
        return None

    def trains(self) -> bool:
        """Whether the op trains on the job's dataset."""
        return False

    def may_train_torch(self, model_format: str) -> bool:
        """Whether the op builds models that train on torch beyond its own step (the auto
        search's distillation-backed candidates): routed like a training step."""
        return False

    def fits_data(self) -> bool:
        """Whether the op fits weights to the job's dataset — training, or a least-squares
        refit — so that measuring on the same samples would flatter it: then part of the
        dataset is held out for measuring (`evaluation.holdout`)."""
        return self.trains()

    def needs_labels(self) -> str | None:
        """Why this op needs a dataset with labels (None: it does not)."""
        return None

    def needs_dataset(self) -> str | None:
        """Why this op needs a dataset at all (None: synthetic inputs do)."""
        return None
