"""Architecture rules: the API never imports torch; the engine imports no web/DB/queue code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _loaded_after(statement: str) -> set[str]:
    code = f"{statement}; import sys; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


def test_api_process_never_imports_torch_or_onnxruntime() -> None:
    modules = _loaded_after("from app.main import create_app; create_app()")
    assert "torch" not in modules
    assert "onnxruntime" not in modules
    assert "engine.config" in modules  # the shared op configs are torch-free


def test_engine_imports_no_web_db_or_queue_code() -> None:
    modules = _loaded_after("import engine.pipeline, engine.io.formats, engine.examples")
    for forbidden in ("fastapi", "celery", "sqlalchemy", "app", "worker.tasks"):
        assert not any(m == forbidden or m.startswith(forbidden + ".") for m in modules), forbidden


def test_import_linter_contracts_hold() -> None:
    exe = Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(exe)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
