"""The auto search (issue #17) in the engine: the request's checks, the catalog, dominance and
the Pareto front without a model; then real searches on the digits CNN (ONNX upload, so the
candidates are the post-training ones and the tests stay short): a budget met by a model at
least as small as every preset meeting it, an impossible budget answered with the original and
a warning, and a search interrupted mid-way that resumes without building its finished
candidates again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.config import AutoConfig, PipelineError, auto_step
from engine.onnxgraph.metrics import sha256_file
from engine.pipeline import compress, run
from engine.search.auto import Baseline, Search, candidates, pareto, pipeline_key
from engine.spec import CompressSpec


def test_request_checks_name_the_field_and_the_valid_keys() -> None:
    with pytest.raises(PipelineError) as err:
        auto_step({"max_acc_drop": 0.01})
    assert (err.value.code, err.value.field) == ("invalid_budget", "budget.max_acc_drop")
    assert "max_accuracy_drop" in err.value.extra["valid_keys"]
    with pytest.raises(PipelineError) as err:
        auto_step({})
    assert err.value.field == "budget"
    with pytest.raises(PipelineError) as err:
        auto_step({"min_cosine": 0.99}, "smallest")
    assert (err.value.code, err.value.field) == ("invalid_objective", "objective")
    with pytest.raises(PipelineError) as err:
        auto_step({"min_cosine": 0.99}, "size", {"max_candidates": 0})
    assert (err.value.code, err.value.field) == ("invalid_search", "search.max_candidates")
    with pytest.raises(PipelineError) as err:
        auto_step({"max_size_bytes": -5})
    assert err.value.field == "budget.max_size_bytes"
    step = auto_step({"min_cosine": 0.99})
    assert step["objective"] == "size"
    assert step["search"] == {"max_minutes": 15.0, "max_candidates": 12}


def test_catalog_follows_the_upload_and_the_data() -> None:
    config = AutoConfig.model_validate({"op": "auto", "budget": {"max_accuracy_drop": 0.01}})
    onnx = candidates(
        config, "onnx", task="classification", has_dataset=True, has_labels=True, train_samples=999
    )
    pt2 = candidates(
        config, "pt2", task="classification", has_dataset=True, has_labels=True, train_samples=999
    )
    small = candidates(
        config, "pt2", task="classification", has_dataset=True, has_labels=True, train_samples=50
    )
    names = {s.name for s in onnx}
    assert {"preset fp16", "preset edge-int8", "preset int4-weights"} <= names
    assert "int8 static, target = budget" in names  # the quantizer's repairs aim at the budget
    assert not any("distill" in s.name or "low_rank" in s.name for s in onnx)  # need a .pt2
    pt2_names = {s.name for s in pt2}
    assert {"preset tiny", "preset deep-compression", "low_rank + int8 static"} <= pt2_names
    assert not any("distill" in s.name or "tiny" in s.name for s in small)  # too few samples
    assert len({s.key for s in pt2}) == len(pt2)


def test_dominated_candidates_are_skipped_before_they_are_built() -> None:
    config = AutoConfig.model_validate(
        {"op": "auto", "budget": {"max_accuracy_drop": 0.01}, "objective": "size"}
    )
    base = Baseline(size_bytes=1_000_000, weight_bytes=1_000_000, macs=None, latency_ms=1.0,
                    accuracy=0.9)  # fmt: skip
    specs = candidates(
        config, "pt2", task="classification", has_dataset=True, has_labels=True, train_samples=999
    )
    search = Search(config, base, specs)
    order = search.order()
    assert order[0].name == "preset fp16"  # the near-lossless anchor first
    assert all(s.cost == 0 for s in order[:5])  # post-training builds bound the rest first
    fp16 = next(s for s in specs if s.name == "preset fp16")
    assert search.skip_reason(fp16) is None
    search.records.append(
        {"index": 9, "name": "x", "status": "measured", "meets": True, "objective": 100_000}
    )
    reason = search.skip_reason(fp16)
    assert reason is not None and "cannot beat candidate 9" in reason
    composed = next(s for s in specs if s.name == "low_rank + int8 static")
    search.records[:] = [
        {"index": 1, "name": "low_rank", "status": "measured", "meets": False,
         "objective": 600_000, "missed": ["accuracy_drop 0.05 > max_accuracy_drop 0.01"]},
    ]  # fmt: skip
    reason = search.skip_reason(composed)
    assert reason is not None and "prefix 'low_rank' already misses" in reason


def test_an_op_with_nothing_to_work_on_is_not_tried_again() -> None:
    config = AutoConfig.model_validate({"op": "auto", "budget": {"min_sqnr_db": 20}})
    base = Baseline(size_bytes=1_000_000, weight_bytes=1_000_000, macs=None, latency_ms=1.0,
                    accuracy=None)  # fmt: skip
    specs = candidates(
        config, "onnx", task="generic", has_dataset=True, has_labels=False, train_samples=64
    )
    search = Search(config, base, specs)
    search.records.append(
        {"index": 4, "name": "weight_share 4 bits", "status": "failed",
         "error": "nothing_to_share: The model has no Conv/Gemm/MatMul float32 weights"}
    )  # fmt: skip
    shared = [s for s in specs if any(step["op"] == "weight_share" for step in s.pipeline)]
    assert {s.name for s in shared} >= {"weight_share 6 bits", "prune 50% + weight_share 5 bits"}
    for spec in shared:
        reason = search.skip_reason(spec)
        assert reason is not None and "weight_share does not apply to this model" in reason
        assert "candidate 4 (weight_share 4 bits) failed with nothing_to_share" in reason
    edge = next(s for s in specs if s.name == "preset edge-int8")
    assert search.skip_reason(edge) is None
    # another failure (a crash, a timeout) says nothing about the op's other settings
    search.records[0]["error"] = "training_failed: loss was NaN"
    assert all(search.skip_reason(s) is None for s in shared)


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = [
        {"candidate": 1, "objective": 10.0, "fidelity": -0.02},
        {"candidate": 2, "objective": 20.0, "fidelity": 0.0},
        {"candidate": 3, "objective": 25.0, "fidelity": -0.01},  # worse than 2 on both
        {"candidate": 4, "objective": 5.0, "fidelity": -0.2},
    ]
    assert [p["candidate"] for p in pareto(points)] == [4, 1, 2]


def _delivered(metrics: dict[str, Any]) -> int:
    return int(metrics.get("archive_size_bytes") or metrics["size_bytes"])


def _auto(budget: dict[str, Any], candidates: int) -> dict[str, Any]:
    return {"op": "auto", "budget": budget, "objective": "size",
            "search": {"max_candidates": candidates}}  # fmt: skip


@pytest.mark.slow
def test_budget_met_by_a_model_as_small_as_the_best_preset(
    digits_files: dict[str, Path], tmp_path: Path
) -> None:
    budget = {"max_accuracy_drop": 0.01}
    events: list[dict[str, Any]] = []
    result = compress(
        digits_files["onnx"],
        [_auto(budget, 3)],
        dataset_path=digits_files["npz"],
        workdir=tmp_path / "auto",
        progress=events.append,
    )
    details = result["steps"][0]["details"]
    chosen = details["chosen"]
    assert chosen["candidate"] is not None, result["warnings"]
    assert result["quality"]["verdict"] == "ok"
    drop = result["original"]["accuracy_top1"] - result["final"]["accuracy_top1"]
    assert drop <= 0.01
    measured = [c for c in details["candidates"] if c["status"] == "measured"]
    assert 1 <= len(measured) <= 3
    assert all(c["seconds"] > 0 and c["recipe"]["pipeline"] for c in measured)
    assert details["pareto"] and all(p["recipe"]["content_sha256"] for p in details["pareto"])
    assert sum(e["type"] == "candidate" for e in events) == len(details["candidates"])
    # Every preset that applies to an ONNX upload, run on its own with the same held-out split.
    best_preset = None
    for name in ("fp16", "edge-int8", "int4-weights"):
        from engine.config import preset_pipeline

        preset = compress(
            digits_files["onnx"],
            preset_pipeline(name),
            dataset_path=digits_files["npz"],
            workdir=tmp_path / name,
            holdout=result["evaluation"]["holdout"],
        )
        preset_drop = preset["original"]["accuracy_top1"] - preset["final"]["accuracy_top1"]
        if preset_drop <= 0.01:
            size = _delivered(preset["final"])
            best_preset = size if best_preset is None else min(best_preset, size)
    assert best_preset is not None
    assert _delivered(result["final"]) <= best_preset


@pytest.mark.slow
def test_impossible_budget_returns_the_original_with_a_warning(
    digits_files: dict[str, Path], tmp_path: Path
) -> None:
    original_size = digits_files["onnx"].stat().st_size
    budget = {"max_size_bytes": original_size // 100, "max_accuracy_drop": 0.0}
    result = compress(
        digits_files["onnx"],
        [_auto(budget, 2)],
        dataset_path=digits_files["npz"],
        workdir=tmp_path,
    )
    assert result["quality"]["verdict"] == "ok"
    details = result["steps"][0]["details"]
    assert details["chosen"]["candidate"] is None
    final = Path(result["artifacts"][0]["path"])
    assert sha256_file(final) == sha256_file(tmp_path / "original.onnx")
    (warning,) = [w for w in result["warnings"] if "No candidate met the whole budget" in w]
    closest = min(
        (c for c in details["candidates"] if c["status"] == "measured"),
        key=lambda c: c["shortfall"],
    )
    assert f"candidate {closest['index']} ({closest['name']})" in warning
    assert "max_size_bytes" in warning


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_interrupted_search_resumes_without_rebuilding_finished_candidates(
    digits_files: dict[str, Path], tmp_path: Path
) -> None:
    # min_sqnr_db 60 dB: no cheap build meets it, so nothing is skipped as dominated and every
    # candidate up to the limit is built (the test is about what a retry does).
    step = _auto({"min_sqnr_db": 60.0}, 4)
    spec = CompressSpec(
        model_path=str(digits_files["onnx"]),
        dataset_path=str(digits_files["npz"]),
        pipeline=[step],
        workdir=str(tmp_path / "first"),
    )
    kept: list[dict[str, Any]] = []

    def killed_after_two(event: dict[str, Any]) -> None:
        if event["type"] == "candidate":
            kept.append({k: v for k, v in event.items() if k != "type"})
            if sum(e["status"] == "measured" for e in kept) == 2:
                raise _Killed  # the worker dies after its second candidate was recorded

    with pytest.raises(_Killed):
        run(spec, killed_after_two)
    finished = {e["key"] for e in kept if e["status"] == "measured"}
    assert len(finished) == 2

    events: list[dict[str, Any]] = []
    retry = spec.model_copy(update={"workdir": str(tmp_path / "retry"), "search_history": kept})
    result = run(retry, events.append)
    candidates_seen = [e for e in events if e["type"] == "candidate"]
    reused = [e for e in candidates_seen if e["reused"]]
    assert {e["key"] for e in reused} == finished
    assert all(e["message"].startswith(f"candidate {e['index']} reused") for e in reused)
    built_again = [e for e in candidates_seen if not e["reused"] and e["key"] in finished]
    assert built_again == []
    details = result["steps"][0]["details"]
    assert details["search"]["reused"] == 2
    assert len([c for c in details["candidates"] if c["status"] != "skipped"]) == 4
    assert {pipeline_key(c["pipeline"]) for c in details["candidates"]} >= finished


# ----------------------------------------------- corrections, sweeps and probes (issue #17)


def _search(
    digits_mlp: Path, npz: Path, tmp: Path, budget: dict[str, Any], n: int
) -> dict[str, Any]:
    """A real auto search on the digits MLP (ONNX: post-training candidates, about 1.5 s each)."""
    result = compress(digits_mlp, [_auto(budget, n)], dataset_path=npz, workdir=tmp)
    return result["steps"][0]["details"]


def _by_name(details: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in details["candidates"]}


def test_a_measured_family_member_corrects_the_estimates_of_the_others(
    mlp_files: dict[str, Path], tmp_path: Path
) -> None:
    # weight_share 4 bits on the MLP delivers 0.63 of its analytic size (a codebook archive
    # compresses its indices). weight_share 6 bits' analytic estimate is then far over the
    # size limit; corrected by the measured 4 bits it is not, so it is built (and ahead of
    # int4-weights, whose analytic estimate was smaller).
    budget = {"max_accuracy_drop": 0.0, "max_size_bytes": 30_000}
    details = _search(mlp_files["onnx"], mlp_files["npz"], tmp_path, budget, 3)
    records = details["candidates"]
    assert [c["name"] for c in records] == [
        "preset fp16",
        "weight_share 4 bits",
        "weight_share 6 bits",
    ]
    fp16, ws4, ws6 = records
    assert ws4["corrected_by"] is None and ws4["estimate_corrected"] == ws4["estimate"]
    factor = _delivered(ws4["metrics"]) / ws4["estimate"]["size_bytes"]
    assert factor < 0.8
    assert ws6["family"] == ws4["family"] == "weight_share/codebook"
    assert ws6["corrected_by"]["candidate"] == ws4["index"]
    assert ws6["corrected_by"]["size_factor"] == pytest.approx(factor, rel=1e-3)
    assert ws6["estimate_corrected"]["size_bytes"] == pytest.approx(
        ws6["estimate"]["size_bytes"] * factor, rel=1e-3
    )
    assert ws6["status"] == "measured"
    # What the analytic estimate alone decided, on the same measured records: skip it.
    config = AutoConfig.model_validate(_auto(budget, 3))
    original = compress(mlp_files["onnx"], [], dataset_path=mlp_files["npz"],
                        workdir=tmp_path / "original", holdout=0.3)["original"]  # fmt: skip
    base = Baseline(int(original["size_bytes"]), 4 * int(original["params"]), original["macs"],
                    original["latency_ms_p50"], original["accuracy_top1"])  # fmt: skip
    specs = candidates(
        config, "onnx", task="classification", has_dataset=True, has_labels=True, train_samples=0
    )
    ws6_spec = next(s for s in specs if s.name == "weight_share 6 bits")
    before = Search(config, base, specs, [fp16])
    reason = before.skip_reason(ws6_spec)
    assert reason is not None and "far over max_size_bytes" in reason
    assert before.order()[0].name == "weight_share 4 bits"
    after = Search(config, base, specs, [fp16, ws4])
    assert after.skip_reason(ws6_spec) is None
    order = [s.name for s in after.order()]
    assert order.index("weight_share 6 bits") < order.index("preset int4-weights")


def test_sweeps_refine_a_feasible_point_and_can_be_chosen(
    mlp_files: dict[str, Path], tmp_path: Path
) -> None:
    # Two points on the MLP meet a 2-point drop: weight_share 4 bits and prune 50% +
    # weight_share 5 bits. After the catalog the search tries the next, more aggressive
    # settings of them; weight_share 3 bits meets the budget too and is smaller than every
    # catalog point, so it is the chosen model.
    details = _search(mlp_files["onnx"], mlp_files["npz"], tmp_path, {"max_accuracy_drop": 0.02}, 5)
    records = details["candidates"]
    sweeps = [c for c in records if c["sweep"]]
    catalog = [c for c in records if not c["sweep"]]
    assert sweeps and records.index(sweeps[0]) == len(catalog)  # after the whole catalog
    first = sweeps[0]
    assert first["name"] == "weight_share 3 bits (sweep)"
    assert first["pipeline"] == [{"op": "weight_share", "bits": 3}]
    assert first["index"] > details["search"]["catalog"]
    assert first["key"] == pipeline_key(first["pipeline"])
    assert (
        first["estimate"]["size_bytes"]
        < _by_name(details)["weight_share 4 bits"]["estimate"]["size_bytes"]
    )
    assert first["recipe"]["pipeline"][0]["bits"] == 3  # a recipe like any candidate's
    feasible = [c for c in catalog if c["status"] == "measured" and c["meets"]]
    assert {"weight_share 4 bits", "prune 50% + weight_share 5 bits"} <= {
        c["name"] for c in feasible
    }
    chosen = details["chosen"]
    chosen_record = next(c for c in records if c["index"] == chosen["candidate"])
    assert chosen_record["sweep"] and chosen_record["meets"]
    assert _delivered(chosen_record["metrics"]) < min(_delivered(c["metrics"]) for c in feasible)
    assert details["search"]["sweeps"] >= 1


def test_refine_bisects_between_a_met_and_a_missed_setting() -> None:
    config = AutoConfig.model_validate(_auto({"max_accuracy_drop": 0.01}, 12))
    base = Baseline(size_bytes=1_000_000, weight_bytes=1_000_000, macs=None, latency_ms=None,
                    accuracy=0.9)  # fmt: skip
    specs = candidates(
        config, "onnx", task="classification", has_dataset=True, has_labels=True, train_samples=0
    )
    search = Search(config, base, specs)
    pruned = next(s for s in specs if s.name == "prune 50% + weight_share 5 bits")

    def measured(spec: Any, meets: bool) -> dict[str, Any]:
        missed = [] if meets else ["accuracy_drop 0.03 > max_accuracy_drop 0.01"]
        return {"index": search.index_of(spec), "key": spec.key, "name": spec.name,
                "pipeline": spec.pipeline, "status": "measured", "meets": meets,
                "objective": 1.0, "missed": missed}  # fmt: skip

    search.records = [measured(pruned, True)]
    made = {s.name: s for s in search.refine()}
    assert set(made) == {
        "prune 70% + weight_share 5 bits (sweep)",
        "prune 50% + weight_share 4 bits (sweep)",
    }
    p70 = made["prune 70% + weight_share 5 bits (sweep)"]
    assert p70.size_ratio == pytest.approx(pruned.size_ratio * 0.3 / 0.5)
    search.records.append(measured(p70, False))  # 70 % misses: halfway to 50 %, on the grid
    search.records.append(
        measured(made["prune 50% + weight_share 4 bits (sweep)"], False)
    )  # 4 bits misses: 5 and 4 are adjacent, nothing between
    (bisect,) = search.refine()
    assert bisect.name == "prune 60% + weight_share 5 bits (sweep, bisect)"
    assert bisect.sweep == "bisect" and bisect.pipeline[0]["sparsity"] == 0.6
    search.records.append(measured(bisect, True))  # 60 % meets: split 60..70 once more
    made = {s.name: s for s in search.refine()}
    assert set(made) == {
        "prune 65% + weight_share 5 bits (sweep, bisect)",
        "prune 60% + weight_share 4 bits (sweep)",  # 60 % meets: its bits go on
    }
    # 60 % + 4 bits is at least as aggressive on both knobs as 50 % + 4 bits, which missed
    reason = search.skip_reason(made["prune 60% + weight_share 4 bits (sweep)"])
    assert reason is not None and "at least as aggressive on every setting as candidate" in reason
    assert "(prune 50% + weight_share 4 bits (sweep)), which already misses" in reason
    search.records.append(measured(made["prune 65% + weight_share 5 bits (sweep, bisect)"], True))
    # two bisections on the sparsity line: no third
    assert all(s.sweep != "bisect" for s in search.refine())
    assert search.next() is not None  # the catalog's other points are still to try


def test_probe_cuts_training_and_its_verdict_follows_the_rules() -> None:
    from engine.config import PRESETS
    from engine.search.auto import probe_pipeline

    deep = probe_pipeline(PRESETS["deep-compression"]["pipeline"])
    assert deep[0]["schedule"]["epochs_per_step"] == 1 and deep[0]["fine_tune_epochs"] == 0
    assert deep[0]["sparsity"] == 0.94 and deep[1] == {"op": "weight_share", "bits": 5}
    tiny = probe_pipeline(PRESETS["tiny"]["pipeline"])
    assert tiny[1]["epochs"] == 1 and tiny[0]["sparsity"] == 0.5
    assert PRESETS["tiny"]["pipeline"][1]["epochs"] == 10  # the preset itself is untouched

    config = AutoConfig.model_validate(
        _auto({"max_accuracy_drop": 0.01, "max_size_bytes": 50_000}, 12)
    )
    base = Baseline(size_bytes=1_000_000, weight_bytes=1_000_000, macs=None, latency_ms=None,
                    accuracy=0.9)  # fmt: skip
    search = Search(config, base, [])

    def probe(size: int, drop: float) -> dict[str, Any]:
        return {"metrics": {"size_bytes": size, "accuracy_drop": drop}, "objective": float(size)}

    assert search.probe_reason({"error": "x"}) is None  # a failed probe: build it
    reason = search.probe_reason(probe(60_000, 0.0))
    assert reason is not None and "misses max_size_bytes" in reason
    assert search.probe_reason(probe(20_000, 0.5)) is None  # nothing feasible yet: build it
    search.records.append(
        {"index": 3, "name": "x", "status": "measured", "meets": True, "objective": 10_000}
    )
    reason = search.probe_reason(probe(20_000, 0.0))  # cannot beat 10,000 B, whatever training
    assert reason is not None and "cannot beat candidate 3" in reason
    assert search.probe_reason(probe(8_000, 0.02)) is None  # a near miss: training may recover
    reason = search.probe_reason(probe(8_000, 0.2))  # far below, for a 20 % gain
    assert reason is not None and "far below" in reason
    assert search.probe_reason(probe(2_000, 0.2)) is None  # far below, but 5x smaller: build


@pytest.mark.slow
def test_a_probe_skips_a_training_candidate_whose_size_cannot_fit(
    mlp_files: dict[str, Path], tmp_path: Path
) -> None:
    # The digits MLP as a .pt2 (training candidates apply), at most 5,500 bytes. Deep
    # compression (94 %) is probed, then built: 4.6 kB, but under the agreement floor. Its
    # measured size corrects the 90 % gradual prune's estimate (same family) to within the
    # limit, so that one is probed too; the probe's real size (training changes values, not
    # their number) misses the limit, and its full training is skipped.
    budget = {"max_accuracy_drop": 0.01, "max_size_bytes": 5_500}
    events: list[dict[str, Any]] = []
    result = compress(mlp_files["pt2"], [_auto(budget, 4)], dataset_path=mlp_files["npz"],
                      workdir=tmp_path, progress=events.append)  # fmt: skip
    details = result["steps"][0]["details"]
    by_name = _by_name(details)
    deep = by_name["preset deep-compression"]
    assert deep["status"] == "measured" and deep["probe"]["seconds"] > 0
    assert deep["probe"]["max_train_samples"] == 256
    assert 0 < deep["probe"]["train_samples"] <= 256
    assert deep["probe"]["pipeline"][0]["fine_tune_epochs"] == 0
    p90 = by_name["prune 90% gradual + weight_share 5 bits"]
    assert p90["corrected_by"]["candidate"] == deep["index"], p90
    assert p90["estimate"]["size_bytes"] * 0.7 > 5_500  # analytic: it would not have been tried
    assert p90["status"] == "skipped", p90
    assert p90["reason"].startswith("probe: its delivered size"), p90["reason"]
    assert _delivered(p90["probe"]["metrics"]) * 0.9 > 5_500
    assert "seconds" not in p90  # never built
    search = details["search"]
    assert search["probed"] == 2 and search["measured"] == 2  # probes are not candidates
    assert search["seconds"] >= deep["seconds"] + deep["probe"]["seconds"] + p90["probe"]["seconds"]
    assert any("probed (prune 90% gradual" in e.get("message", "") for e in events)
