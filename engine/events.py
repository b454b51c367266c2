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


# A job's progress: measuring the original takes the first 20 %, then the steps share the next
# 75 % equally (the last 5 % is the final check). Clients map a progress event back onto the
# running step with it.
STEPS_START, STEPS_SHARE = 0.2, 0.75


def step_span(index: int, steps: int) -> tuple[float, float]:
    """The part of the job's 0..1 progress that step `index` of `steps` covers."""
    return (
        STEPS_START + STEPS_SHARE * index / steps,
        STEPS_START + STEPS_SHARE * (index + 1) / steps,
    )
