"""Settings: one pydantic-settings class, environment prefix COMPAAS_."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.torchgraph.device import DeviceSetting


class Settings(BaseSettings):
    """Everything the API, the worker and the CLI read from the environment."""

    model_config = SettingsConfigDict(env_prefix="COMPAAS_", env_file=".env", extra="ignore")

    mode: Literal["embedded", "production"] = "embedded"
    data_dir: Path = Path("./var")
    database_url: str = ""
    broker_url: str = ""

    blob_backend: Literal["local", "s3"] = "local"
    blob_dir: Path | None = None
    s3_bucket: str = "compaas"
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None

    api_key_pepper: str = ""
    # The ed25519 private key (PEM, PKCS8) that signs provenance statements; unset in embedded
    # mode: DATA_DIR/signing_key.pem, generated on first start (app.signing).
    signing_key_file: Path | None = None
    # Public keys (PEM files, comma-separated) of retired signing keys, still served by
    # GET /v1/keys so that statements they signed keep verifying.
    signing_previous_public_keys: str = ""
    ops_token: str = ""
    max_upload_bytes: int = 512 * 1024 * 1024
    # Longest pause between body chunks, and longest whole upload, before a 408.
    upload_idle_timeout_s: float = Field(default=30.0, gt=0)
    upload_deadline_s: float = Field(default=900.0, gt=0)
    job_time_limit_s: int = 1800
    job_memory_limit_mb: int = 8192
    inspect_time_limit_s: int = 300
    # Sandbox protections a job needs, comma-separated ("network" = netns or seccomp; see
    # worker/confine.py); a job fails with sandbox_unavailable when one can't be applied.
    sandbox_require: str = "network"
    latency_threads: int = 1
    # CPU threads a job's torch training uses; 0: the worker's OMP_NUM_THREADS when set, else
    # every CPU the worker may run on (worker.runner.train_threads). With several job processes
    # per machine (--concurrency > 1), set it to CPUs / processes.
    train_threads: int = Field(default=0, ge=0, le=256)
    max_attempts: int = 3
    lease_s: int = 30
    heartbeat_s: float = 2.0
    # A published message not seen in the broker this long after is lost, and published again.
    requeue_after_s: int = 60
    # A model whose inspection message was lost this many times ends invalid (inspection_lost).
    inspect_max_publishes: int = Field(default=3, ge=1)
    reconcile_interval_s: float = 5.0
    # The janitor (app.services.janitor), run from the reconciler loop at most this often
    # (0: on every pass); a blob with no row is deleted once it has been seen without one for
    # orphan_blob_grace_s.
    janitor_interval_s: float = Field(default=300.0, ge=0)
    orphan_blob_grace_s: float = Field(default=3600.0, ge=0)
    # `compaas api` processes (uvicorn workers); 0 = one per CPU core this container or machine
    # may use (app.processes). The embedded reconciler thread (run_reconciler) allows only one.
    api_workers: int = Field(default=0, ge=0)
    # Database connections, per process: kept open (pool size) and opened on demand on top
    # (overflow). Unset: the API's share of api_db_connections (the most that all
    # api_workers processes together open), and 5 + 5 in workers and the reconciler.
    db_pool_size: int | None = Field(default=None, ge=1)
    db_max_overflow: int | None = Field(default=None, ge=0)
    api_db_connections: int = Field(default=40, ge=2)
    run_reconciler: bool | None = None
    broker_visibility_timeout_s: int | None = None
    worker_queues: str = "default"
    # Where a worker's torch training runs: auto (a GPU when torch can use one), cpu, cuda.
    device: DeviceSetting = "auto"
    # The queue of GPU workers ("" = none): jobs that train a torch model go there
    # (app.services.routing); every other job goes to the first of worker_queues.
    gpu_queue: str = ""
    # The queue of model inspections, consumed by a worker of its own (compose: `inspector`;
    # `compaas up` starts one), so an upload is inspected at once however long jobs run.
    # "" = inspections go to the default queue and wait behind the jobs there.
    inspect_queue: str = "inspect"

    # Abuse limits (429/413/422 problem+json); generous enough for the test suite's bursts.
    rate_limit_storage_url: str = ""  # "" → the broker's Redis if it is one, else in-process
    team_requests_per_window: int = 3000
    team_window_s: int = 60
    team_max_inflight_requests: int = 64
    team_max_inflight_uploads: int = 8
    team_max_active_jobs: int = 100
    auth_failures_per_window: int = 60
    auth_failure_window_s: int = 60
    max_json_body_bytes: int = 256 * 1024
    max_pipeline_steps: int = 32

    # Log lines (app.logs): json, console (human-readable) or auto (console on a terminal).
    log_format: Literal["auto", "json", "console"] = "auto"
    # One line a request (app.api.telemetry); off, only 5xx requests are logged.
    access_log: bool = True

    @model_validator(mode="after")
    def _defaults_and_secrets(self) -> Settings:
        data_dir = self.data_dir.resolve()
        if not self.database_url:
            if self.mode == "production":
                raise ValueError("COMPAAS_DATABASE_URL is required when COMPAAS_MODE=production")
            self.database_url = f"sqlite:///{data_dir / 'compaas.db'}"
        if not self.broker_url:
            if self.mode == "production":
                raise ValueError("COMPAAS_BROKER_URL is required when COMPAAS_MODE=production")
            self.broker_url = "filesystem://"
        if self.run_reconciler is None:
            self.run_reconciler = self.mode == "embedded"
        if self.blob_dir is None:
            self.blob_dir = data_dir / "blobs"
        if self.signing_key_file == Path():  # set but empty (compose's `${VAR:-}`): unset
            self.signing_key_file = None
        if self.ops_token and len(self.ops_token) < 32:
            raise ValueError(
                "COMPAAS_OPS_TOKEN must be a random secret of at least 32 characters "
                "(e.g. `openssl rand -hex 32`), or unset to leave /metrics and /docs open"
            )
        if self.mode == "production":
            if len(self.api_key_pepper) < 32 or self.api_key_pepper.startswith("change"):
                raise ValueError(
                    "COMPAAS_API_KEY_PEPPER must be a random secret of at least 32 characters "
                    "in production (e.g. `openssl rand -hex 32`)"
                )
            if self.blob_backend == "s3" and not (
                self.s3_access_key_id and self.s3_secret_access_key
            ):
                raise ValueError(
                    "COMPAAS_S3_ACCESS_KEY_ID/COMPAAS_S3_SECRET_ACCESS_KEY are required"
                )
        return self

    def db_pool(self, api_processes: int | None = None) -> tuple[int, int]:
        """(pool size, max overflow) for one process: what db_pool_size/db_max_overflow say,
        else, in one of `api_processes` API processes, its share of api_db_connections (half
        kept open, half on demand), else 5 + 5."""
        if api_processes is None:
            size, overflow = 5, 5
        else:
            share = max(2, self.api_db_connections // max(1, api_processes))
            size = (share + 1) // 2
            overflow = share - size
        return (
            self.db_pool_size if self.db_pool_size is not None else size,
            self.db_max_overflow if self.db_max_overflow is not None else overflow,
        )

    @property
    def default_queue(self) -> str:
        """Where every task goes that is not routed to the GPU queue."""
        return self.worker_queues.split(",")[0]

    @property
    def inspection_queue(self) -> str:
        """Where model inspections go: inspect_queue, or the default queue when it is ""."""
        return self.inspect_queue or self.default_queue

    @property
    def job_queues(self) -> str:
        """Every queue the API publishes jobs to (what `compaas up`'s job worker consumes): the
        worker queues and the GPU queue, without the inspection queue."""
        names = [*self.worker_queues.split(","), *([self.gpu_queue] if self.gpu_queue else [])]
        jobs = [n for n in names if n != self.inspect_queue or n == self.default_queue]
        return ",".join(dict.fromkeys(jobs))

    @property
    def inspects_apart(self) -> bool:
        """Whether inspections have a queue no job goes to (then a worker of their own)."""
        return self.inspection_queue not in self.job_queues.split(",")

    @property
    def published_queues(self) -> str:
        """Every queue the API publishes to: the job queues and the inspection queue."""
        names = [*self.job_queues.split(","), self.inspection_queue]
        return ",".join(dict.fromkeys(names))

    @property
    def broker_dir(self) -> Path:
        return self.data_dir.resolve() / "broker"

    @property
    def sandbox_requirements(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in self.sandbox_require.split(",") if n.strip())

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir.resolve() / "tmp"


@lru_cache
def get_settings() -> Settings:
    return Settings()
