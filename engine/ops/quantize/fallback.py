"""The target fallback of `quantize`: rank the layers (cheaply by weight noise, then the
noisiest measured), and keep float what it takes to meet the target — weightless ops first,
then sensitive layers 1, 2, 4, ... up to FALLBACK_MAX_FLOAT_SHARE of the weights.

Before that search it builds the most it may keep float (the ceiling: the weightless ops and
the layers in rank order up to the share; every smaller set it would try is a subset). When
even the ceiling misses the target by more than FALLBACK_HOPELESS_DB, the fallback stops there
instead of spending minutes on builds that cannot succeed."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.config import QuantizeTarget
from engine.ops.quantize.integer import Quantizer, Variant
from engine.ops.quantize.measure import (
    Candidate,
    Evaluator,
    fid_rank,
    meets,
    shortfall_db,
    sqnr_key,
)
from engine.ops.quantize.weight_only import symmetric_int8

if TYPE_CHECKING:
    import onnx

SENSITIVITY_MAX_LAYERS = 40  # measured one by one; the rest are ranked by weight noise
SENSITIVITY_BUDGET_S = 120.0  # ...within this time; the remainder keep the cheap order
# The target fallback keeps at most this share of the quantizable weights float.
FALLBACK_MAX_FLOAT_SHARE = 0.25
# The ceiling (the most the fallback may keep float) missing the target by more than this:
# the target is out of the fallback's reach (fewer float layers are not more faithful).
FALLBACK_HOPELESS_DB = 3.0


def sensitivity(q: Quantizer, variant: Variant, ev: Evaluator) -> list[dict[str, Any]]:
    """Rank every quantizable layer, most sensitive first: all of them cheaply by the int8
    rounding noise of their own weights (weight_noise_db), then the SENSITIVITY_MAX_LAYERS
    noisiest measured for real (quantized alone, the rest float, output fidelity); measured
    entries come first, the others follow in the cheap order (`measured: false`)."""
    layers = q.candidates(variant)
    noise = weight_noise_db(q.model, layers)
    layers = sorted(layers, key=lambda x: noise.get(x.name, math.inf))
    refine, rest = layers[:SENSITIVITY_MAX_LAYERS], layers[SENSITIVITY_MAX_LAYERS:]
    measured: list[dict[str, Any]] = []
    started = time.monotonic()
    for i, layer in enumerate(refine):
        if measured and time.monotonic() - started > SENSITIVITY_BUDGET_S:
            rest = refine[i:] + rest  # out of time: the rest stay in the cheap order
            q.ctx.details["sensitivity_time_budget_s"] = SENSITIVITY_BUDGET_S
            break
        q.ctx.report(0.3 + 0.3 * i / max(1, len(refine)), f"sensitivity {i + 1}/{len(refine)}")
        path = q.build(variant, q.ctx.workdir / "sensitivity.onnx", only=[layer.name])
        fid = ev.score(path, small=True)
        measured.append(
            {
                "layer": layer.name,
                "op_type": layer.op_type,
                "weight": layer.weight,
                "weight_noise_db": noise.get(layer.name),
                "measured": True,
                "cosine": fid.get("cosine_similarity"),
                "sqnr_db": fid.get("sqnr_db"),
                "sqnr_db_min": fid.get("sqnr_db_min"),
                "agreement": fid.get("agreement_top1"),
            }
        )
    cheap = [
        {
            "layer": x.name,
            "op_type": x.op_type,
            "weight": x.weight,
            "weight_noise_db": noise.get(x.name),
            "measured": False,
        }
        for x in rest
    ]
    return sorted(measured, key=sqnr_key) + cheap


def weight_noise_db(model: onnx.ModelProto, layers: list[Any]) -> dict[str, float]:
    """Per layer: SQNR (dB) of its weight against its own int8 per-output-channel rounding, a
    cheap proxy of how much quantizing it costs (low = coarse). Layers without a constant
    weight get none (they sort last)."""
    from onnx import numpy_helper

    from engine.onnxgraph.graph import weight_layers

    by_node = {x.node.name: x for x in weight_layers(model, min_ndim=1)}
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, float] = {}
    for layer in layers:
        found = by_node.get(layer.name)
        if found is None or found.weight not in inits:
            continue
        w = numpy_helper.to_array(inits[found.weight]).astype(np.float64)
        axis = found.out_axis % w.ndim
        q, scale = symmetric_int8(w, axis)
        shape = [-1 if i == axis else 1 for i in range(w.ndim)]
        noise = float(((w - q * scale.reshape(shape)) ** 2).sum())
        signal = float((w**2).sum())
        out[layer.name] = 10 * math.log10(signal / noise) if noise > 0 and signal > 0 else 200.0
    return out


class LayerOrder:
    """The fallback's layer order, worked out the first time a build misses its target: the
    measured sensitivity ranking (a target, or `sensitivity: true`; reported in
    details.sensitivity), else the cheap weight-noise order (prefer speed's default guard)."""

    def __init__(self, q: Quantizer, variant: Variant, ev: Evaluator, measure: bool) -> None:
        self.q, self.variant, self.ev, self.measure = q, variant, ev, measure
        self.ranking: list[dict[str, Any]] | None = None
        self._names: list[str] | None = None

    def __call__(self) -> list[str]:
        if self._names is None:
            if self.measure:
                self.ranking = sensitivity(self.q, self.variant, self.ev)
                self.q.ctx.details["sensitivity"] = self.ranking
                self._names = [entry["layer"] for entry in self.ranking]
            else:
                noise = weight_noise_db(self.q.model, self.q.candidates(self.variant))
                self._names = sorted(noise, key=noise.__getitem__)
        return self._names


def first_build(q: Quantizer, variant: Variant, ev: Evaluator, index: int) -> Candidate:
    """The variant as is (nothing kept float beyond the config and the range repairs)."""
    path = q.build(variant, q.ctx.workdir / f"variant{index}.onnx")
    return Candidate(variant, path, ev.score(path), [], False)


def fallback(
    q: Quantizer,
    cand: Candidate,
    ev: Evaluator,
    target: QuantizeTarget,
    order: LayerOrder,
    index: int,
) -> Candidate:
    """Keep float first the weightless ops the quantizer touches (no bytes); then, unless the
    ceiling shows the target is out of reach, the most sensitive weight layers — 1, 2, 4, 8,
    ... of them, up to FALLBACK_MAX_FLOAT_SHARE of the weights — until the target is met.
    Met: the build that met it with the fewest float weights. Unmet: the most faithful build
    tried. What happened is in details.fallback (per start)."""
    variant = cand.variant
    dst = q.ctx.workdir / f"variant{index}-fallback.onnx"
    params = q.weight_params(variant)
    tried: list[tuple[dict[str, Any], list[str]]] = [(cand.fidelity, [])]
    met: list[list[str]] = []
    log: dict[str, Any] = {"start": variant.name, "builds": 0}
    q.ctx.details.setdefault("fallback", []).append(log)

    def attempt(kept: list[str]) -> bool:
        path = q.build(variant, dst, exclude=set(kept))
        fid = ev.score(path)
        tried.append((fid, kept))  # dst holds the last one
        log["builds"] += 1
        if meets(fid, target):
            met.append(kept)
            return True
        return False

    base: list[str] = []
    weightless = q.weightless(variant)
    if weightless:
        if attempt(weightless):
            return Candidate(variant, dst, tried[-1][0], weightless, True)
        if fid_rank(tried[-1][0]) < fid_rank(cand.fidelity):  # better: keep them float
            base = weightless
    budget = FALLBACK_MAX_FLOAT_SHARE * sum(params.values())
    queue = [name for name in order() if name in params]
    ceiling = [*base, *_fill(queue, params, budget)]  # every prefix below is a subset of it
    if len(ceiling) > len(base):
        attempt(ceiling)
        gap = shortfall_db(tried[-1][0], target)
        log["ceiling"] = {
            "float_nodes": len(ceiling),
            "shortfall_db": None if gap is None else round(gap, 2),
        }
        if gap is not None and gap > FALLBACK_HOPELESS_DB:
            log["stopped"] = (
                f"keeping {len(ceiling) - len(base)} layer(s) float "
                f"({FALLBACK_MAX_FLOAT_SHARE:.0%} of the weights) still misses the target by "
                f"{gap:.1f} dB (> {FALLBACK_HOPELESS_DB} dB): out of the fallback's reach"
            )
            return _unmet(q, variant, dst, ev, cand, tried)
    count = 1
    while count <= len(queue):
        layers = queue[:count]
        if sum(params[k] for k in layers) > budget:
            break
        if attempt([*base, *layers]):
            break
        count *= 2
    if met:
        kept = min(met, key=lambda k: sum(params.get(n, 0) for n in k))
        return _built(q, variant, dst, ev, tried, kept, True)
    return _unmet(q, variant, dst, ev, cand, tried)


def _fill(names: list[str], params: dict[str, int], budget: float) -> list[str]:
    """The layers in order, each taken while the running weight count stays within budget."""
    out, used = [], 0
    for name in names:
        if name in params and used + params[name] <= budget:
            out.append(name)
            used += params[name]
    return out


def _built(
    q: Quantizer,
    variant: Variant,
    dst: Path,
    ev: Evaluator,
    tried: list[tuple[dict[str, Any], list[str]]],
    kept: list[str],
    met: bool,
) -> Candidate:
    """The build keeping `kept` float: dst as it is when that was the last one built."""
    if tried[-1][1] == kept and len(tried) > 1:
        return Candidate(variant, dst, tried[-1][0], kept, met)
    path = q.build(variant, dst, exclude=set(kept))
    return Candidate(variant, path, ev.score(path), kept, met)


def _unmet(
    q: Quantizer,
    variant: Variant,
    dst: Path,
    ev: Evaluator,
    cand: Candidate,
    tried: list[tuple[dict[str, Any], list[str]]],
) -> Candidate:
    """The most faithful build tried (the start itself when nothing beat it)."""
    _, best = min(tried, key=lambda t: fid_rank(t[0]))
    return cand if not best else _built(q, variant, dst, ev, tried, best, False)
