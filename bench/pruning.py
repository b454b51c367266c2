"""Every prune criterion × granularity × sparsity on the digits CNN (.pt2 upload), measured in
one run at the engine level (compress(), temp dirs, no API): accuracy and what each row keeps
of the original's MACs, parameters, nonzero parameters, zstd size and latency.

    .venv/bin/python -m bench.pruning [--quick] [--out table.md]

Block "one-shot": no training at all, so the criteria are compared on their own.
Block "gradual": magnitude, schedule {steps 3, epochs_per_step 2} (training on the labels
between rounds). Block "exact": magnitude channels one-shot with round_to null (kept channel
counts not rounded to multiples of 8). Every row uses holdout 0.3, so all rows are measured on
the same held-out samples (the job's seed splits them the same way).

Ratios are final/original (smaller is better); latency is 1/speedup, both models timed side by
side (onnxruntime CPU, batch 1, 1 thread). Prints a Markdown table; it is not a test and never
gates on absolute times.
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

from engine.errors import EngineError  # noqa: E402
from engine.pipeline import compress  # noqa: E402

CRITERIA = ("magnitude", "gradient", "entropy", "random")
SPARSITIES = (0.3, 0.5, 0.7, 0.9)
QUICK_SPARSITIES = (0.5, 0.9)
GRADUAL: dict[str, Any] = {"kind": "gradual", "steps": 3, "epochs_per_step": 2}
HOLDOUT = 0.3
COLUMNS = (
    "block",
    "criterion",
    "granularity",
    "sparsity",
    "measured sparsity",
    "accuracy",
    "drop (points)",
    "MACs",
    "params",
    "nonzero params",
    "zstd size",
    "latency",
    "s",
)


def _rows(sparsities: tuple[float, ...]) -> list[tuple[str, dict[str, Any]]]:
    rows: list[tuple[str, dict[str, Any]]] = []
    for criterion in CRITERIA:
        for granularity in ("unstructured", "channels"):
            for s in sparsities:
                step: dict[str, Any] = {
                    "criterion": criterion,
                    "granularity": granularity,
                    "sparsity": s,
                }
                rows.append(("one-shot", step))
        rows.append(("one-shot", {"criterion": criterion, "granularity": "n:m", "n": 2, "m": 4}))
    for granularity in ("unstructured", "channels"):
        for s in sparsities:
            step = {
                "criterion": "magnitude",
                "granularity": granularity,
                "sparsity": s,
                "schedule": GRADUAL,
            }
            rows.append(("gradual 3×2", step))
    for s in sparsities:
        step = {"criterion": "magnitude", "granularity": "channels", "sparsity": s}
        rows.append(("exact (round_to null)", {**step, "round_to": None}))
    return rows


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def _ratio(final: dict[str, Any], original: dict[str, Any], key: str) -> float | None:
    if key not in final or not original.get(key):
        return None
    return float(final[key]) / float(original[key])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="only 50%% and 90%% sparsity")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    from engine.examples import write_digits_example

    tmp = Path(tempfile.mkdtemp(prefix="compaas-pbench-"))
    files = write_digits_example(tmp / "cnn")
    rows = _rows(QUICK_SPARSITIES if args.quick else SPARSITIES)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    print("\n".join(lines), flush=True)
    original: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    started_all = time.perf_counter()
    for i, (block, extra) in enumerate(rows):
        step = {"op": "prune", **extra}
        sparsity = "2:4" if extra["granularity"] == "n:m" else f"{extra['sparsity']:.0%}"
        label = [block, extra["criterion"], extra["granularity"], sparsity]
        started = time.perf_counter()
        try:
            result = compress(
                files["pt2"],
                [step],
                dataset_path=files["npz"],
                workdir=tmp / "runs" / str(i),
                holdout=HOLDOUT,
            )
        except EngineError as exc:
            lines.append("| " + " | ".join(label) + f" | error: {exc.code} |" + " |" * 8)
            print(lines[-1], flush=True)
            continue
        seconds = time.perf_counter() - started
        original, final = result["original"], result["final"]
        evaluation = result["evaluation"]
        drop = result["ratios"]["accuracy_drop"]
        lines.append(
            "| "
            + " | ".join(
                [
                    *label,
                    _fmt(final.get("sparsity"), ".3f"),
                    _fmt(final.get("accuracy_top1"), ".4f"),
                    _fmt(None if drop is None else 100 * drop, "+.2f"),
                    _fmt(_ratio(final, original, "macs")),
                    _fmt(_ratio(final, original, "params")),
                    _fmt(_ratio(final, original, "nonzero_params")),
                    _fmt(_ratio(final, original, "size_zstd_bytes")),
                    _fmt(1 / result["ratios"]["speedup"], ".2f"),
                    _fmt(seconds, ".1f"),
                ]
            )
            + " |"
        )
        print(lines[-1], flush=True)
    total = time.perf_counter() - started_all
    notes = ""
    if original is not None and evaluation is not None:
        notes = (
            f"\nOriginal (digits CNN, fp32 ONNX export of the .pt2): accuracy_top1 "
            f"{original['accuracy_top1']:.4f} on {evaluation['eval_samples']} held-out samples "
            f"(1 sample = {100 / evaluation['eval_samples']:.2f} points), macs "
            f"{original['macs']:,}, params {original['params']:,}, size_zstd_bytes "
            f"{original['size_zstd_bytes']:,}, latency_ms_p50 {original['latency_ms_p50']:.4f}. "
            f"{len(rows)} rows in {total:.0f} s.\n"
        )
    table = "\n".join(lines)
    print("\n" + table + notes)
    if args.out:
        args.out.write_text(table + "\n" + notes)


if __name__ == "__main__":
    main()
