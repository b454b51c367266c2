"""The team CLI and the SDK against `compaas up`, as a user runs them: `compaas login`,
uploads, `jobs create --preset tiny --wait` rendered in a pseudo-terminal, `jobs download`,
`--json` piped to Python, and the README's SDK quickstart (Client.compress)."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import pty
import re
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from compaas import AsyncClient, Client, RetryPolicy
from tests.conftest import running_up

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMPAAS = str(BIN / "compaas")
STYLE = re.compile(r"\x1b\[[0-9;]*m|\x1b\][^\x07]*\x07")  # colours, links: dropped
CURSOR = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # cursor moves, line erases: a new line
# the tiny preset with fewer epochs: the same three ops, a shorter run
QUICK_TINY = json.dumps(
    {
        "prune": {"schedule": {"kind": "gradual", "steps": 2, "epochs_per_step": 1}},
        "distill": {"epochs": 2},
    }
)


@dataclass
class Served:
    root: Path
    api: str
    key: str
    env: dict[str, str]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [COMPAAS, *args], cwd=self.root, env=self.env, capture_output=True, text=True
        )
        if check:
            assert done.returncode == 0, done.stdout + done.stderr
        return done

    def job(self, job_id: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.key}"}
        response = httpx.get(f"{self.api}/v1/jobs/{job_id}", headers=headers, timeout=30)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, digits_files: dict[str, Path]
) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("cli-sdk")
    examples = root / "examples"
    examples.mkdir()
    shutil.copy(digits_files["pt2"], examples / "digits_cnn.pt2")
    shutil.copy(digits_files["npz"], examples / "digits.npz")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPAAS_")}
    env.update(PATH=f"{BIN}:{env['PATH']}", XDG_CONFIG_HOME=str(root / "config"))
    with running_up([COMPAAS], root, env, "--data-dir", str(root / "var")) as up:
        made = subprocess.run(
            [COMPAAS, "admin", "create-team", "cli", "--data-dir", str(root / "var"), "--json"],
            cwd=ROOT,  # another directory: --data-dir finds the served database
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert f"database: sqlite:///{root / 'var' / 'compaas.db'}" in made.stderr
        yield Served(root, up.api, json.loads(made.stdout)["api_key"], env)


def run_in_pty(argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> tuple[int, str]:
    """Run a command on a 120x40 pseudo-terminal; its exit code and everything it drew."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal of a known size, then the command
        try:
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
            os.chdir(cwd)
            os.execve(argv[0], argv, {**env, "TERM": "xterm-256color"})
        finally:
            os._exit(127)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode("utf-8", "replace")


def frames(output: str) -> list[str]:
    """Every line the terminal showed, escape sequences removed (live redraws included)."""
    text = CURSOR.sub("\n", STYLE.sub("", output))
    return [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]


def test_login_upload_create_tiny_with_live_progress_and_download(served: Served) -> None:
    code, shown = run_in_pty(
        [COMPAAS, "login", "--url", served.api, "--key", served.key],
        served.env,
        served.root,
        timeout=60,
    )
    profile = served.root / "config" / "compaas" / "config.json"
    assert code == 0 and "logged in" in shown, shown
    assert stat.S_IMODE(profile.stat().st_mode) == 0o600
    assert json.loads(profile.read_text()) == {"url": served.api, "api_key": served.key}

    # from here on the profile is the only place the URL and key come from
    model = json.loads(served.cli("models", "upload", "examples/digits_cnn.pt2", "--json").stdout)
    assert model["status"] == "ready" and model["format"] == "pt2"
    dataset = json.loads(served.cli("datasets", "upload", "examples/digits.npz", "--json").stdout)
    assert dataset["has_labels"] is True

    argv = [COMPAAS, "jobs", "create", "--model", model["id"], "--dataset", dataset["id"]]
    argv += ["--preset", "tiny", "--overrides", QUICK_TINY, "--wait"]
    code, shown = run_in_pty(argv, served.env, served.root, timeout=900)
    (served.root / "jobs-create.pty").write_text(shown)  # the capture, kept for a look
    lines = frames(shown)
    assert code == 0, "\n".join(lines[-60:])
    job_id = re.search(r"job (\S{36}) queued", "\n".join(lines))
    assert job_id, "\n".join(lines[:20])
    job = served.job(job_id.group(1))
    assert job["status"] == "succeeded" and [s["op"] for s in job["steps"]] == [
        "prune",
        "distill",
        "quantize",
    ]
    # every step's bar reached 100 % marked succeeded, and the job's bar moved through
    # several values on the way (drawn live, not only at the end)
    for label in ("1. prune", "2. distill", "3. quantize"):
        finished = [ln for ln in lines if label in ln and "100%" in ln and "succeeded" in ln]
        assert finished, f"{label} never shown complete:\n" + "\n".join(lines[-40:])
    job_bar = [ln for ln in lines if ln.startswith("overall")]
    percents = {int(p) for ln in job_bar for p in re.findall(r"(\d+)%", ln)}
    assert len(percents) >= 3 and 100 in percents, job_bar
    assert "compression_ratio" in shown  # the summary table after the bars

    out_dir = served.root / "downloads"
    got = served.cli("jobs", "download", job["id"], "--out", str(out_dir), "--json")
    (entry,) = json.loads(got.stdout)
    (final,) = [a for a in job["artifacts"] if a["role"] == "final"]
    path = Path(entry["path"])
    assert path.parent == out_dir and path.is_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == final["sha256"] == entry["sha256"]

    saved = served.cli("report", job["id"], "--out", "report.html", "--json")
    assert json.loads(saved.stdout)["path"] == "report.html"
    assert "<svg" in (served.root / "report.html").read_text()


def test_json_output_pipes_into_python(served: Served) -> None:
    env = {**served.env, "COMPAAS_URL": served.api, "COMPAAS_API_KEY": served.key}
    script = r"""
py() { python3 -c "import json,sys; d=json.load(sys.stdin); $1"; }
MODEL=$(compaas models upload examples/digits_cnn.pt2 --name piped --json \
  | py 'assert d["status"] == "ready", d; print(d["id"])')
DATA=$(compaas datasets upload examples/digits.npz --json | py 'print(d["id"])')
compaas jobs create --model "$MODEL" --dataset "$DATA" --preset edge-int8 --wait --json \
  > job.json
py 'assert d["status"] == "succeeded", d["error"]; print(d["id"])' < job.json > job_id
py 'r = d["metrics"]["ratios"]; assert r["compression_ratio"] > 3, r' < job.json
JOB=$(cat job_id)
compaas jobs list --json | py "assert '$JOB' in [j['id'] for j in d], d"
compaas jobs show "$JOB" --json | py "assert d['id'] == '$JOB' and d['artifacts'], d"
compaas jobs compare "$JOB" "$JOB" --json \
  | py "assert [r['id'] for r in d] == ['$JOB'] * 2, d; assert d[0]['compression_ratio'] > 3, d"
# a refusal: exit 3, the problem as JSON on stdout, the message on stderr
set +e
compaas jobs show no-such-job --json > missing.json 2> missing.err
echo "exit=$?"
set -e
py 'e = d["error"]; assert (e["exit_code"], e["status"]) == (3, 404), d' < missing.json
py 'assert d["error"]["problem"]["code"] == "not_found", d' < missing.json
grep -q "404 not_found" missing.err
"""
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=served.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "exit=3" in run.stdout


def _readme_sdk_block() -> str:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- sdk-quickstart:begin -->", 1)[1].split(
        "<!-- sdk-quickstart:end -->"
    )[0]
    match = re.search(r"```python\n(.*?)```", block, re.S)
    assert match, "README SDK quickstart block not found"
    return match.group(1)


def test_readme_sdk_quickstart_compresses_and_downloads_the_checked_artifact(
    served: Served,
) -> None:
    env = {**served.env, "API": served.api, "KEY": served.key}
    run = subprocess.run(
        [sys.executable, "-c", _readme_sdk_block()],
        cwd=served.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    job_id = re.search(r"job (\S+) succeeded", run.stdout)
    assert job_id, run.stdout
    job = served.job(job_id.group(1))
    (final,) = [a for a in job["artifacts"] if a["role"] == "final"]
    written = list((served.root / "out").iterdir())
    assert len(written) == len(job["artifacts"])
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in written}
    assert final["sha256"] in digests
    assert {a["sha256"] for a in job["artifacts"]} == digests


class DropFirstJobAnswer(httpx.BaseTransport):
    """The real network, except that the first answer to POST /v1/jobs is lost on the way
    back (the server did create the job): what a client sees when a connection drops."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.posts: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method == "POST" and request.url.path == "/v1/jobs":
            self.posts.append(request)
            if len(self.posts) == 1:
                response.read()
                response.close()
                raise httpx.ReadError("connection reset by peer", request=request)
        return response


def test_a_retried_create_after_a_lost_answer_makes_one_job(served: Served) -> None:
    transport = DropFirstJobAnswer()
    retry = RetryPolicy(attempts=3, backoff_s=0.05)
    with Client(served.api, served.key, transport=transport, retry=retry) as client:
        model = client.models.upload(served.root / "examples" / "digits_cnn.pt2", wait=True)
        before = {j.id for j in client.jobs.list()}
        job = client.jobs.create(model.id, preset="fp16")
        after = client.jobs.list()
        canceled = client.jobs.cancel(job.id)
    assert len(transport.posts) == 2
    keys = {r.headers["Idempotency-Key"] for r in transport.posts}
    assert len(keys) == 1  # the same key both times: the server replayed the first job
    assert [j.id for j in after if j.id not in before] == [job.id]
    assert canceled.status == "canceled"


def test_the_async_client_compresses_follows_and_downloads(served: Served, tmp_path: Path) -> None:
    examples = served.root / "examples"

    async def run() -> tuple[Any, list[Any], list[Path], list[Any]]:
        async with AsyncClient(served.api, served.key) as client:
            models = await client.models.list()
            ready = [m for m in models if m.status == "ready" and m.format == "pt2"]
            model = ready[0] if ready else examples / "digits_cnn.pt2"
            events: list[Any] = []
            job = await client.compress(
                model, dataset=examples / "digits.npz", preset="fp16", on_event=events.append
            )
            paths = await job.download(tmp_path, roles={"final"})
            replay = [event async for event in client.jobs.stream(job.id)]
            return job, events, paths, replay

    job, events, paths, replay = asyncio.run(run())
    assert job.status == "succeeded", job.error
    assert events[-1].type == "done" and events[-1].data["status"] == "succeeded"
    assert any(e.type == "step" and e.data.get("status") == "succeeded" for e in events)
    assert [e.id for e in replay] == [e.id for e in events]  # the history, replayed whole
    (final,) = job.final_artifacts
    (path,) = paths
    assert hashlib.sha256(path.read_bytes()).hexdigest() == final.sha256


def test_the_cli_runs_an_auto_search_with_a_budget(served: Served) -> None:
    env = {**served.env, "COMPAAS_URL": served.api, "COMPAAS_API_KEY": served.key}
    examples = served.root / "examples"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [COMPAAS, *args], cwd=served.root, env=env, capture_output=True, text=True
        )

    model = json.loads(cli("models", "upload", str(examples / "digits_cnn.pt2"), "--json").stdout)
    data = json.loads(cli("datasets", "upload", str(examples / "digits.npz"), "--json").stdout)
    base = ("jobs", "create", "--model", model["id"], "--dataset", data["id"], "--preset", "auto")
    refused = cli(*base, "--budget", "max_drop=0.01", "--json")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    problem = json.loads(refused.stdout)["error"]["problem"]
    assert problem["code"] == "invalid_budget" and "max_accuracy_drop" in problem["valid_keys"]
    done = cli(
        *base,
        *("--budget", "max_accuracy_drop=0.01", "--budget", "max_size_bytes=1000000"),
        *("--objective", "size", "--max-candidates", "1", "--wait", "--json"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    job = json.loads(done.stdout)
    assert job["status"] == "succeeded" and job["preset"] == "auto"
    details = job["steps"][0]["details"]
    assert details["budget"] == {"max_accuracy_drop": 0.01, "max_size_bytes": 1000000}
    assert details["objective"] == "size" and details["search"]["measured"] == 1
    assert details["chosen"]["candidate"] is not None, job["warnings"]
