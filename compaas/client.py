"""The synchronous client: `Client(url, key)`, its `models`, `datasets` and `jobs`."""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse
from tenacity import Retrying

from compaas import _http
from compaas._http import RETRYABLE, RetryPolicy
from compaas.config import resolve
from compaas.errors import ApiError, CompaasError, NetworkError, UploadInvalid, WaitTimeout
from compaas.job import JobView
from compaas.types import (
    TERMINAL_STATUSES,
    ArtifactRead,
    DatasetRead,
    JobEvent,
    JobRead,
    JobStatusRead,
    ModelRead,
)

EventHandler = Callable[[JobEvent], None]


def falls_back(exc: CompaasError) -> bool:
    """Whether wait() polls after the event stream failed: on network errors, server errors
    and answers meaning "no event stream here" (a proxy, an old server); polling raises
    again if the job itself is the problem."""
    if isinstance(exc, NetworkError):
        return True
    return isinstance(exc, ApiError) and (exc.status in {404, 405, 406} or exc.status >= 500)


class Job(JobView):
    """A compression job: `.status`, `.metrics`, `.report_url`, `.download(dir)`, `.wait()`."""

    def __init__(self, client: Client, read: JobRead) -> None:
        super().__init__(read, client.url)
        self._client = client

    def refresh(self) -> Job:
        self.read = self._client.jobs.get(self.id).read
        return self

    def wait(self, timeout: float | None = None, on_event: EventHandler | None = None) -> Job:
        self.read = self._client.jobs.wait(self.id, timeout=timeout, on_event=on_event).read
        return self

    def stream(self) -> Iterator[JobEvent]:
        return self._client.jobs.stream(self.id)

    def cancel(self) -> Job:
        self.read = self._client.jobs.cancel(self.id).read
        return self

    def retry(self) -> Job:
        self.read = self._client.jobs.retry(self.id).read
        return self

    def download(self, directory: str | Path = ".", roles: set[str] | None = None) -> list[Path]:
        """Write every artifact (or those of `roles`: final, checkpoint), checked by sha256."""
        return self._client.jobs.download(self, directory, roles=roles)

    def download_report(self, path: str | Path) -> Path:
        return self._client.jobs.download_report(self.id, path)


class Client:
    """The compaas API over HTTP. URL and key default to COMPAAS_URL / COMPAAS_API_KEY, then
    the profile `compaas login` saved. Network errors and 429/502/503/504 are retried
    (`retry`), POSTs with one Idempotency-Key for all their tries."""

    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        poll_interval_s: float = 1.0,
    ) -> None:
        profile = resolve(url, key)
        self.url = profile.url
        self.retry = retry or RetryPolicy()
        self.poll_interval_s = poll_interval_s
        headers = {"User-Agent": _http.user_agent(), "Accept": "application/json"}
        if profile.api_key:
            headers["Authorization"] = f"Bearer {profile.api_key}"
        self.http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
        )
        self.models = Models(self)
        self.datasets = Datasets(self)
        self.jobs = Jobs(self)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        upload: Path | None = None,
        data: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> httpx.Response:
        """One API call, retried by the policy; the answer, or ApiError / NetworkError."""
        headers = {}
        if method == "POST":
            headers["Idempotency-Key"] = idempotency_key or _http.new_idempotency_key()
        try:
            for attempt in Retrying(**_http.retry_options(self.retry)):
                with attempt:
                    if upload is not None:
                        with upload.open("rb") as fh:
                            files = {"file": (upload.name, fh, "application/octet-stream")}
                            response = self.http.request(
                                method, path, files=files, data=data, headers=headers
                            )
                    else:
                        response = self.http.request(
                            method, path, json=json, params=params, headers=headers
                        )
                    return _http.check(response)
        except RETRYABLE as exc:
            raise _http.give_up(exc, self.url, self.retry) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self.request("GET", path, params=params).json()

    def pages(self, path: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Every item of a cursor-paginated list."""
        query = dict(params or {})
        while True:
            page = self.get_json(path, {k: v for k, v in query.items() if v is not None})
            yield from page["items"]
            if not page.get("next_cursor"):
                return
            query["cursor"] = page["next_cursor"]

    def compress(
        self,
        model: str | Path | ModelRead,
        dataset: str | Path | DatasetRead | None = None,
        *,
        preset: str | None = None,
        pipeline: list[dict[str, Any]] | None = None,
        overrides: dict[str, dict[str, Any]] | None = None,
        evaluation: dict[str, Any] | None = None,
        export: list[str] | None = None,
        seed: int | None = None,
        budget: dict[str, float] | None = None,
        objective: str | None = None,
        search: dict[str, Any] | None = None,
        name: str | None = None,
        wait: bool = True,
        timeout: float | None = None,
        on_event: EventHandler | None = None,
    ) -> Job:
        """Upload the model (and dataset), wait until the model is ready, create the job and,
        with `wait`, follow it to the end. Returns the Job whatever its outcome: check
        `job.status` (a failed job carries `job.error`)."""
        ready = (
            model
            if isinstance(model, ModelRead)
            else self.models.upload(model, name=name, wait=True, timeout=timeout)
        )
        data = (
            dataset
            if dataset is None or isinstance(dataset, DatasetRead)
            else self.datasets.upload(dataset)
        )
        job = self.jobs.create(
            ready.id,
            dataset_id=data.id if data else None,
            preset=preset,
            pipeline=pipeline,
            overrides=overrides,
            evaluation=evaluation,
            export=export,
            seed=seed,
            budget=budget,
            objective=objective,
            search=search,
        )
        return self.jobs.wait(job.id, timeout=timeout, on_event=on_event) if wait else job


class Models:
    """POST/GET/DELETE /v1/models."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def upload(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> ModelRead:
        """Upload an ONNX or .pt2 file; with `wait`, until the worker inspected it (ready)."""
        file = _http.existing_file(Path(path))
        response = self._client.request(
            "POST",
            "/v1/models",
            upload=file,
            data={"name": name} if name else None,
            idempotency_key=idempotency_key,
        )
        model = ModelRead.model_validate(response.json())
        return self.wait_ready(model.id, timeout=timeout) if wait else model

    def get(self, model_id: str) -> ModelRead:
        return ModelRead.model_validate(self._client.get_json(f"/v1/models/{model_id}"))

    def list(self) -> list[ModelRead]:
        return [ModelRead.model_validate(m) for m in self._client.pages("/v1/models")]

    def delete(self, model_id: str) -> None:
        self._client.request("DELETE", f"/v1/models/{model_id}")

    def wait_ready(self, model_id: str, timeout: float | None = None) -> ModelRead:
        """Poll until the model is `ready`; UploadInvalid if the worker refused it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            model = self.get(model_id)
            if model.status == "ready":
                return model
            if model.status == "invalid":
                raise UploadInvalid(
                    "model", model.id, model.error.model_dump() if model.error else None
                )
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"model {model_id} still {model.status} after {timeout} s")
            time.sleep(min(self._client.poll_interval_s, 0.5))


class Datasets:
    """POST/GET/DELETE /v1/datasets."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def upload(
        self, path: str | Path, *, name: str | None = None, idempotency_key: str | None = None
    ) -> DatasetRead:
        """Upload an .npz or .safetensors dataset (checked as it is received)."""
        file = _http.existing_file(Path(path))
        response = self._client.request(
            "POST",
            "/v1/datasets",
            upload=file,
            data={"name": name} if name else None,
            idempotency_key=idempotency_key,
        )
        return DatasetRead.model_validate(response.json())

    def get(self, dataset_id: str) -> DatasetRead:
        return DatasetRead.model_validate(self._client.get_json(f"/v1/datasets/{dataset_id}"))

    def list(self) -> list[DatasetRead]:
        return [DatasetRead.model_validate(d) for d in self._client.pages("/v1/datasets")]

    def delete(self, dataset_id: str) -> None:
        self._client.request("DELETE", f"/v1/datasets/{dataset_id}")


class Jobs:
    """/v1/jobs: create, get, list, cancel, retry, stream, wait, download, report."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def _job(self, response: httpx.Response) -> Job:
        return Job(self._client, JobRead.model_validate(response.json()))

    def create(
        self,
        model_id: str | None,
        *,
        dataset_id: str | None = None,
        preset: str | None = None,
        pipeline: list[dict[str, Any]] | None = None,
        overrides: dict[str, dict[str, Any]] | None = None,
        evaluation: dict[str, Any] | None = None,
        export: list[str] | None = None,
        seed: int | None = None,
        recipe: dict[str, Any] | None = None,
        budget: dict[str, float] | None = None,
        objective: str | None = None,
        search: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Queue a job: a preset (with overrides), an explicit pipeline, or a recipe. With
        `preset="auto"`, `budget` ({"max_accuracy_drop": 0.01}, {"min_cosine": 0.99},
        {"max_size_bytes": …}, …), `objective` (size, latency, balanced) and `search`
        ({"max_minutes": …, "max_candidates": …}) steer the search (docs/auto.md)."""
        body = _http.job_body(
            model_id,
            dataset_id=dataset_id,
            preset=preset,
            pipeline=pipeline,
            overrides=overrides,
            evaluation=evaluation,
            export=export,
            seed=seed,
            recipe=recipe,
            budget=budget,
            objective=objective,
            search=search,
        )
        return self._job(
            self._client.request("POST", "/v1/jobs", json=body, idempotency_key=idempotency_key)
        )

    def get(self, job_id: str) -> Job:
        return self._job(self._client.request("GET", f"/v1/jobs/{job_id}"))

    def status(self, job_id: str) -> JobStatusRead:
        """The five-field status view: the cheap poll."""
        return JobStatusRead.model_validate(
            self._client.get_json(f"/v1/jobs/{job_id}", {"view": "status"})
        )

    def list(self, status: str | None = None, limit: int | None = None) -> list[Job]:
        """The team's jobs, newest first (every page, or the first `limit`)."""
        jobs: list[Job] = []
        for item in self._client.pages("/v1/jobs", {"status": status}):
            jobs.append(Job(self._client, JobRead.model_validate(item)))
            if limit is not None and len(jobs) >= limit:
                break
        return jobs

    def cancel(self, job_id: str) -> Job:
        return self._job(self._client.request("POST", f"/v1/jobs/{job_id}/cancel"))

    def retry(self, job_id: str) -> Job:
        return self._job(self._client.request("POST", f"/v1/jobs/{job_id}/retry"))

    def recipe(self, job_id: str) -> dict[str, Any]:
        return dict(self._client.get_json(f"/v1/jobs/{job_id}/recipe"))

    def stream(self, job_id: str, after: int | None = None) -> Iterator[JobEvent]:
        """The job's events (its history, then live) until `done`; reconnects after a
        network failure from the last event seen (Last-Event-ID), within the retry policy."""
        client, last, failures = self._client, after or 0, 0
        while True:
            seen_done = False
            try:
                for event in self._stream_once(job_id, last):
                    last, failures, seen_done = event.id, 0, event.terminal
                    yield event
            except RETRYABLE as exc:
                failures += 1
                if failures >= client.retry.attempts:
                    raise _http.give_up(exc, client.url, client.retry) from exc
                time.sleep(_http.backoff_s(client.retry, failures))
                continue
            if seen_done:
                return
            failures += 1  # closed before `done` (a proxy's idle cut): resume
            if failures >= client.retry.attempts:
                raise NetworkError(f"the event stream of job {job_id} kept closing early")

    def _stream_once(self, job_id: str, last: int) -> Iterator[JobEvent]:
        http = self._client.http
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(last)}
        with connect_sse(http, "GET", f"/v1/jobs/{job_id}/events", headers=headers) as source:
            if source.response.status_code >= 400:
                source.response.read()
                _http.check(source.response)
            for sse in source.iter_sse():
                if not sse.data or not sse.id:
                    continue  # the retry hint
                yield JobEvent(int(sse.id), sse.event, _loads(sse.data))

    def wait(
        self, job_id: str, timeout: float | None = None, on_event: EventHandler | None = None
    ) -> Job:
        """Follow the job until it finishes (the event stream; polling where there is none)
        and return it, whatever the outcome. WaitTimeout after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            for event in self.stream(job_id):
                if on_event is not None:
                    on_event(event)
                if event.terminal:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise WaitTimeout(f"job {job_id} still running after {timeout} s")
        except (NetworkError, ApiError) as exc:
            if not falls_back(exc):
                raise
            return self._poll(job_id, deadline, timeout)
        job = self.get(job_id)
        return job if job.done else self._poll(job_id, deadline, timeout)

    def _poll(self, job_id: str, deadline: float | None, timeout: float | None) -> Job:
        interval, last_progress = self._client.poll_interval_s, -1.0
        while True:
            view = self.status(job_id)
            if view.status in TERMINAL_STATUSES:
                return self.get(job_id)
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"job {job_id} still {view.status} after {timeout} s")
            interval = _http.poll_interval(
                view.progress != last_progress, interval, self._client.poll_interval_s
            )
            last_progress = view.progress
            time.sleep(interval)

    def download(
        self, job: str | Job, directory: str | Path = ".", roles: set[str] | None = None
    ) -> builtins.list[Path]:
        """Write the job's artifacts (every one, or those of `roles`) into `directory` under
        the server's file names; each checked against its sha256. The paths written."""
        read = job if isinstance(job, Job) else self.get(job)
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        taken: set[Path] = set()
        return [
            self.download_artifact(artifact, out, taken)
            for artifact in read.artifacts
            if roles is None or artifact.role in roles
        ]

    def download_artifact(
        self, artifact: ArtifactRead, directory: Path, taken: set[Path] | None = None
    ) -> Path:
        client = self._client
        try:
            for attempt in Retrying(**_http.retry_options(client.retry)):
                with attempt:
                    url = f"/v1/artifacts/{artifact.id}/download"
                    with client.http.stream("GET", url) as response:
                        if response.status_code >= 400:
                            response.read()
                            _http.check(response)
                        name = _http.download_name(response, artifact)
                        path = _http.unique_path(directory, name, artifact, taken or set())
                        writer = _http.HashingWriter(path)
                        try:
                            for chunk in response.iter_bytes(1 << 20):
                                writer.write(chunk)
                        except BaseException:
                            writer.abort()
                            raise
                    return writer.finish(artifact.sha256)
        except RETRYABLE as exc:
            raise _http.give_up(exc, client.url, client.retry) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def report(self, job_id: str) -> str:
        """The job's self-contained HTML report."""
        return self._client.request("GET", f"/v1/jobs/{job_id}/report").text

    def download_report(self, job_id: str, path: str | Path) -> Path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(self.report(job_id), encoding="utf-8")
        return out


def _loads(data: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise CompaasError(f"the event stream sent data that is not JSON: {data[:200]!r}") from exc
    return value if isinstance(value, dict) else {"value": value}
