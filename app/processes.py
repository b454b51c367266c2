"""How many API processes `compaas api` runs: COMPAAS_API_WORKERS, or one per usable core."""

from __future__ import annotations

import math
import os
from pathlib import Path

from app.config import Settings

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota
    (`docker run --cpus`, compose `cpus:`), rounded up."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return max(1, cores)
    if quota != "max" and int(period) > 0:
        cores = min(cores, math.ceil(int(quota) / int(period)))
    return max(1, cores)


class TooManyProcesses(ValueError):
    """More than one API process with the reconciler running inside the API."""


def api_processes(settings: Settings, cpus: int | None = None) -> int:
    """The number of API processes: api_workers if set, else one per usable core; one when the
    API runs the embedded reconciler (every process would run its own)."""
    if settings.run_reconciler:
        if settings.api_workers > 1:
            raise TooManyProcesses(
                f"COMPAAS_API_WORKERS={settings.api_workers}, but this API runs the reconciler "
                "in-process (embedded mode), and every API process would run one. Set "
                "COMPAAS_RUN_RECONCILER=false and run `compaas reconciler` once beside the API, "
                "or run one API process."
            )
        return 1
    if settings.api_workers:
        return settings.api_workers
    return cpus if cpus is not None else available_cpus()
