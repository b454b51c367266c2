"""The child process that loads user models runs under memory, time and network limits."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from engine.spec import CompressSpec, InspectSpec, Resume
from worker import sandbox


def test_result_comes_back_from_the_child() -> None:
    assert sandbox.run(sandbox.SelfTestSpec(), sandbox.Limits(60, 2048)) == {"ok": True}


def test_memory_limit_stops_an_allocation_past_it() -> None:
    with pytest.raises(sandbox.SandboxError) as err:
        sandbox.run(sandbox.SelfTestSpec(what="allocate", mb=3000), sandbox.Limits(60, 1024))
    assert err.value.code == "memory_limit_exceeded"
    assert "1024 MiB" in err.value.detail
    assert err.value.reason == "memory"  # /metrics compaas_sandbox_kills_total{reason}


def test_allocation_under_the_limit_succeeds() -> None:
    out = sandbox.run(sandbox.SelfTestSpec(what="allocate", mb=100), sandbox.Limits(60, 1024))
    assert out == {"allocated": 100 * 1024 * 1024}


def test_a_gpu_child_is_still_held_to_its_memory_limit() -> None:
    """A child that may use CUDA has its memory limit on data, not address space (CUDA
    reserves far more address space than it uses): an allocation past it still fails."""
    limits = sandbox.Limits(60, 1024, gpu=True)
    with pytest.raises(sandbox.SandboxError) as err:
        sandbox.run(sandbox.SelfTestSpec(what="allocate", mb=3000), limits)
    assert err.value.code == "memory_limit_exceeded"
    assert sandbox.run(sandbox.SelfTestSpec(what="allocate", mb=100), limits) == {
        "allocated": 100 * 1024 * 1024
    }
    assert sandbox.run(sandbox.ProtectionsSpec(), limits)["rlimits"] is True


@pytest.mark.parametrize(
    ("setting", "gpus", "device"),
    [
        ("auto", [], "cpu"),
        ("auto", ["/dev/nvidia0", "/dev/nvidiactl"], "auto"),
        ("cuda", [], "cuda"),
        ("cpu", ["/dev/nvidia0"], "cpu"),
    ],
)
def test_a_host_without_nvidia_devices_runs_auto_jobs_as_cpu_jobs(
    setting: str, gpus: list[str], device: str
) -> None:
    assert sandbox.device_for(setting, gpus) == device  # type: ignore[arg-type]


def test_wall_time_limit_kills_the_child() -> None:
    with pytest.raises(sandbox.SandboxError) as err:
        sandbox.run(sandbox.SelfTestSpec(what="sleep", seconds=30), sandbox.Limits(2, 1024))
    assert err.value.code == "time_limit_exceeded"
    assert err.value.reason == "time"


@pytest.mark.slow
def test_network_is_refused_inside_the_child() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted: list[bool] = []

    def accept() -> None:
        server.settimeout(5)
        try:
            server.accept()[0].close()
            accepted.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=accept)
    thread.start()
    out = sandbox.run(
        sandbox.SelfTestSpec(what="connect", host="127.0.0.1", port=port),
        sandbox.Limits(30, 1024),
    )
    thread.join()
    server.close()
    assert out["connected"] is False
    assert not accepted


def test_a_crash_is_reported_with_the_signal() -> None:
    with pytest.raises(sandbox.SandboxError) as err:
        sandbox.run(sandbox.SelfTestSpec(what="segfault"), sandbox.Limits(30, 1024))
    assert err.value.code == "worker_crashed"
    assert "SIGSEGV" in err.value.detail
    assert err.value.reason == "signal"


def test_parent_can_abort_the_child() -> None:
    with pytest.raises(sandbox.SandboxAborted):
        sandbox.run(
            sandbox.SelfTestSpec(what="sleep", seconds=30),
            sandbox.Limits(60, 1024),
            should_continue=lambda: False,
        )


def test_the_spec_crosses_the_pipe_as_json_and_comes_back_typed(tmp_path: Path) -> None:
    spec = CompressSpec(
        model_path=str(tmp_path / "model.onnx"),
        pipeline=[{"op": "quantize", "dtype": "fp16"}],
        workdir=str(tmp_path / "out"),
        holdout=0.2,
        latency_threads=2,
        models={"m1": str(tmp_path / "student.pt2")},
        resume=Resume(start_index=1, model_path=str(tmp_path / "c.onnx"), original_metrics={}),
    )
    box = sandbox.Box(cwd="/c", tmp="/t", read=sandbox.input_paths(spec), write=[], require=[])
    sent = sandbox.ChildInput(spec=spec, box=box, memory_limit_mb=512).model_dump_json()
    received = sandbox.ChildInput.model_validate_json(sent)
    assert received.spec == spec
    assert box.read == [spec.model_path, str(tmp_path / "student.pt2"), str(tmp_path / "c.onnx")]
    inspect = sandbox.ChildInput(spec=InspectSpec(model_path="/m.pt2"), box=box, memory_limit_mb=1)
    assert isinstance(
        sandbox.ChildInput.model_validate_json(inspect.model_dump_json()).spec, InspectSpec
    )
