"""preset auto next to every preset, per model, through the REST API of `compaas up`.

    .venv/bin/python -m bench.auto [--models cnn,mlp] [--zoo ocr-cls,wakeword-emb,orientation]
        [--minutes 6] [--candidates 12] [--out table.md]

Starts the service the README's first command starts (`compaas up`, embedded default: one
worker process, jobs one at a time) in a scratch directory and drives it with the SDK
(`compaas.Client`), as a team would: upload the model and its dataset, POST one
`{"preset": "auto", "budget": …, "objective": "size", "search": …}` job, then one job per
preset that applies (tiny and deep-compression need a .pt2), all on the same held-out split
(holdout 0.3, seed 0, which is what the auto job resolves to). Digits CNN and MLP (.pt2 uploads
of engine.examples, labelled): budget max_accuracy_drop 0.01. Zoo models (bench/zoo.py: real
pretrained ONNX files from pip wheels, inputs built offline): max_accuracy_drop 0.01 where the
inputs carry their true class (the orientation and text-line direction classifiers:
zoo.true_labels), min_cosine 0.99 for embeddings, else min_sqnr_db 20 on the worst slice (the
zoo's own floor). Size is what is
delivered: the cpz archive of a weight_share step, else the ONNX file. Prints, per model, the
chosen point and the presets side by side, then every candidate (Pareto points marked, skipped
ones with why), as Markdown. Not a test; latency figures are single runs on whatever machine
runs it, and seconds are each job's time in the worker.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compaas import Client, Job  # noqa: E402
from engine.search.auto import budget_misses  # noqa: E402

HOLDOUT = 0.3
PT2_PRESETS = ("fp16", "edge-int8", "int4-weights", "tiny", "deep-compression")
ONNX_PRESETS = ("fp16", "edge-int8", "int4-weights")
HEADER = "| pipeline | delivered bytes | smaller | latency ms p50 | fidelity | meets | seconds |"


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


def _seconds(job: Job) -> float:
    read = job.read
    if read.started_at is None or read.finished_at is None:
        return float("nan")
    return (read.finished_at - read.started_at).total_seconds()


def _row(label: str, budget: dict[str, float], job: Job) -> str:
    if job.status != "succeeded":
        error = job.error.get("code") if job.error else job.status
        return f"| {label} | {job.status}: {error} | | | | no | {_seconds(job):.0f} |"
    metrics = job.metrics or {}
    original, final = metrics["original"], metrics["final"]
    m = _figures(original, final)
    quality = job.read.quality
    misses = budget_misses(budget, m, quality)
    meets = "yes" if not misses else "no: " + "; ".join(misses)
    return (
        f"| {label} | {_size(m):,} | {original['size_bytes'] / _size(m):.1f}× | "
        f"{m.get('latency_ms_p50', float('nan')):.4f} | {_fid(budget, m)} | {meets} | "
        f"{_seconds(job):.0f} |"
    )


def _candidates(budget: dict[str, float], details: dict[str, Any]) -> list[str]:
    lines = [
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
        reused = " (reused)" if c.get("reused") else ""
        lines.append(
            f"| {c['index']} | {c['name']}{mark} | measured{reused} | {int(c['objective']):,} | "
            f"{_fid(budget, c['metrics'])} | "
            f"{'yes' if c['meets'] else 'no: ' + '; '.join(c['missed'])} | "
            f"{c['seconds']:.0f} |"
        )
    return lines


class Bench:
    """One model's jobs: the auto search and the presets, queued together, read when done."""

    def __init__(
        self,
        client: Client,
        title: str,
        model: Path,
        npz: Path,
        task: str,
        budget: dict[str, float],
        presets: tuple[str, ...],
        args: argparse.Namespace,
    ) -> None:
        self.client, self.title, self.task, self.budget = client, title, task, budget
        uploaded = client.models.upload(model, name=model.stem, wait=True, timeout=600)
        dataset = client.datasets.upload(npz)
        self.auto = client.jobs.create(
            uploaded.id,
            dataset_id=dataset.id,
            preset="auto",
            budget=budget,
            objective="size",
            search={"max_minutes": args.minutes, "max_candidates": args.candidates},
            evaluation={"task": task},
        )
        self.presets = {
            preset: client.jobs.create(
                uploaded.id,
                dataset_id=dataset.id,
                preset=preset,
                # the auto job's split; measured (and shown) even under the quality floor
                evaluation={"task": task, "holdout": HOLDOUT, "allow_below_floor": True},
            )
            for preset in presets
        }

    def table(self, timeout_s: float) -> list[str]:
        wanted = ", ".join(f"{k} {v:g}" for k, v in self.budget.items())
        auto = self.client.jobs.wait(self.auto.id, timeout=timeout_s)
        details = (auto.steps[0].details if auto.steps else None) or {}
        chosen = details.get("chosen", {}).get("name", "-")
        lines = [
            f"### {self.title}: budget {wanted}, objective size",
            "",
            f"auto job `{auto.id}`: {auto.status}; warnings: {auto.warnings or 'none'}",
            "",
            HEADER,
            "|---|---:|---:|---:|---|---|---:|",
            _row(f"**auto** → {chosen}", self.budget, auto),
        ]
        for preset, job in self.presets.items():
            done = self.client.jobs.wait(job.id, timeout=timeout_s)
            lines.append(_row(f"preset {preset}", self.budget, done))
        if details.get("candidates"):
            lines += ["", *_candidates(self.budget, details)]
        return [*lines, ""]


def _digits(client: Client, name: str, args: argparse.Namespace, tmp: Path) -> Bench:
    from engine.examples import write_digits_example, write_digits_mlp

    files = (write_digits_example if name == "cnn" else write_digits_mlp)(tmp / "files")
    model = files["pt2"].rename(files["pt2"].with_name(f"digits_{name}.pt2"))
    title = f"digits {name.upper()} (.pt2)"
    budget = {"max_accuracy_drop": 0.01}
    return Bench(client, title, model, files["npz"], "classification", budget, PT2_PRESETS, args)


def _zoo(client: Client, key: str, args: argparse.Namespace, tmp: Path) -> Bench:
    import numpy as np

    from bench import zoo

    spec = next(s for s in zoo.ZOO if s.key == key)
    model = zoo.model_file(spec)
    tmp.mkdir(parents=True, exist_ok=True)
    npz = tmp / f"{key}.npz"
    n = max(spec.calib, 64)
    feeds = spec.inputs(n, zoo.SEED + 1)
    labels = zoo.true_labels(key, n, zoo.SEED + 1)
    task = spec.task
    if labels is not None:  # inputs built with a known answer: accuracy can be measured
        feeds["labels"] = labels
        budget = {"max_accuracy_drop": 0.01}
    else:
        budget = {"min_cosine": 0.99} if spec.task == "embedding" else {"min_sqnr_db": 20.0}
    np.savez(npz, **feeds)
    title = f"{spec.title} (zoo `{key}`, {model.stat().st_size / 2**20:.1f} MiB ONNX)"
    return Bench(client, title, model, npz, task, budget, ONNX_PRESETS, args)


def main() -> None:
    from bench.zoo import Service

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", default="cnn,mlp")
    parser.add_argument("--zoo", default="")
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--candidates", type=int, default=12)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = datetime.now()
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        service = Service(Path(tmp))
        try:
            with Client(service.api, service.key, timeout=300) as client:
                benches = [
                    _digits(client, n, args, Path(tmp) / n) for n in args.models.split(",") if n
                ] + [_zoo(client, k, args, Path(tmp) / k) for k in args.zoo.split(",") if k]
                for bench in benches:  # every job is queued; the worker runs them in order
                    lines += bench.table(timeout_s=4 * 3600)
                    print("\n".join(lines), flush=True)
        finally:
            service.close()
    lines.append(f"Started {started:%Y-%m-%d %H:%M}, took {str(datetime.now() - started)[:-7]}.")
    print(lines[-1])
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
