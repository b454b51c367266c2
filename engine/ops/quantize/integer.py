"""Integer `quantize` on ONNX: int8/uint8 static (QDQ or QOperator, streamed calibration) or
dynamic, and weight-only int8/int4 (engine.ops.quantize.weight_only).

`prepare_quantizer` readies the float model once (opset for per-channel, onnxruntime's
pre-processing, named nodes); a `Quantizer` then builds one file per `Variant`, calibrating at
most once. Which variants are built and kept is engine.ops.quantize.search's job.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.config import QuantizeConfig
from engine.context import StepContext
from engine.io.datasets import Samples
from engine.io.formats import onnx_opset
from engine.onnxgraph.compact import compact, tensor_names
from engine.onnxgraph.convert import quiet
from engine.onnxgraph.graph import WEIGHT_OPS, matches, name_nodes, weight_layers
from engine.onnxgraph.runtime import feeds
from engine.ops.quantize.attention import FLOAT_OUTPUT_OPS, AttentionPlan, attention_plan
from engine.ops.quantize.memory import PeakRss
from engine.ops.quantize.ranges import choose as choose_ranges
from engine.ops.quantize.repairs import (
    Repair,
    mixed_range_concats,
    mixed_range_outputs,
    output_tails,
)
from engine.ops.quantize.weight_only import int4_blockwise, weight_only_int8

if TYPE_CHECKING:
    import onnx

CALIBRATION_BATCH = 32
# Per-tensor ranges (`ranges="mse"`) fold every activation value into a histogram, about 10 ns
# a value in numpy: PP-LCNet at 192×192 has 40 M activation values a sample, so 96 samples took
# 25 s of a 73 s job. Its tails (the 99.999th percentile) need about 10^5 values a tensor, which
# this many samples give for every zoo model (a MiniLM tensor: 384 × 16 tokens a sentence).
HISTOGRAM_SAMPLES = 32
# ... and at most this many activation values, at least one chunk: the PP-OCR detector's
# 480×640 pages took 3 s a sample (50 s for 16). A count, not a time: the same request on the
# same samples folds the same samples in, whatever the worker's load (a 15 s limit gave that
# detector 5 pages on an idle worker, 4 under a profiler, and a different file).
HISTOGRAM_VALUES = 1_500_000_000
CALIBRATION_CHUNK = 4  # batches per histogram update (entropy/percentile) or range merge (minmax)
# Input bytes per calibration chunk: every intermediate tensor of a chunk's samples is held at
# once — the sum of a CNN's intermediate tensors is often ~1000× its input (PP-OCRv4's
# recognizer: ~130 MB per 48×320 line) — so a line or a photo calibrates a few samples per
# chunk, a 480×640 page one, and digits 32 per batch in chunks of 4.
CALIBRATION_CHUNK_INPUT_BYTES = 1 << 20
PER_CHANNEL_MIN_OPSET = 13
INT4_BLOCK = 32


# Values beyond this are masks, not activations: transformers' attention masks add
# float32's lowest value (-3.4e38), and a histogram over ±3.4e38 overflows (numpy: "Too many
# bins for data range"). Such tensors keep their min/max range.
HISTOGRAM_MAX_ABS = 1e30


def ragged_histograms() -> Any:
    """onnxruntime's value histograms (2048 bins, widened as values arrive), taking a chunk's
    batches of unequal sizes: its collector stacks them into one array, which fails when the
    last batch is smaller. Tensors with values beyond ±HISTOGRAM_MAX_ABS (or not finite) are
    left out of the histograms; `extreme` keeps their min/max."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    class Ragged(HistogramCollector):  # type: ignore[misc]
        values = 0  # folded in so far

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.extreme: dict[str, tuple[float, float]] = {}

        def collect(self, name_to_arr: dict[str, Any]) -> Any:
            flat = {
                k: np.concatenate([np.ravel(a) for a in v]) if isinstance(v, list) else v
                for k, v in name_to_arr.items()
            }
            self.values += sum(int(np.size(a)) for a in flat.values())
            for k in list(flat):
                a = np.asarray(flat[k])
                if a.size == 0 or a.dtype.kind != "f":
                    continue
                lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
                if k in self.extreme or not max(abs(lo), abs(hi)) <= HISTOGRAM_MAX_ABS:
                    was = self.extreme.get(k, (lo, hi))
                    self.extreme[k] = (min(was[0], lo), max(was[1], hi))
                    self.histogram_dict.pop(k, None)
                    del flat[k]
            return super().collect(flat)

    return Ragged(
        method="percentile",
        symmetric=False,
        num_bins=2048,
        num_quantized_bins=128,
        percentile=99.999,
        scenario="same",
    )


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
        self.fed = 0  # batches handed out so far
        self._batches: Iterator[dict[str, np.ndarray]] = iter(())
        self._next: dict[str, np.ndarray] | None = None
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.chunk is not None and self._given >= self.chunk:
            return None
        item, self._next = self._next, next(self._batches, None)
        if item is not None:
            self._given += 1
            self.fed += 1
        return item

    def more(self) -> bool:
        """Start the next chunk; False when the data is exhausted."""
        self._given = 0
        return self._next is not None

    def rewind(self) -> None:
        self._given = 0
        self.fed = 0
        self._batches = (f for f, _ in feeds(self.samples, self.batch, pad=self.fixed))
        self._next = next(self._batches, None)


def calibration_batching(samples: Samples, fixed_batch: int | None) -> tuple[int, int]:
    """(batch, batches per chunk) so one chunk holds about CALIBRATION_CHUNK_INPUT_BYTES of
    inputs: the calibrator keeps every intermediate output of a chunk in memory."""
    per_sample = max(1, sum(v[:1].nbytes for v in samples.inputs.values()))
    fits = max(1, CALIBRATION_CHUNK_INPUT_BYTES // per_sample)
    if fixed_batch is not None:
        return fixed_batch, max(1, min(CALIBRATION_CHUNK, fits // fixed_batch))
    batch = max(1, min(CALIBRATION_BATCH, fits // CALIBRATION_CHUNK))
    return batch, max(1, min(CALIBRATION_CHUNK, fits // batch))


# ----------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class Layer:
    """A quantizable compute node: its name, op type and constant weight input (if any)."""

    name: str
    op_type: str
    weight: str | None
    depthwise: bool = False


def layers(model: onnx.ModelProto) -> list[Layer]:
    """Conv/Gemm/MatMul nodes in graph order, with their constant weight where they have one."""
    weights = {x.index: x.weight for x in weight_layers(model, min_ndim=0)}
    out = []
    for index, node in enumerate(model.graph.node):
        if node.op_type not in WEIGHT_OPS:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        depthwise = node.op_type == "Conv" and group > 1
        out.append(Layer(node.name, node.op_type, weights.get(index), depthwise))
    return out


def excluded(all_layers: list[Layer], patterns: list[str]) -> set[str]:
    """Names of the layers whose node name or weight name matches one of the patterns."""
    return {
        x.name for x in all_layers if matches([x.name, *([x.weight] if x.weight else [])], patterns)
    }


# ----------------------------------------------------------------------------- preparation


def prepare_quantizer(config: QuantizeConfig, model: Path, ctx: StepContext) -> Quantizer:
    """The float model made ready once for every build: opset >= 13 where per-channel needs
    it, onnxruntime's pre-processing, every node named (so nodes can be excluded by name)."""
    import onnx

    per_channel_ok = True
    source = model
    needs_axis = config.mode in ("static", "dynamic") or (
        config.mode == "weight_only" and config.dtype == "int8"
    )
    if config.per_channel is not False and needs_axis:
        upgraded = _upgrade_opset(model, ctx.workdir / "opset13.onnx", ctx)
        per_channel_ok = upgraded is not None
        source = upgraded or model
    ctx.report(0.1, "pre-processing (shape inference, fusion)")
    prepared = _preprocess(source, ctx.workdir / "preprocessed.onnx", ctx)
    named = name_nodes(onnx.load(str(prepared)))
    prepared = ctx.workdir / "prepared.onnx"
    onnx.save(named, str(prepared))
    return Quantizer(config, prepared, ctx, per_channel_ok)


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
            # onnxruntime writes sym_shape_infer_temp.onnx (+ external data) into the working
            # directory when symbolic inference is incomplete: keep it in the step's scratch.
            with quiet(), contextlib.chdir(dst.parent):
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic)
            return dst
        except Exception:
            continue
    ctx.warnings.append(
        "onnxruntime's quantization pre-processing (shape inference and fusion) failed on this "
        "model; it was quantized without it, which can leave some operators unquantized."
    )
    return src


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
    # static int8: activations int8 (S8S8) or uint8 (U8S8, weights stay int8). Same precision
    # (256 asymmetric levels); onnxruntime's x86 integer kernels take uint8 activations, so
    # U8S8 ran 2-3x faster than S8S8 on YOLOv8n and PP-LCNet here. Chosen by measurement.
    activations: str = "int8"
    # int8 weights on 7 bits (onnxruntime's reduce_range). x86 without VNNI multiplies uint8
    # activations by int8 weights in pairs summed into int16 (vpmaddubsw), which saturates
    # with full-range weights: a transformer block with outlier channels read 6.4 dB with
    # quantize_dynamic's defaults on an AVX2 worker and 24.9 dB with 7-bit weights.
    reduce_range: bool = False
    # static: the calibration's ranges as configured, or per tensor by expected error
    # (engine.ops.quantize.ranges; `..._mse` builds)
    ranges: str = "configured"


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
    kept_float: set[str] = field(default_factory=set)  # mixed-range repairs (static only)
    # a graph with attention: static builds quantize its weight layers and embeddings only
    attention: AttentionPlan | None = None
    _caches: dict[str, Path] = field(default_factory=dict)  # ranges -> calibration cache
    builds: int = 0
    calibration_progress: float = 0.2  # where the step's progress stands when it calibrates
    tag: str = ""  # told apart in scratch file names (a refit calibrates the same model again)
    # built file -> what compaction saved there; one dict shared with the derived quantizers
    compactions: dict[str, dict[str, int]] = field(default_factory=dict)

    @cached_property
    def model(self) -> onnx.ModelProto:
        """The prepared float model, loaded once after calibration, for the graph questions
        the search asks (read-only: builds read the file)."""
        import onnx

        return onnx.load(str(self.prepared))

    def __post_init__(self) -> None:
        import onnx

        # Not self.model: calibration comes next and should not hold a second copy.
        model = onnx.load(str(self.prepared))
        self.all_layers = layers(model)
        self.attention = attention_plan(model)
        del model
        self.base_exclude = excluded(self.all_layers, self.config.exclude)

    def derived(self, prepared: Path, samples: Samples | None = None) -> Quantizer:
        """A quantizer with the same config and repairs over a rewritten copy of the prepared
        model (SmoothQuant, bias correction), or over the same model calibrating on other
        `samples`; it calibrates on first build, after the variants' building has begun."""
        ctx = self.ctx if samples is None else replace(self.ctx, samples=samples)
        other = Quantizer(self.config, prepared, ctx, self.per_channel_ok)
        other.kept_float = set(self.kept_float)
        other.compactions = self.compactions
        other.calibration_progress = 0.65 if samples is None else 0.9
        other.tag = "" if samples is None else "-refit"
        return other

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

    def weightless(self, variant: Variant) -> list[str]:
        """Nodes without weights that a static build quantizes (Add, Mul, Concat, pooling,
        Resize, Sigmoid, Softmax, ...): keeping them float costs no bytes."""
        if variant.mode != "static":
            return []
        from onnxruntime.quantization.registry import QDQRegistry

        layers = {x.name for x in self.all_layers}
        skip = layers | self.base_exclude | self.kept_float | self.attention_float
        nodes = self.model.graph.node
        return [n.name for n in nodes if n.op_type in QDQRegistry and n.name not in skip]

    def weight_params(self, variant: Variant) -> dict[str, int]:
        """Weight elements per quantizable layer (layers without a constant weight: 0)."""
        dims = {t.name: int(np.prod(t.dims)) for t in self.model.graph.initializer}
        return {x.name: dims.get(x.weight or "", 0) for x in self.candidates(variant)}

    def qtype(self) -> Any:
        from onnxruntime.quantization import QuantType

        return QuantType.QUInt8 if self.config.dtype == "uint8" else QuantType.QInt8

    def activation_qtype(self, variant: Variant) -> Any:
        from onnxruntime.quantization import QuantType

        return QuantType.QUInt8 if variant.activations == "uint8" else self.qtype()

    @property
    def attention_float(self) -> set[str]:
        """Nodes a static build keeps float because the graph has attention
        (engine.ops.quantize.attention)."""
        return set(self.attention.kept_float) if self.attention is not None else set()

    def extra_options(self, static: bool = False) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.config.symmetric is not None:
            extra["ActivationSymmetric"] = self.config.symmetric
            extra["WeightSymmetric"] = self.config.symmetric
        if static and self.attention is not None:
            extra["OpTypesToExcludeOutputQuantization"] = list(FLOAT_OUTPUT_OPS)
        return extra

    # ---- calibration (static)
    def calibration_method(self) -> Any:
        from onnxruntime.quantization import CalibrationMethod

        return {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[self.config.calibration.method]

    def calibration_cache(self, ranges: str = "configured") -> Path:
        """Streams the calibration samples once per kind of ranges (as configured, or "mse":
        per tensor by expected error); the ranges are cached for every later build."""
        if ranges in self._caches:
            return self._caches[ranges]
        from onnxruntime.quantization import CalibrationMethod
        from onnxruntime.quantization.calibrate import (
            TensorsData,
            create_calibrator,
            save_tensors_data,
        )
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        cfg = self.config.calibration
        per_tensor = ranges == "mse"
        samples = self.ctx.calibration(
            min(cfg.samples, HISTOGRAM_SAMPLES) if per_tensor else cfg.samples
        )
        method = CalibrationMethod.Percentile if per_tensor else self.calibration_method()
        label = "per-tensor by expected error" if per_tensor else cfg.method
        self.ctx.report(
            self.calibration_progress,
            f"calibrating (ranges {label}) on {len(samples)} {samples.source} samples",
        )
        options: dict[str, Any] = {}
        if per_tensor:
            options["symmetric"] = False  # a histogram of the values, not of their magnitudes
        elif cfg.method == "percentile":
            options["percentile"] = cfg.percentile
        if self.config.symmetric and not per_tensor:
            options["symmetric"] = True
        batch, chunk = calibration_batching(samples, self.ctx.batch)
        reader = CalibrationReader(samples, batch, fixed=self.ctx.batch is not None, chunk=chunk)
        ops = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
        with quiet(), PeakRss() as memory:
            calibrator = create_calibrator(
                self.prepared,
                ops,
                augmented_model_path=str(
                    self.ctx.workdir / f"{self.prepared.stem}{self.tag}-{ranges}-augmented.onnx"
                ),
                calibrate_method=method,
                extra_options=options,
            )
            if per_tensor:
                calibrator.collector = ragged_histograms()
            # One chunk of batches per call: minmax merges each chunk's min/max into its
            # running range, entropy/percentile fold it into their histograms, so memory
            # holds one chunk's activations, not the dataset's.
            calibrator.collect_data(reader)
            while reader.more():
                if per_tensor and calibrator.collector.values >= HISTOGRAM_VALUES:
                    break  # enough values for the tails; the rest of the samples not folded in
                calibrator.collect_data(reader)
            used = min(len(samples), reader.fed * reader.batch)
            if per_tensor:
                chosen, report = choose_ranges(calibrator.collector.histogram_dict)
                chosen.update(calibrator.collector.extreme)  # masks: their min/max
                report["min_max_beyond_histogram"] = sorted(calibrator.collector.extreme)[:8]
                data = TensorsData(
                    CalibrationMethod.MinMax,
                    {
                        k: (np.array(a, np.float32), np.array(b, np.float32))
                        for k, (a, b) in chosen.items()
                    },
                )
                self.ctx.details["calibration_ranges"] = report
            else:
                data = calibrator.compute_data()
            del calibrator
        cache = self.ctx.workdir / f"{self.prepared.stem}{self.tag}-{ranges}-calibration.json"
        save_tensors_data(data, cache)
        self._caches[ranges] = cache
        # The last calibration is the delivered file's (the refit's, when there is one).
        peak = max(int(memory.peak), int(self.ctx.metrics.get("calibration_peak_memory_bytes", 0)))
        self.ctx.metrics["calibration_peak_memory_bytes"] = peak
        self.ctx.metrics["calibration_samples"] = used
        self.ctx.details["calibration"] = {
            "method": cfg.method,
            "ranges": label,
            "samples": used,
            "batch": reader.batch,
            "batches_per_chunk": chunk,
            "peak_memory_bytes": int(memory.peak),
        }
        return cache

    def range_repairs(self, reference: list[np.ndarray]) -> list[Repair]:
        """Find the weightless nodes whose one int8 scale would zero part of a tensor
        (engine.ops.quantize.repairs: mixed-range Concats and outputs, the weightless tail
        before each output) from the calibrated ranges and the float outputs; static builds
        keep them float from now on."""
        from onnxruntime.quantization.calibrate import load_tensors_data

        ranges = {
            name: (float(np.min(data.range_value[0])), float(np.max(data.range_value[1])))
            for name, data in load_tensors_data(self.calibration_cache()).items()
        }
        model = self.model
        found = mixed_range_concats(model, ranges)
        found += mixed_range_outputs(model, reference, {r.node for r in found})
        found += output_tails(model, {r.node for r in found})
        found = [r for r in found if r.node not in self.base_exclude]
        self.kept_float = {r.node for r in found}
        return found

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
        if variant.mode == "static":
            skip = sorted(set(skip) | self.kept_float | self.attention_float)
        if variant.mode == "weight_only":
            if self.config.dtype == "int4":
                int4_blockwise(
                    self.prepared, dst, variant.block_size, self.config.symmetric, skip, only
                )
            else:
                weight_only_int8(self.prepared, dst, per_channel, skip, only)
            return dst
        if variant.mode == "dynamic":
            self._dynamic(dst, per_channel, skip, only, variant.reduce_range)
            return self._compact(dst)
        from onnxruntime.quantization import QuantFormat, quantize_static

        method = self.calibration_method()
        fmt = QuantFormat.QOperator if variant.fmt == "qoperator" else QuantFormat.QDQ
        with quiet():
            quantize_static(
                str(self.prepared),
                str(dst),
                None,
                quant_format=fmt,
                per_channel=per_channel,
                reduce_range=variant.reduce_range,
                activation_type=self.activation_qtype(variant),
                weight_type=self.qtype(),
                calibrate_method=method,
                nodes_to_exclude=skip,
                nodes_to_quantize=only,
                extra_options=self.extra_options(static=True),
                calibration_cache_path=self.calibration_cache(variant.ranges),
            )
        return self._compact(dst)

    @cached_property
    def float_names(self) -> frozenset[str]:
        return tensor_names(self.prepared)

    def _compact(self, dst: Path) -> Path:
        """`compact` (default on): the file without onnxruntime's long generated names, their
        shape records and all-zero weight zero points (engine.onnxgraph.compact)."""
        if self.config.compact:
            done = compact(dst, self.float_names)
            if done is not None:
                self.compactions[str(dst)] = done.as_dict()
        return dst

    def _dynamic(
        self,
        dst: Path,
        per_channel: bool,
        skip: list[str],
        only: list[str] | None,
        reduce_range: bool = False,
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
                reduce_range=reduce_range,
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
            self._dynamic(dst, per_channel, skip, only, reduce_range)
            self.ctx.warnings.append(
                "onnxruntime has no CPU kernel for some dynamically quantized operators here "
                f"({type(exc).__name__}); only MatMul/Gemm were quantized, convolutions stay "
                "float. Use mode 'static' to quantize convolutions."
            )
