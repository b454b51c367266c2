"""preset auto next to every preset, per model, at the engine level (compress(), no API).

    .venv/bin/python -m bench.auto [--models cnn,mlp] [--zoo ocr-cls,wakeword-emb,yolov8n]
        [--minutes 6] [--candidates 12] [--out table.md]

Digits CNN and MLP (.pt2 uploads of engine.examples, labelled): budget max_accuracy_drop 0.01.
Zoo models (bench/zoo.py: real pretrained ONNX files from pip wheels, unlabelled inputs built
offline): min_cosine 0.99 for embeddings, else min_sqnr_db 20 on the worst slice (the zoo's own
floor). Objective size. For each model: the auto search within `--minutes` / `--candidates`,
then every preset that applies (tiny and deep-compression need a .pt2) on its own with the same
held-out split (holdout 0.3, seed 0). Size is what is delivered: the cpz archive of a
weight_share step, else the ONNX file. Prints, per model, the chosen point and the presets side
by side, then every candidate (Pareto points marked, skipped ones with why), as Markdown. Not
a test; latency figures are single runs on whatever machine runs it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import preset_pipeline  # noqa: E402
from engine.errors import EngineError  # noqa: E402
from engine.pipeline import compress  # noqa: E402
from engine.search.auto import budget_misses  # noqa: E402

HOLDOUT = 0.3
PT2_PRESETS = ("fp16", "edge-int8", "int4-weights", "tiny", "deep-compression")
ONNX_PRESETS = ("fp16", "edge-int8", "int4-weights")


def _size(metrics: dict[str, Any]) -> int:
    return int(metrics.get("archive_size_bytes") or metrics["size_bytes"])


def _figures(original: dict[str, Any], final: dict[str, Any]) -> dict[str, Any]:
    out = dict(final)
    if "accuracy_top1" in final and "accuracy_top1" in original:
        out["accuracy_drop"] = round(original["accuracy_top1"] - final["accuracy_top1"], 6)
    return out


def _fid(budget: dict[str, float], m: dict[str, Any]) -> str:
    if "max_accuracy_drop" in budget:
        return f"drop {m.get('accuracy_drop', float('nan')) * 100:+.2f} pt"
    if "min_cosine" in budget:
        return f"cos {m.get('cosine_similarity', float('nan')):.4f}"
    value = m.get("sqnr_db_min", m.get("sqnr_db"))
    return "exact" if value is None else f"SQNR min {value:.1f} dB"


def _row(
    label: str,
    budget: dict[str, float],
    result: dict[str, Any],
    s: float,
) -> str:
    original, final = result["original"], result["final"]
    m = _figures(original, final)
    misses = budget_misses(budget, m, result["quality"])
    meets = "yes" if not misses else "no: " + "; ".join(misses)
    return (
        f"| {label} | {_size(m):,} | {original['size_bytes'] / _size(m):.1f}× | "
        f"{m.get('latency_ms_p50', float('nan')):.4f} | {_fid(budget, m)} | {meets} | {s:.0f} |"
    )


def bench_model(
    title: str,
    model: Path,
    npz: Path,
    task: str,
    budget: dict[str, float],
    presets: tuple[str, ...],
    args: argparse.Namespace,
    tmp: Path,
) -> list[str]:
    wanted = ", ".join(f"{k} {v:g}" for k, v in budget.items())
    lines = [
        f"### {title}: budget {wanted}, objective size",
        "",
        "| pipeline | delivered bytes | smaller | latency ms p50 | fidelity | meets | seconds |",
        "|---|---:|---:|---:|---|---|---:|",
    ]
    started = time.monotonic()
    result = compress(
        model,
        [
            {
                "op": "auto",
                "budget": budget,
                "objective": "size",
                "search": {"max_minutes": args.minutes, "max_candidates": args.candidates},
            }
        ],
        dataset_path=npz,
        evaluation_task=task,
        workdir=tmp / "auto",
    )
    auto_s = time.monotonic() - started
    details = result["steps"][0]["details"]
    chosen = details["chosen"]["name"]
    lines.append(_row(f"**auto** → {chosen}", budget, result, auto_s))
    for preset in presets:
        started = time.monotonic()
        try:
            out = compress(
                model,
                preset_pipeline(preset),
                dataset_path=npz,
                evaluation_task=task,
                workdir=tmp / preset,
                holdout=HOLDOUT,
            )
        except EngineError as exc:
            lines.append(f"| preset {preset} | failed: {exc.code} | | | | no | |")
            continue
        spent = time.monotonic() - started
        lines.append(_row(f"preset {preset}", budget, out, spent))
    lines += [
        "",
        f"Search: {details['search']}",
        "",
        "| # | candidate | status | delivered bytes | fidelity | meets | seconds |",
        "|---:|---|---|---:|---|---|---:|",
    ]
    front = {p["candidate"] for p in details["pareto"]}
    for c in details["candidates"]:
        if c["status"] != "measured":
            why = (c.get("reason") or c.get("error") or "").split(", which")[0]
            lines.append(f"| {c['index']} | {c['name']} | {c['status']}: {why[:100]} | | | | |")
            continue
        mark = " **(Pareto)**" if c["index"] in front else ""
        lines.append(
            f"| {c['index']} | {c['name']}{mark} | measured | {int(c['objective']):,} | "
            f"{_fid(budget, c['metrics'])} | "
            f"{'yes' if c['meets'] else 'no: ' + '; '.join(c['missed'])} | "
            f"{c['seconds']:.0f} |"
        )
    return [*lines, ""]


def _digits(name: str, args: argparse.Namespace, tmp: Path) -> list[str]:
    from engine.examples import write_digits_example, write_digits_mlp

    files = (write_digits_example if name == "cnn" else write_digits_mlp)(tmp / "files")
    return bench_model(
        f"digits {name.upper()} (.pt2)",
        files["pt2"],
        files["npz"],
        "classification",
        {"max_accuracy_drop": 0.01},
        PT2_PRESETS,
        args,
        tmp,
    )


def _zoo(key: str, args: argparse.Namespace, tmp: Path) -> list[str]:
    import numpy as np

    from bench import zoo

    spec = next(s for s in zoo.ZOO if s.key == key)
    model = zoo.model_file(spec)
    tmp.mkdir(parents=True, exist_ok=True)
    npz = tmp / f"{key}.npz"
    np.savez(npz, **spec.inputs(max(spec.calib, 64), zoo.SEED + 1))
    budget = {"min_cosine": 0.99} if spec.task == "embedding" else {"min_sqnr_db": 20.0}
    title = f"{spec.title} (zoo `{key}`, {model.stat().st_size / 2**20:.1f} MiB ONNX)"
    return bench_model(title, model, npz, spec.task, budget, ONNX_PRESETS, args, tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", default="cnn,mlp")
    parser.add_argument("--zoo", default="")
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--candidates", type=int, default=12)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [n for n in args.models.split(",") if n]:
            lines += _digits(name, args, Path(tmp) / name)
            print("\n".join(lines), flush=True)
        for key in [k for k in args.zoo.split(",") if k]:
            lines += _zoo(key, args, Path(tmp) / key)
            print("\n".join(lines), flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
