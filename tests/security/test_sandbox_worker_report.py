"""Over real HTTP with a real worker: TorchScript uploads get a 422; /readyz shows the sandbox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack, wait_for
from tests.security.model_code_files import CANARY_TEXT, evil_torchscript

pytestmark = pytest.mark.integration


def test_torchscript_upload_is_refused_and_readyz_shows_protections(
    sqlite_stack: Stack,
    tmp_path: Path,
) -> None:
    secret, canary = tmp_path / "secret.txt", tmp_path / "canary.txt"
    secret.write_bytes(b"SECRET")
    model = evil_torchscript(tmp_path / "evil.pt", secret, canary)
    canary.write_bytes(CANARY_TEXT)
    _, headers = sqlite_stack.new_team("attacker")
    response = sqlite_stack.upload("models", model, headers, name="evil")
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == "torchscript_refused" and "torch.export" in body["detail"]
    assert canary.read_bytes() == CANARY_TEXT

    def reported() -> list[dict[str, Any]] | None:
        hosts = sqlite_stack.client.get("/readyz").json()["sandbox"]["worker_hosts"]
        return hosts if isinstance(hosts, list) and hosts else None

    hosts = wait_for(reported, timeout=60)
    protections = hosts[0]["protections"]
    assert protections["env_scrubbed"] and protections["isolated_cwd"]
    assert protections["netns"] or protections["seccomp"]
