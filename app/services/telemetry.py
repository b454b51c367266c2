"""What /metrics says about the whole deployment, read at scrape time from shared state.

Jobs, steps, sandbox kills, worker heartbeats and the janitor's totals are facts about every
API, worker and reconciler process on every host, so they are read from Postgres (and queue
depth from the broker) when Prometheus scrapes, not counted in one process's memory: any API
process answers the same numbers, they survive restarts, and a worker never has to be scraped.
A job's or step's duration is observed when its row gets `finished_at` (the worker's fenced
final write, a cancel, the reconciler giving up), so each is counted exactly once. The
readings are cached for CACHE_S, so a scrape every few seconds from several Prometheus
servers costs one set of aggregate queries.

Per-process figures (request latency) live in `app.api.telemetry`; `exposition` merges both.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from prometheus_client import REGISTRY, CollectorRegistry, disable_created_metrics, multiprocess
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from app import queue
from app.config import Settings
from app.db.base import utcnow
from app.db.models import JobStatus, ModelStatus
from app.db.repositories.janitor import JanitorRepository
from app.db.repositories.operations import Buckets, OperationsRepository, Window
from app.db.session import session_scope
from app.services import janitor

log = logging.getLogger(__name__)
# No `_created` series beside every counter and histogram: Prometheus does not need them.
disable_created_metrics()

CACHE_S = 5.0
# Seconds: a quick inspection-sized step up to a two-hour training job.
DURATION_BUCKETS: tuple[float, ...] = (
    0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200,
)  # fmt: skip
WORKERS_SEEN_WITHIN = timedelta(days=1)
# Rows observed longer ago than this are settled: aggregated once, then kept by the collector
# (well above the time between a row's finished_at and its commit).
SETTLE_S = 600.0
HISTOGRAMS = ("job_durations", "queue_waits", "step_durations")
# Why a sandbox child was stopped (worker.sandbox sets SandboxError.reason).
KILL_REASONS = ("memory", "time", "cpu_time", "file_size", "seccomp", "signal", "aborted")


def record_sandbox_kill(settings: Settings, reason: str) -> None:
    """Count one sandbox child stopped for `reason` (the worker calls this; never raises)."""
    try:
        with session_scope(settings.database_url) as session:
            OperationsRepository(session).add_sandbox_kill(reason, utcnow())
    except Exception:
        log.exception("could not count a sandbox kill (%s)", reason)


@dataclass
class Reading:
    """One scrape's worth of shared state; `up` says which sources answered."""

    up: dict[str, bool] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)
    models: dict[str, int] = field(default_factory=dict)
    job_durations: dict[tuple[str, ...], Buckets] = field(default_factory=dict)
    queue_waits: dict[tuple[str, ...], Buckets] = field(default_factory=dict)
    step_durations: dict[tuple[str, ...], Buckets] = field(default_factory=dict)
    kills: dict[str, int] = field(default_factory=dict)
    workers: list[tuple[str, float, float]] = field(default_factory=list)
    reclaimed: dict[str, tuple[int, int]] = field(default_factory=dict)
    candidates: tuple[int, int] = (0, 0)
    queue_depth: dict[str, int] = field(default_factory=dict)


Series = dict[tuple[str, ...], Buckets]


@dataclass
class Settled:
    """The duration histograms of rows observed (finished, or claimed) before `until`, kept by
    the collector so that a scrape reads only rows newer than that: a finished row does not
    change, so the full table is aggregated once per process and each later scrape reads the
    last SETTLE_S of rows (an index range) plus what settled since the previous one."""

    until: datetime | None = None
    series: dict[str, Series] = field(default_factory=lambda: {n: {} for n in HISTOGRAMS})


def merge(a: Series, b: Series) -> Series:
    return {key: a.get(key, Buckets()).plus(b.get(key, Buckets())) for key in a.keys() | b.keys()}


def read(settings: Settings, settled: Settled | None = None) -> Reading:
    """Everything the cluster metrics show, from the database and the broker. `settled`
    (updated in place) carries the histograms of rows read before."""
    settled = settled if settled is not None else Settled()
    reading = Reading()
    try:
        with session_scope(settings.database_url) as session:
            ops = OperationsRepository(session)
            reading.jobs, reading.models = ops.jobs_by_status(), ops.models_by_status()
            queries = {
                "job_durations": ops.job_durations,
                "queue_waits": ops.job_queue_waits,
                "step_durations": ops.step_durations,
            }
            cut = utcnow() - timedelta(seconds=SETTLE_S)
            if settled.until is not None:
                cut = max(cut, settled.until)
            newly = {n: q(Window(DURATION_BUCKETS, settled.until, cut)) for n, q in queries.items()}
            recent = {n: q(Window(DURATION_BUCKETS, cut, None)) for n, q in queries.items()}
            reading.kills = ops.sandbox_kills()
            reading.workers = [
                (host, started.timestamp(), seen.timestamp())
                for host, started, seen in ops.worker_hosts(utcnow() - WORKERS_SEEN_WITHIN)
            ]
            cleaned = JanitorRepository(session)
            reading.reclaimed, reading.candidates = cleaned.reclaimed(), cleaned.candidate_count()
        for name in HISTOGRAMS:  # only once every query of this reading succeeded
            settled.series[name] = merge(settled.series[name], newly[name])
        settled.until = cut
        reading.job_durations = merge(settled.series["job_durations"], recent["job_durations"])
        reading.queue_waits = merge(settled.series["queue_waits"], recent["queue_waits"])
        reading.step_durations = merge(settled.series["step_durations"], recent["step_durations"])
        reading.up["database"] = True
    except Exception:
        log.exception("metrics: the database did not answer")
        reading.up["database"] = False
    try:
        reading.queue_depth = queue.depths(settings)
        reading.up["broker"] = True
    except Exception as exc:
        log.warning("metrics: the broker did not answer: %s", type(exc).__name__)
        reading.up["broker"] = False
    return reading


def _histogram(
    name: str, doc: str, labels: Sequence[str], series: dict[tuple[str, ...], Buckets]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=list(labels))
    for values, found in sorted(series.items()):
        buckets: list[tuple[str, float]] = [
            (str(float(bound)), float(c))
            for bound, c in zip(DURATION_BUCKETS, found.cumulative, strict=True)
        ]
        buckets.append(("+Inf", float(found.count)))
        family.add_metric(list(values), buckets, found.total)
    return family


def families(reading: Reading) -> Iterator[Metric]:
    """The cluster metrics of one reading, as Prometheus metric families."""
    up = GaugeMetricFamily(
        "compaas_metrics_source_up",
        "1 when this scrape could read the source (database, broker), else 0",
        labels=["source"],
    )
    for source, ok in sorted(reading.up.items()):
        up.add_metric([source], 1.0 if ok else 0.0)
    yield up
    if reading.up.get("database"):
        yield from _database_families(reading)
    depth = GaugeMetricFamily(
        "compaas_queue_depth",
        "Messages waiting in each broker queue the API publishes to (not yet taken by a worker)",
        labels=["queue"],
    )
    for name, count in sorted(reading.queue_depth.items()):
        depth.add_metric([name], float(count))
    yield depth


def _database_families(reading: Reading) -> Iterator[Metric]:
    jobs = GaugeMetricFamily("compaas_jobs", "Jobs by status, every team", labels=["status"])
    for status in JobStatus:
        jobs.add_metric([str(status)], float(reading.jobs.get(status, 0)))
    yield jobs
    models = GaugeMetricFamily("compaas_models", "Models by status, every team", labels=["status"])
    for model_status in ModelStatus:
        models.add_metric([str(model_status)], float(reading.models.get(model_status, 0)))
    yield models
    yield _histogram(
        "compaas_job_duration_seconds",
        "Finished jobs: seconds from the last claim by a worker to the final status",
        ["status"],
        reading.job_durations,
    )
    yield _histogram(
        "compaas_job_queue_wait_seconds",
        "Claimed jobs: seconds from creation to the (last) claim by a worker",
        [],
        reading.queue_waits,
    )
    yield _histogram(
        "compaas_job_step_duration_seconds",
        "Finished job steps: seconds from start to finish, by op and status",
        ["op", "status"],
        reading.step_durations,
    )
    kills = CounterMetricFamily(
        "compaas_sandbox_kills",
        "Sandbox children stopped by a limit or a signal, by reason",
        labels=["reason"],
    )
    for reason in sorted(set(KILL_REASONS) | set(reading.kills)):
        kills.add_metric([reason], float(reading.kills.get(reason, 0)))
    yield kills
    seen = GaugeMetricFamily(
        "compaas_worker_last_seen_timestamp_seconds",
        "Unix time of each worker host's last heartbeat (hosts seen within a day)",
        labels=["host"],
    )
    started = GaugeMetricFamily(
        "compaas_worker_started_timestamp_seconds",
        "Unix time each worker host's worker last started",
        labels=["host"],
    )
    for host, start_at, seen_at in sorted(reading.workers):
        seen.add_metric([host], seen_at)
        started.add_metric([host], start_at)
    yield seen
    yield started
    for index, unit in enumerate(("files", "bytes")):
        reclaimed = CounterMetricFamily(
            f"compaas_janitor_reclaimed_{unit}",
            f"What the janitor removed ({unit}), by kind",
            labels=["kind"],
        )
        for kind in janitor.KINDS:
            reclaimed.add_metric([kind], float(reading.reclaimed.get(kind, (0, 0))[index]))
        yield reclaimed
    watching, watching_bytes = reading.candidates
    yield GaugeMetricFamily(
        "compaas_janitor_orphan_candidates",
        "Blobs without a row, waiting out their grace period",
        value=float(watching),
    )
    yield GaugeMetricFamily(
        "compaas_janitor_orphan_candidate_bytes",
        "Bytes of the blobs waiting out their grace period",
        value=float(watching_bytes),
    )


class ClusterCollector(Collector):
    """A prometheus-client collector over `read(settings)`, cached for `cache_s`."""

    def __init__(self, settings: Settings, cache_s: float = CACHE_S) -> None:
        self.settings = settings
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._reading: Reading | None = None
        self._settled = Settled()

    def reading(self) -> Reading:
        with self._lock:
            if self._reading is None or time.monotonic() - self._at >= self.cache_s:
                self._reading = read(self.settings, self._settled)
                self._at = time.monotonic()
            return self._reading

    def collect(self) -> Iterable[Metric]:
        return list(families(self.reading()))


class _Forward(Collector):
    """Yields what another registry collects (this process's own metrics)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        return self.registry.collect()


def exposition(
    cluster: Collector, accept: str | None = None, own: CollectorRegistry | None = None
) -> tuple[bytes, str]:
    """The exposition (body, content type) in the format `accept` asks for (Prometheus text or
    OpenMetrics): this API's process metrics (every API process's, merged, when
    PROMETHEUS_MULTIPROC_DIR is set: `compaas api` with several processes) and the cluster's."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_Forward(own or REGISTRY))
    registry.register(cluster)
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
