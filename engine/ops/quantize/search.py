"""Which quantized variants `quantize` builds (granularity, int8/uint8 activations,
SmoothQuant, the `prefer` variants), and which one it delivers.

Everything here is measured, not assumed: fidelity against the step's float input on the
job's samples (engine.ops.quantize.measure), latency side by side with the float model on this
worker (1 thread, batch 1 or the fixed batch), sizes from the written files. When no build
meets a target, engine.ops.quantize.fallback keeps what it takes float.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine.config import QuantizeConfig, QuantizeTarget
from engine.errors import EngineError
from engine.io.datasets import Samples
from engine.onnxgraph import metrics as m
from engine.ops.quantize.bias import correct_biases, input_means
from engine.ops.quantize.fallback import FALLBACK_MAX_FLOAT_SHARE, LayerOrder, fallback, first_build
from engine.ops.quantize.integer import Quantizer, Variant
from engine.ops.quantize.measure import (
    LATENCY_THREADS,
    Candidate,
    Evaluator,
    meets,
    worst_sqnr,
)
from engine.ops.quantize.smooth import SMOOTH_ALPHAS, smooth

# prefer speed's guard against a broken result when no target is given (a whole-output
# cosine: the worst-slice SQNR of a detector's 1e-5 scores is not what speed trades against).
SPEED_DEFAULT_TARGET = QuantizeTarget(min_cosine=0.99)
QUALITY_TIE_DB = 1.0
# Top-1 agreements within this of the best are a tie. PP-LCNet orientation, 8 selection photos:
# per-tensor weights measured 10.5 dB at 0.625 agreement, per-channel 9.5 dB at 0.875; the
# SQNR tie band alone kept the per-tensor build (smaller), which was 4 dB worse on new photos.
# Top-1 agreements within 0.02, or within one sample's decision on a small selection set, are
# a tie: on 8 selection photos, 7/8 vs 6/8 is one photo (PP-LCNet on an AVX2 worker without
# VNNI: the uint8-activation build, 3× faster there, was set aside for that one photo).
AGREEMENT_TIE = 0.02
# Latencies within 10% of the fastest are a tie, broken by the smaller file and then by the
# build order, never by the timing itself: two builds of one size (int8 vs uint8 activations)
# measure within a few percent of each other from run to run, and the same request on the same
# input must give the same file (a resumed job rebuilds its last step; a recipe re-runs).
LATENCY_TIE = 0.10
# when latency only ranks the builds the rest starts from: telling 3× from 1× takes a few runs
RANKING_RUNS = 10
RANKING_SECONDS = 1.0
SIZE_TIE = 0.05  # files within 5% of the smallest are as small (_cheapest_meeting)
# an activation type this much slower than its twin's is not built again (_without_slow_...)
ACTIVATION_SLOW = 1.25
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")


def cpu_int8_features() -> list[str]:
    """CPU flags that give int8 dot-product instructions (VNNI / AMX / Arm dot product)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return [f for f in VNNI_FLAGS if f in flags]


def quality_variants(q: Quantizer, requested: Variant) -> list[Variant]:
    """What `prefer: quality` builds: the requested variant and, for static int8, the same with
    uint8 activations (U8S8), and per tensor when `per_channel` is unset; choose_quality keeps
    the most faithful, then the fastest."""
    cfg = q.config
    out = [requested]
    if cfg.mode != "static":
        return with_reduced_range(q, out)
    if cfg.per_channel is None and q.per_channel_ok:
        out.append(replace(requested, name=f"{requested.name}_per_tensor", per_channel=False))
    if cfg.dtype == "int8":
        out += [replace(v, name=f"{v.name}_u8act", activations="uint8") for v in out]
    return with_reduced_range(q, out)


def with_reduced_range(q: Quantizer, variants: list[Variant]) -> list[Variant]:
    """On a CPU without int8 dot-product instructions, every build that multiplies uint8
    activations by int8 weights (dynamic, static U8S8) also with 7-bit weights (`..._rr7`):
    the int16 pair sums of its kernels saturate otherwise. Measured like the rest; on VNNI/AMX
    or Arm dot-product CPUs there is nothing to saturate, and no such build."""
    if q.config.dtype != "int8" or cpu_int8_features():
        return variants
    reduced = [
        replace(v, name=f"{v.name}_rr7", reduce_range=True)
        for v in variants
        if v.mode == "dynamic" or (v.mode == "static" and v.activations == "uint8")
    ]
    return variants + reduced


def variants_for(q: Quantizer) -> list[Variant]:
    """What prefer speed/size tries for the requested mode and dtype."""
    cfg = q.config
    has_matmul = any(x.op_type in ("MatMul", "Gemm") and x.weight for x in q.all_layers)
    has_depthwise = any(x.depthwise for x in q.all_layers)
    if cfg.mode == "weight_only":
        if cfg.dtype == "int4":
            return [
                Variant("int4_block32", "weight_only"),
                Variant("int4_block128", "weight_only", block_size=128),
            ]
        return [
            Variant("weight_only_per_channel", "weight_only"),
            Variant("weight_only_per_tensor", "weight_only", per_channel=False),
        ]
    static = [
        Variant("static_qdq_per_channel", "static"),
        Variant("static_qdq_per_tensor", "static", per_channel=False),
        Variant("static_qoperator_per_channel", "static", fmt="qoperator"),
    ]
    if has_depthwise:
        static.append(Variant("static_qdq_depthwise_float", "static", exclude_depthwise=True))
    if cfg.dtype == "int8":
        static += [replace(v, name=f"{v.name}_u8act", activations="uint8") for v in static]
    dynamic = [
        Variant("dynamic_per_channel", "dynamic"),
        Variant("dynamic_per_tensor", "dynamic", per_channel=False),
    ]
    if cfg.mode == "dynamic":
        return with_reduced_range(q, dynamic + static[:1])
    return with_reduced_range(q, static + (dynamic[:1] if has_matmul else []))


def search(q: Quantizer, float_model: Path, select: Samples, refit: Samples | None = None) -> Path:
    """Quantize as configured, measuring every build on the `select` samples (held out of the
    quantizer's calibration samples where the dataset allows, measure.selection_split);
    returns the chosen file, a static one calibrated again on `refit` (all the step's
    samples) when given. Fills ctx.details/metrics/warnings."""
    cfg, ctx = q.config, q.ctx
    assert cfg.mode is not None
    requested = Variant(
        f"{cfg.mode}_{cfg.dtype}", cfg.mode, per_channel=cfg.per_channel is not False
    )
    target = cfg.target
    if target is None and cfg.prefer == "speed":
        target = SPEED_DEFAULT_TARGET
    if target is not None:
        ctx.details["target"] = target.model_dump(exclude_none=True)
    ev = Evaluator(float_model, q, select)
    ctx.details["selection"] = {
        "calibration_samples": len(ctx.samples),
        "selection_samples": len(select),
        "disjoint": select is not ctx.samples,
    }
    variants = quality_variants(q, requested) if cfg.prefer == "quality" else variants_for(q)
    if q.attention is not None and any(v.mode == "static" for v in variants):
        # engine.ops.quantize.attention: what static int8 quantizes in a graph with attention
        ctx.details["attention"] = q.attention.as_dict()
    if cfg.range_repairs and any(v.mode == "static" for v in variants):
        repairs = q.range_repairs(ev.reference)
        if repairs:
            ctx.details["repairs"] = [r.as_dict() for r in repairs]
    order = LayerOrder(q, requested, ev, measure=cfg.sensitivity or cfg.target is not None)
    if cfg.sensitivity:
        order()  # asked for: ranked even when no fallback needs it

    builds = bias_corrected_builds(q, requested, variants)
    for alpha, smoothed in smoothed_quantizers(q):
        builds += [
            (smoothed, replace(v, name=f"{v.name}_smoothquant{alpha}"))
            for v in variants
            if v.per_channel == requested.per_channel
            and v.fmt == requested.fmt
            and v.mode == requested.mode  # speed/size: not every variant twice more
            and not v.exclude_depthwise
        ]
    builds = _twins_first(builds, requested)
    ctx.report(0.65, f"building and measuring {len(builds)} variant(s)")
    tried: list[Candidate] = []
    quantizer_of: dict[str, Quantizer] = {}
    # builds[2:] may shrink after the first two; enumerate reads the list as it goes
    for i, (quantizer, variant) in enumerate(builds):
        try:
            cand = first_build(quantizer, variant, ev, i)
        except Exception as exc:
            if len(builds) == 1:
                raise
            _failed(ctx.details, variant, exc)
            continue
        cand.met = meets(cand.fidelity, target)
        quantizer_of[variant.name] = quantizer
        tried.append(cand)
        if i == 1 and len(tried) == 2 and tried[0].variant.activations != variant.activations:
            _measure_latency(tried, ev, rank=True)  # the requested build and its twin
            builds[2:] = _without_slow_activations(tried, builds[2:], ctx.details)
    if not tried:
        raise EngineError("quantize_failed", "No quantized variant could be built.")
    missed = target is not None and not any(c.met for c in tried)
    if len(tried) > 1 and (_per_tensor_ranges_apply(cfg) or missed):
        # The builds the rest starts from (per-tensor ranges, the fallback) are picked by
        # speed, too: as faithful and 3× faster is the uint8-activation twin where int8
        # activations take a slow path (PP-LCNet: S8S8 4.3× slower than fp32 on a Xeon with
        # AMX, U8S8 1.4×); picked by size and order alone, the per-tensor ranges went to the
        # slow twin and the job delivered it. The choice measures them all again; without
        # per-tensor ranges or a fallback to start, nothing is ranked.
        _measure_latency(tried, ev, rank=True)
    per_tensor = _per_tensor_ranges(tried, quantizer_of, ev, target, len(builds))
    if per_tensor is not None:
        quantizer_of[per_tensor[0].variant.name] = per_tensor[1]
        tried.append(per_tensor[0])
    if target is not None and not any(c.met for c in tried):
        for cand in _fallback_starts(tried, cfg.prefer):
            ctx.report(0.8, f"target missed: fallback on {cand.variant.name}")
            i = tried.index(cand)
            better = fallback(quantizer_of[cand.variant.name], cand, ev, target, order, i)
            if better is not cand:
                tried[i] = better
    # The float model and every variant measured side by side (interleaved runs).
    float_ms = _measure_latency(tried, ev, float_model)
    chosen = _choose(tried, cfg.prefer, cfg.target)
    if refit is not None and chosen.variant.mode == "static":
        # Chosen on samples its ranges were not fitted to; delivered with ranges from every
        # sample (PP-LCNet orientation: 24 calibration photos gave 13.3 dB on new photos where
        # 32 gave 15 dB).
        owner = quantizer_of[chosen.variant.name]
        full = owner.derived(owner.prepared, samples=refit)
        dst = ctx.workdir / "chosen-refit.onnx"
        path = full.build(chosen.variant, dst, exclude=set(chosen.kept_float))
        chosen = replace(chosen, path=path)
        # every sample, or HISTOGRAM_SAMPLES of them for per-tensor ranges
        ctx.details["selection"]["refit_calibration_samples"] = ctx.details["calibration"][
            "samples"
        ]
    ctx.details["variants"] = [
        {
            "name": c.variant.name,
            "latency_ms_p50": round(c.latency_ms, 5),
            "speedup": round(float_ms / c.latency_ms, 4),
            "size_bytes": c.size_bytes,
            "fidelity": c.fidelity,
            "kept_float": c.kept_float,
            "meets_target": c.met,
        }
        for c in tried
    ]
    ctx.details["chosen"] = chosen.variant.name
    if str(chosen.path) in q.compactions:
        ctx.details["compaction"] = q.compactions[str(chosen.path)]
    if target is not None:
        ctx.details["kept_float"] = chosen.kept_float
        ctx.details["target_met"] = chosen.met
        if not chosen.met:
            ctx.warnings.append(
                f"The quality target ({target.describe()}) could not be met: keeping the "
                "weightless ops and then the most sensitive layers float, up to "
                f"{FALLBACK_MAX_FLOAT_SHARE:.0%} of the weights, did not reach it. Delivered the "
                f"most faithful build tried ({len(chosen.kept_float)} node(s) float; "
                f"{_fid_text(chosen.fidelity)}). Try dtype fp16, or distillation/QAT."
            )
        elif chosen.kept_float:
            ctx.warnings.append(
                f"To meet {target.describe()}, {len(chosen.kept_float)} layer(s) stay float: "
                f"{', '.join(chosen.kept_float[:8])}{' …' if len(chosen.kept_float) > 8 else ''}."
            )
    else:
        _fidelity_warning(chosen, order.ranking, ctx.warnings)
    _speed_report(q, float_ms, chosen, tried)
    return chosen.path


def _failed(details: dict[str, Any], variant: Variant, exc: Exception) -> None:
    """A build that could not be made, in details.variants_failed."""
    details.setdefault("variants_failed", []).append(
        {"name": variant.name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    )


def _twins_first(
    builds: list[tuple[Quantizer, Variant]], requested: Variant
) -> list[tuple[Quantizer, Variant]]:
    """The requested build and its other-activation twin (the same build with uint8
    activations, or int8 for a uint8 request) first, when both are to be built from the same
    model: what they measure decides whether the slower activation type is built again
    (_without_slow_activations). The rest keep their order."""
    if len(builds) < 3 or builds[0][1] != requested:
        return builds
    other = "int8" if requested.activations == "uint8" else "uint8"
    twin = next(
        (
            i
            for i, (quantizer, v) in enumerate(builds)
            if i > 0
            and quantizer is builds[0][0]
            and v == replace(requested, name=v.name, activations=other)
        ),
        None,
    )
    if twin is None:
        return builds
    return [builds[0], builds[twin], *(b for i, b in enumerate(builds) if i not in (0, twin))]


def _without_slow_activations(
    pair: list[Candidate],
    rest: list[tuple[Quantizer, Variant]],
    details: dict[str, Any],
) -> list[tuple[Quantizer, Variant]]:
    """After the requested build and its twin, which differ only in the activation type: when
    one runs ACTIVATION_SLOW× slower than the other (a quick side-by-side measurement, in
    latency_ms) and is no more faithful (choose_quality keeps the other), the remaining builds
    with its activation type are not made. int8 × int8 (S8S8) kernels ran PP-LCNet at 4.3× fp32 on a
    Xeon with AMX where uint8 activations (U8S8) ran at 1.4×: its S8S8 builds were measured
    only to lose. The skipped builds are listed in details.variants_skipped."""
    keep = choose_quality(pair)
    slow = next(c for c in pair if c is not keep)
    if slow.latency_ms < ACTIVATION_SLOW * keep.latency_ms:
        return rest
    kind = slow.variant.activations
    skipped = [v.name for _, v in rest if v.activations == kind]
    if skipped:
        details["variants_skipped"] = {
            "names": skipped,
            "why": f"{kind} activations ran {slow.latency_ms / keep.latency_ms:.2f}× slower "
            f"than {keep.variant.activations} here ({slow.variant.name} vs "
            f"{keep.variant.name}, quick side-by-side) and measured no more faithful",
        }
    return [b for b in rest if b[1].activations != kind]


def _per_tensor_ranges_apply(cfg: QuantizeConfig) -> bool:
    """Whether the request gets a per-tensor-ranges build (of its pick, when that is static):
    prefer quality, min/max calibration, asymmetric, `calibration.per_tensor_ranges` on."""
    return (
        cfg.prefer == "quality"
        and cfg.calibration.method == "minmax"
        and not cfg.symmetric
        and cfg.calibration.per_tensor_ranges
    )


def _per_tensor_ranges(
    tried: list[Candidate],
    quantizer_of: dict[str, Quantizer],
    ev: Evaluator,
    target: QuantizeTarget | None,
    index: int,
) -> tuple[Candidate, Quantizer] | None:
    """prefer quality, static, min/max calibration: the most faithful build again with each
    activation tensor's range chosen by expected error (engine.ops.quantize.ranges), as one
    more candidate (`..._mse`) that the choice keeps only if it measures better."""
    pick = choose_quality(tried)
    q = quantizer_of[pick.variant.name]
    if not _per_tensor_ranges_apply(q.config) or pick.variant.mode != "static":
        return None
    variant = replace(pick.variant, name=f"{pick.variant.name}_mse", ranges="mse")
    q.ctx.report(0.75, f"{variant.name}: activation ranges per tensor by expected error")
    try:
        cand = first_build(q, variant, ev, index)
    except Exception as exc:  # one more candidate, never the step's failure
        _failed(q.ctx.details, variant, exc)
        return None
    cand.met = meets(cand.fidelity, target)
    return cand, q


def _measure_latency(
    tried: list[Candidate], ev: Evaluator, float_model: Path | None = None, rank: bool = False
) -> float:
    """Set every candidate's latency_ms, measured side by side (interleaved runs) with the
    float model when given; returns the float model's (0.0 without one). `rank`: a quick
    measurement (RANKING_RUNS, RANKING_SECONDS a build) that only ranks."""
    paths = (
        [c.path for c in tried] if float_model is None else [float_model, *(c.path for c in tried)]
    )
    if rank:
        times = m.latency_side_by_side(
            paths,
            ev.latency_feeds,
            LATENCY_THREADS,
            block=5,
            min_runs=RANKING_RUNS,
            max_seconds=RANKING_SECONDS,
        )
    else:
        times = m.latency_side_by_side(paths, ev.latency_feeds, LATENCY_THREADS)
    float_ms = 0.0 if float_model is None else times.pop(0)
    for cand, ms in zip(tried, times, strict=True):
        cand.latency_ms = ms
    return float_ms


def _fallback_starts(tried: list[Candidate], prefer: str) -> list[Candidate]:
    """Which builds the target fallback works on (it costs builds): quality, choose_quality's
    pick (the most faithful, then fastest); speed, the two fastest; size, the two smallest."""
    if prefer == "quality":
        return [choose_quality(tried)]
    key = (lambda c: c.size_bytes) if prefer == "size" else (lambda c: c.latency_ms)
    return sorted(tried, key=key)[:2]


def bias_corrected_builds(
    q: Quantizer, requested: Variant, variants: list[Variant]
) -> list[tuple[Quantizer, Variant]]:
    """What to build: every variant as is; with bias correction (int8 weights, symmetric,
    prefer quality) the requested build as is and every variant from a bias-corrected copy
    of the model (engine.ops.quantize.bias; one copy per weight granularity), named
    `..._biascorr`. Without anything to correct: the variants as they are."""
    cfg = q.config
    plain = [(q, v) for v in variants]
    if (
        not cfg.bias_correction
        or cfg.prefer != "quality"
        or cfg.mode not in ("static", "dynamic")
        or cfg.dtype != "int8"
        or cfg.symmetric is False
    ):
        return plain
    means = input_means(q.prepared, q.ctx.samples, q.ctx.batch, q.ctx.workdir / "bias-probe.onnx")
    corrected: dict[bool, Quantizer | None] = {}
    out: list[tuple[Quantizer, Variant]] = [(q, requested)]
    # ... and its uint8-activation twin as is: where bias correction lowers a slice (YOLOv8n's
    # scores), the uncorrected build is the most faithful, and without the twin only its S8S8
    # form was left (2× slower than fp32 on a Xeon with AMX, where U8S8 ran at 0.5×)
    out += [(q, v) for v in variants if v == replace(requested, name=v.name, activations="uint8")]
    for v in variants:
        per_channel = v.per_channel and q.per_channel_ok
        if per_channel not in corrected:
            corrected[per_channel] = _bias_corrected(q, per_channel, means)
        other = corrected[per_channel]
        if other is None:
            out += [] if any(x is q and y == v for x, y in out) else [(q, v)]
        else:
            out.append((other, replace(v, name=f"{v.name}_biascorr")))
    return out


def _bias_corrected(q: Quantizer, per_channel: bool, means: dict[str, Any]) -> Quantizer | None:
    granularity = "per_channel" if per_channel else "per_tensor"
    dst = q.ctx.workdir / f"biascorr-{granularity}.onnx"
    done = correct_biases(q.prepared, dst, means, per_channel)
    if not done:
        return None
    q.ctx.details.setdefault("bias_corrected", {})[granularity] = [x.as_dict() for x in done]
    return q.derived(dst)


def smoothed_quantizers(q: Quantizer) -> list[tuple[float, Quantizer]]:
    """(alpha, quantizer over the SmoothQuant-rescaled model) per strength in SMOOTH_ALPHAS
    (engine.ops.quantize.smooth) when int8 MatMul inputs have outlier channels; [] when none."""
    if not q.config.smooth or q.config.mode not in ("static", "dynamic"):
        return []
    out = []
    for alpha in SMOOTH_ALPHAS:
        dst = q.ctx.workdir / f"smoothed-{alpha}.onnx"
        done = smooth(q.prepared, dst, q.ctx.samples, q.ctx.batch, alpha)
        if not done:
            return []
        q.ctx.details.setdefault("smoothed", {})[str(alpha)] = [x.as_dict() for x in done]
        out.append((alpha, q.derived(dst)))
    return out


def _choose(tried: list[Candidate], prefer: str, target: QuantizeTarget | None) -> Candidate:
    """speed: the fastest that meets the target; size: the smallest; quality with a target:
    the cheapest that meets it (_cheapest_meeting: about the smallest, then the fastest) — the
    target says how much fidelity is enough; quality without one: choose_quality. When none
    meets the target: choose_quality over all (the most faithful, ties to the faster)."""
    if not tried:
        raise RuntimeError("no quantized variant could be built")
    ok = [c for c in tried if c.met] or [choose_quality(tried)]
    if prefer == "speed":
        return min(ok, key=lambda c: c.latency_ms)
    if prefer == "size":
        return min(ok, key=lambda c: c.size_bytes)
    if target is not None:
        return _cheapest_meeting(ok)
    return choose_quality(ok)


def _cheapest(ok: list[Candidate]) -> Candidate:
    fastest = min(c.latency_ms for c in ok)
    quick = [i for i, c in enumerate(ok) if c.latency_ms <= fastest * (1 + LATENCY_TIE)]
    return ok[min(quick, key=lambda i: (ok[i].size_bytes, i))]


def _cheapest_meeting(ok: list[Candidate]) -> Candidate:
    """Of the builds that meet a target: those within SIZE_TIE of the smallest, then the
    fastest of them (within LATENCY_TIE), then the most faithful of those (choose_quality).
    A target says how much fidelity is enough, and then the file a team ships should be as
    small as the plain call's: per-channel scales on the depthwise convs of a 0.6 MB OCR
    classifier made a 15% larger file that the fastest-first rule delivered. Among builds as
    small and as fast, the margin over the target decides, not the build order: that
    classifier's uncorrected build met 20 dB on the 32 selection lines with 24.8 dB and gave
    19.0 dB on new ones, where its bias-corrected twin, same size and speed, had 33.9 dB."""
    smallest = min(c.size_bytes for c in ok)
    small = [c for c in ok if c.size_bytes <= smallest * (1 + SIZE_TIE)]
    fastest = min(c.latency_ms for c in small)
    return choose_quality([c for c in small if c.latency_ms <= fastest * (1 + LATENCY_TIE)])


def choose_quality(ok: list[Candidate]) -> Candidate:
    """The most faithful candidates — for a classifier first those whose top-1 agreement is
    within AGREEMENT_TIE of the best (a build that changes more decisions is not "as
    faithful" because its logits' SQNR is close), then worst slice within QUALITY_TIE_DB of
    the best — then the fastest of those (within LATENCY_TIE), then the smallest: uint8
    activations or per-tensor weights are kept only when they measure as faithful, and then
    because they are faster or smaller (per-channel scales and int32 biases weigh on a 0.6 MB
    model at opset < 13)."""
    agreements = [c.fidelity.get("agreement_top1") for c in ok]
    if all(a is not None for a in agreements):
        top = max(float(a) for a in agreements if a is not None)
        tie = max(AGREEMENT_TIE, 1.0 / min(int(c.fidelity.get("samples", 10**9)) for c in ok))
        ok = [c for c in ok if float(c.fidelity["agreement_top1"]) >= top - tie - 1e-9]
    best = max(_quality_db(c) for c in ok)
    return _cheapest([c for c in ok if _quality_db(c) >= best - QUALITY_TIE_DB])


def _quality_db(c: Candidate) -> float:
    """Worst-slice SQNR in dB (infinite when the outputs are exact)."""
    sqnr = worst_sqnr(c.fidelity)
    return math.inf if sqnr is None else sqnr


def _fid_text(fid: dict[str, Any]) -> str:
    parts = []
    if fid.get("accuracy_drop") is not None:
        parts.append(f"accuracy drop {fid['accuracy_drop']:.4f}")
    if fid.get("cosine_similarity") is not None:
        parts.append(f"cosine {fid['cosine_similarity']:.4f}")
    if fid.get("sqnr_db") is not None:
        parts.append(f"SQNR {fid['sqnr_db']:.1f} dB")
    if fid.get("sqnr_db_min") is not None and fid.get("sqnr_db_min") != fid.get("sqnr_db"):
        parts.append(f"worst slice {fid['sqnr_db_min']:.1f} dB at {fid['sqnr_db_min_slice']}")
    if fid.get("agreement_top1") is not None:
        parts.append(f"top-1 agreement {fid['agreement_top1']:.3f}")
    return ", ".join(parts)


def _fidelity_warning(
    chosen: Candidate, ranking: list[dict[str, Any]] | None, warnings: list[str]
) -> None:
    fid = chosen.fidelity
    worst_db = worst_sqnr(fid)
    if (
        fid.get("agreement_top1", 1.0) >= 0.98
        and fid.get("cosine_similarity", 1.0) >= 0.99
        and (worst_db is None or worst_db >= m.SLICE_SQNR_WARN_DB)
    ):
        return
    if ranking:
        worst = ", ".join(
            f"{e['layer']} ({e['op_type']}, SQNR {e.get('sqnr_db')} dB)" for e in ranking[:3]
        )
        hint = f"The most sensitive layers are {worst}; add them to `exclude`"
    else:
        hint = "Set `sensitivity: true` to rank the layers, or give a `target`"
    warnings.append(
        f"Quantization changed the outputs noticeably ({_fid_text(fid)}). {hint} "
        "(or give a target to keep layers float automatically)."
    )


def _speed_report(q: Quantizer, float_ms: float, chosen: Candidate, tried: list[Candidate]) -> None:
    ctx, cfg = q.ctx, q.config
    features = cpu_int8_features()
    speedup = float_ms / chosen.latency_ms
    ctx.details["latency"] = {
        "float_ms_p50": round(float_ms, 5),
        "quantized_ms_p50": round(chosen.latency_ms, 5),
        "speedup": round(speedup, 4),
        "threads": LATENCY_THREADS,
        "cpu_int8_features": features,
    }
    if cfg.prefer == "speed" and all(float_ms / c.latency_ms < 1.0 for c in tried):
        ctx.warnings.append(
            f"None of the {len(tried)} quantized variants tried ran faster than the float model "
            f"here ({float_ms:.3f} ms); delivered the fastest that meets the target "
            f"({chosen.variant.name}, speedup {speedup:.2f}×)."
        )
    if speedup >= m.SLOWER:
        return
    if chosen.variant.mode == "weight_only":
        cause = (
            "weight-only quantization stores small weights and unpacks them to float for the "
            "float compute (DequantizeLinear / MatMulNBits block dequantization), so it saves "
            "size, not time, on layers this small"
        )
    elif features:
        cause = (
            f"this CPU has {'/'.join(features)}, so the int8 kernels are fast, but at batch 1 "
            "on layers this small the Quantize/Dequantize (or dynamic activation quantization) "
            "around each layer costs more than the int8 math saves"
        )
    else:
        cause = (
            "no VNNI: int8 QDQ adds Quantize/Dequantize overhead on small/depthwise convs "
            "(this CPU lacks avx512_vnni/avx_vnni/AMX int8 dot-product instructions)"
        )
    depthwise = [x.name for x in q.all_layers if x.depthwise]
    extra = " Try prefer: 'speed'." if cfg.prefer != "speed" else ""
    if depthwise and chosen.variant.mode == "static" and not chosen.variant.exclude_depthwise:
        extra += f" {len(depthwise)} depthwise conv(s) are quantized; excluding them may help."
    ctx.warnings.append(
        f"The quantized model ran slower than its float input on this worker "
        f"({chosen.latency_ms:.3f} ms vs {float_ms:.3f} ms, speedup {speedup:.2f}×, "
        f"{LATENCY_THREADS} thread): {cause}.{extra}"
    )
