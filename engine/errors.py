"""The one exception the engine raises for problems a user can fix."""

from __future__ import annotations

EXPORT_HOWTO = (
    "Export the model instead: "
    "`torch.export.save(torch.export.export(model.eval(), (example_input,)), 'model.pt2')` "
    "or `torch.onnx.export(model.eval(), (example_input,), 'model.onnx', dynamo=True)`."
)
ACCEPTED_FORMATS = "Accepted formats: ONNX (.onnx) and torch.export ExportedProgram (.pt2)."


class EngineError(Exception):
    """A user-facing failure: a stable code, a detail that says what to do, the field at fault."""

    def __init__(self, code: str, detail: str, *, field: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.field = field

    def __str__(self) -> str:
        return self.detail

    def __repr__(self) -> str:
        return f"EngineError({self.code!r}, {self.detail!r}, field={self.field!r})"
