"""A job as the SDK hands it back: the API's JobRead plus shortcuts."""

from __future__ import annotations

from typing import Any

from compaas.types import TERMINAL_STATUSES, ArtifactRead, JobRead, JobStepRead


class JobView:
    """Read-only shortcuts over `read` (the API's JobRead), shared by Job and AsyncJob."""

    def __init__(self, read: JobRead, base_url: str) -> None:
        self.read = read
        self._base_url = base_url

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.status} {self.progress:.0%}>"

    @property
    def id(self) -> str:
        return self.read.id

    @property
    def status(self) -> str:
        return self.read.status

    @property
    def progress(self) -> float:
        return self.read.progress

    @property
    def done(self) -> bool:
        return self.read.status in TERMINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.read.status == "succeeded"

    @property
    def metrics(self) -> dict[str, Any] | None:
        """{"original", "result", "ratios", …}: the job's measured numbers (docs/metrics.md)."""
        return self.read.metrics

    @property
    def ratios(self) -> dict[str, Any]:
        return dict((self.read.metrics or {}).get("ratios") or {})

    @property
    def steps(self) -> list[JobStepRead]:
        return self.read.steps

    @property
    def artifacts(self) -> list[ArtifactRead]:
        return self.read.artifacts

    @property
    def final_artifacts(self) -> list[ArtifactRead]:
        return [a for a in self.read.artifacts if a.role == "final"]

    @property
    def error(self) -> dict[str, Any] | None:
        return self.read.error.model_dump() if self.read.error else None

    @property
    def warnings(self) -> list[str]:
        return self.read.warnings

    @property
    def report_url(self) -> str:
        """The HTML report (send the API key as a Bearer token; `download_report` saves it)."""
        return f"{self._base_url}/v1/jobs/{self.id}/report"
