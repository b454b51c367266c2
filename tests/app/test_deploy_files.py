"""Dockerfile and docker-compose.yml agree with the settings, the CLI and the app (no Docker)."""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from app.cli import build_parser
from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]
PEPPER = "test-pepper-0123456789abcdef0123456789abcdef"
SETTINGS_VARS = {f"COMPAAS_{name.upper()}" for name in Settings.model_fields}
_INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Resolve compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?msg}, ${VAR?msg} and $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def resolve(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op is None:
            return current or ""
        if op.endswith("-"):
            return arg if unset else str(current)
        if unset:
            raise ValueError(f"required variable {name} is missing: {arg}")
        return str(current)

    return _INTERPOLATION.sub(resolve, value)


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return interpolate(raw, {"COMPAAS_API_KEY_PEPPER": PEPPER} if env is None else env)


@dataclass
class Stage:
    name: str
    parent: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def load_dockerfile() -> dict[str, Stage]:
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in joined.splitlines():
        if not line.strip():
            continue
        keyword, _, rest = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", rest.strip(), re.IGNORECASE)
            assert match, f"every stage is named: FROM {rest}"
            current = stages[match.group(2)] = Stage(match.group(2), match.group(1))
        else:
            assert current is not None, f"{keyword} before the first FROM"
            current.instructions.append((keyword, " ".join(rest.split())))
    return stages


def chain(stages: dict[str, Stage], name: str) -> list[tuple[str, str]]:
    """The instructions a target runs, its parent stages' first."""
    stage = stages[name]
    inherited = chain(stages, stage.parent) if stage.parent in stages else []
    return inherited + stage.instructions


def build_args(stages: dict[str, Stage], name: str, given: dict[str, str]) -> dict[str, str]:
    """The values of a target's ARGs: `given` (compose's build args), else their defaults."""
    values = {}
    for keyword, args in chain(stages, name):
        if keyword == "ARG":
            arg, _, default = args.partition("=")
            values[arg] = given.get(arg, default)
    return values


def runs_with(stages: dict[str, Stage], name: str, given: dict[str, str]) -> list[str]:
    """A target's RUN lines with its build args substituted ($NAME and ${NAME})."""
    values = build_args(stages, name, given)
    runs = [args for keyword, args in chain(stages, name) if keyword == "RUN"]
    return [
        re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), run) for run in runs
    ]


def exec_form(args: str) -> list[str]:
    parsed = yaml.safe_load(args)
    assert isinstance(parsed, list), f"use the exec form (a JSON list): {args}"
    return [str(a) for a in parsed]


def effective_command(service: dict[str, Any], stages: dict[str, Stage]) -> list[str] | None:
    if "command" in service:
        command = service["command"]
        return command if isinstance(command, list) else command.split()
    target = (service.get("build") or {}).get("target")
    if target is None:
        return None
    cmds = [args for keyword, args in chain(stages, target) if keyword == "CMD"]
    return exec_form(cmds[-1]) if cmds else None


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return load_dockerfile()


@pytest.fixture(scope="module")
def compaas_env(services: dict[str, Any]) -> dict[str, str]:
    env = services["api"]["environment"]
    for name in ("migrate", "worker", "inspector", "reconciler"):
        if name in services:
            assert services[name]["environment"] == env, f"{name} runs with the api's settings"
    return {k: str(v) for k, v in env.items()}


def test_every_compaas_variable_is_a_setting(services: dict[str, Any]) -> None:
    for name, service in services.items():
        env = service.get("environment") or {}
        assert isinstance(env, dict), f"{name}: write environment as a mapping"
        unknown = {k for k in env if k.startswith("COMPAAS_")} - SETTINGS_VARS
        assert not unknown, f"{name} sets variables Settings does not read: {sorted(unknown)}"


def test_compose_environment_validates_in_production(
    compaas_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.storage import get_blob_store
    from app.storage.s3 import S3BlobStore

    for name in SETTINGS_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in compaas_env.items():
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.mode == "production"
    assert settings.blob_backend == "s3"
    assert settings.api_key_pepper == PEPPER
    store = get_blob_store(settings)  # builds the client only; nothing is contacted
    assert isinstance(store, S3BlobStore)
    assert store.bucket == settings.s3_bucket


def test_the_pepper_is_required_and_has_no_default() -> None:
    with pytest.raises(ValueError, match="COMPAAS_API_KEY_PEPPER"):
        load_compose(env={})
    raw = (ROOT / "docker-compose.yml").read_text()
    assert re.search(r"COMPAAS_API_KEY_PEPPER: \$\{COMPAAS_API_KEY_PEPPER:\?", raw)


def test_service_commands_are_real_cli_commands(
    services: dict[str, Any], stages: dict[str, Stage]
) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    parser = build_parser()
    expected = {
        "migrate": "migrate",
        "api": "api",
        "worker": "worker",
        "worker-gpu": "worker",
        "inspector": "worker",
        "reconciler": "reconciler",
    }
    for name, subcommand in expected.items():
        if name not in services:
            assert name == "reconciler", f"compose has no {name} service"
            continue
        command = effective_command(services[name], stages)
        assert command, f"{name} has no command (compose `command` or Dockerfile CMD)"
        assert command[0] in scripts, f"{name} runs {command[0]!r}, not the `compaas` script"
        args = parser.parse_args(command[1:])  # exits (fails the test) on an unknown argument
        assert args.command == subcommand, f"{name} runs `{' '.join(command)}`"


def test_ports_agree(services: dict[str, Any], stages: dict[str, Stage]) -> None:
    assert "8000:8000" in [str(p) for p in services["api"]["ports"]]
    exposed = [args for keyword, args in chain(stages, "api") if keyword == "EXPOSE"]
    assert exposed == ["8000"]
    api_args = build_parser().parse_args(effective_command(services["api"], stages)[1:])  # type: ignore[index]
    assert (api_args.host, api_args.port) == ("0.0.0.0", 8000)


def test_api_image_never_installs_torch(stages: dict[str, Stage]) -> None:
    runs = [args for keyword, args in chain(stages, "api") if keyword == "RUN"]
    assert any(re.search(r"pip install \.(\s|$)", run) for run in runs), "api installs the core"
    assert not [run for run in runs if "torch" in run or "[worker]" in run]


def test_worker_installs_cpu_torch_before_the_worker_extra(stages: dict[str, Stage]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pin = next(r for r in pyproject["project"]["optional-dependencies"]["worker"] if "torch" in r)
    runs = runs_with(stages, "worker", {})
    torch_at = next(
        i
        for i, run in enumerate(runs)
        if f"pip install {pin}" in run and "--index-url https://download.pytorch.org/whl/cpu" in run
    )
    extra_at = next(i for i, run in enumerate(runs) if '".[worker]"' in run or "'.[worker]'" in run)
    assert torch_at < extra_at


def test_images_copy_what_the_package_needs_and_run_unprivileged(
    stages: dict[str, Stage],
) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = " ".join(args for keyword, args in chain(stages, "base") if keyword == "COPY")
    for package in [p.rstrip("*") for p in packages] + [pyproject["project"]["readme"]]:
        assert package in copied, f"the Dockerfile does not copy {package}"
    for target in ("api", "worker"):
        users = [args for keyword, args in chain(stages, target) if keyword == "USER"]
        assert users and users[-1] not in ("root", "0"), f"{target} runs as root"
        assert stages[target].parent in stages or stages[target].parent.startswith(
            "python:3.11-slim"
        )
    assert stages["base"].parent == "python:3.11-slim"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv", ".git", "var", ".env"):
        assert path in ignored, f".dockerignore leaves {path} in the build context"


def test_migrate_runs_before_api_and_worker(services: dict[str, Any]) -> None:
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"].get("restart", "no") == "no"
    for name in ("api", "worker", "inspector", "worker-gpu", "reconciler"):
        if name in services:
            condition = services[name]["depends_on"]["migrate"]["condition"]
            assert condition == "service_completed_successfully", name
    assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["api"]["depends_on"]["createbucket"]["condition"] == (
        "service_completed_successfully"
    )


def test_every_awaited_health_is_checked(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on a missing service {dependency}"
            if spec.get("condition") == "service_healthy":
                check = services[dependency].get("healthcheck") or {}
                assert check.get("test") and not check.get("disable"), dependency
            if spec.get("condition") == "service_completed_successfully":
                assert services[dependency].get("restart", "no") == "no", dependency


def test_hostnames_are_compose_services(
    services: dict[str, Any], compaas_env: dict[str, str], compose: dict[str, Any]
) -> None:
    database = urlsplit(compaas_env["COMPAAS_DATABASE_URL"])
    assert database.hostname == "postgres" and database.port == 5432
    pg = services["postgres"]["environment"]
    assert (database.username, database.password) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"])
    assert database.path.lstrip("/") == pg["POSTGRES_DB"]

    broker = urlsplit(compaas_env["COMPAAS_BROKER_URL"])
    assert broker.scheme == "redis" and broker.hostname == "redis" and broker.port == 6379

    s3 = urlsplit(compaas_env["COMPAAS_S3_ENDPOINT_URL"])
    assert s3.hostname == "minio" and s3.port == 9000
    minio = services["minio"]["environment"]
    assert compaas_env["COMPAAS_S3_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert compaas_env["COMPAAS_S3_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    assert len(minio["MINIO_ROOT_PASSWORD"]) >= 8, "MinIO refuses passwords under 8 characters"
    create = " ".join(services["createbucket"]["entrypoint"])
    assert f"local/{compaas_env['COMPAAS_S3_BUCKET']}" in create
    assert "http://minio:9000" in create
    for host in (database.hostname, broker.hostname, s3.hostname):
        assert host in services
    assert {"postgres-data", "minio-data"} <= set(compose["volumes"])


def test_healthchecks_probe_the_real_healthz_route(
    services: dict[str, Any], stages: dict[str, Stage]
) -> None:
    from app.api.routes.health import router

    routes = {getattr(route, "path", None) for route in router.routes}
    assert {"/healthz", "/readyz"} <= routes
    checks = [args for keyword, args in chain(stages, "api") if keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "urllib" in checks[0], "slim images have no curl: probe with python"
    probed = re.findall(r"https?://[\w.]+:(\d+)(/[\w/]*)", checks[0])
    compose_checks = [
        " ".join(map(str, service["healthcheck"]["test"]))
        for service in services.values()
        if (service.get("build") or {}).get("target") == "api"
        and "test" in service.get("healthcheck", {})
    ]
    for check in compose_checks:
        probed += re.findall(r"https?://[\w.]+:(\d+)(/[\w/]*)", check)
    assert probed, "the api healthcheck probes no URL"
    for port, path in probed:
        assert (port, path) == ("8000", "/healthz")


def test_the_gpu_worker_consumes_the_queue_the_api_routes_training_to(
    stages: dict[str, Stage],
) -> None:
    """Profile `gpu`: a worker image with CUDA torch, given one NVIDIA GPU, set to train on
    it and consuming the queue COMPAAS_GPU_QUEUE names to the API; without that variable the
    API routes nothing there."""
    assert load_compose()["services"]["api"]["environment"]["COMPAAS_GPU_QUEUE"] == ""
    services = load_compose({"COMPAAS_API_KEY_PEPPER": PEPPER, "COMPAAS_GPU_QUEUE": "gpu"})[
        "services"
    ]
    gpu, api_env = services["worker-gpu"], services["api"]["environment"]
    assert gpu["profiles"] == ["gpu"]
    assert all("profiles" not in services[name] for name in ("api", "worker", "reconciler"))
    assert api_env["COMPAAS_GPU_QUEUE"] == "gpu"
    assert gpu["environment"] == {
        **api_env,
        "COMPAAS_WORKER_QUEUES": "gpu",
        "COMPAAS_DEVICE": "cuda",
    }
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        **{k.removeprefix("COMPAAS_").lower(): v for k, v in gpu["environment"].items()},
    )
    assert (settings.worker_queues, settings.device) == ("gpu", "cuda")
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert gpu["depends_on"] == services["worker"]["depends_on"]

    assert gpu["build"]["target"] == "worker"
    runs = runs_with(stages, "worker", gpu["build"]["args"])
    assert any(
        re.search(r"pip install torch==\S+ --index-url https://download\.pytorch\.org/whl/cu\d+", r)
        for r in runs
    ), runs


def test_the_api_runs_one_process_per_core_unless_told(
    services: dict[str, Any], stages: dict[str, Stage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMPAAS_API_WORKERS reaches `compaas api` from compose and from the image: unset, the
    API runs one process per usable core; set, that many."""
    from app.processes import api_processes, available_cpus

    env_lines = [args for keyword, args in chain(stages, "api") if keyword == "ENV"]
    assert "COMPAAS_API_WORKERS=0" in env_lines, "the api image documents the default"
    api_args = build_parser().parse_args(effective_command(services["api"], stages)[1:])  # type: ignore[index]
    assert api_args.command == "api" and api_args.workers is None, "the CMD leaves it to the env"
    for given, expected in ((None, available_cpus()), ("3", 3)):
        env = {"COMPAAS_API_KEY_PEPPER": PEPPER}
        if given is not None:
            env["COMPAAS_API_WORKERS"] = given
        api_env = load_compose(env)["services"]["api"]["environment"]
        for name in SETTINGS_VARS:
            monkeypatch.delenv(name, raising=False)
        for name, value in api_env.items():
            monkeypatch.setenv(name, str(value))
        settings = Settings(_env_file=None)  # type: ignore[call-arg]
        assert settings.run_reconciler is False, "compose runs the reconciler as its own service"
        assert api_processes(settings) == expected
        assert "reconciler" in services and services["reconciler"]["command"][-1] == "reconciler"


# ----------------------------------------------------------------------------- ops-metrics


def exported_metric_names() -> set[str]:
    """Every sample name /metrics can export: the request histogram and every cluster family
    (a histogram's _bucket/_count/_sum, a counter's _total), read from the code itself."""
    from app.api.telemetry import REQUEST_SECONDS
    from app.services.telemetry import Reading, families

    found = [*REQUEST_SECONDS.collect(), *families(Reading(up={"database": True}))]
    names: set[str] = set()
    for family in found:
        suffixes = {
            "histogram": ("_bucket", "_count", "_sum"),
            "counter": ("_total",),
        }.get(family.type, ("",))
        names |= {family.name + suffix for suffix in suffixes}
    return names


def test_flower_runs_under_its_own_profile_on_localhost_with_a_login(
    services: dict[str, Any], compaas_env: dict[str, str]
) -> None:
    flower = services["flower"]
    assert flower["profiles"] == ["flower"]
    command = flower["command"]
    assert command[0] == "celery" and "flower" in command
    broker = next(a.split("=", 1)[1] for a in command if a.startswith("--broker="))
    assert broker == compaas_env["COMPAAS_BROKER_URL"], "Flower watches the workers' broker"
    assert flower["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "FLOWER_BASIC_AUTH" in flower["environment"], "the login comes from the environment"
    for port in flower["ports"]:
        assert str(port).startswith("127.0.0.1:"), "Flower can stop workers: localhost only"
    others = ("api", "worker", "inspector", "reconciler", "migrate")
    assert all("profiles" not in services[name] for name in others)


def test_the_grafana_dashboard_uses_only_metrics_the_app_exports() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "compaas.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    exported = exported_metric_names()
    used: set[str] = set()
    for expr in exprs:
        names = set(re.findall(r"\b(compaas_[a-z0-9_]+)", expr))
        assert names, f"a query that reads no compaas metric: {expr}"
        unknown = names - exported
        assert not unknown, f"{expr} reads {sorted(unknown)}, which /metrics never exports"
        used |= names
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("request rate", "p50", "p95", "p99", "queue depth", "heartbeat", "sandbox"):
        assert topic in titles, f"no panel for {topic}"
    for family in (
        "compaas_http_request_duration_seconds_bucket",
        "compaas_job_step_duration_seconds_bucket",
        "compaas_queue_depth",
        "compaas_worker_last_seen_timestamp_seconds",
        "compaas_sandbox_kills_total",
    ):
        assert family in used, f"the dashboard does not show {family}"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_inspections_have_a_worker_of_their_own(
    services: dict[str, Any], stages: dict[str, Stage], compaas_env: dict[str, str]
) -> None:
    """The `inspector` consumes exactly the queue the API publishes inspections to, one at a
    time, in the worker image; `worker` consumes only the job queue, so a running job never
    holds an upload back."""
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        **{k.removeprefix("COMPAAS_").lower(): v for k, v in compaas_env.items()},
    )
    parser = build_parser()
    inspector = services["inspector"]
    args = parser.parse_args(effective_command(inspector, stages)[1:])  # type: ignore[index]
    assert (args.command, args.queues, args.concurrency) == (
        "worker",
        settings.inspection_queue,
        1,
    )
    assert settings.inspects_apart and settings.inspection_queue == "inspect"
    assert inspector["build"]["target"] == "worker", "inspection loads .pt2 uploads with torch"
    assert inspector["depends_on"] == services["worker"]["depends_on"]
    assert "profiles" not in inspector
    worker = parser.parse_args(effective_command(services["worker"], stages)[1:])  # type: ignore[index]
    consumed = (worker.queues or settings.worker_queues).split(",")
    assert settings.inspection_queue not in consumed
    assert settings.job_queues.split(",") == consumed
