"""The auto search: the best model within a budget, by a Pareto search over the catalog.

Pure logic, no runtime: `candidates()` lists the pipelines worth trying for an upload (quantize
modes and dtypes with their repairs, prune, low_rank, weight_share, distillation-backed variants
and compositions in valid orders) with analytic estimates of size, MACs and cost; `Search`
orders them (cheap post-training builds first, then by estimated objective), skips the
dominated ones before building them, checks each measured one against the budget, and keeps the
Pareto front of objective against fidelity. Building and measuring is the caller's
(engine.ops.auto runs each candidate as a whole pipeline through engine.pipeline).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.config import PRESETS, AutoConfig, PipelineError, parse_steps, validate_request

# Distillation-backed candidates need at least this many training samples.
DISTILL_MIN_SAMPLES = 256
# Built first whatever the estimates say (Search.order).
ANCHOR = "preset fp16"
# An estimate is trusted to within this factor when a candidate is skipped on it.
ESTIMATE_SLACK = 0.7


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


def estimate(spec: Spec, base: Baseline, objective: str) -> dict[str, float]:
    """Analytic size, MACs and objective of a candidate before it is built."""
    overhead = max(base.size_bytes - base.weight_bytes, 0)
    size = overhead + base.weight_bytes * spec.size_ratio
    out: dict[str, float] = {"size_bytes": round(size)}
    if base.macs:
        out["macs"] = round(base.macs * spec.macs_ratio)
    latency = None
    if base.latency_ms:
        latency = base.latency_ms * spec.macs_ratio * spec.speed
        out["latency_ms_p50"] = round(latency, 4)
    if objective == "size":
        out["objective"] = size
    elif objective == "latency" and latency is not None:
        out["objective"] = latency
    elif latency is not None and base.latency_ms:
        out["objective"] = (size / base.size_bytes) * (latency / base.latency_ms)
    return out


def budget_misses(
    budget: dict[str, float], metrics: dict[str, Any], verdict: dict[str, Any] | None
) -> list[str]:
    """What a measured candidate misses of the budget (and of the job's quality floor)."""
    misses = []
    for key, bound in budget.items():
        if key == "max_accuracy_drop":
            value, name, ok = metrics.get("accuracy_drop"), "accuracy_drop", "max"
        elif key == "min_cosine":
            value, name, ok = metrics.get("cosine_similarity"), "cosine_similarity", "min"
        elif key == "min_sqnr_db":
            name, ok = "sqnr_db_min", "min"
            value = metrics.get("sqnr_db_min", metrics.get("sqnr_db"))
            if value is None and "sqnr_db" in metrics:  # outputs equal the original's
                continue
        elif key == "max_size_bytes":
            value, name, ok = delivered_size(metrics), "size", "max"
        else:
            value, name, ok = metrics.get("latency_ms_p50"), "latency_ms_p50", "max"
        if value is None:
            misses.append(f"{name} not measured (budget {key} {bound:g})")
        elif (ok == "max" and value > bound + 1e-9) or (ok == "min" and value < bound - 1e-9):
            sign = ">" if ok == "max" else "<"
            misses.append(f"{name} {value:g} {sign} {key} {bound:g}")
    for key in (verdict or {}).get("below_floor", []):
        measured = (verdict or {}).get("measured", {}).get(key)
        floor = (verdict or {}).get("floor", {}).get(key)
        misses.append(f"quality floor {key}: {measured} against {floor}")
    return misses


def shortfall(budget: dict[str, float], metrics: dict[str, Any]) -> float:
    """How far a candidate is from the budget, summed relative misses (0: meets it)."""
    total = 0.0
    for key, bound in budget.items():
        if key == "max_accuracy_drop":
            value = metrics.get("accuracy_drop")
            miss = None if value is None else max(value - bound, 0.0) / max(abs(bound), 0.01)
        elif key == "min_cosine":
            value = metrics.get("cosine_similarity")
            miss = None if value is None else max(bound - value, 0.0) / 0.01
        elif key == "min_sqnr_db":
            value = metrics.get("sqnr_db_min", metrics.get("sqnr_db"))
            miss = 0.0 if value is None else max(bound - value, 0.0) / max(abs(bound), 1.0)
        elif key == "max_size_bytes":
            value = delivered_size(metrics)
            miss = None if value is None else max(value - bound, 0.0) / bound
        else:
            value = metrics.get("latency_ms_p50")
            miss = None if value is None else max(value - bound, 0.0) / bound
        total += 1e6 if miss is None else miss
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

    def order(self) -> list[Spec]:
        """fp16 first: the near-lossless anchor (the fallback the budget is held to when
        nothing smaller meets it), so a feasible point bounds the rest early; then the other
        post-training builds, then the ones that refit or train, each by estimated objective."""
        objective = self.config.objective
        return sorted(
            self.specs,
            key=lambda s: (
                s.name != ANCHOR,
                s.cost > 0,
                estimate(s, self.base, objective).get("objective", 0.0),
            ),
        )

    def best_feasible(self) -> dict[str, Any] | None:
        feasible = [r for r in self.records if r.get("meets") and r.get("objective") is not None]
        return min(feasible, key=lambda r: r["objective"], default=None)

    def skip_reason(self, spec: Spec) -> str | None:
        """Why building `spec` cannot pay (dominance, before it is built), or None."""
        by_name = {r["name"]: r for r in self.records}
        if spec.prefix and (prior := by_name.get(spec.prefix)) is not None:
            if prior["status"] == "failed":
                return f"its prefix {spec.prefix!r} failed"
            fidelity_misses = [
                m for m in prior.get("missed", []) if not m.startswith(("size", "latency_ms_p50"))
            ]
            if prior["status"] == "measured" and fidelity_misses:
                return (
                    f"dominated: its prefix {spec.prefix!r} already misses the fidelity budget "
                    f"({'; '.join(fidelity_misses)}), and this composition adds loss to it"
                )
        est = estimate(spec, self.base, self.config.objective)
        best = self.best_feasible()
        value = est.get("objective")
        if best is not None and value is not None and value * ESTIMATE_SLACK >= best["objective"]:
            return (
                f"dominated: estimated {self.config.objective} {value:.4g} cannot beat candidate "
                f"{best['index']} ({best['name']}), measured {best['objective']:.4g}, which "
                "meets the budget"
            )
        limit = self.config.budget.max_size_bytes
        # never before one candidate was measured: a search always names its closest one
        measured = any(r["status"] == "measured" for r in self.records)
        if measured and limit is not None and est["size_bytes"] * ESTIMATE_SLACK > limit:
            return (
                f"estimated size {est['size_bytes']} bytes is far over max_size_bytes {limit} "
                f"(analytic: {spec.size_ratio:g} of the weight bytes)"
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
