"""`compaas up` runs model inspection in a worker group of its own: while a long job holds the
job worker, an upload is `ready` within seconds (filesystem transport, SQLite); on SIGTERM both
worker groups stop with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import export_onnx, running_up, slow_mlp, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.exclusive]

ROOT = Path(__file__).resolve().parents[2]
LONG_JOB = [{"op": "fine_tune", "epochs": 40}]  # over a minute on one core; canceled once seen
READY_WITHIN_S = 5.0


def children(pid: int) -> dict[int, list[str]]:
    """The direct child processes of `pid`: their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            found[int(entry.name)] = [part.decode() for part in cmdline if part]
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def flag(cmdline: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in cmdline if a.startswith(f"{name}=")]
    return value


def test_compaas_up_inspects_uploads_while_a_long_job_runs(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPAAS_")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    env["PYTHONPATH"] = str(ROOT)
    data_dir = tmp_path / "var"
    files = slow_mlp(tmp_path / "slow")
    workers: dict[int, list[str]] = {}
    compaas = [str(bin_dir / "compaas")]
    with running_up(compaas, tmp_path, env, "--data-dir", str(data_dir), stop_within_s=60) as up:
        api = up.api

        # two worker groups: the jobs' and the inspections', each consuming its own queue
        found = children(up.process.pid).items()
        workers = {pid: cmd for pid, cmd in found if "celery" in " ".join(cmd)}
        queues = sorted((flag(c, "--queues"), flag(c, "--concurrency")) for c in workers.values())
        assert queues == [("default", "1"), ("inspect", "1")], workers
        names = sorted(flag(c, "--hostname") for c in workers.values())
        assert names == ["compaas-inspect@%h", "compaas@%h"]

        made = subprocess.run(
            [str(bin_dir / "compaas"), "admin", "create-team", "up-inspect", "--json"],
            env={**env, "COMPAAS_DATA_DIR": str(data_dir)},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )
        auth = {"Authorization": f"Bearer {json.loads(made.stdout)['api_key']}"}
        client = httpx.Client(base_url=api, headers=auth, timeout=60)

        def upload(route: str, path: Path) -> dict[str, Any]:
            with path.open("rb") as fh:
                resp = client.post(f"/v1/{route}", files={"file": (path.name, fh)})
            assert resp.status_code == 201, resp.text
            return dict(resp.json())

        def model_settled(model_id: str) -> dict[str, Any] | None:
            body = client.get(f"/v1/models/{model_id}").json()
            return body if body["status"] != "pending" else None

        def job(job_id: str) -> dict[str, Any]:
            return dict(client.get(f"/v1/jobs/{job_id}").json())

        big = upload("models", files["onnx"].with_suffix(".pt2"))
        assert wait_for(lambda: model_settled(big["id"]), 120)["status"] == "ready"
        dataset = upload("datasets", files["npz"])

        def create(model_id: str, pipeline: list[dict[str, Any]]) -> httpx.Response:
            body = {"model_id": model_id, "dataset_id": dataset["id"], "pipeline": pipeline}
            return client.post("/v1/jobs", json=body)

        resp = create(big["id"], LONG_JOB)
        assert resp.status_code == 202, resp.text
        long_id = resp.json()["id"]
        wait_for(lambda: job(long_id)["steps"][0]["status"] == "running", 120, 0.2)

        import torch

        tiny = export_onnx(torch.nn.Linear(64, 10), torch.zeros(1, 64), tmp_path / "tiny.onnx")
        started = time.monotonic()
        model = upload("models", tiny)
        body = wait_for(lambda: model_settled(model["id"]), 60, 0.05)
        took = time.monotonic() - started
        print(f"compaas up: upload → ready in {took:.2f} s while a fine_tune job runs")
        assert body["status"] == "ready", body["error"]
        assert took < READY_WITHIN_S, f"the upload took {took:.1f} s to be inspected"
        assert job(long_id)["status"] == "running"

        resp = create(model["id"], [{"op": "quantize", "mode": "dynamic", "dtype": "int8"}])
        assert resp.status_code == 202, resp.text
        for job_id in (resp.json()["id"], long_id):
            client.post(f"/v1/jobs/{job_id}/cancel")
    assert up.process.returncode is not None
    # `compaas up` stopped both worker groups before it exited
    left = [pid for pid in workers if alive(pid)]
    assert not left, up.log.read_text()[-3000:]
