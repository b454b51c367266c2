"""The auto op's handler: build and measure the search's candidates, deliver the chosen one.

Each candidate is a whole pipeline run on the upload by `ctx.build` (engine.pipeline.run with
the job's data, held-out split, floor and seed), so its metrics are the ones a job with that
pipeline reports. A candidate that trains is first probed (its pipeline with the training cut
to a minimum, on a few samples) and its full build skipped when the probe shows it cannot pay.
One `candidate` event per candidate (built, reused or skipped) carries its record; the worker
keeps them, and a retried job gets them back in `ctx.history`: a finished candidate is reused,
not built again ("candidate N reused"), and a probe is not run again.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from engine.config import AutoConfig
from engine.context import StepContext
from engine.errors import EngineError
from engine.events import EventKind
from engine.io.formats import detect_format
from engine.onnxgraph import metrics as m
from engine.ops.registry import register
from engine.recipe import build_recipe, library_versions
from engine.search.auto import (
    PROBE_MIN_COST,
    PROBE_SAMPLES,
    Baseline,
    Search,
    Spec,
    budget_misses,
    candidates,
    estimate,
    family,
    fidelity,
    objective_value,
    probe_pipeline,
    shortfall,
)

# Figures copied into a candidate's record (and the search's table).
KEPT = (
    "size_bytes",
    "archive_size_bytes",
    "packed_size_bytes",
    "params",
    "nonzero_params",
    "macs",
    "latency_ms_p50",
    "accuracy_top1",
    "accuracy_drop",
    "agreement_top1",
    "cosine_similarity",
    "sqnr_db",
    "sqnr_db_min",
)


@register(AutoConfig)
def auto_search(config: AutoConfig, model_path: Path, ctx: StepContext) -> Path:
    if ctx.build is None or ctx.source_model is None:  # pragma: no cover - the pipeline sets both
        raise EngineError("invalid_pipeline", "auto runs only inside a job's pipeline")
    original = ctx.original_metrics
    size = int(original.get("size_bytes") or model_path.stat().st_size)
    # float32 weight bytes; a model whose weights are Constant nodes counts no params: all of it
    weight_bytes = 4 * int(original.get("params") or 0)
    base = Baseline(
        size_bytes=size,
        weight_bytes=weight_bytes if 0 < weight_bytes <= size else size,
        macs=original.get("macs"),
        latency_ms=original.get("latency_ms_p50"),
        accuracy=original.get("accuracy_top1"),
    )
    has_dataset = ctx.dataset_path is not None
    has_labels = ctx.samples.labels is not None
    specs = candidates(
        config,
        ctx.source_format or detect_format(ctx.source_model),
        task=ctx.task,
        has_dataset=has_dataset,
        has_labels=has_labels,
        train_samples=len(ctx.samples) if has_dataset else 0,
    )
    search = Search(config, base, specs)
    recipes = _Recipes(ctx)
    budget = config.budget.given()
    history = {
        r["key"]: r for r in ctx.history if r.get("status") in ("measured", "failed") and "key" in r
    }
    probes = {r["key"]: r["probe"] for r in ctx.history if r.get("probe") and "key" in r}
    deadline = time.monotonic() + config.search.max_minutes * 60
    if ctx.time_limit_s:
        deadline = min(deadline, time.monotonic() + 0.8 * ctx.time_limit_s)
    built: dict[int, dict[str, Any]] = {}  # candidate index -> its pipeline result (this attempt)
    stopped = "every candidate was tried or skipped"
    counted = 0
    # The next candidate by the corrected estimates (re-sorted after each measurement); after
    # the catalog, the sweeps around what met the budget.
    while (spec := search.next()) is not None:
        index = search.index_of(spec)
        if counted >= config.search.max_candidates:
            stopped = f"search.max_candidates ({config.search.max_candidates}) reached"
            break
        if time.monotonic() >= deadline:
            stopped = "search.max_minutes (or the job's time limit) reached"
            break
        ctx.report(counted / config.search.max_candidates, f"candidate {index}: {spec.name}")
        if spec.key in history:
            record = {**history[spec.key], "index": index, "reused": True}
            counted += 1
            _note(
                ctx,
                search,
                record,
                f"candidate {index} reused ({spec.name}): an earlier "
                "attempt of this job finished it",
            )
            continue
        fields = _estimates(search, spec)
        reason = search.skip_reason(spec)
        if reason is not None:
            record = _record(spec, index, fields, status="skipped", reason=reason)
            _note(ctx, search, record, f"candidate {index} skipped ({spec.name}): {reason}")
            continue
        probe = None
        if spec.cost >= PROBE_MIN_COST:
            # probes count against max_minutes (the deadline), not max_candidates
            probe = probes.get(spec.key) or _probe(ctx, spec, index, base, config, budget)
            reason = search.probe_reason(probe)
            if reason is None and time.monotonic() >= deadline:
                reason = "search.max_minutes (or the job's time limit) reached after its probe"
            if reason is not None:
                record = _record(spec, index, fields, status="skipped", reason=reason, probe=probe)
                _note(ctx, search, record, f"candidate {index} skipped ({spec.name}): {reason}")
                continue
        counted += 1
        record, result = _build(ctx, spec, index, base, config, budget, recipes, fields)
        if probe is not None:
            record["probe"] = probe
        if result is not None:
            built[index] = result
        _note(ctx, search, record, f"candidate {index} {record['status']} ({spec.name})")
        _drop_unneeded(search, built)
    return _deliver(ctx, config, search, budget, built, model_path, stopped, recipes)


class _Recipes:
    """Recipes of candidate pipelines: a normal job (`POST /v1/jobs {"recipe": ...}`)."""

    def __init__(self, ctx: StepContext) -> None:
        assert ctx.source_model is not None
        self.ctx = ctx
        self.model = {
            "sha256": m.sha256_file(ctx.source_model),
            "format": ctx.source_format or detect_format(ctx.source_model),
        }
        path = ctx.dataset_path
        self.dataset = (
            {"sha256": m.sha256_file(path), "format": path.suffix.lstrip(".") or None}
            if path is not None
            else None
        )
        self.versions = library_versions()

    def __call__(self, pipeline: list[dict[str, Any]], below_floor: bool) -> dict[str, Any]:
        return build_recipe(
            model=self.model,
            dataset=self.dataset,
            pipeline=pipeline,
            evaluation={
                "task": self.ctx.task,
                "holdout": self.ctx.holdout,
                "floor": dict(self.ctx.floor) or None,
                # a point under the job's floor can still be taken, knowingly
                "allow_below_floor": below_floor,
            },
            export=["onnx"],
            seed=self.ctx.seed,
            versions=self.versions,
        )


def _estimates(search: Search, spec: Spec) -> dict[str, Any]:
    """A candidate's estimates as recorded: the analytic one, the one the search acted on
    (corrected by the latest measured member of its family) and which candidate corrected it."""
    correction = search.correction(spec)
    analytic = estimate(spec, search.base, search.config.objective)
    corrected = estimate(spec, search.base, search.config.objective, correction)
    return {
        "family": family(spec.pipeline),
        "estimate": {k: v for k, v in analytic.items() if k != "objective"},
        "estimate_corrected": {k: v for k, v in corrected.items() if k != "objective"},
        "corrected_by": correction.to_dict() if correction is not None else None,
    }


def _record(spec: Spec, index: int, fields: dict[str, Any], **values: Any) -> dict[str, Any]:
    return {
        "index": index,
        "key": spec.key,
        "name": spec.name,
        "pipeline": spec.pipeline,
        **fields,
        "sweep": spec.sweep,
        "reused": False,
        **values,
    }


def _measure(
    result: dict[str, Any], base: Baseline, budget: dict[str, float]
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """A built pipeline's kept metrics (with its accuracy drop), quality verdict and what it
    misses of the budget."""
    final = result["final"]
    metrics = {k: final[k] for k in KEPT if k in final}
    if "accuracy_top1" in final and base.accuracy is not None:
        metrics["accuracy_drop"] = round(base.accuracy - final["accuracy_top1"], 6)
    verdict = result["quality"]
    return metrics, verdict, budget_misses(budget, metrics, verdict)


def _failure(exc: Exception) -> str:
    """A failed build as a record's `error`: its code (an EngineError's, else the exception's
    type) and message; Search.skip_reason reads the code before the colon."""
    code = exc.code if isinstance(exc, EngineError) else type(exc).__name__
    return f"{code}: {exc}"


def _probe(
    ctx: StepContext,
    spec: Spec,
    index: int,
    base: Baseline,
    config: AutoConfig,
    budget: dict[str, float],
) -> dict[str, Any]:
    """Build and measure a training candidate's probe: `probe_pipeline` on at most
    PROBE_SAMPLES training samples, measured on the job's held-out samples. A probe that
    fails is recorded with its error (the full build then decides)."""
    assert ctx.build is not None
    started = time.monotonic()
    pipeline = probe_pipeline(spec.pipeline)
    workdir = ctx.workdir / f"probe{index}"
    out: dict[str, Any] = {"pipeline": pipeline, "max_train_samples": PROBE_SAMPLES}
    try:
        result = ctx.build(pipeline, workdir, train_samples=PROBE_SAMPLES)
    except Exception as exc:  # the probe's failure is the full build's to confirm
        out["error"] = _failure(exc)
    else:
        metrics, _, missed = _measure(result, base, budget)
        out.update(
            # what it trained on (the job's training samples, at most PROBE_SAMPLES)
            train_samples=result["evaluation"].get("train_samples"),
            metrics=metrics,
            objective=objective_value(config.objective, metrics, base),
            missed=missed,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out["seconds"] = round(time.monotonic() - started, 2)
    message = f"candidate {index} probed ({spec.name}): " + (
        f"failed: {out['error']}" if "error" in out else "; ".join(out["missed"]) or "meets"
    )
    ctx.emit({"type": EventKind.LOG, "level": "info", "message": message})
    return out


def _build(
    ctx: StepContext,
    spec: Spec,
    index: int,
    base: Baseline,
    config: AutoConfig,
    budget: dict[str, float],
    recipes: _Recipes,
    fields: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Build and measure one candidate; a candidate that fails is recorded, not fatal."""
    assert ctx.build is not None
    started = time.monotonic()
    workdir = ctx.workdir / f"candidate{index}"
    try:
        result = ctx.build(spec.pipeline, workdir)
    except Exception as exc:  # one candidate's failure (its error recorded) ends no search
        shutil.rmtree(workdir, ignore_errors=True)
        record = _record(
            spec,
            index,
            fields,
            status="failed",
            error=_failure(exc),
            seconds=round(time.monotonic() - started, 2),
        )
        return record, None
    metrics, verdict, missed = _measure(result, base, budget)
    fid_name, fid = fidelity(ctx.task, metrics)
    record = _record(
        spec,
        index,
        fields,
        status="measured",
        seconds=round(time.monotonic() - started, 2),
        metrics=metrics,
        speedup=result["ratios"].get("speedup"),
        objective=objective_value(config.objective, metrics, base),
        fidelity_metric=fid_name,
        fidelity=fid,
        verdict=verdict.get("verdict"),
        meets=not missed,
        missed=missed,
        shortfall=round(shortfall(budget, metrics), 6),
        recipe=recipes(spec.pipeline, below_floor=verdict.get("verdict") == "rejected"),
    )
    return record, result


def _note(ctx: StepContext, search: Search, record: dict[str, Any], message: str) -> None:
    search.records.append(record)
    ctx.emit({"type": EventKind.CANDIDATE, **record, "message": message})
    ctx.emit({"type": EventKind.LOG, "level": "info", "message": message})


def _drop_unneeded(search: Search, built: dict[int, dict[str, Any]]) -> None:
    """Keep the files of the best candidate meeting the budget only (disk stays bounded)."""
    best = search.best_feasible()
    for index in list(built):
        if best is None or index != best["index"]:
            shutil.rmtree(Path(built.pop(index)["artifacts"][0]["path"]).parent, True)


def _deliver(
    ctx: StepContext,
    config: AutoConfig,
    search: Search,
    budget: dict[str, float],
    built: dict[int, dict[str, Any]],
    model_path: Path,
    stopped: str,
    recipes: _Recipes,
) -> Path:
    """Copy the chosen candidate (or the original) to the step's output; fill in the details."""
    best = search.best_feasible()
    chosen: dict[str, Any] | None = None
    if best is not None:
        result = built.get(best["index"])
        if result is None:  # reused from an earlier attempt, whose file is not kept
            spec = next(s for s in search.specs if s.key == best["key"])
            message = (
                f"candidate {best['index']} rebuilt ({spec.name}): it is the chosen one and "
                "an earlier attempt measured it"
            )
            ctx.emit({"type": EventKind.LOG, "level": "info", "message": message})
            assert ctx.build is not None
            result = ctx.build(spec.pipeline, ctx.workdir / f"candidate{best['index']}")
        chosen = best
        artifacts = [a for a in result["artifacts"] if a["role"] == "final"]
        onnx = next(a for a in artifacts if a["format"] == "onnx")
        shutil.copyfile(onnx["path"], ctx.output)
        for extra in artifacts:
            if extra is onnx:
                continue
            path = ctx.output.with_name(f"{ctx.output.stem}.{extra['format']}")
            shutil.copyfile(extra["path"], path)
            ctx.extras.append((path, extra["format"]))
        for key in ("archive_size_bytes", "packed_size_bytes"):
            if key in result["final"]:
                ctx.metrics[key] = result["final"][key]
    else:
        shutil.copyfile(model_path, ctx.output)
        ctx.job_warnings.append(_nothing_met(search, budget))
    measured = [r for r in search.records if r["status"] == "measured"]
    ctx.details.update(
        {
            "objective": config.objective,
            "budget": budget,
            "chosen": (
                {"candidate": chosen["index"], "name": chosen["name"], "recipe": chosen["recipe"]}
                if chosen
                else {"candidate": None, "name": "original"}
            ),
            "candidates": search.records,
            "pareto": [
                {
                    "candidate": r["index"],
                    "name": r["name"],
                    "objective": r["objective"],
                    "fidelity_metric": r["fidelity_metric"],
                    "fidelity": r["fidelity"],
                    "meets": r["meets"],
                    "metrics": r["metrics"],
                    "recipe": r["recipe"],
                }
                for r in search.front()
            ],
            "search": {
                "catalog": sum(1 for s in search.specs if s.sweep is None),
                "sweeps": sum(1 for s in search.specs if s.sweep is not None),
                "measured": len(measured),
                "probed": sum(1 for r in search.records if r.get("probe")),
                "reused": sum(1 for r in search.records if r.get("reused")),
                "skipped": sum(1 for r in search.records if r["status"] == "skipped"),
                "failed": sum(1 for r in search.records if r["status"] == "failed"),
                "stopped": stopped,
                # building and probing (probes are not candidates: max_minutes only)
                "seconds": round(
                    sum(
                        (r.get("seconds") or 0) + ((r.get("probe") or {}).get("seconds") or 0)
                        for r in search.records
                    ),
                    2,
                ),
            },
        }
    )
    if chosen is None:
        ctx.details["original_recipe_note"] = "the original is delivered unchanged"
    return ctx.output


def _nothing_met(search: Search, budget: dict[str, float]) -> str:
    measured = [r for r in search.records if r["status"] == "measured"]
    wanted = ", ".join(f"{k} {v:g}" for k, v in budget.items())
    if not measured:
        return (
            f"No candidate could be measured within the search limits, so the original model "
            f"is delivered unchanged (budget: {wanted}). Raise search.max_minutes or "
            "search.max_candidates."
        )
    closest = min(measured, key=lambda r: r["shortfall"])
    return (
        f"No candidate met the whole budget ({wanted}), so the original model is delivered "
        f"unchanged. The closest was candidate {closest['index']} ({closest['name']}): "
        f"{'; '.join(closest['missed'])}. Its recipe is in steps[0].details.candidates; relax "
        "the budget or post that recipe to take it anyway."
    )
