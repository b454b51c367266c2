"""A module planted where the worker or the job runs is never imported by the sandbox child."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.spec import InspectSpec
from tests.security.model_code_files import small_pt2
from worker import sandbox

PLANTED = ("json.py", "numpy.py", "worker.py", "torch.py", "sitecustomize.py", "os.py")


def _plant(directory: Path, canary: Path) -> None:
    for name in PLANTED:
        (directory / name).write_text(f"open({str(canary)!r}, 'a').write({name!r})\n")


@pytest.mark.slow
def test_planted_modules_are_never_imported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = tmp_path / "imported.txt"
    worker_cwd = tmp_path / "worker-cwd"
    worker_cwd.mkdir()
    job = tmp_path / "job"
    job.mkdir()
    _plant(worker_cwd, canary)
    _plant(job, canary)
    (job / "out").mkdir()
    _plant(job / "out", canary)
    monkeypatch.chdir(worker_cwd)
    monkeypatch.setenv("PYTHONPATH", str(worker_cwd))
    monkeypatch.setenv("PYTHONSTARTUP", str(worker_cwd / "json.py"))
    model = small_pt2(job / "model.pt2")
    info = sandbox.run(
        InspectSpec(model_path=str(model)),
        sandbox.Limits(wall_time_s=120, memory_mb=4096),
        workdir=job,
    )
    assert info["format"] == "pt2"
    assert not canary.exists()
