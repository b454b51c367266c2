"""Detect a model's format from its bytes, load it without unpickling, and describe its I/O."""

from __future__ import annotations

import io
import json
import mmap
import pickletools
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from engine.errors import ACCEPTED_FORMATS, EXPORT_HOWTO, EngineError
from engine.io.pt2_ops import check_program
from engine.io.safezip import ZipLimits, open_zip, read_member

if TYPE_CHECKING:
    import onnx
    import torch

ModelFormat = Literal["onnx", "pt2"]
Dim = int | str | None

# ModelProto field number -> protobuf wire type (0 varint, 2 length-delimited).
_MODEL_PROTO_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}
_PICKLE_SCAN_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, shape (dynamic dims as names, None if unknown), dtype."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def _pickle_refused(what: str) -> EngineError:
    return EngineError(
        "pickle_refused",
        f"The file is {what}. Pickle files are refused because unpickling a file runs "
        f"arbitrary code from it. {EXPORT_HOWTO}",
        field="file",
    )


def _unrecognized(what: str) -> EngineError:
    return EngineError(
        "unrecognized_format",
        f"The file is not a model we can read ({what}). {ACCEPTED_FORMATS} {EXPORT_HOWTO}",
        field="file",
    )


def detect_format(path: str | Path) -> ModelFormat:
    """The model format of a file, judged from its content; raises EngineError otherwise."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise EngineError("unrecognized_format", f"The model file cannot be read: {exc}") from exc
    if size == 0:
        raise _unrecognized("the file is empty")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _zip_format(path)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        raise _pickle_refused(f"a Python pickle (protocol {head[1]}), e.g. from torch.save()")
    if _onnx_wire_check(path):
        return "onnx"
    if _is_old_pickle(path):
        raise _pickle_refused("a Python pickle (protocol 0/1)")
    raise _unrecognized(f"unknown content starting with {head[:16]!r}")


def _torchscript_refused() -> EngineError:
    return EngineError(
        "torchscript_refused",
        "The file is a TorchScript archive (torch.jit.save). TorchScript is refused because "
        "loading it runs code stored in the file (e.g. __setstate__), which can read and write "
        f"files on the server. {EXPORT_HOWTO}",
        field="file",
    )


# A .pt2's `archive_format` member holds the 3 bytes "pt2"; detection reads no more than this.
ARCHIVE_FORMAT_MAX_BYTES = 64


def _zip_format(path: Path) -> ModelFormat:
    with open_zip(path, ZipLimits()) as archive:
        names = archive.namelist()
        rel = {_rel(name) for name in names}
        fmt_name = next((n for n in names if _rel(n) == "archive_format"), None)
        if fmt_name is not None and (
            read_member(archive, fmt_name, ARCHIVE_FORMAT_MAX_BYTES).strip() == b"pt2"
        ):
            return "pt2"
    if any(r.startswith("models/") and r.endswith(".json") for r in rel) or (
        "serialized_exported_program.json" in rel
    ):
        return "pt2"
    if any(r.startswith("code/") for r in rel) and ("constants.pkl" in rel or "data.pkl" in rel):
        raise _torchscript_refused()
    if "data.pkl" in rel:
        raise _pickle_refused("a torch.save() archive (a zip around a pickle)")
    if names and all(n.endswith(".npy") for n in names):
        raise _unrecognized("a NumPy .npz archive; upload it as a dataset, not as a model")
    raise _unrecognized("a zip archive that is not a .pt2 file")


def _rel(name: str) -> str:
    """A member's path below the archive's top folder (zips from torch keep one)."""
    return name.split("/", 1)[1] if "/" in name else name


def _read_varint(data: Any, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("varint runs past the end")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _onnx_wire_check(path: Path) -> bool:
    """True if the file starts like an ONNX ModelProto; raises invalid_model if it is damaged."""
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        pos, fields, seen = 0, 0, set()
        while pos < len(data):
            start = pos
            try:
                key, pos = _read_varint(data, pos)
                field, wire = key >> 3, key & 7
                if _MODEL_PROTO_FIELDS.get(field) != wire:
                    raise ValueError(f"unexpected field {field} (wire type {wire})")
                if wire == 0:
                    _, pos = _read_varint(data, pos)
                else:
                    length, pos = _read_varint(data, pos)
                    if pos + length > len(data):
                        if fields == 0 and field != 1:
                            return False
                        raise EngineError(
                            "invalid_model",
                            f"The ONNX file is truncated: field {field} at byte {start} declares "
                            f"{length} bytes but only {len(data) - pos} remain. Upload the "
                            "complete file (check that the export finished and the transfer "
                            "was not cut off).",
                            field="file",
                        )
                    pos += length
            except ValueError as exc:
                if fields < 2:
                    return False
                raise EngineError(
                    "invalid_model",
                    f"The ONNX file is damaged at byte {start}: {exc}. Re-export the model.",
                    field="file",
                ) from exc
            fields += 1
            seen.add(field)
        if 7 not in seen:
            if fields < 2:
                return False
            raise EngineError(
                "invalid_model",
                "The ONNX file has no graph (it may be truncated). Upload the complete file.",
                field="file",
            )
        return True


def _is_old_pickle(path: Path) -> bool:
    """Disassemble (never execute) the start of the file: a protocol 0/1 pickle parses to STOP."""
    with path.open("rb") as fh:
        data = fh.read(_PICKLE_SCAN_BYTES + 1)
    if len(data) > _PICKLE_SCAN_BYTES:
        return False
    try:
        ops = [op.name for op, _, _ in pickletools.genops(io.BytesIO(data))]
    except Exception:
        return False
    return len(ops) >= 2 and ops[-1] == "STOP"


# ----------------------------------------------------------------------------- ONNX


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Parse and check an ONNX file (no external data); raises invalid_model naming the failure."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise EngineError(
            "invalid_model",
            f"The ONNX file could not be parsed ({type(exc).__name__}: {exc}). "
            "It may be truncated or not an ONNX model; re-export and upload the complete file.",
            field="file",
        ) from exc
    external = [
        t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise EngineError(
            "invalid_model",
            f"The ONNX file keeps {len(external)} tensors (e.g. {external[0]!r}) in external data "
            "files, which a single upload cannot carry. Save it as one file: "
            "`onnx.save(onnx.load('model.onnx'), 'single.onnx', save_as_external_data=False)` "
            "or export with `torch.onnx.export(..., external_data=False)` (models under 2 GB).",
            field="file",
        )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineError(
            "invalid_model",
            f"The ONNX model failed onnx.checker: {first}. Re-export it with a current exporter.",
            field="file",
        ) from exc
    return model


def onnx_dtype(elem_type: int) -> str:
    """numpy-style dtype name of an ONNX element type."""
    import onnx

    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError, TypeError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _value_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    shape: tuple[Dim, ...] = ()
    if tensor.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor.shape.dim
        )
    return TensorSpec(value.name, shape, onnx_dtype(tensor.elem_type))


def onnx_io(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph's real inputs (initializers excluded) and outputs."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [_value_spec(v) for v in model.graph.input if v.name not in inits]
    return inputs, [_value_spec(v) for v in model.graph.output]


def onnx_opset(model: onnx.ModelProto) -> int | None:
    """The default-domain opset version."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def onnx_float_params(model: onnx.ModelProto) -> int:
    """Total elements of floating-point initializers."""
    import numpy as np
    import onnx

    total = 0
    for t in model.graph.initializer:
        if np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type), np.floating):
            total += int(np.prod(t.dims, dtype=np.int64))
    return total


def short_error(exc: BaseException, limit: int = 500) -> str:
    text = " ".join(str(exc).split())
    return text[:limit] + ("…" if len(text) > limit else "")


# ----------------------------------------------------------------------------- torch.export


PT2_JSON_MAX_BYTES = 64 * 1024 * 1024
PT2_COPY_CHUNK = 1024 * 1024


def _is_program(rel: str) -> bool:
    return rel == "serialized_exported_program.json" or (
        rel.startswith("models/") and rel.endswith(".json")
    )


def _sanitized_pt2(path: Path, scratch: Path, limits: ZipLimits | None = None) -> Path:
    """Copy a .pt2 without the parts torch.export.load would unpickle, after checking its ops.

    Zip bounds are checked from the central directory before any read, the program's operators
    are checked before any weight is copied, and members are streamed in chunks.
    """
    out = scratch / "sanitized.pt2"
    with open_zip(path, limits or ZipLimits()) as src:
        infos = src.infolist()
        programs = 0
        for info in infos:
            rel = _rel(info.filename)
            if rel.startswith("data/aotinductor/") or rel.startswith("data/executorch"):
                raise EngineError(
                    "unsupported_model",
                    "The .pt2 package contains compiled AOTInductor/ExecuTorch code, which we "
                    "do not load. " + EXPORT_HOWTO,
                    field="file",
                )
            payload_dir = rel.startswith(("data/weights/", "data/constants/"))
            if payload_dir and rel.endswith("_config.json"):
                config = _json_member(src, info.filename).get("config", {})
                for key, meta in config.items():
                    path_name = str(meta.get("path_name", ""))
                    if meta.get("use_pickle") or not path_name.startswith(("weight_", "tensor_")):
                        raise _pickle_refused(
                            f"a .pt2 package whose entry {key!r} is stored as a pickle"
                        )
            elif payload_dir and rel.endswith(".pt"):
                raise _pickle_refused("a .pt2 package in the legacy format with pickled weights")
            elif _is_program(rel):
                check_program(_json_member(src, info.filename))
                programs += 1
        if programs == 0:
            raise EngineError(
                "invalid_model",
                "The .pt2 package holds no serialized program (models/*.json). Save it with "
                "`torch.export.save(...)` from a recent PyTorch.",
                field="file",
            )
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
            for info in infos:
                # Sample inputs are a torch.save() pickle that the loader may unpickle in full.
                if _rel(info.filename).startswith("data/sample_inputs/"):
                    dst.writestr(info.filename, b"")
                    continue
                with src.open(info) as fh, dst.open(info.filename, "w", force_zip64=True) as sink:
                    shutil.copyfileobj(fh, sink, PT2_COPY_CHUNK)
    return out


def _json_member(archive: zipfile.ZipFile, name: str) -> dict[str, Any]:
    try:
        value = json.loads(read_member(archive, name, PT2_JSON_MAX_BYTES))
    except (ValueError, UnicodeDecodeError) as exc:
        raise EngineError(
            "invalid_model", f"The .pt2 member {name!r} is not valid JSON.", field="file"
        ) from exc
    if not isinstance(value, dict):
        raise EngineError(
            "invalid_model", f"The .pt2 member {name!r} is not a JSON object.", field="file"
        )
    return value


def load_exported_program(path: str | Path) -> torch.export.ExportedProgram:
    """torch.export.load on a sanitized copy: weights as raw tensors, no pickles."""
    with tempfile.TemporaryDirectory(prefix="compaas-pt2-") as scratch:
        clean = _sanitized_pt2(Path(path), Path(scratch))
        import torch  # only once the archive and its operators passed

        try:
            return torch.export.load(str(clean))
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(
                "invalid_model",
                f"torch.export.load could not read the .pt2 file: {short_error(exc)}. Save it with "
                "`torch.export.save(...)` from a recent PyTorch.",
                field="file",
            ) from exc


def _sym_name(expr: Any, names: dict[str, str]) -> str:
    text = str(expr)
    return names.get(text, text)


def pt2_dim_names(ep: torch.export.ExportedProgram) -> dict[str, str]:
    """Readable names for symbolic dims: a symbol that is a leading dim is called `batch`."""
    import torch

    names: dict[str, str] = {}
    for spec in _user_input_nodes(ep):
        val = spec.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() > 0:
            first = val.shape[0]
            if not isinstance(first, int) and "batch" not in names.values():
                names[str(first)] = "batch"
    return names


def _user_input_nodes(ep: torch.export.ExportedProgram) -> list[Any]:
    user = set(ep.graph_signature.user_inputs)
    return [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]


def _torch_dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor_spec(name: str, val: Any, names: dict[str, str]) -> TensorSpec:
    import torch

    if not isinstance(val, torch.Tensor):
        raise EngineError(
            "unsupported_model",
            f"The model's input or output {name!r} is not a tensor ({type(val).__name__}); "
            "only tensor inputs and outputs are supported. Export a wrapper that takes tensors.",
            field="file",
        )
    shape = tuple(d if isinstance(d, int) else _sym_name(d, names) for d in val.shape)
    return TensorSpec(name, shape, _torch_dtype_name(val.dtype))


def pt2_io(ep: torch.export.ExportedProgram) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs named as the program's user inputs; outputs from the output node's values."""
    names = pt2_dim_names(ep)
    inputs = [_tensor_spec(n.name, n.meta.get("val"), names) for n in _user_input_nodes(ep)]
    output_node = next(n for n in ep.graph.nodes if n.op == "output")
    user_outputs = list(ep.graph_signature.user_outputs)
    values = output_node.args[0]
    by_name = {getattr(v, "name", None): v for v in values}
    outputs = []
    for out_name in user_outputs:
        node = by_name.get(out_name)
        val = node.meta.get("val") if node is not None else None
        outputs.append(_tensor_spec(out_name or "output", val, names))
    return inputs, outputs


def pt2_params(ep: torch.export.ExportedProgram) -> int:
    """Elements of the program's parameters, buffers and tensor constants."""
    import torch

    tensors = list(ep.state_dict.values()) + [
        c for c in ep.constants.values() if isinstance(c, torch.Tensor)
    ]
    return int(sum(t.numel() for t in tensors))
