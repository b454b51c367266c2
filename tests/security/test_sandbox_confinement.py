"""The sandbox holds: no secrets, no files outside its inputs, no network, no new programs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from engine.spec import InspectSpec
from tests.security.model_code_files import CANARY_TEXT, small_pt2
from worker import sandbox
from worker.confine import landlock_abi

LIMITS = sandbox.Limits(wall_time_s=120, memory_mb=2048)
FOUND = sandbox.protections()


def _selftest(tmp_path: Path, **what: object) -> dict[str, object]:
    job = tmp_path / "job"
    job.mkdir(exist_ok=True)
    return sandbox.run(sandbox.SelfTestSpec(**what), LIMITS, workdir=job)


def test_every_protection_is_reported() -> None:
    assert set(FOUND) == set(sandbox.PROTECTIONS)
    for name in ("env_scrubbed", "isolated_cwd", "private_tmp", "rlimits", "no_new_privs"):
        assert FOUND[name], name
    assert FOUND["netns"] or FOUND["seccomp"]


def test_the_child_sees_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPAAS_API_KEY_PEPPER", "pepper-that-must-not-leak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    environ = _selftest(tmp_path, what="environ")["environ"]
    assert isinstance(environ, dict)
    assert "COMPAAS_API_KEY_PEPPER" not in environ and "AWS_SECRET_ACCESS_KEY" not in environ
    assert "PYTHONPATH" not in environ
    assert not any("pepper-that-must-not-leak" in v for v in environ.values())


@pytest.mark.skipif(landlock_abi() < 1, reason="this kernel has no Landlock")
def test_files_outside_the_inputs_cannot_be_read(tmp_path: Path) -> None:
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"SECRET")
    out = _selftest(tmp_path, what="read", path=str(secret))
    assert out == {"read": None, "error": "PermissionError"}
    inside = tmp_path / "job" / "input.bin"
    inside.write_bytes(b"12345")
    assert _selftest(tmp_path, what="read", path=str(inside)) == {"read": 5}


@pytest.mark.skipif(landlock_abi() < 1, reason="this kernel has no Landlock")
def test_the_child_cannot_write_outside_its_workdir(tmp_path: Path) -> None:
    canary = tmp_path / "canary.txt"
    canary.write_bytes(CANARY_TEXT)
    out = _selftest(tmp_path, what="write", path=str(canary))
    assert out == {"written": False, "error": "PermissionError"}
    assert canary.read_bytes() == CANARY_TEXT
    assert _selftest(tmp_path, what="write", path=str(tmp_path / "job" / "out.bin")) == {
        "written": True
    }


@pytest.mark.skipif(not FOUND["seccomp"], reason="seccomp is not available here")
def test_no_socket_can_be_opened(tmp_path: Path) -> None:
    out = _selftest(tmp_path, what="socket")
    assert out["socket"] is False


@pytest.mark.skipif(not FOUND["seccomp"], reason="seccomp is not available here")
@pytest.mark.skipif(not FOUND["landlock"], reason="Landlock is what limits exec to Python")
def test_no_program_but_the_interpreter_can_be_executed(tmp_path: Path) -> None:
    out = _selftest(tmp_path, what="exec", path="/bin/sh")
    assert out == {"exec": False, "error": "PermissionError"}
    # The interpreter runs (the engine measures peak memory in a fresh one), confined as well.
    probe = (
        "import socket\n"
        "try:\n    socket.socket(socket.AF_INET); print('socket')\n"
        "except OSError:\n    print('refused')"
    )
    out = _selftest(tmp_path, what="exec", path=sys.executable, args=["-I", "-c", probe])
    assert out["exec"] and out["returncode"] == 0 and out["stdout"] == "refused", out


def test_a_missing_required_protection_fails_the_job(tmp_path: Path) -> None:
    absent = [name for name, on in FOUND.items() if not on]
    if not absent:
        pytest.skip("every protection holds on this host; none can be shown missing")
    job = tmp_path / "job"
    job.mkdir()
    with pytest.raises(sandbox.SandboxError) as err:
        sandbox.run(sandbox.SelfTestSpec(), LIMITS, workdir=job, require=[absent[0]])
    assert err.value.code == "sandbox_unavailable" and absent[0] in err.value.detail


@pytest.mark.slow
def test_a_real_model_is_inspected_under_every_protection(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    model = small_pt2(job / "model.pt2")
    info = sandbox.run(
        InspectSpec(model_path=str(model)),
        LIMITS,
        workdir=job,
        require=[name for name, on in FOUND.items() if on],
    )
    assert info["format"] == "pt2" and info["inputs"][0]["shape"] == [3, 4]
    assert sorted(p.name for p in job.iterdir()) == ["model.pt2"]  # the box is gone
