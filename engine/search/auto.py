"""The auto search: the best model within a budget, by a Pareto search over the catalog.

Pure logic, no runtime: `candidates()` lists the pipelines worth trying for an upload (quantize
modes and dtypes with their repairs, prune, low_rank, weight_share, distillation-backed variants
and compositions in valid orders) with analytic estimates of size, MACs and cost; `Search`
orders them (cheap post-training builds first, then by estimated objective), corrects the
estimates of a method family once one of its members was measured (`family`, `Correction`),
skips the dominated ones before building them, judges a training candidate's cheap probe
(`probe_pipeline`, `Search.probe_reason`), checks each measured one against the budget, refines
around the feasible points after the catalog (`Search.refine`: sweeps and bisections of a
family's sparsity or bits) and keeps the Pareto front of objective against fidelity. Building
and measuring is the caller's (engine.ops.auto runs each candidate as a whole pipeline through
engine.pipeline).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.config import PRESETS, AutoConfig, PipelineError, parse_steps, validate_request

# Distillation-backed candidates need at least this many training samples.
DISTILL_MIN_SAMPLES = 256
# Failure codes that say an op has nothing to work on in this model, whatever its settings:
# every later candidate with that op is skipped (prune and quantize are not here: what they
# find depends on granularity and dtype).
NOT_APPLICABLE = {"nothing_to_share": "weight_share", "nothing_to_factorize": "low_rank"}
# Built first whatever the estimates say (Search.order).
ANCHOR = "preset fp16"
# An estimate is trusted to within this factor when a candidate is skipped on it.
ESTIMATE_SLACK = 0.7
# ... and to within this one once a measured member of its family corrected it (Correction):
# the analytic ratios' error is mostly the family's, which the correction removes.
CORRECTED_SLACK = 0.85
# Candidates at least this costly (they train) are probed before their full build.
PROBE_MIN_COST = 2
# A probe trains on at most this many samples (and 1 epoch, no fine-tuning: probe_pipeline).
PROBE_SAMPLES = 256
# A probe's measured objective (its size, its graph's latency: training changes neither the
# number nor the storage of the weights) is trusted to within this factor.
PROBE_SLACK = 0.9
# How far under a fidelity budget key a probe must be to count as "far below" it: training
# recovers fidelity, so only a wide miss says something about the full build.
FAR_BELOW = {"max_accuracy_drop": 0.05, "min_cosine": 0.05, "min_sqnr_db": 10.0}
# Sweeps: the settings tried past a feasible catalog point, gentlest first, per knob
# (`_KNOBS`); a bisection splits a knob's interval between a met and a missed point, at most
# MAX_BISECTIONS times per line (the same pipeline but for that knob).
MAX_BISECTIONS = 2


@dataclass(frozen=True)
class Spec:
    """One candidate before it is built: its pipeline and the analytic estimates."""

    name: str
    pipeline: list[dict[str, Any]]
    size_ratio: float  # estimated share of the original's weight bytes delivered
    macs_ratio: float  # estimated share of the original's MACs
    speed: float  # estimated latency factor per MAC (int8 kernels ~0.6, fp16 on CPU ~1.2)
    cost: int  # 0: post-training (seconds), 1: one-shot + refit, 2: trains, 3: trains long
    prefix: str | None = None  # the candidate this one extends (a composition)
    # made by Search.refine after the catalog: "next" (a knob's next, more aggressive ladder
    # setting) or "bisect" (halfway between a met and a missed setting); None: a catalog point
    sweep: str | None = None

    @property
    def key(self) -> str:
        return pipeline_key(self.pipeline)


def pipeline_key(pipeline: Sequence[dict[str, Any]]) -> str:
    """A candidate's identity across attempts: the sha256 of its canonical pipeline."""
    canonical = json.dumps(list(pipeline), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _quant_target(config: AutoConfig) -> dict[str, float] | None:
    """The budget's fidelity keys as a quantize/low_rank target: the build keeps layers float
    until it meets them (the quantizer's repairs)."""
    b = config.budget
    target = {
        k: v
        for k, v in (
            ("max_accuracy_drop", b.max_accuracy_drop),
            ("min_cosine", b.min_cosine),
            ("min_sqnr_db", b.min_sqnr_db),
        )
        if v is not None
    }
    return target or None


def candidates(
    config: AutoConfig,
    model_format: str,
    *,
    task: str,
    has_dataset: bool,
    has_labels: bool,
    train_samples: int,
) -> list[Spec]:
    """Every candidate pipeline valid for this upload and data, in catalog order."""
    target = _quant_target(config)
    static: dict[str, Any] = {"op": "quantize", "mode": "static", "dtype": "int8"}
    if target is not None:
        static["target"] = target
    int8_speed = 0.6
    out = [
        Spec("preset fp16", PRESETS["fp16"]["pipeline"], 0.5, 1.0, 1.2, 0),
        Spec("preset edge-int8", PRESETS["edge-int8"]["pipeline"], 0.26, 1.0, int8_speed, 0),
        Spec(
            "int8 dynamic",
            [{"op": "quantize", "mode": "dynamic", "dtype": "int8"}],
            0.26,
            1.0,
            0.8,
            0,
        ),
        Spec("preset int4-weights", PRESETS["int4-weights"]["pipeline"], 0.16, 1.0, 1.0, 0),
        Spec("weight_share 6 bits", [{"op": "weight_share", "bits": 6}], 0.2, 1.0, 1.0, 0),
        Spec("weight_share 4 bits", [{"op": "weight_share", "bits": 4}], 0.14, 1.0, 1.0, 0),
        Spec(
            "prune 50% + weight_share 5 bits",
            [
                {"op": "prune", "criterion": "magnitude", "sparsity": 0.5},
                {"op": "weight_share", "bits": 5},
            ],
            0.11,
            1.0,
            1.0,
            1,
        ),
    ]
    if target is not None:
        # the quantizer's repairs: layers kept float until the build meets the budget
        out.insert(2, Spec("int8 static, target = budget", [static], 0.27, 1.0, int8_speed, 0))
        out.insert(
            3,
            Spec(
                "int8 static, prefer size, target = budget",
                [{**static, "prefer": "size"}],
                0.26,
                1.0,
                int8_speed,
                0,
            ),
        )
    if model_format == "pt2":
        low_rank: dict[str, Any] = {"op": "low_rank"}
        if target is not None:
            low_rank["target"] = target
        out += [
            Spec("low_rank", [low_rank], 0.6, 0.6, 1.0, 1),
            Spec(
                "low_rank + int8 static", [low_rank, static], 0.16, 0.6, int8_speed, 1, "low_rank"
            ),
        ]
        if has_dataset and train_samples >= DISTILL_MIN_SAMPLES:
            pruned = [
                {
                    "op": "prune",
                    "criterion": "magnitude",
                    "granularity": "channels",
                    "sparsity": 0.3,
                },
                {"op": "distill", "epochs": 5, "temperature": 4.0, "alpha": 0.5},
            ]
            name = "channels -30% + distill"
            out += [
                Spec(name, pruned, 0.49, 0.49, 1.0, 2),
                Spec(f"{name} + int8 static", [*pruned, static], 0.13, 0.49, int8_speed, 2, name),
                Spec("preset tiny", PRESETS["tiny"]["pipeline"], 0.065, 0.25, int8_speed, 2),
                Spec(
                    "prune 90% gradual + weight_share 5 bits",
                    [
                        {
                            "op": "prune",
                            "criterion": "magnitude",
                            "sparsity": 0.9,
                            "scope": "global",
                            "schedule": {"kind": "gradual", "steps": 3, "epochs_per_step": 3},
                            "fine_tune_epochs": 5,
                        },
                        {"op": "weight_share", "bits": 5},
                    ],
                    0.035,
                    1.0,
                    1.0,
                    2,
                ),
                Spec(
                    "preset deep-compression",
                    PRESETS["deep-compression"]["pipeline"],
                    0.025,
                    1.0,
                    1.0,
                    3,
                ),
            ]
    valid = []
    for spec in out:
        try:
            validate_request(
                parse_steps(spec.pipeline),
                model_format,
                export=["onnx"],
                task=task,
                has_dataset=has_dataset,
                has_labels=has_labels,
            )
        except PipelineError:
            continue
        valid.append(spec)
    return valid


@dataclass
class Baseline:
    """The original model's figures every estimate and objective is relative to."""

    size_bytes: int
    weight_bytes: int
    macs: int | None
    latency_ms: float | None
    accuracy: float | None


def delivered_size(metrics: dict[str, Any]) -> int | None:
    """What a candidate weighs to deliver: its archive where it makes one, else the ONNX."""
    value = metrics.get("archive_size_bytes") or metrics.get("size_bytes")
    return int(value) if value is not None else None


def objective_value(objective: str, metrics: dict[str, Any], base: Baseline) -> float | None:
    """Lower is better: bytes (size), ms (latency), or size ratio × latency ratio (balanced)."""
    size = delivered_size(metrics)
    latency = metrics.get("latency_ms_p50")
    if objective == "size":
        return float(size) if size is not None else None
    if objective == "latency":
        return float(latency) if latency is not None else None
    if size is None or latency is None or not base.latency_ms:
        return None
    return (size / base.size_bytes) * (latency / base.latency_ms)


def family(pipeline: Sequence[dict[str, Any]]) -> str:
    """A candidate's method family, the one unit estimate corrections are shared within: the
    kind of its first op and how its weights end up stored (the last quantize's dtype, else a
    weight_share codebook, else float32). The analytic ratios are wrong for the same reason
    across a family (int4 weight-only leaves convolutions float; a codebook archive's index and
    sparse overhead), so one member's measured/estimated holds for the others: `quantize/int8`
    is edge-int8 and every int8 static or dynamic build, `weight_share/codebook` every
    bit-width, `prune/codebook` the magnitude prunes followed by weight_share (deep-compression
    included), `prune/int8` the channel prunes ending in int8 (tiny included)."""
    storage = "float32"
    for step in pipeline:
        if step.get("op") == "quantize":
            storage = str(step.get("dtype", "int8"))
        elif step.get("op") == "weight_share" and storage == "float32":
            storage = "codebook"
    first = str(pipeline[0].get("op")) if pipeline else "none"
    return f"{first}/{storage}"


@dataclass(frozen=True)
class Correction:
    """Measured over estimated (delivered size; latency p50) of the latest measured candidate
    of a family, applied to the estimates of its members not built yet."""

    candidate: int
    name: str
    size: float
    latency: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "name": self.name,
            "size_factor": round(self.size, 4),
            "latency_factor": None if self.latency is None else round(self.latency, 4),
        }


def estimate(
    spec: Spec, base: Baseline, objective: str, correction: Correction | None = None
) -> dict[str, float]:
    """Analytic size, MACs and objective of a candidate before it is built; with a
    `correction`, its size and latency scaled by what its family measured."""
    overhead = max(base.size_bytes - base.weight_bytes, 0)
    size = overhead + base.weight_bytes * spec.size_ratio
    if correction is not None:
        size *= correction.size
    out: dict[str, float] = {"size_bytes": round(size)}
    if base.macs:
        out["macs"] = round(base.macs * spec.macs_ratio)
    latency = None
    if base.latency_ms:
        latency = base.latency_ms * spec.macs_ratio * spec.speed
        if correction is not None and correction.latency is not None:
            latency *= correction.latency
        out["latency_ms_p50"] = round(latency, 4)
    if objective == "size":
        out["objective"] = size
    elif objective == "latency" and latency is not None:
        out["objective"] = latency
    elif latency is not None and base.latency_ms:
        out["objective"] = (size / base.size_bytes) * (latency / base.latency_ms)
    return out


# What each budget key bounds: the figure's name and whether the bound is its max or its min.
BUDGET_FIGURES: dict[str, tuple[str, str]] = {
    "max_accuracy_drop": ("accuracy_drop", "max"),
    "min_cosine": ("cosine_similarity", "min"),
    "min_sqnr_db": ("sqnr_db_min", "min"),
    "max_size_bytes": ("size", "max"),
    "max_latency_ms": ("latency_ms_p50", "max"),
}


def budget_value(key: str, metrics: dict[str, Any]) -> float | None:
    """The measured figure a budget key bounds (BUDGET_FIGURES): the worst slice's SQNR where
    there is one, else the whole output's; the delivered size (delivered_size)."""
    if key == "min_sqnr_db":
        return metrics.get("sqnr_db_min", metrics.get("sqnr_db"))
    if key == "max_size_bytes":
        return delivered_size(metrics)
    return metrics.get(BUDGET_FIGURES[key][0])


def budget_excess(key: str, bound: float, value: float) -> float:
    """How far `value` is past the key's bound, in the figure's units (≤ 0: within it)."""
    return value - bound if BUDGET_FIGURES[key][1] == "max" else bound - value


def budget_misses(
    budget: dict[str, float], metrics: dict[str, Any], verdict: dict[str, Any] | None
) -> list[str]:
    """What a measured candidate misses of the budget (and of the job's quality floor)."""
    misses = []
    for key, bound in budget.items():
        name, ok = BUDGET_FIGURES[key]
        value = budget_value(key, metrics)
        if key == "min_sqnr_db" and value is None and "sqnr_db" in metrics:
            continue  # outputs equal the original's
        if value is None:
            misses.append(f"{name} not measured (budget {key} {bound:g})")
        elif budget_excess(key, bound, value) > 1e-9:
            sign = ">" if ok == "max" else "<"
            misses.append(f"{name} {value:g} {sign} {key} {bound:g}")
    for key in (verdict or {}).get("below_floor", []):
        measured = (verdict or {}).get("measured", {}).get(key)
        floor = (verdict or {}).get("floor", {}).get(key)
        misses.append(f"quality floor {key}: {measured} against {floor}")
    return misses


def far_below(budget: dict[str, float], metrics: dict[str, Any]) -> list[str]:
    """The budget's fidelity keys a (probe's) metrics miss by more than FAR_BELOW."""
    out = []
    for key, margin in FAR_BELOW.items():
        bound = budget.get(key)
        value = budget_value(key, metrics)
        if bound is None or value is None:
            continue
        if budget_excess(key, bound, value) > margin:
            out.append(f"{key} {bound:g} (probe {value:g}, margin {margin:g})")
    return out


def probe_pipeline(pipeline: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A training candidate's probe: the same pipeline with its training cut to a minimum, 1
    epoch per training op and per gradual round, no fine-tuning (the caller also trains it on
    at most PROBE_SAMPLES samples). Its one-shot parts (what is pruned, how the weights are
    stored) are the full build's, so its size and graph are the full build's too; its
    fidelity is a pessimistic one."""
    out = []
    for step, config in zip(pipeline, parse_steps(list(pipeline)), strict=True):
        cut = copy.deepcopy(step)
        fields = type(config).model_fields
        if "epochs" in fields:
            cut["epochs"] = 1
        if "fine_tune_epochs" in fields:
            cut["fine_tune_epochs"] = 0
        schedule = cut.get("schedule")
        if isinstance(schedule, dict) and schedule.get("epochs_per_step"):
            schedule["epochs_per_step"] = 1
        out.append(cut)
    return out


def describe(pipeline: Sequence[dict[str, Any]]) -> str:
    """A short name of a pipeline, as the catalog names its points ("prune 70% + weight_share
    4 bits"); sweep candidates are named by it."""
    parts = []
    for step in pipeline:
        op = step.get("op")
        if op == "prune":
            share = f"{step.get('sparsity', 0.5) * 100:g}%"
            channels = step.get("granularity") == "channels"
            part = f"channels -{share}" if channels else f"prune {share}"
            if (step.get("schedule") or {}).get("kind") == "gradual":
                part += " gradual"
        elif op == "weight_share":
            part = f"weight_share {step.get('bits', 5)} bits"
        elif op == "quantize":
            part = f"{step.get('dtype', 'int8')} {step.get('mode', 'static')}"
        elif op == "low_rank" and "energy" in step:
            part = f"low_rank energy {step['energy']:g}"
        else:
            part = str(op)
        parts.append(part)
    return " + ".join(parts)


@dataclass(frozen=True)
class _Knob:
    """A parameter a sweep turns: its settings from gentle to aggressive, the grid a bisection
    rounds to, and how the analytic size (and MACs) scale with it."""

    field: str
    ladder: tuple[float, ...]
    grid: float
    kind: str  # "density" (unstructured prune), "channels", "bits", "energy"

    def aggression(self, value: float) -> float:
        return value if self.kind in ("density", "channels") else -value

    def scale(self, value: float) -> tuple[float, float]:
        """(size, MACs) factors of a setting, relative between two settings of the knob."""
        if self.kind == "density":  # pruned weights are stored sparse, MACs are dense
            return 1.0 - value, 1.0
        if self.kind == "channels":  # a layer loses input and output channels
            return (1.0 - value) ** 2, (1.0 - value) ** 2
        if self.kind == "bits":
            return value, 1.0
        return value, value  # energy: rough, the ranks kept grow with it


_UNSTRUCTURED = _Knob("sparsity", (0.5, 0.7, 0.8, 0.9, 0.95, 0.97), 0.01, "density")
_CHANNELS = _Knob("sparsity", (0.3, 0.5, 0.6, 0.7), 0.05, "channels")
_BITS = _Knob("bits", (8, 7, 6, 5, 4, 3, 2), 1, "bits")
_ENERGY = _Knob("energy", (0.99, 0.95, 0.9, 0.8, 0.7), 0.01, "energy")


def _knobs(pipeline: Sequence[dict[str, Any]]) -> list[tuple[int, _Knob]]:
    """The sweepable settings of a pipeline, by step: a magnitude prune's sparsity (channels or
    unstructured), weight_share's bits, low_rank's energy when it is given (a low_rank with a
    target picks its ranks by fidelity: nothing to sweep)."""
    out = []
    for i, step in enumerate(pipeline):
        op = step.get("op")
        if op == "prune" and "sparsity" in step and step.get("granularity") != "n:m":
            out.append((i, _CHANNELS if step.get("granularity") == "channels" else _UNSTRUCTURED))
        elif op == "weight_share" and "bits" in step:
            out.append((i, _BITS))
        elif op == "low_rank" and "energy" in step and "target" not in step:
            out.append((i, _ENERGY))
    return out


def _line(pipeline: Sequence[dict[str, Any]], i: int, knob: _Knob) -> str:
    """The pipeline but for one knob: the points a sweep along that knob lies on."""
    rest = [dict(step) for step in pipeline]
    rest[i].pop(knob.field, None)
    return f"{i}:{knob.field}:{pipeline_key(rest)}"


def _swept(spec: Spec, i: int, knob: _Knob, old: float, new: float, kind: str) -> Spec:
    """`spec` with knob `i` set to `new`: its estimate scaled from `spec`'s by the knob."""
    pipeline = copy.deepcopy(spec.pipeline)
    pipeline[i][knob.field] = int(new) if knob.kind == "bits" else new
    (size_old, macs_old), (size_new, macs_new) = knob.scale(old), knob.scale(new)
    return Spec(
        name=f"{describe(pipeline)} ({'sweep' if kind == 'next' else 'sweep, bisect'})",
        pipeline=pipeline,
        size_ratio=spec.size_ratio * size_new / size_old,
        macs_ratio=spec.macs_ratio * macs_new / macs_old,
        speed=spec.speed,
        cost=spec.cost,
        sweep=kind,
    )


def at_least_as_aggressive(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> bool:
    """Whether pipeline `a` is `b` with every sweepable knob (`_knobs`) set at least as
    aggressively and everything else equal: it can only lose more fidelity than `b`."""
    knobs = _knobs(b)
    if len(a) != len(b) or [(i, k.field) for i, k in _knobs(a)] != [(i, k.field) for i, k in knobs]:
        return False
    fields = {i: k.field for i, k in knobs}
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if {k: v for k, v in x.items() if k != fields.get(i)} != {
            k: v for k, v in y.items() if k != fields.get(i)
        }:
            return False
    return all(
        k.aggression(float(a[i][k.field])) >= k.aggression(float(b[i][k.field])) for i, k in knobs
    )


def _fidelity_misses(record: dict[str, Any]) -> list[str]:
    """What a record missed of the budget other than its size and latency bounds."""
    limits = (BUDGET_FIGURES["max_size_bytes"][0], BUDGET_FIGURES["max_latency_ms"][0])
    return [m for m in record.get("missed", []) if not m.startswith(limits)]


def shortfall(budget: dict[str, float], metrics: dict[str, Any]) -> float:
    """How far a candidate is from the budget, summed relative misses (0: meets it)."""
    total = 0.0
    for key, bound in budget.items():
        value = budget_value(key, metrics)
        if value is None:  # not measured: far; an SQNR that is absent: outputs exact
            total += 0.0 if key == "min_sqnr_db" else 1e6
            continue
        scale = {
            "max_accuracy_drop": max(abs(bound), 0.01),
            "min_cosine": 0.01,
            "min_sqnr_db": max(abs(bound), 1.0),
        }.get(key, bound)
        total += max(budget_excess(key, bound, value), 0.0) / scale
    return total


def fidelity(task: str, metrics: dict[str, Any]) -> tuple[str, float | None]:
    """The fidelity figure the front is drawn on, higher is better (name, value)."""
    if "accuracy_drop" in metrics:
        drop = metrics["accuracy_drop"]
        return "accuracy_drop", None if drop is None else -float(drop)
    if task == "embedding" or "agreement_top1" not in metrics:
        if "cosine_similarity" in metrics:
            value = metrics["cosine_similarity"]
            return "cosine_similarity", None if value is None else float(value)
        value = metrics.get("sqnr_db_min", metrics.get("sqnr_db"))
        return "sqnr_db_min", math.inf if value is None else float(value)
    return "agreement_top1", float(metrics["agreement_top1"])


def pareto(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats on both `objective` (lower) and `fidelity` (higher),
    sorted by objective."""
    usable = [p for p in points if p["objective"] is not None and p["fidelity"] is not None]
    front = []
    for p in usable:
        dominated = any(
            q is not p
            and q["objective"] <= p["objective"]
            and q["fidelity"] >= p["fidelity"]
            and (q["objective"] < p["objective"] or q["fidelity"] > p["fidelity"])
            for q in usable
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: (p["objective"], -p["fidelity"]))


@dataclass
class Search:
    """Which candidate to build next, and what the measured ones show."""

    config: AutoConfig
    base: Baseline
    specs: list[Spec]
    records: list[dict[str, Any]] = field(default_factory=list)

    def index_of(self, spec: Spec) -> int:
        """A candidate's number: its catalog position, sweeps numbered on after the catalog in
        the order they were made (the same on a retry, which makes them from the same
        records)."""
        return next(i + 1 for i, s in enumerate(self.specs) if s.key == spec.key)

    def spec_of(self, key: str) -> Spec | None:
        return next((s for s in self.specs if s.key == key), None)

    def correction(self, spec: Spec) -> Correction | None:
        """The latest measured member of `spec`'s family: its measured / estimated size and
        latency (None before one was measured)."""
        wanted = family(spec.pipeline)
        for record in reversed(self.records):
            pipeline = record.get("pipeline")
            if record["status"] != "measured" or not pipeline or family(pipeline) != wanted:
                continue
            est, metrics = record.get("estimate") or {}, record.get("metrics") or {}
            size = delivered_size(metrics)
            if size is None or not est.get("size_bytes"):
                continue
            latency, est_latency = metrics.get("latency_ms_p50"), est.get("latency_ms_p50")
            return Correction(
                record["index"],
                record["name"],
                size / est["size_bytes"],
                latency / est_latency if latency and est_latency else None,
            )
        return None

    def estimated(self, spec: Spec) -> dict[str, float]:
        """The estimate the search acts on: the analytic one, corrected by the family."""
        return estimate(spec, self.base, self.config.objective, self.correction(spec))

    def order(self) -> list[Spec]:
        """The candidates not tried yet, in the order they are tried. fp16 first: the
        near-lossless anchor (the fallback the budget is held to when nothing smaller meets
        it), so a feasible point bounds the rest early; then the other post-training builds,
        then the ones that refit or train, then the sweeps, each by corrected estimated
        objective (re-sorted after every measurement)."""
        tried = {r["key"] for r in self.records}
        return sorted(
            (s for s in self.specs if s.key not in tried),
            key=lambda s: (
                s.name != ANCHOR,
                s.sweep is not None,
                s.cost > 0,
                self.estimated(s).get("objective", 0.0),
            ),
        )

    def next(self) -> Spec | None:
        """The next candidate to try; when the catalog (and every sweep made so far) was
        tried, the sweeps `refine` makes from what was measured; None when there are none."""
        pending = self.order()
        if not pending and self.refine():
            pending = self.order()
        return pending[0] if pending else None

    def refine(self) -> list[Spec]:
        """Sweep points around the feasible ones, added to `specs`. For each measured
        candidate meeting the budget and each knob of its pipeline (a magnitude prune's
        sparsity, weight_share's bits, low_rank's energy): when nothing more aggressive lies
        on its line yet, the knob's next ladder setting ("next"); when the nearest more
        aggressive point missed the budget or failed, the setting halfway between, rounded to
        the knob's grid ("bisect", at most MAX_BISECTIONS per line). A more aggressive point
        that met the budget refines itself; one that was skipped ends the line."""
        by_key = {r["key"]: r for r in self.records}
        known = {s.key for s in self.specs}
        made: list[Spec] = []
        feasible = [r for r in self.records if r["status"] == "measured" and r.get("meets")]
        for record in sorted(feasible, key=lambda r: r["index"]):
            spec = self.spec_of(record["key"])
            if spec is None:
                continue
            for i, knob in _knobs(spec.pipeline):
                value = float(spec.pipeline[i][knob.field])
                line = _line(spec.pipeline, i, knob)
                on_line = [
                    (s, float(s.pipeline[i][knob.field]))
                    for s in self.specs
                    if len(s.pipeline) == len(spec.pipeline)
                    and knob.field in s.pipeline[i]
                    and _line(s.pipeline, i, knob) == line
                ]
                harder = [p for p in on_line if knob.aggression(p[1]) > knob.aggression(value)]
                if not harder:
                    steps = [v for v in knob.ladder if knob.aggression(v) > knob.aggression(value)]
                    if not steps:
                        continue
                    setting, kind = float(steps[0]), "next"
                else:
                    nearest, other = min(harder, key=lambda p: knob.aggression(p[1]))
                    outcome = by_key.get(nearest.key)
                    missed = outcome is not None and (
                        outcome["status"] == "failed"
                        or (outcome["status"] == "measured" and not outcome.get("meets"))
                    )
                    bisections = sum(1 for s, _ in on_line if s.sweep == "bisect")
                    if not missed or bisections >= MAX_BISECTIONS:
                        continue
                    setting = round(round((value + other) / 2 / knob.grid) * knob.grid, 6)
                    if not min(value, other) < setting < max(value, other):
                        continue
                    kind = "bisect"
                made_spec = _swept(spec, i, knob, value, setting, kind)
                if made_spec.key not in known:
                    known.add(made_spec.key)
                    made.append(made_spec)
                    self.specs.append(made_spec)
        return made

    def best_feasible(self) -> dict[str, Any] | None:
        feasible = [r for r in self.records if r.get("meets") and r.get("objective") is not None]
        return min(feasible, key=lambda r: r["objective"], default=None)

    def skip_reason(self, spec: Spec) -> str | None:
        """Why building `spec` cannot pay (dominance, before it is built, on its corrected
        estimate) or cannot work (an op an earlier candidate found nothing to apply to), or
        None."""
        by_name = {r["name"]: r for r in self.records}
        ops = {str(step.get("op")) for step in spec.pipeline}
        for failed in self.records:
            code = str(failed.get("error") or "").split(":", 1)[0]
            if failed["status"] == "failed" and NOT_APPLICABLE.get(code) in ops:
                return (
                    f"{NOT_APPLICABLE[code]} does not apply to this model: candidate "
                    f"{failed['index']} ({failed['name']}) failed with {code}"
                )
        if spec.prefix and (prior := by_name.get(spec.prefix)) is not None:
            if prior["status"] == "failed":
                return f"its prefix {spec.prefix!r} failed"
            fidelity_misses = _fidelity_misses(prior)
            if prior["status"] == "measured" and fidelity_misses:
                return (
                    f"dominated: its prefix {spec.prefix!r} already misses the fidelity budget "
                    f"({'; '.join(fidelity_misses)}), and this composition adds loss to it"
                )
        for missed in self.records:
            lost = _fidelity_misses(missed)
            missed_spec = self.spec_of(missed.get("key", ""))
            if (
                spec.sweep is not None
                and missed["status"] == "measured"
                and lost
                and missed_spec is not None
                and at_least_as_aggressive(spec.pipeline, missed_spec.pipeline)
            ):
                return (
                    f"dominated: at least as aggressive on every setting as candidate "
                    f"{missed['index']} ({missed['name']}), which already misses the fidelity "
                    f"budget ({'; '.join(lost)})"
                )
        correction = self.correction(spec)
        est = estimate(spec, self.base, self.config.objective, correction)
        how = (
            f"corrected by candidate {correction.candidate} ({correction.name}): size "
            f"×{correction.size:.3g}"
            if correction is not None
            else f"analytic: {spec.size_ratio:g} of the weight bytes"
        )
        slack = ESTIMATE_SLACK if correction is None else CORRECTED_SLACK
        best = self.best_feasible()
        value = est.get("objective")
        if best is not None and value is not None and value * slack >= best["objective"]:
            return (
                f"dominated: estimated {self.config.objective} {value:.4g} ({how}) cannot beat "
                f"candidate {best['index']} ({best['name']}), measured {best['objective']:.4g}, "
                "which meets the budget"
            )
        limit = self.config.budget.max_size_bytes
        # never before one candidate was measured: a search always names its closest one
        measured = any(r["status"] == "measured" for r in self.records)
        if measured and limit is not None and est["size_bytes"] * slack > limit:
            return (
                f"estimated size {est['size_bytes']} bytes is far over max_size_bytes {limit} "
                f"({how})"
            )
        return None

    def probe_reason(self, probe: dict[str, Any]) -> str | None:
        """Why a training candidate's full build cannot pay after its probe (`probe_pipeline`
        on at most PROBE_SAMPLES samples; `probe` holds its `metrics` and `objective`), or
        None. Training changes the weights' values, not their number, their storage or the
        graph, so the probe's size and latency are the full build's (to within PROBE_SLACK):
        skip when they already miss max_size_bytes, or when a candidate meeting the budget
        already beats them. Its fidelity is pessimistic (one epoch on a few samples), so a
        fidelity miss alone never skips: only one FAR_BELOW the budget, and only when the
        gain the full build could bring over the best feasible candidate is small (its
        measured objective less than 1 / ESTIMATE_SLACK better) — a small gain that needs a
        large recovery."""
        metrics = probe.get("metrics")
        if not metrics:
            return None  # the probe failed: the full build is the only way to know
        size = delivered_size(metrics)
        limit = self.config.budget.max_size_bytes
        if limit is not None and size is not None and size * PROBE_SLACK > limit:
            return (
                f"probe: its delivered size {size} bytes misses max_size_bytes {limit} "
                "(training does not change the size)"
            )
        best = self.best_feasible()
        value = probe.get("objective")
        if best is None or value is None:
            return None
        if best["objective"] <= value * PROBE_SLACK:
            return (
                f"probe: its measured {self.config.objective} {value:.4g} cannot beat candidate "
                f"{best['index']} ({best['name']}), measured {best['objective']:.4g}, which "
                "meets the budget (training does not change it)"
            )
        far = far_below(self.config.budget.given(), metrics)
        if far and best["objective"] * ESTIMATE_SLACK <= value:
            return (
                f"probe: far below the budget ({'; '.join(far)}) for a small gain: its "
                f"{self.config.objective} {value:.4g} against {best['objective']:.4g} of "
                f"candidate {best['index']} ({best['name']}), which meets the budget"
            )
        return None

    def point(self, record: dict[str, Any]) -> dict[str, Any]:
        return {
            "candidate": record["index"],
            "name": record["name"],
            "objective": record.get("objective"),
            "fidelity": record.get("fidelity"),
        }

    def front(self) -> list[dict[str, Any]]:
        measured = [r for r in self.records if r["status"] == "measured"]
        keep = {p["candidate"] for p in pareto([self.point(r) for r in measured])}
        return [r for r in measured if r["index"] in keep]
