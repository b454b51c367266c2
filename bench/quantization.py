"""Every quantize mode × dtype on the four test models, measured side by side in one run:
size ratio, zstd size ratio, speedup (onnxruntime CPU, batch 1, 1 thread), quality, and
calibration peak memory. Models are trained here in seconds (sklearn digits, a synthetic
token task), so the numbers are real.

    .venv/bin/python -m bench.quantization [--out table.md]

Prints a Markdown table; it is not a test and never gates on absolute times.
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

STEPS: list[tuple[str, dict[str, Any]]] = [
    ("static int8", {"mode": "static", "dtype": "int8"}),
    (
        "static int8 entropy",
        {"mode": "static", "dtype": "int8", "calibration": {"method": "entropy"}},
    ),
    ("static uint8", {"mode": "static", "dtype": "uint8"}),
    ("static int8 prefer speed", {"mode": "static", "dtype": "int8", "prefer": "speed"}),
    ("dynamic int8", {"mode": "dynamic", "dtype": "int8"}),
    ("weight-only int8", {"mode": "weight_only", "dtype": "int8"}),
    ("weight-only int4", {"mode": "weight_only", "dtype": "int4"}),
    ("fp16", {"dtype": "fp16"}),
    ("bf16", {"dtype": "bf16"}),
    ("binary", {"dtype": "binary"}),
    ("ternary", {"dtype": "ternary"}),
    ("qat int8 (3 epochs)", {"mode": "qat", "dtype": "int8", "epochs": 3}),
    (
        "qat binary, all layers (10 epochs)",
        {"mode": "qat", "dtype": "binary", "keep_first_last": False, "epochs": 10},
    ),
    (
        "qat ternary, all layers (10 epochs)",
        {"mode": "qat", "dtype": "ternary", "keep_first_last": False, "epochs": 10},
    ),
]


def _models(tmp: Path) -> dict[str, dict[str, Any]]:
    from engine import examples

    return {
        "digits CNN": examples.write_digits_example(tmp / "cnn"),
        "digits MLP": examples.write_digits_mlp(tmp / "mlp"),
        "transformer": examples.write_token_transformer(tmp / "tr"),
        "separable CNN": examples.write_separable_cnn(tmp / "sep"),
    }


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="compaas-qbench-"))
    models = _models(tmp)
    header = (
        "| model | method | size ratio | zstd ratio | packed ratio | speedup | acc. drop "
        "| cosine | agreement | calib. peak MiB | s |"
    )
    lines = [header, "|" + "---|" * 11]
    for model_name, files in models.items():
        for label, extra in STEPS:
            step = {"op": "quantize", **extra}
            started = time.perf_counter()
            try:
                result = compress(
                    files["pt2"],  # the .pt2 upload: QAT rows need it, the rest export it
                    [step],
                    dataset_path=files["npz"],
                    holdout=0.3,  # every row measured on the same held-out 30 %
                    workdir=tmp / "runs" / f"{model_name}-{label}".replace(" ", "_"),
                )
            except EngineError as exc:
                lines.append(f"| {model_name} | {label} | error: {exc.code} |" + " |" * 8)
                continue
            seconds = time.perf_counter() - started
            original, final = result["original"], result["final"]
            metrics = result["steps"][0]["metrics"]
            peak = metrics.get("calibration_peak_memory_bytes")
            lines.append(
                "| "
                + " | ".join(
                    [
                        model_name,
                        label,
                        _fmt(final["size_bytes"] / original["size_bytes"]),
                        _fmt(final["size_zstd_bytes"] / original["size_zstd_bytes"]),
                        _fmt(
                            1 / metrics["packed_compression_ratio"]
                            if "packed_compression_ratio" in metrics
                            else None
                        ),
                        _fmt(result["ratios"]["speedup"], ".2f"),
                        _fmt(result["ratios"]["accuracy_drop"], "+.4f"),
                        _fmt(final.get("cosine_similarity"), ".4f"),
                        _fmt(final.get("agreement_top1")),
                        _fmt(peak / 2**20 if peak else None, ".1f"),
                        _fmt(seconds, ".1f"),
                    ]
                )
                + " |"
            )
        print("\n".join(lines[-len(STEPS) :]), flush=True)
    accuracy = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in models.items())
    table = "\n".join(lines)
    notes = (
        f"\nFloat accuracy (held out): {accuracy}. Size ratios are result/original (smaller is "
        "better); packed ratio is the .cbin file / original ONNX; speedup is original p50 / "
        "result p50 at batch 1, 1 thread.\n"
    )
    print("\n" + table + notes)
    if args.out:
        args.out.write_text(table + "\n" + notes)


if __name__ == "__main__":
    main()
