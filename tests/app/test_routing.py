"""Which queue a job goes to (app.services.routing.job_queue), as a pure function of the
settings, the model's format and the pipeline; where inspections go, and the worker groups
`compaas up` starts for them."""

from __future__ import annotations

from typing import Any

import pytest

from app.cli import embedded_worker_commands, worker_name
from app.config import Settings
from app.services.routing import inspection_queue, job_queue

FINE_TUNE = [{"op": "fine_tune", "epochs": 1}]
DISTILL = [{"op": "low_rank", "energy": 0.9}, {"op": "distill", "epochs": 1}]
QAT = [{"op": "quantize", "mode": "qat", "dtype": "int8"}]
GRADUAL = [
    {"op": "prune", "granularity": "channels", "sparsity": 0.3,
     "schedule": {"kind": "gradual", "steps": 2, "epochs_per_step": 1}},
]  # fmt: skip
ONE_SHOT = [{"op": "prune", "granularity": "unstructured", "sparsity": 0.5}]
LOW_RANK = [{"op": "low_rank", "energy": 0.9}]
DYNAMIC = [{"op": "quantize", "mode": "dynamic", "dtype": "int8"}]
AUTO = [{"op": "auto", "budget": {"max_accuracy_drop": 0.01}}]


def _settings(gpu_queue: str) -> Settings:
    return Settings(worker_queues="cpu,other", gpu_queue=gpu_queue, data_dir="/tmp/unused")


@pytest.mark.parametrize("pipeline", [FINE_TUNE, DISTILL, QAT, GRADUAL])
def test_a_torch_program_that_trains_goes_to_the_gpu_queue(pipeline: list[dict[str, Any]]) -> None:
    assert job_queue(_settings("gpu"), "pt2", pipeline) == "gpu"


@pytest.mark.parametrize("pipeline", [ONE_SHOT, LOW_RANK, DYNAMIC])
def test_a_pipeline_that_trains_nothing_stays_on_the_cpu_queue(
    pipeline: list[dict[str, Any]],
) -> None:
    assert job_queue(_settings("gpu"), "pt2", pipeline) == "cpu"


def test_onnx_models_and_deleted_models_stay_on_the_cpu_queue() -> None:
    assert job_queue(_settings("gpu"), "onnx", ONE_SHOT) == "cpu"
    assert job_queue(_settings("gpu"), None, FINE_TUNE) == "cpu"


def test_an_auto_search_goes_where_its_distillation_candidates_train() -> None:
    # on a .pt2 its catalog holds prune + distill candidates; an ONNX upload's never trains
    assert job_queue(_settings("gpu"), "pt2", AUTO) == "gpu"
    assert job_queue(_settings("gpu"), "onnx", AUTO) == "cpu"
    assert job_queue(_settings(""), "pt2", AUTO) == "cpu"


def test_without_gpu_workers_everything_goes_to_the_default_queue() -> None:
    for pipeline in (FINE_TUNE, DISTILL, QAT, GRADUAL, DYNAMIC):
        assert job_queue(_settings(""), "pt2", pipeline) == "cpu"


def test_a_pipeline_the_worker_would_refuse_is_not_sent_to_the_gpu() -> None:
    assert job_queue(_settings("gpu"), "pt2", [{"op": "no_such_op"}]) == "cpu"


def test_the_embedded_workers_consume_every_queue_the_api_publishes_to() -> None:
    assert _settings("gpu").published_queues == "cpu,other,gpu,inspect"
    assert _settings("").published_queues == "cpu,other,inspect"
    assert Settings(worker_queues="gpu", gpu_queue="gpu").published_queues == "gpu,inspect"
    shared = Settings(worker_queues="cpu", inspect_queue="", data_dir="/tmp/unused")
    for settings in (_settings("gpu"), _settings(""), shared):
        commands = embedded_worker_commands(settings, 2)
        consumed = [_flag(c, "--queues").split(",") for c in commands]
        assert sorted(q for qs in consumed for q in qs) == sorted(
            settings.published_queues.split(",")
        )


def _flag(command: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in command if a.startswith(f"{name}=")]
    return value


def test_inspections_have_a_queue_and_a_worker_of_their_own() -> None:
    """`compaas up` runs two worker groups: the jobs' (its --concurrency) and one process on the
    inspection queue alone, with a node name of its own."""
    settings = _settings("gpu")
    assert inspection_queue(settings) == "inspect"
    assert settings.job_queues == "cpu,other,gpu" and settings.inspects_apart
    jobs, inspections = embedded_worker_commands(settings, 3)
    assert (_flag(jobs, "--queues"), _flag(jobs, "--concurrency")) == ("cpu,other,gpu", "3")
    assert (_flag(inspections, "--queues"), _flag(inspections, "--concurrency")) == (
        "inspect",
        "1",
    )
    assert _flag(jobs, "--hostname") == "compaas@%h"
    assert _flag(inspections, "--hostname") == "compaas-inspect@%h"
    assert worker_name(settings, "inspect") == "compaas-inspect"
    assert worker_name(settings, "cpu,inspect") == "compaas"


def test_an_empty_inspect_queue_puts_inspections_back_on_the_default_queue() -> None:
    """COMPAAS_INSPECT_QUEUE="" (or the default queue's name): inspections wait behind the jobs
    of the default queue, as with one worker for everything; `compaas up` starts one group."""
    for name in ("", "cpu"):
        settings = Settings(worker_queues="cpu,other", inspect_queue=name, data_dir="/tmp/unused")
        assert inspection_queue(settings) == "cpu"
        assert not settings.inspects_apart
        assert settings.published_queues == settings.job_queues == "cpu,other"
        (only,) = embedded_worker_commands(settings, 1)
        assert _flag(only, "--queues") == "cpu,other"


def test_the_device_setting_is_checked_when_the_settings_load() -> None:
    assert Settings().device == "auto"
    with pytest.raises(ValueError, match="device"):
        Settings(device="tpu")  # type: ignore[arg-type]
