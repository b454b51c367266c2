"""The auto op's handler: build and measure the search's candidates, deliver the chosen one.

Each candidate is a whole pipeline run on the upload by `ctx.build` (engine.pipeline.run with
the job's data, held-out split, floor and seed), so its metrics are the ones a job with that
pipeline reports. One `candidate` event per candidate (built, reused or skipped) carries its
record; the worker keeps them, and a retried job gets them back in `ctx.history`: a finished
candidate is reused, not built again ("candidate N reused").
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
    Baseline,
    Search,
    Spec,
    budget_misses,
    candidates,
    estimate,
    fidelity,
    objective_value,
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
    deadline = time.monotonic() + config.search.max_minutes * 60
    if ctx.time_limit_s:
        deadline = min(deadline, time.monotonic() + 0.8 * ctx.time_limit_s)
    index_of = {spec.key: i + 1 for i, spec in enumerate(specs)}
    built: dict[int, dict[str, Any]] = {}  # candidate index -> its pipeline result (this attempt)
    stopped = "every candidate was tried or skipped"
    counted = 0
    for spec in search.order():
        index = index_of[spec.key]
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
        reason = search.skip_reason(spec)
        if reason is not None:
            record = _record(spec, index, base, config, status="skipped", reason=reason)
            _note(ctx, search, record, f"candidate {index} skipped ({spec.name}): {reason}")
            continue
        counted += 1
        record, result = _build(ctx, spec, index, base, config, budget, recipes)
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


def _record(
    spec: Spec, index: int, base: Baseline, config: AutoConfig, **values: Any
) -> dict[str, Any]:
    return {
        "index": index,
        "key": spec.key,
        "name": spec.name,
        "pipeline": spec.pipeline,
        "estimate": {
            k: v for k, v in estimate(spec, base, config.objective).items() if k != "objective"
        },
        "reused": False,
        **values,
    }


def _build(
    ctx: StepContext,
    spec: Spec,
    index: int,
    base: Baseline,
    config: AutoConfig,
    budget: dict[str, float],
    recipes: _Recipes,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Build and measure one candidate; a candidate that fails is recorded, not fatal."""
    assert ctx.build is not None
    started = time.monotonic()
    workdir = ctx.workdir / f"candidate{index}"
    try:
        result = ctx.build(spec.pipeline, workdir)
    except Exception as exc:  # one candidate's failure (its error recorded) ends no search
        shutil.rmtree(workdir, ignore_errors=True)
        code = exc.code if isinstance(exc, EngineError) else type(exc).__name__
        record = _record(
            spec,
            index,
            base,
            config,
            status="failed",
            error=f"{code}: {exc}",
            seconds=round(time.monotonic() - started, 2),
        )
        return record, None
    final = result["final"]
    metrics = {k: final[k] for k in KEPT if k in final}
    if "accuracy_top1" in final and base.accuracy is not None:
        metrics["accuracy_drop"] = round(base.accuracy - final["accuracy_top1"], 6)
    verdict = result["quality"]
    missed = budget_misses(budget, metrics, verdict)
    fid_name, fid = fidelity(ctx.task, metrics)
    record = _record(
        spec,
        index,
        base,
        config,
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
                "catalog": len(search.specs),
                "measured": len(measured),
                "reused": sum(1 for r in search.records if r.get("reused")),
                "skipped": sum(1 for r in search.records if r["status"] == "skipped"),
                "failed": sum(1 for r in search.records if r["status"] == "failed"),
                "stopped": stopped,
                "seconds": round(sum(r.get("seconds") or 0 for r in search.records), 2),
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
