"""Run the README's quickstart, word for word, against `compaas up`, as a new user would."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import running_up

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def _quickstart() -> str:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- quickstart:begin -->", 1)[1].split("<!-- quickstart:end -->")[0]
    match = re.search(r"```bash\n(.*?)```", block, re.S)
    assert match, "README quickstart block not found"
    return match.group(1)


def test_readme_first_command_and_quickstart(tmp_path: Path) -> None:
    first = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].splitlines()[0]
    assert first.split("#")[0].strip() == "bash .ci/setup && .venv/bin/compaas up"
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPAAS_")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    with running_up([str(bin_dir / "compaas")], tmp_path, env) as up:
        printed = up.log.read_text()
        assert f"{up.api}/v1" in printed and f"{up.api}/docs" in printed

        started = time.monotonic()
        run = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", _quickstart()],
            cwd=tmp_path,
            env={**env, "API": up.api},
            capture_output=True,
            text=True,
            timeout=600,
        )
        wall = time.monotonic() - started
        assert run.returncode == 0, run.stdout + run.stderr + up.log.read_text()

    job = json.loads((tmp_path / "job.json").read_text())
    assert job["status"] == "succeeded", job["error"]
    ratios = job["metrics"]["ratios"]
    assert ratios["compression_ratio"] >= 3.5
    assert ratios["accuracy_drop"] <= 0.01
    (final,) = [a for a in job["artifacts"] if a["role"] == "final"]
    data = (tmp_path / "digits_int8.onnx").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    headers = (tmp_path / "headers.txt").read_text().lower()
    assert f"x-checksum-sha256: {digest}" in headers
    assert digest == final["sha256"]
    assert digest in run.stdout  # sha256sum's line, printed by the quickstart
    assert f"OK digits_int8.onnx: sha256 {digest}" in run.stdout  # compaas verify
    print(
        f"\nquickstart wall time {wall:.1f} s; ratio {ratios['compression_ratio']:.2f}, "
        f"drop {ratios['accuracy_drop']:.4f}, speedup {ratios['speedup']:.2f}"
    )
