"""COMPAAS_API_WORKERS and the database pool each API process gets (no servers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import Settings
from app.db import session as db_session
from app.processes import TooManyProcesses, api_processes, available_cpus

ROOT = Path(__file__).resolve().parents[2]


def settings(**values: object) -> Settings:
    values.setdefault("data_dir", Path("/tmp/unused"))
    return Settings(_env_file=None, **values)  # type: ignore[arg-type,call-arg]


def test_available_cpus_reads_the_cgroup_quota(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    assert available_cpus(tmp_path / "absent") == cores
    cpu_max.write_text("max 100000\n")
    assert available_cpus(cpu_max) == cores
    cpu_max.write_text("150000 100000\n")  # --cpus 1.5: two processes
    assert available_cpus(cpu_max) == min(cores, 2)
    cpu_max.write_text("50000 100000\n")
    assert available_cpus(cpu_max) == 1


def test_api_processes() -> None:
    production = {"run_reconciler": False}
    assert api_processes(settings(**production), cpus=6) == 6
    assert api_processes(settings(api_workers=3, **production), cpus=6) == 3
    # the embedded default runs the reconciler in the API: one process, whatever the cores
    assert api_processes(settings(), cpus=6) == 1
    assert api_processes(settings(api_workers=1), cpus=6) == 1
    with pytest.raises(TooManyProcesses, match="COMPAAS_RUN_RECONCILER=false"):
        api_processes(settings(api_workers=2))


def test_the_pool_is_the_processes_share() -> None:
    budget = settings(api_db_connections=40)
    assert budget.db_pool(1) == (20, 20)
    assert budget.db_pool(4) == (5, 5)
    assert budget.db_pool(16) == (1, 1), "never under 2 connections a process"
    for n in (1, 2, 3, 5, 8):
        size, overflow = budget.db_pool(n)
        assert n * (size + overflow) <= 40
    assert budget.db_pool() == (5, 5), "workers and the reconciler"
    explicit = settings(db_pool_size=3, db_max_overflow=0)
    assert explicit.db_pool(4) == (3, 0)


def test_configure_pool_sizes_the_engines(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'pool.db'}"
    before = db_session.pool_limits()
    try:
        db_session.configure_pool(3, 2)
        engine = db_session.get_sessionmaker(url).kw["bind"]
        assert (engine.pool.size(), engine.pool._max_overflow) == (3, 2)
        db_session.configure_pool(7, 1)
        engine = db_session.get_sessionmaker(url).kw["bind"]
        assert (engine.pool.size(), engine.pool._max_overflow) == (7, 1)
    finally:
        db_session.configure_pool(*before)


def test_create_app_sizes_the_pool_to_its_processes(tmp_path: Path) -> None:
    from app.main import create_app

    before = db_session.pool_limits()
    try:
        create_app(settings(data_dir=tmp_path, api_workers=4, run_reconciler=False))
        assert db_session.pool_limits() == (5, 5)
        create_app(settings(data_dir=tmp_path, db_pool_size=2, db_max_overflow=3))
        assert db_session.pool_limits() == (2, 3)
    finally:
        db_session.configure_pool(*before)


def test_compaas_api_refuses_several_processes_with_the_embedded_reconciler(
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "COMPAAS_DATA_DIR": str(tmp_path),
        "COMPAAS_MODE": "embedded",
    }
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "api", "--workers", "2", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "COMPAAS_RUN_RECONCILER=false" in out.stderr
