"""Model formats: detect from content, load safely (never unpickle), inspect, convert to ONNX."""

from __future__ import annotations

import contextlib
import io
import warnings
import zipfile
from pathlib import Path
from typing import Any, Literal

import numpy as np

from worker.engine.errors import EngineError

Format = Literal["onnx", "pt2", "torchscript"]

EXPORT_HOWTO = (
    "Export the model instead: "
    "`torch.export.save(torch.export.export(model.eval(), (example_input,)), 'model.pt2')` "
    "or `torch.onnx.export(model.eval(), (example_input,), 'model.onnx', dynamo=True)`."
)
ACCEPTED = "Accepted formats: ONNX (.onnx), torch.export ExportedProgram (.pt2), TorchScript (.pt)."


def detect_format(path: str | Path) -> Format:
    """The model's format from its bytes; pickles and unknown content raise EngineError."""
    path = Path(path)
    with path.open("rb") as fh:
        head = fh.read(4)
    if not head:
        raise EngineError("unrecognized_format", f"The file is empty. {ACCEPTED}", field="file")
    if head[0] == 0x80 and 2 <= head[1] <= 5:
        raise EngineError(
            "pickle_refused",
            "The file is a raw Python pickle. Pickles are refused because loading one runs "
            f"arbitrary code. {EXPORT_HOWTO}",
            field="file",
        )
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            tails = {n.split("/", 1)[1] for n in zf.namelist() if "/" in n}
        if "archive_format" in tails or any(t.startswith("models/") for t in tails):
            return "pt2"
        if any(t.startswith("code/") for t in tails) and "constants.pkl" in tails:
            return "torchscript"
        if "data.pkl" in tails:
            raise EngineError(
                "pickle_refused",
                "The file is a torch.save() checkpoint (a pickled module or state_dict). Pickles "
                f"are refused because loading one runs arbitrary code. {EXPORT_HOWTO}",
                field="file",
            )
        raise EngineError("unrecognized_format", f"The zip archive is not a model. {ACCEPTED}")
    load_onnx(path)
    return "onnx"


def load_onnx(path: str | Path) -> Any:
    """Parse and check an ONNX file; a truncated or corrupt one raises EngineError."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError, ...
        raise EngineError(
            "invalid_model",
            f"The file could not be parsed as ONNX ({type(exc).__name__}: {exc}). If it is an "
            f"ONNX model it is truncated or corrupt; upload the complete file. {ACCEPTED}",
            field="file",
        ) from exc
    if not model.graph.node:
        raise EngineError(
            "unrecognized_format", f"The file has no ONNX graph. {ACCEPTED}", field="file"
        )
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise EngineError(
            "invalid_model",
            f"The ONNX model is invalid: {exc}. Re-export it with a recent exporter.",
            field="file",
        ) from exc
    return model


def _dtype_name(elem_type: int) -> str:
    import onnx

    return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))


def _onnx_specs(values: Any) -> list[dict[str, Any]]:
    specs = []
    for value in values:
        shape: list[int | str] = []
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            else:
                shape.append(dim.dim_param or ("batch" if i == 0 else f"d{i}"))
        specs.append(
            {
                "name": value.name,
                "shape": shape,
                "dtype": _dtype_name(value.type.tensor_type.elem_type),
            }
        )
    return specs


def onnx_session(model: str | Path | bytes, threads: int = 1) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def inspect_onnx(path: str | Path) -> dict[str, Any]:

    model = load_onnx(path)
    try:
        onnx_session(path)
    except Exception as exc:
        raise EngineError(
            "invalid_model",
            f"onnxruntime cannot load the model: {exc}. Use standard ONNX operators (custom "
            "domains need their runtime library) and a single-file model (external data "
            "embedded).",
            field="file",
        ) from exc
    init_names = {init.name for init in model.graph.initializer}
    params = sum(
        int(np.prod(init.dims)) if init.dims else 1
        for init in model.graph.initializer
        if init.data_type in (1, 10, 11, 16)  # float, float16, double, bfloat16
    )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "format": "onnx",
        "inputs": _onnx_specs([i for i in model.graph.input if i.name not in init_names]),
        "outputs": _onnx_specs(model.graph.output),
        "params": params,
        "opset": opset,
    }


def load_pt2(path: str | Path) -> Any:
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(str(path))
    except Exception as exc:
        raise EngineError(
            "invalid_model",
            f"torch.export.load could not read the .pt2 file: {type(exc).__name__}: {exc}. "
            "Save it with torch.export.save from the same or an older torch version.",
            field="file",
        ) from exc


def _pt2_specs(program: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    user_inputs = list(program.graph_signature.user_inputs)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    inputs = []
    for name in user_inputs:
        val = placeholders[name].meta.get("val")
        shape: list[int | str] = []
        for i, dim in enumerate(getattr(val, "shape", [])):
            shape.append(int(dim) if isinstance(dim, int) else ("batch" if i == 0 else str(dim)))
        dtype = str(val.dtype).replace("torch.", "") if val is not None else "float32"
        inputs.append({"name": name, "shape": shape, "dtype": dtype})
    outputs = []
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    for i, node in enumerate(output_node.args[0]):
        val = getattr(node, "meta", {}).get("val")
        shape = []
        for j, dim in enumerate(getattr(val, "shape", [])):
            shape.append(int(dim) if isinstance(dim, int) else ("batch" if j == 0 else str(dim)))
        dtype = str(val.dtype).replace("torch.", "") if val is not None else "float32"
        outputs.append({"name": f"output_{i}", "shape": shape, "dtype": dtype})
    return inputs, outputs


def inspect_model(path: str | Path) -> dict[str, Any]:
    """Format, inputs/outputs (names, shapes with dynamic dims as strings, dtypes), params."""
    fmt = detect_format(path)
    if fmt == "onnx":
        return inspect_onnx(path)
    if fmt == "pt2":
        program = load_pt2(path)
        inputs, outputs = _pt2_specs(program)
        params = sum(int(t.numel()) for t in program.state_dict.values())
        params += sum(int(getattr(t, "numel", lambda: 0)()) for t in program.constants.values())
        return {
            "format": "pt2",
            "inputs": inputs,
            "outputs": outputs,
            "params": params,
            "opset": None,
        }
    module = load_torchscript(path)
    params = sum(int(p.numel()) for p in module.parameters())
    names = [i.debugName().split(".")[0] for i in list(module.graph.inputs())[1:]]
    return {
        "format": "torchscript",
        "inputs": [{"name": n, "shape": [], "dtype": "float32"} for n in names],
        "outputs": [{"name": "output_0", "shape": [], "dtype": "float32"}],
        "params": params,
        "opset": None,
    }


def load_torchscript(path: str | Path) -> Any:
    import torch

    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise EngineError(
            "invalid_model",
            f"torch.jit.load could not read the TorchScript file: {exc}",
            field="file",
        ) from exc


def to_onnx(path: str | Path, out: Path, example: dict[str, np.ndarray] | None = None) -> Path:
    """The model as a single-file fp32 ONNX (pt2 via torch.onnx dynamo export, dynamic dims kept)."""
    fmt = detect_format(path)
    if fmt == "onnx":
        model = load_onnx(path)
        import onnx

        onnx.save(model, str(out))
        return out
    import logging

    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    if fmt == "pt2":
        program = load_pt2(path)
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(program, f=str(out), dynamo=True, external_data=False)
        except Exception as exc:
            raise EngineError(
                "unsupported_model",
                f"The .pt2 program could not be exported to ONNX: {type(exc).__name__}: "
                f"{str(exc)[:500]}",
            ) from exc
        return out
    module = load_torchscript(path)
    if example is None:
        raise EngineError(
            "unsupported_model",
            "A TorchScript model carries no input shapes; attach a dataset to the job so it can "
            "be exported, or upload a torch.export .pt2 instead.",
        )
    args = tuple(torch.from_numpy(v[:1]) for v in example.values())
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(out),
                dynamo=False,
                input_names=list(example),
                dynamic_axes={name: {0: "batch"} for name in example},
            )
    except Exception as exc:
        raise EngineError(
            "unsupported_model", f"The TorchScript model could not be exported to ONNX: {exc}"
        ) from exc
    return out
