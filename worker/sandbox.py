"""Run engine work in a child process with memory, CPU-time, wall-time and no-network limits.

The parent (a Celery task) never loads a user's model itself. The child receives a JSON spec,
writes JSON-line events to a pipe, and exits; the parent relays events and enforces the limits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

from pydantic import BaseModel, ConfigDict, Field

from engine.spec import CompressSpec, InspectSpec
from engine.torchgraph.device import DeviceSetting
from worker.confine import (
    GPU_READ,
    PROTECTIONS,
    REQUIREMENTS,
    SYSTEM_READ,
    SYSTEM_WRITE,
    child_env,
    deny_syscalls,
    die_with_parent,
    drop_privileges,
    enter_netns,
    env_scrubbed,
    gpu_devices,
    interpreter_paths,
    isolated_cwd,
    preload_seccomp,
    private_tmp,
    restrict_filesystem,
    rlimits_set,
    set_no_new_privs,
    set_rlimits,
)

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
# The child imports the `worker` and `engine` packages from ROOT by file location: nothing from its
# working directory, PYTHONPATH or the parent's cwd is ever on sys.path (`-I`), and ROOT itself is
# not on sys.path either, so a module planted next to the code is not importable.
PACKAGES = ("engine", "worker")
BOOTSTRAP = (
    "import sys, importlib.util as u; root = sys.argv[1]\n"
    "for name in ('engine', 'worker'):\n"
    "    spec = u.spec_from_file_location(name, f'{root}/{name}/__init__.py', "
    "submodule_search_locations=[f'{root}/{name}'])\n"
    "    module = u.module_from_spec(spec); sys.modules[name] = module\n"
    "    spec.loader.exec_module(module)\n"
    "from worker.sandbox import main; sys.exit(main(int(sys.argv[2])))"
)
NPROC_LIMIT = 512
NOFILE_LIMIT = 1024
DEFAULT_REQUIRE = ("network",)


class ProtectionsSpec(BaseModel):
    """Report which protections a child gets on this host."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    action: Literal["protections"] = "protections"


class SelfTestSpec(BaseModel):
    """Probe a limit from inside the child (used by tests): see `_selftest`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    action: Literal["selftest"] = "selftest"
    what: str = "ok"
    mb: int = 0
    seconds: float = 0.0
    host: str = ""
    port: int = 0
    path: str = ""
    args: list[str] = Field(default_factory=lambda: ["-c", "true"])
    family: int = socket.AF_INET


Spec = Annotated[
    InspectSpec | CompressSpec | ProtectionsSpec | SelfTestSpec, Field(discriminator="action")
]


class Box(BaseModel):
    """The child's private directories and what it may read and write."""

    cwd: str
    tmp: str
    read: list[str]
    write: list[str]
    require: list[str]
    devices: list[str] = Field(default_factory=list)  # GPU device nodes it may open


class ChildInput(BaseModel):
    """What the parent writes to the child's stdin (as JSON)."""

    spec: Spec
    box: Box
    memory_limit_mb: int


class Reply(StrEnum):
    """The child's own messages on the event pipe; every other event is relayed to `on_event`."""

    RESULT = "result"  # result
    ERROR = "error"  # code, detail, field
    PROTECTIONS = "protections"  # protections


class SandboxError(Exception):
    """The child reported an error or was stopped by a limit; code/detail are user-facing.

    `reason` (ops-metrics: /metrics compaas_sandbox_kills) says why a child was stopped: memory,
    time (wall clock), cpu_time, file_size, seccomp (SIGSYS), signal (another signal); None when
    the child reported an ordinary error itself."""

    def __init__(
        self, code: str, detail: str, field: str | None = None, reason: str | None = None
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.field = field
        self.reason = reason if reason is not None else MEMORY_REASON.get(code)


# A child that caught its own allocation failure reports it as an error; it was stopped by the
# memory limit all the same.
MEMORY_REASON = {"memory_limit_exceeded": "memory"}


class SandboxAborted(Exception):
    """The parent asked the child to stop (job canceled or lease lost)."""


@dataclass
class Limits:
    wall_time_s: float
    memory_mb: int
    # The child may train on this host's NVIDIA GPUs: their device nodes are opened to it and
    # its memory limit is on data rather than address space (set_rlimits).
    gpu: bool = False


def device_for(setting: DeviceSetting, gpus: Iterable[str] | None = None) -> DeviceSetting:
    """The device a job's engine is asked for: "auto" on a host without NVIDIA device nodes is
    "cpu", so such a worker's child is confined exactly as a CPU worker's; "cuda" stays, for
    the engine to refuse with a clear error when torch cannot use a GPU."""
    found = gpu_devices() if gpus is None else list(gpus)
    return "cpu" if setting == "auto" and not found else setting


def _limit_child(memory_mb: int, cpu_s: int, gpu: bool) -> Callable[[], None]:
    def apply() -> None:
        die_with_parent()  # the worker process that started us
        set_rlimits(memory_mb, cpu_s, NPROC_LIMIT, NOFILE_LIMIT, address_space=not gpu)

    return apply


def input_paths(spec: Spec) -> list[str]:
    """The files a spec names for the child to read."""
    if isinstance(spec, InspectSpec | CompressSpec):
        return spec.input_paths()
    return []


def run(
    spec: Spec,
    limits: Limits,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    should_continue: Callable[[], bool] | None = None,
    tick_s: float = 1.0,
    workdir: Path | None = None,
    require: Iterable[str] = DEFAULT_REQUIRE,
) -> dict[str, Any]:
    """Run one action in a confined child; return its result or raise SandboxError/SandboxAborted.

    The child reads the spec's inputs, writes only under `workdir` (the job's directory) and a
    private box (empty cwd, TMPDIR) that is removed afterwards.
    """
    box = Path(tempfile.mkdtemp(prefix="sandbox-", dir=workdir))
    try:
        (box / "cwd").mkdir()
        (box / "tmp").mkdir()
        return _run_in(box, spec, limits, on_event, should_continue, tick_s, workdir, require)
    finally:
        shutil.rmtree(box, ignore_errors=True)


def _run_in(
    box: Path,
    spec: Spec,
    limits: Limits,
    on_event: Callable[[dict[str, Any]], None] | None,
    should_continue: Callable[[], bool] | None,
    tick_s: float,
    workdir: Path | None,
    require: Iterable[str],
) -> dict[str, Any]:
    unknown = [r for r in require if r not in REQUIREMENTS]
    if unknown:
        raise ValueError(f"unknown sandbox requirement(s) {unknown}; use {sorted(REQUIREMENTS)}")
    read_fd, write_fd = os.pipe()
    threads = spec.latency_threads if isinstance(spec, CompressSpec) else 1
    env = child_env(
        {
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": str(threads),
            "NO_PROXY": "*",
            "HOME": str(box / "cwd"),
            "TMPDIR": str(box / "tmp"),
        }
    )
    child_input = ChildInput(
        spec=spec,
        box=Box(
            cwd=str(box / "cwd"),
            tmp=str(box / "tmp"),
            read=input_paths(spec),
            write=[str(workdir or box)],
            require=list(require),
            devices=gpu_devices() if limits.gpu else [],
        ),
        memory_limit_mb=limits.memory_mb,
    )
    cpu_s = int(limits.wall_time_s * max(os.cpu_count() or 1, 1)) + 30
    proc = subprocess.Popen(
        [sys.executable, "-I", "-c", BOOTSTRAP, str(ROOT), str(write_fd)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        pass_fds=(write_fd,),
        env=env,
        cwd=box / "cwd",
        start_new_session=True,
        preexec_fn=_limit_child(limits.memory_mb, cpu_s, limits.gpu),  # noqa: PLW1509
    )
    os.close(write_fd)
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(child_input.model_dump_json().encode())
    proc.stdin.close()
    os.set_blocking(proc.stderr.fileno(), False)
    deadline = time.monotonic() + limits.wall_time_s
    buffer = b""
    stderr_tail = b""
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    reader = os.fdopen(read_fd, "rb", buffering=0)
    try:
        while True:
            ready, _, _ = select.select([reader, proc.stderr], [], [], tick_s)
            if proc.stderr in ready:
                chunk = proc.stderr.read() or b""
                stderr_tail = (stderr_tail + chunk)[-8000:]
            if reader in ready:
                chunk = reader.read(65536)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    event = json.loads(line)
                    if event["type"] == Reply.RESULT:
                        result = event["result"]
                    elif event["type"] == Reply.ERROR:
                        error = event
                    elif event["type"] == Reply.PROTECTIONS:
                        log.debug("sandbox protections: %s", event["protections"])
                    elif on_event is not None:
                        on_event(event)
            if time.monotonic() > deadline:
                _kill(proc)
                raise SandboxError(
                    "time_limit_exceeded",
                    f"The work exceeded its time limit of {limits.wall_time_s:.0f} s and was "
                    "stopped. Use a smaller dataset (fewer calibration samples) or ask your "
                    "operator to raise COMPAAS_JOB_TIME_LIMIT_S.",
                    reason="time",
                )
            if should_continue is not None and not should_continue():
                _kill(proc)
                raise SandboxAborted()
        proc.wait(timeout=30)
    finally:
        reader.close()
        if proc.poll() is None:
            _kill(proc)
    with contextlib.suppress(OSError, ValueError):
        stderr_tail = (stderr_tail + (proc.stderr.read() or b""))[-8000:]
    if error is not None:
        raise SandboxError(error["code"], error["detail"], error.get("field"))
    if result is not None and proc.returncode == 0:
        return result
    _raise_crash(proc.returncode, stderr_tail.decode("utf-8", "replace"), limits)


def protections(require: Iterable[str] = ()) -> dict[str, bool]:
    """Which protections a child gets on this host (probed once at worker start)."""
    return run(ProtectionsSpec(), Limits(wall_time_s=60, memory_mb=1024), require=require)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _raise_crash(returncode: int | None, stderr: str, limits: Limits) -> NoReturn:
    """The SandboxError for a child that ended without a result: which limit stopped it."""
    if "MemoryError" in stderr or "std::bad_alloc" in stderr or "out of memory" in stderr.lower():
        raise SandboxError(
            "memory_limit_exceeded",
            f"The work needed more than its memory limit of {limits.memory_mb} MiB. Use a "
            "smaller model or batch, or ask your operator to raise COMPAAS_JOB_MEMORY_LIMIT_MB.",
        )
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name
        if name == "SIGXFSZ":
            raise SandboxError(
                "file_size_limit_exceeded",
                f"The work tried to write a file larger than its limit of {limits.memory_mb} MiB "
                "and was stopped. Use a smaller model, or ask your operator to raise "
                "COMPAAS_JOB_MEMORY_LIMIT_MB.",
                reason="file_size",
            )
        if name == "SIGXCPU":
            raise SandboxError(
                "time_limit_exceeded",
                "The work used more CPU time than its limit allows.",
                reason="cpu_time",
            )
        raise SandboxError(
            "worker_crashed",
            f"The model process was killed by {name} (often a memory limit or a crash inside a "
            "native operator). The last lines it wrote: " + stderr.strip()[-600:],
            reason="seccomp" if name == "SIGSYS" else "signal",
        )
    raise SandboxError(
        "worker_crashed",
        f"The model process exited with status {returncode} without a result. "
        "The last lines it wrote: " + stderr.strip()[-600:],
    )


# ----------------------------------------------------------------------------- child side


def confine(box: Box) -> dict[str, bool]:
    """Apply every protection this host allows, in the order the kernel needs; report each."""
    preload_seccomp()
    cwd, tmp = Path(box.cwd), Path(box.tmp)
    reads = [*interpreter_paths(), *(ROOT / name for name in PACKAGES), *map(Path, box.read)]
    writes = [Path(p) for p in box.write]
    report = {
        "env_scrubbed": env_scrubbed(),
        "isolated_cwd": isolated_cwd(cwd),
        "private_tmp": private_tmp(tmp),
        "rlimits": rlimits_set(),
        "netns": enter_netns(),
    }
    report["unprivileged_uid"], report["capabilities_dropped"] = drop_privileges(reads, writes)
    report["no_new_privs"] = set_no_new_privs()
    own = [Path(f"/proc/{os.getpid()}")]
    gpu = [*map(Path, GPU_READ)] if box.devices else []
    report["landlock"] = restrict_filesystem(
        [*reads, *map(Path, SYSTEM_READ), *own, *gpu],
        [*writes, *map(Path, SYSTEM_WRITE), *map(Path, box.devices)],
    )
    report["seccomp"] = deny_syscalls()
    return {name: bool(report[name]) for name in PROTECTIONS}


def missing(report: dict[str, bool], require: Iterable[str]) -> list[str]:
    """The requirements none of whose protections took hold."""
    return [r for r in require if not any(report.get(p) for p in REQUIREMENTS[r])]


def _unavailable_event(names: list[str], report: dict[str, bool]) -> dict[str, Any]:
    off = ", ".join(k for k, v in report.items() if not v) or "none"
    return {
        "type": Reply.ERROR,
        "code": "sandbox_unavailable",
        "detail": f"The worker cannot apply the sandbox protection(s) it requires: "
        f"{', '.join(names)} (inactive here: {off}). Nothing was loaded. Ask your operator to "
        "run the worker where network namespaces or seccomp are allowed (root, CAP_SYS_ADMIN "
        "or unprivileged user namespaces), or to change COMPAAS_SANDBOX_REQUIRE.",
    }


MEMORY_MARKERS = (
    "not enough memory",
    "bad_alloc",
    "failed to allocate",
    "unable to allocate",
    "out of memory",
    "cannot allocate memory",
    # protobuf's C++ serializer when its buffer cannot be allocated (a 35 MB model under a
    # 1.1 GiB limit); its other cause, a proto over 2 GiB, cannot come from an upload
    # (COMPAAS_MAX_UPLOAD_BYTES defaults to 512 MiB)
    "failed to serialize proto",
)


def _is_memory_error(exc: BaseException | None) -> bool:
    """MemoryError, or a native library's allocation failure, anywhere in the exception chain.

    A native library's failure has no code, so its message is all there is to go by; an
    EngineError's code was chosen where it was raised, so its own message is not searched.
    """
    from engine.errors import EngineError

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, MemoryError):
            return True
        if not isinstance(exc, EngineError) and any(
            marker in str(exc).lower() for marker in MEMORY_MARKERS
        ):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _memory_event(memory_limit_mb: int) -> dict[str, Any]:
    return {
        "type": Reply.ERROR,
        "code": "memory_limit_exceeded",
        "detail": "The work needed more memory than its limit "
        f"({memory_limit_mb} MiB). Use a smaller model, dataset or calibration "
        "sample count, or ask your operator to raise COMPAAS_JOB_MEMORY_LIMIT_MB.",
    }


def main(event_fd: int) -> int:
    """The child: read the spec, confine itself, run the action, report on the event pipe."""
    out = os.fdopen(event_fd, "w", buffering=1)

    def emit(event: dict[str, Any]) -> None:
        out.write(json.dumps(event, default=str) + "\n")

    child = ChildInput.model_validate_json(sys.stdin.read())
    try:
        report = confine(child.box)
        emit({"type": Reply.PROTECTIONS, "protections": report})
        absent = missing(report, child.box.require)
        if absent:
            emit(_unavailable_event(absent, report))
            return 1
        if isinstance(child.spec, ProtectionsSpec):
            emit({"type": Reply.RESULT, "result": report})
            return 0
        from engine.errors import EngineError

        try:
            result = _dispatch(child.spec, emit)
        except EngineError as exc:
            if _is_memory_error(exc):
                emit(_memory_event(child.memory_limit_mb))
            else:
                emit(
                    {
                        "type": Reply.ERROR,
                        "code": exc.code,
                        "detail": exc.detail,
                        "field": exc.field,
                    }
                )
            return 1
        emit({"type": Reply.RESULT, "result": result})
        return 0
    except Exception as exc:
        traceback.print_exc()
        if _is_memory_error(exc):
            emit(_memory_event(child.memory_limit_mb))
            return 1
        emit(
            {
                "type": Reply.ERROR,
                "code": "internal_error",
                "detail": f"Unexpected error while processing the model: {type(exc).__name__}: "
                f"{exc}",
            }
        )
        return 1
    finally:
        out.flush()


def _dispatch(spec: Spec, emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    if isinstance(spec, InspectSpec):
        from engine.inspect import inspect_model

        return inspect_model(Path(spec.model_path))
    if isinstance(spec, CompressSpec):
        from engine import pipeline

        return pipeline.run(spec, progress=emit)
    if isinstance(spec, SelfTestSpec):
        return _selftest(spec)
    raise ValueError(f"unknown action {spec.action!r}")


def _selftest(spec: SelfTestSpec) -> dict[str, Any]:
    """Probes the limits themselves (used by tests): allocate, spin, or open a socket."""
    what = spec.what
    if what == "allocate":
        block = bytearray(spec.mb * 1024 * 1024)
        return {"allocated": len(block)}
    if what == "sleep":
        time.sleep(spec.seconds)
        return {"slept": spec.seconds}
    if what == "connect":
        try:
            socket.create_connection((spec.host, spec.port), timeout=2).close()
        except (PermissionError, OSError) as exc:
            return {"connected": False, "error": type(exc).__name__}
        return {"connected": True}
    if what == "environ":
        return {"environ": dict(os.environ)}
    if what == "read":
        try:
            return {"read": len(Path(spec.path).read_bytes())}
        except OSError as exc:
            return {"read": None, "error": type(exc).__name__}
    if what == "write":
        try:
            with open(spec.path, "ab") as fh:
                fh.write(b"written by the sandbox")
        except OSError as exc:
            return {"written": False, "error": type(exc).__name__}
        return {"written": True}
    if what == "socket":
        try:
            socket.socket(spec.family, socket.SOCK_STREAM).close()
        except OSError as exc:
            return {"socket": False, "error": type(exc).__name__}
        return {"socket": True}
    if what == "exec":
        try:
            done = subprocess.run([spec.path, *spec.args], capture_output=True, text=True)
        except OSError as exc:
            return {"exec": False, "error": type(exc).__name__}
        return {
            "exec": True,
            "returncode": done.returncode,
            "stdout": done.stdout.strip(),
            "stderr": done.stderr.strip()[-2000:],
        }
    if what == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    return {"ok": True}
