"""The kinds of event `engine.pipeline` reports while it runs (the `type` of each event dict)."""

from __future__ import annotations

from enum import StrEnum


class EventKind(StrEnum):
    PROGRESS = "progress"  # progress (0..1), message
    ORIGINAL_MEASURED = "original_measured"  # metrics
    STEP_STARTED = "step_started"  # index, op
    # index, metrics, quality (engine.quality.verdict), warnings, details, artifact (a checkpoint)
    STEP_FINISHED = "step_finished"
    LOG = "log"  # level, message
    # the auto search: one per candidate built, reused from an earlier attempt or skipped
    # (engine.search.auto.Candidate.record); the worker keeps them so a retry reuses them
    CANDIDATE = "candidate"
