"""The asynchronous client: `AsyncClient`, the same surface as `Client` with `await`."""

from __future__ import annotations

import asyncio
import builtins
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse
from tenacity import AsyncRetrying

from compaas import _http
from compaas._http import RETRYABLE, RetryPolicy
from compaas.client import falls_back
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


class AsyncJob(JobView):
    """A compression job; like `Job`, with awaitable methods."""

    def __init__(self, client: AsyncClient, read: JobRead) -> None:
        super().__init__(read, client.url)
        self._client = client

    async def refresh(self) -> AsyncJob:
        self.read = (await self._client.jobs.get(self.id)).read
        return self

    async def wait(
        self, timeout: float | None = None, on_event: EventHandler | None = None
    ) -> AsyncJob:
        self.read = (await self._client.jobs.wait(self.id, timeout=timeout, on_event=on_event)).read
        return self

    def stream(self) -> AsyncIterator[JobEvent]:
        return self._client.jobs.stream(self.id)

    async def cancel(self) -> AsyncJob:
        self.read = (await self._client.jobs.cancel(self.id)).read
        return self

    async def retry(self) -> AsyncJob:
        self.read = (await self._client.jobs.retry(self.id)).read
        return self

    async def download(
        self, directory: str | Path = ".", roles: set[str] | None = None
    ) -> list[Path]:
        return await self._client.jobs.download(self, directory, roles=roles)

    async def download_report(self, path: str | Path) -> Path:
        return await self._client.jobs.download_report(self.id, path)


class AsyncClient:
    """The compaas API over HTTP for asyncio; see `Client`."""

    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        poll_interval_s: float = 1.0,
    ) -> None:
        profile = resolve(url, key)
        self.url = profile.url
        self.retry = retry or RetryPolicy()
        self.poll_interval_s = poll_interval_s
        headers = {"User-Agent": _http.user_agent(), "Accept": "application/json"}
        if profile.api_key:
            headers["Authorization"] = f"Bearer {profile.api_key}"
        self.http = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
        )
        self.models = AsyncModels(self)
        self.datasets = AsyncDatasets(self)
        self.jobs = AsyncJobs(self)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def request(
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
        headers = {}
        if method == "POST":
            headers["Idempotency-Key"] = idempotency_key or _http.new_idempotency_key()
        try:
            async for attempt in AsyncRetrying(**_http.retry_options(self.retry)):
                with attempt:
                    if upload is not None:
                        with upload.open("rb") as fh:
                            files = {"file": (upload.name, fh, "application/octet-stream")}
                            response = await self.http.request(
                                method, path, files=files, data=data, headers=headers
                            )
                    else:
                        response = await self.http.request(
                            method, path, json=json, params=params, headers=headers
                        )
                    return _http.check(response)
        except RETRYABLE as exc:
            raise _http.give_up(exc, self.url, self.retry) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return (await self.request("GET", path, params=params)).json()

    async def pages(
        self, path: str, params: dict[str, Any] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        query = dict(params or {})
        while True:
            page = await self.get_json(path, {k: v for k, v in query.items() if v is not None})
            for item in page["items"]:
                yield item
            if not page.get("next_cursor"):
                return
            query["cursor"] = page["next_cursor"]

    async def compress(
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
    ) -> AsyncJob:
        """See `Client.compress`."""
        ready = (
            model
            if isinstance(model, ModelRead)
            else await self.models.upload(model, name=name, wait=True, timeout=timeout)
        )
        data = (
            dataset
            if dataset is None or isinstance(dataset, DatasetRead)
            else await self.datasets.upload(dataset)
        )
        job = await self.jobs.create(
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
        if not wait:
            return job
        return await self.jobs.wait(job.id, timeout=timeout, on_event=on_event)


class AsyncModels:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def upload(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> ModelRead:
        file = _http.existing_file(Path(path))
        response = await self._client.request(
            "POST",
            "/v1/models",
            upload=file,
            data={"name": name} if name else None,
            idempotency_key=idempotency_key,
        )
        model = ModelRead.model_validate(response.json())
        return await self.wait_ready(model.id, timeout=timeout) if wait else model

    async def get(self, model_id: str) -> ModelRead:
        return ModelRead.model_validate(await self._client.get_json(f"/v1/models/{model_id}"))

    async def list(self) -> list[ModelRead]:
        return [ModelRead.model_validate(m) async for m in self._client.pages("/v1/models")]

    async def delete(self, model_id: str) -> None:
        await self._client.request("DELETE", f"/v1/models/{model_id}")

    async def wait_ready(self, model_id: str, timeout: float | None = None) -> ModelRead:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            model = await self.get(model_id)
            if model.status == "ready":
                return model
            if model.status == "invalid":
                raise UploadInvalid(
                    "model", model.id, model.error.model_dump() if model.error else None
                )
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"model {model_id} still {model.status} after {timeout} s")
            await asyncio.sleep(min(self._client.poll_interval_s, 0.5))


class AsyncDatasets:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def upload(
        self, path: str | Path, *, name: str | None = None, idempotency_key: str | None = None
    ) -> DatasetRead:
        file = _http.existing_file(Path(path))
        response = await self._client.request(
            "POST",
            "/v1/datasets",
            upload=file,
            data={"name": name} if name else None,
            idempotency_key=idempotency_key,
        )
        return DatasetRead.model_validate(response.json())

    async def get(self, dataset_id: str) -> DatasetRead:
        body = await self._client.get_json(f"/v1/datasets/{dataset_id}")
        return DatasetRead.model_validate(body)

    async def list(self) -> list[DatasetRead]:
        return [DatasetRead.model_validate(d) async for d in self._client.pages("/v1/datasets")]

    async def delete(self, dataset_id: str) -> None:
        await self._client.request("DELETE", f"/v1/datasets/{dataset_id}")


class AsyncJobs:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    def _job(self, response: httpx.Response) -> AsyncJob:
        return AsyncJob(self._client, JobRead.model_validate(response.json()))

    async def create(
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
    ) -> AsyncJob:
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
        response = await self._client.request(
            "POST", "/v1/jobs", json=body, idempotency_key=idempotency_key
        )
        return self._job(response)

    async def get(self, job_id: str) -> AsyncJob:
        return self._job(await self._client.request("GET", f"/v1/jobs/{job_id}"))

    async def status(self, job_id: str) -> JobStatusRead:
        body = await self._client.get_json(f"/v1/jobs/{job_id}", {"view": "status"})
        return JobStatusRead.model_validate(body)

    async def list(self, status: str | None = None, limit: int | None = None) -> list[AsyncJob]:
        jobs: list[AsyncJob] = []
        async for item in self._client.pages("/v1/jobs", {"status": status}):
            jobs.append(AsyncJob(self._client, JobRead.model_validate(item)))
            if limit is not None and len(jobs) >= limit:
                break
        return jobs

    async def cancel(self, job_id: str) -> AsyncJob:
        return self._job(await self._client.request("POST", f"/v1/jobs/{job_id}/cancel"))

    async def retry(self, job_id: str) -> AsyncJob:
        return self._job(await self._client.request("POST", f"/v1/jobs/{job_id}/retry"))

    async def recipe(self, job_id: str) -> dict[str, Any]:
        return dict(await self._client.get_json(f"/v1/jobs/{job_id}/recipe"))

    async def stream(self, job_id: str, after: int | None = None) -> AsyncIterator[JobEvent]:
        """See `Jobs.stream`."""
        client, last, failures = self._client, after or 0, 0
        while True:
            seen_done = False
            try:
                async for event in self._stream_once(job_id, last):
                    last, failures, seen_done = event.id, 0, event.terminal
                    yield event
            except RETRYABLE as exc:
                failures += 1
                if failures >= client.retry.attempts:
                    raise _http.give_up(exc, client.url, client.retry) from exc
                await asyncio.sleep(_http.backoff_s(client.retry, failures))
                continue
            if seen_done:
                return
            failures += 1
            if failures >= client.retry.attempts:
                raise NetworkError(f"the event stream of job {job_id} kept closing early")

    async def _stream_once(self, job_id: str, last: int) -> AsyncIterator[JobEvent]:
        http = self._client.http
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(last)}
        async with aconnect_sse(
            http, "GET", f"/v1/jobs/{job_id}/events", headers=headers
        ) as source:
            if source.response.status_code >= 400:
                await source.response.aread()
                _http.check(source.response)
            async for sse in source.aiter_sse():
                if not sse.data or not sse.id:
                    continue
                yield JobEvent(int(sse.id), sse.event, _loads(sse.data))

    async def wait(
        self, job_id: str, timeout: float | None = None, on_event: EventHandler | None = None
    ) -> AsyncJob:
        """See `Jobs.wait`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            async for event in self.stream(job_id):
                if on_event is not None:
                    on_event(event)
                if event.terminal:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise WaitTimeout(f"job {job_id} still running after {timeout} s")
        except (NetworkError, ApiError) as exc:
            if not falls_back(exc):
                raise
            return await self._poll(job_id, deadline, timeout)
        job = await self.get(job_id)
        return job if job.done else await self._poll(job_id, deadline, timeout)

    async def _poll(self, job_id: str, deadline: float | None, timeout: float | None) -> AsyncJob:
        interval, last_progress = self._client.poll_interval_s, -1.0
        while True:
            view = await self.status(job_id)
            if view.status in TERMINAL_STATUSES:
                return await self.get(job_id)
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"job {job_id} still {view.status} after {timeout} s")
            interval = _http.poll_interval(
                view.progress != last_progress, interval, self._client.poll_interval_s
            )
            last_progress = view.progress
            await asyncio.sleep(interval)

    async def download(
        self, job: str | AsyncJob, directory: str | Path = ".", roles: set[str] | None = None
    ) -> builtins.list[Path]:
        read = job if isinstance(job, AsyncJob) else await self.get(job)
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        taken: set[Path] = set()
        return [
            await self.download_artifact(artifact, out, taken)
            for artifact in read.artifacts
            if roles is None or artifact.role in roles
        ]

    async def download_artifact(
        self, artifact: ArtifactRead, directory: Path, taken: set[Path] | None = None
    ) -> Path:
        client = self._client
        try:
            async for attempt in AsyncRetrying(**_http.retry_options(client.retry)):
                with attempt:
                    url = f"/v1/artifacts/{artifact.id}/download"
                    async with client.http.stream("GET", url) as response:
                        if response.status_code >= 400:
                            await response.aread()
                            _http.check(response)
                        name = _http.download_name(response, artifact)
                        path = _http.unique_path(directory, name, artifact, taken or set())
                        writer = _http.HashingWriter(path)
                        try:
                            async for chunk in response.aiter_bytes(1 << 20):
                                writer.write(chunk)
                        except BaseException:
                            writer.abort()
                            raise
                    return writer.finish(artifact.sha256)
        except RETRYABLE as exc:
            raise _http.give_up(exc, client.url, client.retry) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def report(self, job_id: str) -> str:
        return (await self._client.request("GET", f"/v1/jobs/{job_id}/report")).text

    async def download_report(self, job_id: str, path: str | Path) -> Path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(await self.report(job_id), encoding="utf-8")
        return out


def _loads(data: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise CompaasError(f"the event stream sent data that is not JSON: {data[:200]!r}") from exc
    return value if isinstance(value, dict) else {"value": value}
