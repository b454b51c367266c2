"""`measured_on`: what a metrics block was measured on (docs/metrics.md), computed once a job.

The data (dataset id and sha256, samples, held-out split), the runtime and its version, the
CPU (model and the instruction sets integer kernels depend on), threads and batch. Every
metrics block of a job (original, each step, final) carries the same one.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Any

# The CPU flags latency depends on (x86 /proc/cpuinfo `flags`, Arm `Features`): vector widths,
# and the integer / bf16 dot-product instructions int8 kernels use.
CPU_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "neon",
    "asimd",
    "asimddp",
    "i8mm",
    "sve",
    "sve2",
    "bf16",
)


@functools.cache
def cpu(cpuinfo: str = "/proc/cpuinfo") -> dict[str, Any]:
    """{"model": name or None, "flags": the CPU_FLAGS this CPU has, sorted}."""
    model: str | None = None
    found: set[str] = set()
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if model is None and name in ("model name", "hardware", "cpu model"):
            model = value.strip() or None
        elif name in ("flags", "features"):
            found.update(value.split())
    return {
        "model": model or platform.processor() or platform.machine() or None,
        "flags": sorted(f for f in CPU_FLAGS if f in found),
    }


def runtime() -> tuple[str, str]:
    """(name, version) of the runtime every model is measured in."""
    import onnxruntime

    return "onnxruntime", str(onnxruntime.__version__)


def describe(
    *,
    dataset_id: str | None,
    dataset_sha256: str | None,
    source: str,
    samples: int,
    holdout: float,
    threads: int,
    batch: int | None,
) -> dict[str, Any]:
    """The `measured_on` block of a job's metrics (see the module docstring for the fields)."""
    name, version = runtime()
    host = cpu()
    return {
        "dataset_id": dataset_id,
        "dataset_sha256": dataset_sha256,
        "data_source": source,  # "dataset", or "synthetic" (random-normal inputs, no dataset)
        "samples": samples,
        # "held_out": samples the steps did not train or calibrate on; "all": the job's data
        "split": "held_out" if holdout > 0 and source == "dataset" else "all",
        "holdout": holdout,
        "runtime": name,
        "runtime_version": version,
        "cpu_model": host["model"],
        "cpu_flags": host["flags"],
        "threads": threads,
        "batch": batch or 1,
    }
