"""Binary (XNOR-Net) and ternary (TWN) weights, and the packed `.cbin` file that carries them.

Per output channel c of a Conv / Gemm / MatMul weight W:

* binary:  α_c = mean|W_c|;  W_c ≈ α_c · sign(W_c)                (sign(0) = +1)
* ternary: Δ_c = 0.7 · mean|W_c|;  α_c = mean(|W_c| where |W_c| > Δ_c);
           W_c ≈ α_c · {−1, 0, +1}  (0 where |W_c| ≤ Δ_c)

The step's model is a plain float32 ONNX holding the dequantized weights (runs anywhere); the
packed file holds the same model in 1 bit (binary) or 2 bits (ternary) per quantized weight.

Packed format, version 2 (little-endian)::

    b"CBIN"  u8 version=2  u32 header_length  header (UTF-8 JSON)  body (zstd frame)

    header = {"format": "compaas-lowbit", "version": 2, "kind": "binary"|"ternary",
              "bits": 1|1.6, "body": {"compression": "zstd", "size": decompressed bytes},
              "skeleton": {"offset", "nbytes"},       # the ONNX without the quantized weights
              "tensors": [{"name", "index", "shape", "axis", "codes": {"offset", "nbytes"},
                           "scales": {"offset", "nbytes", "dtype": "float16"}}]}

Offsets are into the decompressed body. Codes run over the weight in C order: binary one bit
per weight (1 → +1, 0 → −1, numpy packbits, most significant bit first), ternary five
weights per byte in base 3 (digit 0 → 0, 1 → +1, 2 → −1; byte = Σ dᵢ·3ⁱ, first weight the
least significant digit) — version 1 stored two bits per weight, four per byte, and is still
read. Scales
are stored as float16; the dequantized weight is float32(scale) · code computed in float32,
reinserted at initializer position `index` of the skeleton, so `unpack()` rebuilds the step's
ONNX byte for byte (the step's ONNX is itself written by `unpack`).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from engine.config import QuantizeConfig
from engine.context import StepContext
from engine.errors import EngineError
from engine.onnxgraph.graph import (
    matches,
    name_nodes,
    sort_nodes,
    strip_debug_metadata,
    weight_layers,
)

if TYPE_CHECKING:
    import onnx

MAGIC = b"CBIN"
VERSION = 2  # 2: ternary in base 3 (five weights per byte); 1: two bits per weight
TWN_DELTA = 0.7
FORMAT = "cbin"

T = TypeVar("T")


def ternary_threshold(mean_abs: T) -> T:
    """TWN's Δ per output channel from its mean |w| (numpy or torch): weights with |w| ≤ Δ
    become 0, the rest ±α. The one rule lowbit's packer and QAT's training share."""
    return TWN_DELTA * mean_abs  # type: ignore[operator,return-value]


def binarize(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """XNOR-Net: codes in {−1, +1} (int8) and α per output channel (float16)."""
    moved = np.moveaxis(w.astype(np.float32), axis, 0).reshape(w.shape[axis], -1)
    alpha = np.abs(moved).mean(1).astype(np.float16)
    codes = np.where(w >= 0, 1, -1).astype(np.int8)
    return codes, alpha


def ternarize(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """TWN: codes in {−1, 0, +1} (int8) and α per output channel (float16)."""
    moved = np.moveaxis(w.astype(np.float32), axis, 0).reshape(w.shape[axis], -1)
    absw = np.abs(moved)
    delta = ternary_threshold(absw.mean(1, keepdims=True))
    mask = absw > delta
    counts = mask.sum(1)
    alpha = np.where(counts > 0, (absw * mask).sum(1) / np.maximum(counts, 1), 0.0)
    codes_moved = (np.sign(moved) * mask).astype(np.int8).reshape(np.moveaxis(w, axis, 0).shape)
    return np.moveaxis(codes_moved, 0, axis), alpha.astype(np.float16)


def dequantize(codes: np.ndarray, alpha: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * codes.ndim
    shape[axis] = -1
    return (alpha.astype(np.float32).reshape(shape) * codes.astype(np.float32)).astype(np.float32)


TRITS = np.array([1, 3, 9, 27, 81], dtype=np.uint16)  # five ternary digits per byte (3^5 ≤ 256)


def pack_codes(codes: np.ndarray, kind: str, version: int = 2) -> bytes:
    flat = codes.reshape(-1)
    if kind == "binary":
        return np.packbits(flat > 0).tobytes()
    digits = np.where(flat > 0, 1, np.where(flat < 0, 2, 0)).astype(np.uint16)
    if version >= 2:  # base 3: 1.6 bits per weight
        digits = np.concatenate([digits, np.zeros((-len(digits)) % 5, np.uint16)]).reshape(-1, 5)
        return (digits @ TRITS).astype(np.uint8).tobytes()
    two = np.concatenate([digits, np.zeros((-len(digits)) % 4, np.uint16)]).reshape(-1, 4)
    return (
        (two[:, 0] | (two[:, 1] << 2) | (two[:, 2] << 4) | (two[:, 3] << 6))
        .astype(np.uint8)
        .tobytes()
    )


def unpack_codes(data: bytes, kind: str, shape: list[int], version: int = 2) -> np.ndarray:
    n = int(np.prod(shape))
    raw = np.frombuffer(data, np.uint8)
    if kind == "binary":
        bits = np.unpackbits(raw)[:n]
        return np.where(bits == 1, 1, -1).astype(np.int8).reshape(shape)
    if version >= 2:
        digits = ((raw.astype(np.uint16)[:, None] // TRITS[None, :]) % 3).reshape(-1)[:n]
    else:
        digits = np.stack([(raw >> s) & 3 for s in (0, 2, 4, 6)], 1).reshape(-1)[:n]
    return np.where(digits == 1, 1, np.where(digits == 2, -1, 0)).astype(np.int8).reshape(shape)


def write_packed(
    model: onnx.ModelProto, kind: str, weights: dict[str, int], out: Path
) -> dict[str, Any]:
    """Quantize the initializers named in `weights` (name → output-channel axis) and write the
    packed file; returns its header."""
    import zstandard
    from onnx import numpy_helper

    skeleton = type(model)()
    skeleton.CopyFrom(model)
    graph = skeleton.graph
    body = bytearray()
    tensors = []
    kept = []
    for index, init in enumerate(graph.initializer):
        if init.name not in weights:
            kept.append(init)
            continue
        w = numpy_helper.to_array(init)
        axis = weights[init.name]
        codes, alpha = (binarize if kind == "binary" else ternarize)(w, axis)
        packed, scales = pack_codes(codes, kind), alpha.astype("<f2").tobytes()
        entry = {
            "name": init.name,
            "index": index,
            "shape": list(w.shape),
            "axis": axis,
            "codes": {"offset": len(body), "nbytes": len(packed)},
        }
        body += packed
        entry["scales"] = {"offset": len(body), "nbytes": len(scales), "dtype": "float16"}
        body += scales
        tensors.append(entry)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    skeleton_bytes = skeleton.SerializeToString()
    header = {
        "format": "compaas-lowbit",
        "version": VERSION,
        "kind": kind,
        "bits": 1 if kind == "binary" else 1.6,
        "skeleton": {"offset": len(body), "nbytes": len(skeleton_bytes)},
        "tensors": tensors,
    }
    body += skeleton_bytes
    header["body"] = {"compression": "zstd", "size": len(body)}
    text = json.dumps(header, separators=(",", ":")).encode()
    compressed = zstandard.ZstdCompressor(level=19).compress(bytes(body))
    out.write_bytes(MAGIC + struct.pack("<BI", VERSION, len(text)) + text + compressed)
    return header


def unpack(packed: Path, out: Path) -> Path:
    """Rebuild the dequantized float32 ONNX from a packed file (byte-identical to the step's)."""
    import onnx
    import zstandard
    from onnx import numpy_helper

    data = packed.read_bytes()
    if data[:4] != MAGIC:
        raise ValueError(f"{packed} is not a compaas packed file (magic {data[:4]!r})")
    version, length = struct.unpack("<BI", data[4:9])
    if version not in (1, 2):
        raise ValueError(f"packed format version {version} is not supported (this reads 1, 2)")
    header = json.loads(data[9 : 9 + length])
    body = zstandard.ZstdDecompressor().decompress(
        data[9 + length :], max_output_size=header["body"]["size"]
    )
    sk = header["skeleton"]
    model = onnx.ModelProto.FromString(body[sk["offset"] : sk["offset"] + sk["nbytes"]])
    inits = list(model.graph.initializer)
    for entry in sorted(header["tensors"], key=lambda e: e["index"]):
        c, s = entry["codes"], entry["scales"]
        codes = unpack_codes(
            body[c["offset"] : c["offset"] + c["nbytes"]], header["kind"], entry["shape"], version
        )
        alpha = np.frombuffer(body[s["offset"] : s["offset"] + s["nbytes"]], "<f2")
        w = dequantize(codes, alpha, entry["axis"])
        inits.insert(entry["index"], numpy_helper.from_array(w, entry["name"]))
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    out.write_bytes(model.SerializeToString())
    return out


def quantize_lowbit(config: QuantizeConfig, model_path: Path, ctx: StepContext) -> Path:
    """Binary/ternary weights: the dequantized ONNX as the step's model, the packed file as an
    extra (format "cbin")."""
    import onnx

    kind = config.dtype
    model = sort_nodes(strip_debug_metadata(name_nodes(onnx.load(str(model_path)))))
    layers = weight_layers(model)
    if not layers:
        raise EngineError(
            "quantization_failed",
            f"The model has no Conv/Gemm/MatMul layer with constant weights to make {kind}.",
            field="pipeline",
        )
    keep: dict[str, str] = {}
    if config.keep_first_last:
        first_conv = next((x for x in layers if x.node.op_type == "Conv"), None)
        if first_conv is not None:
            keep[first_conv.name] = "first conv"
        last = layers[-1]
        if last.node.op_type in ("Gemm", "MatMul"):
            keep[last.name] = "last classifier layer"
    for layer in layers:
        if matches((layer.name, layer.weight), config.exclude):
            keep.setdefault(layer.name, "exclude")
    shared = {x.weight for x in layers if x.name in keep}  # kept by one layer: float everywhere
    weights = {
        x.weight: x.out_axis for x in layers if x.name not in keep and x.weight not in shared
    }
    if not weights:
        raise EngineError(
            "quantization_failed",
            f"Every weight layer is kept float (first/last layers and `exclude`); nothing "
            f"to make {kind}.",
            field="pipeline",
        )
    ctx.report(0.3, f"{kind} weights for {len(weights)} layer(s), packing")
    packed = ctx.output.with_suffix(f".{FORMAT}")
    header = write_packed(model, kind, weights, packed)
    unpack(packed, ctx.output)
    packed_size = packed.stat().st_size
    ctx.extras.append((packed, FORMAT))
    ctx.metrics["packed_size_bytes"] = packed_size
    ctx.metrics["packed_compression_ratio"] = round(model_path.stat().st_size / packed_size, 4)
    quantized = sum(int(np.prod(t["shape"])) for t in header["tensors"])
    ctx.details.update(
        {
            "kind": kind,
            "packed_format": f"{FORMAT} v{VERSION}",
            "bits_per_weight": header["bits"],
            "quantized_layers": [x.name for x in layers if x.weight in weights],
            "quantized_weights": quantized,
            "kept_float": [{"layer": k, "why": v} for k, v in keep.items()],
        }
    )
    firstlast = {k: v for k, v in keep.items() if v != "exclude"}
    if firstlast:
        ctx.warnings.append(
            f"{', '.join(f'{k} ({v})' for k, v in firstlast.items())} stay float32, as is "
            f"standard for {kind} networks (they hold few weights but most of the accuracy); "
            "set keep_first_last: false to quantize them too."
        )
    ctx.warnings.append(
        f"{kind.capitalize()} weights without retraining usually lose accuracy; the step's "
        "ONNX holds the dequantized weights (float32, runs anywhere), the ."
        f"{FORMAT} file holds them packed ({header['bits']} bit(s) per weight)."
    )
    return ctx.output
