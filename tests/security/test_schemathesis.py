"""schemathesis, every check, against /openapi.json of the in-process app (embedded, no worker)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.security.limits_support import Embedded, embedded

pytestmark = pytest.mark.slow

# Examples per operation and mode: 19 operations × 2 modes × 50 took 26 s here (100: 92 s).
EXAMPLES = int(os.environ.get("COMPAAS_SCHEMATHESIS_EXAMPLES", "50"))
UPLOADS = ("/v1/models", "/v1/datasets")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Embedded, str]]:
    # Fuzzing sends far more than a team's per-minute budget; the limits have their own tests.
    with embedded(
        tmp_path_factory.mktemp("schemathesis"), team_requests_per_window=1_000_000
    ) as stack:
        yield stack, stack.new_team("fuzz")["Authorization"]


def _fuzz(operation: Any, mode: GenerationMode, key: str) -> None:
    upload = operation.method == "post" and operation.path in UPLOADS

    @given(case=operation.as_strategy(mode, headers={"Authorization": key}))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        # A schema cannot say which bytes make a model or a dataset, nor which strings are
        # cursors this API issued: schema-valid ones are refused with a 422 naming `file` or
        # `cursor`, which is checked here instead of by positive_data_acceptance.
        opaque = upload or "cursor" in (case.query or {})
        response = case.call_and_validate(
            headers={"Authorization": key},
            excluded_checks=[positive_data_acceptance] if opaque else [],
        )
        if opaque and mode == GenerationMode.POSITIVE and response.status_code == 422:
            assert response.json()["field"] in ("file", "cursor"), response.text

    check()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_conforms_to_its_schema(deployment: tuple[Embedded, str], mode: GenerationMode) -> None:
    """0 server errors and 0 schema violations, every check on, for every operation."""
    stack, key = deployment
    schema = schemathesis.openapi.from_asgi("/openapi.json", stack.client.app)
    failures: dict[str, str] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        try:
            _fuzz(operation, mode, key)
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE  # nothing in it can be schema-invalid
        except (Exception, BaseExceptionGroup) as exc:  # report every failing operation
            failures[operation.label] = str(exc)[:3000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
