"""`quantize` on ONNX: int8/uint8 static (QDQ, streamed calibration) or dynamic, weight-only
int8 (DequantizeLinear) / int4 (MatMulNBits), fp16, bf16 (weight storage), binary/ternary.

Sensitivity ranking, target fallback and the speed/size variant search live in
`quant_search`; binary/ternary weights and their packed file in `lowbit`.
"""

from __future__ import annotations

import fnmatch
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.config import QuantizeConfig
from engine.context import StepContext
from engine.errors import EngineError
from engine.io.datasets import Samples
from engine.io.formats import onnx_opset
from engine.onnxgraph.convert import quiet, sort_nodes, strip_debug_metadata
from engine.onnxgraph.runtime import feeds
from engine.ops.registry import register

if TYPE_CHECKING:
    import onnx

CALIBRATION_BATCH = 32
CALIBRATION_CHUNK = 4  # batches per histogram update (entropy/percentile) or range merge (minmax)
PER_CHANNEL_MIN_OPSET = 13
INT4_BLOCK = 32
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


class CalibrationReader:
    """Streams calibration batches to onnxruntime's calibrator (fixed batch sizes padded).

    With `chunk`, get_next() stops after that many batches (None) and the next call to
    `more()` continues, so a histogram calibrator can fold each chunk into its histograms
    instead of holding every intermediate output of the whole dataset.
    """

    def __init__(self, samples: Samples, batch: int, fixed: bool, chunk: int | None = None) -> None:
        self.samples = samples
        self.batch = batch
        self.fixed = fixed
        self.chunk = chunk
        self._given = 0
        self._batches: Iterator[dict[str, np.ndarray]] = iter(())
        self._next: dict[str, np.ndarray] | None = None
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.chunk is not None and self._given >= self.chunk:
            return None
        item, self._next = self._next, next(self._batches, None)
        if item is not None:
            self._given += 1
        return item

    def more(self) -> bool:
        """Start the next chunk; False when the data is exhausted."""
        self._given = 0
        return self._next is not None

    def rewind(self) -> None:
        self._given = 0
        self._batches = (f for f, _ in feeds(self.samples, self.batch, pad=self.fixed))
        self._next = next(self._batches, None)


def _save(model: onnx.ModelProto, path: Path) -> None:
    import onnx

    onnx.save(sort_nodes(strip_debug_metadata(model)), str(path))


def _upgrade_opset(src: Path, dst: Path, ctx: StepContext) -> Path | None:
    """Per-channel QDQ needs opset >= 13 (older opsets make an invalid file): convert, or None."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(src))
    opset = onnx_opset(model) or 0
    if opset >= PER_CHANNEL_MIN_OPSET:
        return src
    try:
        converted = version_converter.convert_version(model, PER_CHANNEL_MIN_OPSET)
        onnx.checker.check_model(converted)
    except Exception as exc:
        ctx.warnings.append(
            f"The model uses opset {opset} and could not be upgraded to opset "
            f"{PER_CHANNEL_MIN_OPSET} ({type(exc).__name__}), so weights were quantized "
            "per-tensor instead of per-channel. Re-export with opset >= 13 for per-channel."
        )
        return None
    onnx.save(converted, str(dst))
    ctx.warnings.append(
        f"Upgraded the model from opset {opset} to {PER_CHANNEL_MIN_OPSET} for per-channel "
        "quantization."
    )
    return dst


def _preprocess(src: Path, dst: Path, ctx: StepContext) -> Path:
    """quant_pre_process (optimization + shape inference); retry without symbolic shapes."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for skip_symbolic in (False, True):
        try:
            with quiet():
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic)
            return dst
        except Exception:
            continue
    ctx.warnings.append(
        "onnxruntime's quantization pre-processing (shape inference and fusion) failed on this "
        "model; it was quantized without it, which can leave some operators unquantized."
    )
    return src


QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulNBits",
}


def _refuse_quantized(path: Path) -> None:
    import onnx

    found = sorted({n.op_type for n in onnx.load(str(path)).graph.node} & QUANTIZED_OPS)
    if found:
        raise EngineError(
            "quantization_failed",
            f"The model is already integer-quantized (it has {', '.join(found)} nodes); "
            "quantize the float model once instead of stacking int8 steps.",
            field="pipeline",
        )


# ----------------------------------------------------------------------------- float16 / bf16


def _refuse_half(model: onnx.ModelProto, dtype: str) -> None:
    import onnx

    kinds = {t.data_type for t in model.graph.initializer}
    half = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    if kinds & half and onnx.TensorProto.FLOAT not in kinds:
        raise EngineError(
            "quantization_failed",
            f"The model is already 16-bit; converting it to {dtype} would change nothing.",
            field="pipeline",
        )


def _fp16(src: Path, ctx: StepContext) -> Path:
    """float16 weights and activations; graph inputs/outputs stay float32 (keep_io_types).

    onnxruntime's converter keeps the ops on its fp32 block list (e.g. Range, Resize's scales
    and shape arithmetic) in float32 with Casts around them.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    _refuse_half(model, "fp16")
    with quiet():
        model = convert_float_to_float16(model, keep_io_types=True)
    _save(model, ctx.output)
    return ctx.output


def _bf16(src: Path, ctx: StepContext, min_elements: int = 16) -> Path:
    """bfloat16 weight storage: each float initializer with >= min_elements values is stored
    as bfloat16 and a Cast to float32 feeds its consumers, so compute stays float32.

    onnxruntime's CPU provider has no bfloat16 kernels for MatMul/Conv/Gemm, so a graph that
    computes in bf16 would not load; the Cast is supported everywhere and ORT folds it into a
    float32 constant at session start. The file is half the size; latency is unchanged.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    _refuse_half(model, "bf16")
    graph = model.graph
    casts = []
    renamed: dict[str, str] = {}
    kept = []
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        if init.data_type != onnx.TensorProto.FLOAT or array.size < min_elements:
            kept.append(init)
            continue
        stored = f"{init.name}_bf16"
        kept.append(_bf16_tensor(array, stored))
        casts.append(
            helper.make_node(
                "Cast", [stored], [init.name], name=f"{init.name}_cast", to=onnx.TensorProto.FLOAT
            )
        )
        renamed[init.name] = stored
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    ctx.details["bf16_tensors"] = len(renamed)
    _save(model, ctx.output)
    return ctx.output


def _bf16_tensor(array: np.ndarray, name: str) -> onnx.TensorProto:
    """Round-to-nearest-even float32 → bfloat16, stored as raw little-endian uint16."""
    import onnx

    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    tensor = onnx.TensorProto()
    tensor.name = name
    tensor.data_type = onnx.TensorProto.BFLOAT16
    tensor.dims.extend(array.shape)
    tensor.raw_data = rounded.astype("<u2").tobytes()
    return tensor


# ----------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class Layer:
    """A quantizable compute node: its name, op type and constant weight input (if any)."""

    name: str
    op_type: str
    weight: str | None
    depthwise: bool = False


def layers(model: onnx.ModelProto, op_types: tuple[str, ...] = WEIGHT_OPS) -> list[Layer]:
    """Compute nodes of op_types in graph order (named ones; unnamed nodes get names first)."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        weight = next((i for i in node.input[1:2] if i in inits), None)
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        out.append(Layer(node.name, node.op_type, weight, node.op_type == "Conv" and group > 1))
    return out


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed node a unique name, so nodes can be excluded by name."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)
    return model


def match_exclude(all_layers: list[Layer], patterns: list[str]) -> set[str]:
    """Node names whose name or weight name matches one of the fnmatch patterns."""
    out = set()
    for layer in all_layers:
        names = [layer.name] + ([layer.weight] if layer.weight else [])
        if any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns):
            out.add(layer.name)
    return out


# ----------------------------------------------------------------------------- memory


class PeakRss:
    """Samples this process's resident memory in a thread; `.peak` = max increase (bytes)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._base = 0

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as fh:
                import os

                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # pragma: no cover - not Linux
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss() - self._base)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self._base = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss() - self._base)


# ----------------------------------------------------------------------------- builders


@dataclass(frozen=True)
class Variant:
    """How one quantized candidate is built."""

    name: str
    mode: str  # static | dynamic | weight_only
    per_channel: bool = True
    fmt: str = "qdq"  # qdq | qoperator
    exclude_depthwise: bool = False
    block_size: int = INT4_BLOCK


@dataclass
class Quantizer:
    """Builds quantized files from one prepared float model (calibrating at most once)."""

    config: QuantizeConfig
    prepared: Path
    ctx: StepContext
    per_channel_ok: bool
    all_layers: list[Layer] = field(default_factory=list)
    base_exclude: set[str] = field(default_factory=set)
    dynamic_conv_ok: bool = True
    _cache: Path | None = None
    builds: int = 0

    def __post_init__(self) -> None:
        import onnx

        self.all_layers = layers(onnx.load(str(self.prepared)))
        self.base_exclude = match_exclude(self.all_layers, self.config.exclude)

    # ---- what a variant quantizes
    def candidates(self, variant: Variant) -> list[Layer]:
        """Layers the variant would quantize (sensitivity and fallback work on these)."""
        if variant.mode == "weight_only" and self.config.dtype == "int4":
            keep = [x for x in self.all_layers if x.op_type in ("MatMul", "Gemm") and x.weight]
        elif variant.mode in ("weight_only", "dynamic"):
            keep = [x for x in self.all_layers if x.weight]
            if variant.mode == "dynamic":
                keep = [x for x in keep if x.op_type != "Conv" or self.dynamic_conv_ok]
        else:
            keep = list(self.all_layers)
        return [x for x in keep if x.name not in self.base_exclude]

    def qtype(self) -> Any:
        from onnxruntime.quantization import QuantType

        return QuantType.QUInt8 if self.config.dtype == "uint8" else QuantType.QInt8

    def extra_options(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.config.symmetric is not None:
            extra["ActivationSymmetric"] = self.config.symmetric
            extra["WeightSymmetric"] = self.config.symmetric
        return extra

    # ---- calibration (static)
    def calibration_cache(self) -> Path:
        """Streams the calibration samples once; the ranges are cached for every later build."""
        if self._cache is not None:
            return self._cache
        from onnxruntime.quantization import CalibrationMethod
        from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        cfg = self.config.calibration
        samples = self.ctx.calibration(cfg.samples)
        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[cfg.method]
        self.ctx.report(
            0.2, f"calibrating ({cfg.method}) on {len(samples)} {samples.source} samples"
        )
        options: dict[str, Any] = {}
        if cfg.method == "percentile":
            options["percentile"] = cfg.percentile
        if self.config.symmetric:
            options["symmetric"] = True
        reader = CalibrationReader(
            samples,
            self.ctx.batch or CALIBRATION_BATCH,
            fixed=self.ctx.batch is not None,
            chunk=CALIBRATION_CHUNK,
        )
        ops = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
        with quiet(), PeakRss() as memory:
            calibrator = create_calibrator(
                self.prepared,
                ops,
                augmented_model_path=str(self.ctx.workdir / "augmented.onnx"),
                calibrate_method=method,
                extra_options=options,
            )
            # One chunk of batches per call: minmax merges each chunk's min/max into its
            # running range, entropy/percentile fold it into their histograms, so memory
            # holds one chunk's activations, not the dataset's.
            calibrator.collect_data(reader)
            while reader.more():
                calibrator.collect_data(reader)
            ranges = calibrator.compute_data()
            del calibrator
        self._cache = self.ctx.workdir / "calibration.json"
        save_tensors_data(ranges, self._cache)
        self.ctx.metrics["calibration_peak_memory_bytes"] = int(memory.peak)
        self.ctx.metrics["calibration_samples"] = len(samples)
        self.ctx.details["calibration"] = {
            "method": cfg.method,
            "samples": len(samples),
            "batch": reader.batch,
            "peak_memory_bytes": int(memory.peak),
        }
        return self._cache

    # ---- one build
    def build(
        self,
        variant: Variant,
        dst: Path,
        *,
        exclude: set[str] | frozenset[str] = frozenset(),
        only: list[str] | None = None,
    ) -> Path:
        """Quantize with `variant`, keeping `exclude` (plus the config's patterns) float;
        `only` quantizes just those nodes (sensitivity)."""
        self.builds += 1
        skip = sorted(self.base_exclude | set(exclude))
        per_channel = variant.per_channel and self.per_channel_ok
        if variant.exclude_depthwise:
            skip += [x.name for x in self.all_layers if x.depthwise]
        if variant.mode == "weight_only":
            if self.config.dtype == "int4":
                _int4(self.prepared, dst, variant.block_size, self.config.symmetric, skip, only)
            else:
                _weight_only_int8(self.prepared, dst, per_channel, skip, only)
            return dst
        if variant.mode == "dynamic":
            self._dynamic(dst, per_channel, skip, only)
            return dst
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[self.config.calibration.method]
        fmt = QuantFormat.QOperator if variant.fmt == "qoperator" else QuantFormat.QDQ
        with quiet():
            quantize_static(
                str(self.prepared),
                str(dst),
                None,
                quant_format=fmt,
                per_channel=per_channel,
                activation_type=self.qtype(),
                weight_type=self.qtype(),
                calibrate_method=method,
                nodes_to_exclude=skip,
                nodes_to_quantize=only,
                extra_options=self.extra_options(),
                calibration_cache_path=self.calibration_cache(),
            )
        return dst

    def _dynamic(
        self, dst: Path, per_channel: bool, skip: list[str], only: list[str] | None
    ) -> None:
        """quantize_dynamic; if onnxruntime lacks an integer kernel it made, keep MatMul/Gemm."""
        from onnxruntime.quantization import quantize_dynamic

        from engine.onnxgraph.runtime import make_session

        ops = None if self.dynamic_conv_ok else ["MatMul", "Gemm"]
        with quiet():
            quantize_dynamic(
                str(self.prepared),
                str(dst),
                per_channel=per_channel,
                weight_type=self.qtype(),
                nodes_to_exclude=skip,
                nodes_to_quantize=only,
                op_types_to_quantize=ops,
                extra_options=self.extra_options(),
            )
        if ops is not None:
            return
        try:
            make_session(dst)
        except Exception as exc:
            self.dynamic_conv_ok = False
            self._dynamic(dst, per_channel, skip, only)
            self.ctx.warnings.append(
                "onnxruntime has no CPU kernel for some dynamically quantized operators here "
                f"({type(exc).__name__}); only MatMul/Gemm were quantized, convolutions stay "
                "float. Use mode 'static' to quantize convolutions."
            )


def _selected(node: onnx.NodeProto, skip: list[str], only: list[str] | None) -> bool:
    return node.name not in skip and (only is None or node.name in only)


def _weight_only_int8(
    src: Path, dst: Path, per_channel: bool, skip: list[str], only: list[str] | None
) -> None:
    """Conv/Gemm/MatMul weights stored as symmetric int8 (per output channel) with a
    DequantizeLinear in front: the file shrinks ~4×, compute stays float (opset >= 13)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    done: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type not in WEIGHT_OPS or not _selected(node, skip, only):
            continue
        if len(node.input) < 2 or node.input[1] not in inits:
            continue
        name = node.input[1]
        if name not in done:
            w = numpy_helper.to_array(inits[name]).astype(np.float32)
            if w.ndim < 2:
                continue
            axis = _out_axis(node, w.ndim)
            reduce = tuple(i for i in range(w.ndim) if i != axis)
            amax = np.abs(w).max(axis=reduce) if per_channel else np.abs(w).max(keepdims=False)
            scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
            shape = [1] * w.ndim
            if per_channel:
                shape[axis] = -1
            q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
            zp = np.zeros_like(scale, dtype=np.int8)
            graph.initializer.extend(
                [
                    numpy_helper.from_array(q, f"{name}_int8"),
                    numpy_helper.from_array(scale, f"{name}_int8_scale"),
                    numpy_helper.from_array(zp, f"{name}_int8_zp"),
                ]
            )
            dq = helper.make_node(
                "DequantizeLinear",
                [f"{name}_int8", f"{name}_int8_scale", f"{name}_int8_zp"],
                [f"{name}_dq"],
                name=f"{name}_DequantizeLinear",
            )
            if per_channel:
                dq.attribute.append(helper.make_attribute("axis", axis))
            new_nodes.append(dq)
            done[name] = f"{name}_dq"
        node.input[1] = done[name]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    _save(model, dst)


def _out_axis(node: onnx.NodeProto, ndim: int) -> int:
    """The weight axis of output channels: Conv 0, Gemm 0 with transB else 1, MatMul last."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if next((a.i for a in node.attribute if a.name == "transB"), 0) else 1
    return ndim - 1


def _gemm_to_matmul(model: onnx.ModelProto, skip: list[str]) -> None:
    """Gemm(x, W, b) with constant W and default alpha/beta/transA → MatMul + Add, so
    MatMulNBits can take classifier / MLP layers too (names kept on the MatMul)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: a for a in node.attribute}
        plain = all(
            (k == "transB") or (k in ("alpha", "beta") and attrs[k].f == 1.0) or attrs[k].i == 0
            for k in attrs
        )
        if (
            node.op_type != "Gemm"
            or node.name in skip
            or not plain
            or len(node.input) < 2
            or node.input[1] not in inits
        ):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if "transB" in attrs and attrs["transB"].i:
            w = np.ascontiguousarray(w.T)
        wname = f"{node.input[1]}_kn"
        graph.initializer.append(numpy_helper.from_array(w, wname))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{node.output[0]}_mm" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], wname], [mm_out], name=node.name))
        if has_bias:
            nodes.append(
                helper.make_node(
                    "Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}_bias"
                )
            )
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _int4(
    src: Path,
    dst: Path,
    block: int,
    symmetric: bool | None,
    skip: list[str],
    only: list[str] | None,
) -> None:
    """4-bit block-wise weights in com.microsoft MatMulNBits (onnxruntime's
    MatMulNBitsQuantizer, round-to-nearest, blocks of `block` along K)."""
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    _gemm_to_matmul(model, skip)
    if only is not None:  # nodes_to_include widens op_types_to_quantize; exclude the rest
        skip = skip + [n.name for n in model.graph.node if n.name not in only]
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=block,
        is_symmetric=bool(symmetric) if symmetric is not None else True,
        nodes_to_exclude=skip,
        quant_format=QuantFormat.QOperator,
        op_types_to_quantize=("MatMul",),
    )
    with quiet():
        quantizer.process()
    _save(quantizer.model.model, dst)


# ----------------------------------------------------------------------------- handler


@register(QuantizeConfig)
def quantize(config: QuantizeConfig, model: Path, ctx: StepContext) -> Path:
    """Write the quantized ONNX to ctx.output."""
    try:
        if config.dtype == "fp16":
            ctx.report(0.2, "converting weights and activations to float16")
            return _fp16(model, ctx)
        if config.dtype == "bf16":
            ctx.report(0.2, "storing weights as bfloat16")
            return _bf16(model, ctx)
        _refuse_quantized(model)
        if config.dtype in ("binary", "ternary"):
            from engine.ops.quantize.lowbit import lowbit

            return lowbit(config, model, ctx)
        from engine.ops.quantize.search import search

        per_channel_ok = True
        source = model
        needs_axis = config.mode in ("static", "dynamic") or (
            config.mode == "weight_only" and config.dtype == "int8"
        )
        if config.per_channel and needs_axis:
            upgraded = _upgrade_opset(model, ctx.workdir / "opset13.onnx", ctx)
            per_channel_ok = upgraded is not None
            source = upgraded or model
        ctx.report(0.1, "pre-processing (shape inference, fusion)")
        prepared = _preprocess(source, ctx.workdir / "preprocessed.onnx", ctx)
        import onnx

        named = name_nodes(onnx.load(str(prepared)))
        prepared = ctx.workdir / "prepared.onnx"
        onnx.save(named, str(prepared))
        quantizer = Quantizer(config, prepared, ctx, per_channel_ok)
        result = search(quantizer, model)
    except EngineError:
        raise
    except Exception as exc:
        text = " ".join(str(exc).split())[:400]
        raise EngineError(
            "quantization_failed",
            f"onnxruntime could not quantize the model ({type(exc).__name__}: {text}). "
            "Try per_channel: false, another mode, or dtype 'fp16'.",
            field="pipeline",
        ) from exc
    import onnx

    _save(onnx.load(str(result)), ctx.output)
    return ctx.output
