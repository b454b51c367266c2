"""Every preset and every op alone on the digits CNN and MLP (.pt2 uploads), measured in one run
at the engine level (compress(), temp dirs, no API): size, storage, MACs, latency, accuracy.

    .venv/bin/python -m bench.pipelines [--out table.md]

Presets come from engine.config.preset_pipeline(name). Every row uses holdout 0.3, so all
rows of a model are measured on the same held-out samples. Ratios are result/original (smaller
is better): size = the final ONNX file; storage = what is stored or sent (the cpz archive of a
weight_share step, the packed file of binary/ternary, else the zstd-compressed ONNX) over the
original fp32 ONNX file, as Deep Compression counts it; latency = 1/speedup, both models timed
side by side (onnxruntime CPU, batch 1, 1 thread). Prints a Markdown table; it is not a test
and never gates on absolute times.
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

HOLDOUT = 0.3
GRADUAL = {"kind": "gradual", "steps": 3, "epochs_per_step": 3}

# (model, label, pipeline)
ROWS: list[tuple[str, str, list[dict[str, Any]]]] = [
    ("CNN", "preset edge-int8", preset_pipeline("edge-int8")),
    ("MLP", "preset edge-int8", preset_pipeline("edge-int8")),
    ("CNN", "preset fp16", preset_pipeline("fp16")),
    ("MLP", "preset fp16", preset_pipeline("fp16")),
    ("CNN", "preset int4-weights (Gemm layers only)", preset_pipeline("int4-weights")),
    ("MLP", "preset int4-weights", preset_pipeline("int4-weights")),
    ("CNN", "preset tiny", preset_pipeline("tiny")),
    ("MLP", "preset deep-compression", preset_pipeline("deep-compression")),
    (
        "CNN",
        "prune channels 50 % gradual 3×3",
        [{"op": "prune", "granularity": "channels", "sparsity": 0.5, "schedule": GRADUAL}],
    ),
    (
        "MLP",
        "prune channels 50 % gradual 3×3",
        [{"op": "prune", "granularity": "channels", "sparsity": 0.5, "schedule": GRADUAL}],
    ),
    (
        "CNN",
        "prune unstructured 90 % gradual 3×3",
        [{"op": "prune", "granularity": "unstructured", "sparsity": 0.9, "schedule": GRADUAL}],
    ),
    (
        "MLP",
        "prune unstructured 90 % gradual 3×3",
        [{"op": "prune", "granularity": "unstructured", "sparsity": 0.9, "schedule": GRADUAL}],
    ),
    ("CNN", "distill width 0.5 student", [{"op": "distill", "student": "width", "width": 0.5}]),
    ("MLP", "distill width 0.5 student", [{"op": "distill", "student": "width", "width": 0.5}]),
    (
        "CNN",
        "low_rank energy 0.9 + fine_tune 5",
        [{"op": "low_rank", "energy": 0.9}, {"op": "fine_tune", "epochs": 5}],
    ),
    (
        "MLP",
        "low_rank energy 0.9 + fine_tune 5",
        [{"op": "low_rank", "energy": 0.9}, {"op": "fine_tune", "epochs": 5}],
    ),
    ("CNN", "weight_share 5 bits", [{"op": "weight_share", "bits": 5}]),
    ("MLP", "weight_share 5 bits", [{"op": "weight_share", "bits": 5}]),
    ("CNN", "quantize static int8", [{"op": "quantize", "mode": "static", "dtype": "int8"}]),
    ("MLP", "quantize static int8", [{"op": "quantize", "mode": "static", "dtype": "int8"}]),
]

# Han, Mao & Dally, "Deep Compression" (ICLR 2016), Table 1: LeNet-300-100 on MNIST, top-1
# error 1.64 % → 1.58 %, 1070 KB → 27 KB (40×).
PAPER_ROW = (
    "| paper | Deep Compression (Han et al. 2016), LeNet-300-100 on MNIST, 1070 KB → 27 KB "
    "| — | 0.025 (40×) | — | — | −0.06 | 98.36 % → 98.42 % | — |"
)
COLUMNS = (
    "model",
    "pipeline",
    "size",
    "storage",
    "MACs",
    "latency",
    "drop (points)",
    "accuracy",
    "s",
)


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def _storage(final: dict[str, Any]) -> tuple[int, str]:
    for key, name in (("archive_size_bytes", "cpz"), ("packed_size_bytes", "packed")):
        if key in final:
            return int(final[key]), name
    return int(final["size_zstd_bytes"]), "zstd"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    from engine import examples

    tmp = Path(tempfile.mkdtemp(prefix="compaas-plbench-"))
    models = {
        "CNN": examples.write_digits_example(tmp / "cnn"),
        "MLP": examples.write_digits_mlp(tmp / "mlp"),
    }
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    print("\n".join(lines), flush=True)
    originals: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for i, (model, label, pipeline) in enumerate(ROWS):
        files = models[model]
        started = time.perf_counter()
        try:
            result = compress(
                files["pt2"],
                pipeline,
                dataset_path=files["npz"],
                workdir=tmp / "runs" / str(i),
                holdout=HOLDOUT,
            )
        except EngineError as exc:
            lines.append(f"| {model} | {label} | error: {exc.code} |" + " |" * 6)
            print(lines[-1], flush=True)
            continue
        seconds = time.perf_counter() - started
        original, final = result["original"], result["final"]
        originals[model] = (original, result["evaluation"])
        stored, source = _storage(final)
        drop = result["ratios"]["accuracy_drop"]
        lines.append(
            "| "
            + " | ".join(
                [
                    model,
                    label,
                    _fmt(final["size_bytes"] / original["size_bytes"]),
                    f"{stored / original['size_bytes']:.3f} ({source}, "
                    f"{original['size_bytes'] / stored:.1f}×)",
                    _fmt(
                        final["macs"] / original["macs"]
                        if original.get("macs") and final.get("macs")
                        else None
                    ),
                    _fmt(1 / result["ratios"]["speedup"], ".2f"),
                    _fmt(None if drop is None else 100 * drop, "+.2f"),
                    f"{100 * original['accuracy_top1']:.2f} % → "
                    f"{100 * final['accuracy_top1']:.2f} %",
                    _fmt(seconds, ".1f"),
                ]
            )
            + " |"
        )
        print(lines[-1], flush=True)
        if label == "preset deep-compression":
            lines.append(PAPER_ROW)
            print(lines[-1], flush=True)
    notes = ["", "Originals (fp32 ONNX export of the .pt2 upload):"]
    for model, (original, evaluation) in originals.items():
        notes.append(
            f"- {model}: {original['size_bytes']:,} bytes ({original['size_zstd_bytes']:,} "
            f"zstd), {original['params']:,} params, {original['macs']:,} MACs, accuracy_top1 "
            f"{original['accuracy_top1']:.4f} on {evaluation['eval_samples']} held-out samples "
            f"(1 sample = {100 / evaluation['eval_samples']:.2f} points), latency_ms_p50 "
            f"{original['latency_ms_p50']:.4f}."
        )
    table = "\n".join(lines)
    text = table + "\n" + "\n".join(notes) + "\n"
    print("\n" + text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
