"""The `compaas` command: run the service (up, api, worker, reconciler, migrate), manage teams
(admin), tools (example, decode, verify), and use the API (login, models, datasets, jobs,
report: `compaas.cli`, on the SDK). Exit codes: docs/sdk.md#exit-codes."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from typer.core import TyperGroup

from app.config import Settings, get_settings
from compaas.cli import register as register_team_commands

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from app.db.models import Team
    from app.db.repositories import TeamAdminRepository


def _settings() -> Settings:
    get_settings.cache_clear()
    return get_settings()


def _migrate(settings: Settings) -> None:
    from app.db.migrate import upgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)


def worker_command(
    queues: str, concurrency: int, loglevel: str = "INFO", name: str = "compaas"
) -> list[str]:
    """A Celery worker consuming `queues`; `name`@host is its node name (unique per machine)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        f"--loglevel={loglevel}",
        "--pool=prefork",
        f"--concurrency={concurrency}",
        f"--queues={queues}",
        "--without-mingle",
        "--without-gossip",
        f"--hostname={name}@%h",
    ]


# a running job gets this long to finish on shutdown; after that its lease expires and the
# reconciler re-queues it on the next start
WORKER_STOP_GRACE_S = 10.0


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when `compaas up` dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def start_worker_group(cmd: list[str]) -> subprocess.Popen[bytes]:
    """The worker in a process group of its own: stopping it reaches its pool processes."""
    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent())  # noqa: PLW1509


def stop_worker_group(worker: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the worker's group (warm shutdown), then SIGKILL whatever is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)  # a job past the grace, or pool leftovers
    worker.wait()


def worker_name(settings: Settings, queues: str) -> str:
    """The node name of a worker on `queues`: `compaas-inspect` for one that consumes only the
    inspection queue, so it and a job worker on one machine have names of their own."""
    if settings.inspects_apart and queues == settings.inspection_queue:
        return "compaas-inspect"
    return "compaas"


def embedded_worker_commands(settings: Settings, concurrency: int) -> list[list[str]]:
    """The worker groups `compaas up` runs: one on the job queues (`concurrency` processes) and,
    unless inspections share the default queue (COMPAAS_INSPECT_QUEUE=""), one process on the
    inspection queue, so an upload is inspected while jobs run."""
    commands = [worker_command(settings.job_queues, concurrency)]
    if settings.inspects_apart:
        queue = settings.inspection_queue
        commands.append(worker_command(queue, 1, name=worker_name(settings, queue)))
    return commands


def stop_worker_groups(workers: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    """Stop several worker groups together: SIGTERM them all, then each gets what is left of
    the one grace period before SIGKILL."""
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for worker in workers:
        stop_worker_group(worker, max(0.0, deadline - time.monotonic()))


app = typer.Typer(
    name="compaas",
    help=__doc__,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # a traceback must never print an API key
    context_settings={"help_option_names": ["-h", "--help"]},
)
admin_app = typer.Typer(
    help="Teams and API keys, written straight into the database (run it next to the service: "
    "same --data-dir or --database-url).",
    no_args_is_help=True,
)
app.add_typer(admin_app, name="admin")

HostOpt = Annotated[str, typer.Option(help="Address to listen on.")]
PortOpt = Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)]
ConcurrencyOpt = Annotated[
    int, typer.Option(help="Jobs the worker runs at once (one process each).", min=1)
]


@app.command("up")
def cmd_up(
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    data_dir: Annotated[
        Path, typer.Option(help="Database, blobs and broker of the embedded mode.")
    ] = Path("./var"),
    concurrency: ConcurrencyOpt = 1,
) -> None:
    """Run API, job worker and inspection worker here (SQLite, local blobs, file broker)."""
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; as SystemExit it reaches
    # `finally` (a KeyboardInterrupt would become Click's "Aborted!", exit 1)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_on_signal)
    os.environ["COMPAAS_DATA_DIR"] = str(Path(data_dir).resolve())
    settings = _settings()
    _migrate(settings)
    workers = [start_worker_group(c) for c in embedded_worker_commands(settings, concurrency)]
    try:
        base = f"http://{host}:{port}"
        print(f"compaas API:  {base}/v1", flush=True)
        print(f"API docs:     {base}/docs", flush=True)
        print(f"data dir:     {settings.data_dir.resolve()}  (database, blobs, broker)", flush=True)
        print("first team:   compaas admin create-team my-team", flush=True)
        import uvicorn

        from app.main import create_app

        # ops-metrics: logging is app.logs' (structlog); the app logs each request itself
        uvicorn.run(
            create_app(settings),
            host=host,
            port=port,
            log_level="info",
            log_config=None,
            access_log=False,
        )
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not orphan the worker
        stop_worker_groups(workers, WORKER_STOP_GRACE_S)


@app.command("api")
def cmd_api(
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    workers: Annotated[
        int | None,
        typer.Option(
            help="API processes (default: COMPAAS_API_WORKERS, else one per usable CPU core).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the API server only."""
    import uvicorn

    from app.processes import TooManyProcesses, api_processes

    if workers is not None:
        os.environ["COMPAAS_API_WORKERS"] = str(workers)
    try:
        processes = api_processes(_settings())
    except TooManyProcesses as exc:
        print(f"compaas api: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    # every process reads it back in create_app, to size its share of the database pool
    os.environ["COMPAAS_API_WORKERS"] = str(processes)
    if processes > 1:
        _prometheus_multiprocess_dir()
    print(f"compaas API: {processes} process(es)", flush=True)
    from app import logs

    logs.configure("api", _settings().log_format)
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=processes,
        log_config=None,  # ops-metrics: every process logs through app.logs
        access_log=False,
    )


def _prometheus_multiprocess_dir() -> None:
    """ops-metrics: several API processes share their request metrics through files in
    PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode); any process's /metrics
    then reports all of them. Given one, it is emptied of a previous run's files; else a new
    temporary directory is made."""
    import tempfile

    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        folder = Path(given)
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.db"):
            old.unlink(missing_ok=True)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="compaas-metrics-")


@app.command("worker")
def cmd_worker(
    queues: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated queues (default: COMPAAS_WORKER_QUEUES, else all of them). "
            "Model inspections go to COMPAAS_INSPECT_QUEUE ('inspect'), which wants a worker of "
            "its own: `compaas worker --queues inspect`.",
            show_default=False,
        ),
    ] = None,
    concurrency: ConcurrencyOpt = 1,
) -> None:
    """Run a Celery worker."""
    settings = _settings()
    queues = queues or settings.worker_queues
    cmd = worker_command(queues, concurrency, name=worker_name(settings, queues))
    os.execv(cmd[0], cmd)


@app.command("migrate")
def cmd_migrate() -> None:
    """Upgrade the database schema to the latest."""
    _migrate(_settings())
    print("database is at the latest schema")


@app.command("reconciler")
def cmd_reconciler(
    once: Annotated[bool, typer.Option("--once", help="One pass, then exit.")] = False,
) -> None:
    """Re-publish lost jobs, re-queue or fail expired leases (a loop)."""
    import logging
    import time

    from app import logs
    from app.services.reconciler import reconcile_once

    settings = _settings()
    logs.configure("reconciler", settings.log_format)
    while True:
        try:
            reconcile_once(settings)
        except Exception:
            logging.exception("reconcile pass failed; will try again")
        if once:
            return
        time.sleep(settings.reconcile_interval_s)


def _database_label(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _sqlite_file(url: str) -> Path | None:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database)


def _admin_settings(data_dir: Path | None, database_url: str | None) -> Settings:
    """The settings of the database to manage, which is named on stderr; in embedded mode a
    database that was not there yet is made (migrated), and said so loudly."""
    overrides: dict[str, object] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir.resolve()
    if database_url:
        overrides["database_url"] = database_url
    get_settings.cache_clear()
    settings = Settings(**overrides)  # type: ignore[arg-type]
    sqlite = _sqlite_file(settings.database_url)
    new = sqlite is not None and not sqlite.exists()
    if settings.mode == "embedded":
        _migrate(settings)
    print(f"database: {_database_label(settings.database_url)}", file=sys.stderr)
    if new:
        print(
            f"note: there was no database at {sqlite}; this made a new, empty one. Keys work "
            "only against the API that uses this database: run admin commands where "
            "`compaas up` runs, or pass its --data-dir (or --database-url).",
            file=sys.stderr,
        )
    return settings


def _positive_int(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise typer.BadParameter(f"days must be ≥ 1, not {value}")
    return value


DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        help="The data directory of the `compaas up` to manage (default: COMPAAS_DATA_DIR, "
        "else ./var).",
        show_default=False,
    ),
]
DatabaseUrlOpt = Annotated[
    str | None,
    typer.Option(
        help="The database to manage, e.g. postgresql+psycopg://… (default: "
        "COMPAAS_DATABASE_URL, else the SQLite file in the data directory).",
        show_default=False,
    ),
]
ExpiresOpt = Annotated[
    int | None,
    typer.Option(
        "--expires-in-days",
        metavar="N",
        callback=_positive_int,
        help="The key stops working after N days (default: never).",
        show_default=False,
    ),
]
AdminJsonOpt = Annotated[
    bool, typer.Option("--json", help="Print JSON on stdout (the database is named on stderr).")
]


def _when(value: datetime | None) -> str | None:
    from app.services.auth import as_utc

    return as_utc(value).isoformat(timespec="seconds") if value is not None else None


def _one_team(repo: TeamAdminRepository, id_or_name: str) -> Team | None:
    teams = repo.find_teams(id_or_name)
    if len(teams) == 1:
        return teams[0]
    if not teams:
        print(f"no team with id or name {id_or_name!r}", file=sys.stderr)
    else:
        ids = ", ".join(t.id for t in teams)
        print(f"{len(teams)} teams are named {id_or_name!r}; give the id: {ids}", file=sys.stderr)
    return None


def _issue_key(
    settings: Settings, repo: TeamAdminRepository, team: Team, expires_in_days: int | None
) -> dict[str, str | None]:
    from app.db.base import utcnow
    from app.security import api_key_pepper, generate_api_key, hash_api_key, key_prefix

    key = generate_api_key()
    expires_at = utcnow() + timedelta(days=expires_in_days) if expires_in_days else None
    row = repo.add_key(
        team.id, key_prefix(key), hash_api_key(key, api_key_pepper(settings)), expires_at
    )
    return {
        "team_id": team.id,
        "key_id": row.id,
        "prefix": row.prefix,
        "expires_at": _when(expires_at),
        "api_key": key,
    }


def _print_key(issued: dict[str, str | None], as_json: bool) -> None:
    if as_json:
        print(json.dumps(issued))
        return
    expiry = f"expires {issued['expires_at']}" if issued["expires_at"] else "does not expire"
    print(f"API key {issued['prefix']}… ({expiry}; shown once, store it now):")
    print(issued["api_key"])


@admin_app.command("create-team")
def cmd_create_team(
    name: Annotated[str, typer.Argument(help="The team's name (unique, ignoring case).")],
    expires_in_days: ExpiresOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
    as_json: AdminJsonOpt = False,
) -> None:
    """Create a team and its first API key."""
    from app.db.repositories import TeamAdminRepository
    from app.db.session import session_scope
    from app.errors import AppError
    from app.services import teams

    try:
        teams.check_name(name)
    except AppError as exc:
        print(f"compaas admin create-team: {exc.detail}", file=sys.stderr)
        raise typer.Exit(2) from None
    settings = _admin_settings(data_dir, database_url)
    try:
        with session_scope(settings.database_url) as session:
            repo = TeamAdminRepository(session)
            team = teams.create(session, name)
            issued = _issue_key(settings, repo, team, expires_in_days)
    except AppError as exc:
        print(f"compaas admin create-team: {exc.detail}", file=sys.stderr)
        raise typer.Exit(2) from None
    if not as_json:
        print(f"team {team.name!r} created: {issued['team_id']}")
    _print_key(issued, as_json)


@admin_app.command("create-key")
def cmd_create_key(
    team: Annotated[str, typer.Argument(metavar="TEAM", help="Team id or name.")],
    expires_in_days: ExpiresOpt = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
    as_json: AdminJsonOpt = False,
) -> None:
    """Add an API key to a team."""
    from app.db.repositories import TeamAdminRepository
    from app.db.session import session_scope

    settings = _admin_settings(data_dir, database_url)
    with session_scope(settings.database_url) as session:
        repo = TeamAdminRepository(session)
        found = _one_team(repo, team)
        if found is None:
            raise typer.Exit(1)
        issued = _issue_key(settings, repo, found, expires_in_days)
    _print_key(issued, as_json)


@admin_app.command("list-keys")
def cmd_list_keys(
    team: Annotated[
        str | None,
        typer.Argument(
            metavar="[TEAM]", help="Team id or name (default: every team).", show_default=False
        ),
    ] = None,
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
    as_json: AdminJsonOpt = False,
) -> None:
    """API keys: prefix, team, status, created, last used, expiry, revoked."""
    from app.db.base import utcnow
    from app.db.repositories import TeamAdminRepository
    from app.db.session import session_scope
    from app.services.auth import key_status

    settings = _admin_settings(data_dir, database_url)
    now = utcnow()
    with session_scope(settings.database_url) as session:
        repo = TeamAdminRepository(session)
        team_id = None
        if team is not None:
            found = _one_team(repo, team)
            if found is None:
                raise typer.Exit(1)
            team_id = found.id
        rows = [
            {
                "id": key.id,
                "prefix": key.prefix,
                "team_id": owner.id,
                "team": owner.name,
                "created_at": _when(key.created_at),
                "last_used_at": _when(key.last_used_at),
                "expires_at": _when(key.expires_at),
                "revoked_at": _when(key.revoked_at),
                "status": key_status(key, now),
            }
            for key, owner in repo.list_keys(team_id)
        ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    columns = ["prefix", "id", "team", "status", "created_at", "last_used_at", "expires_at"]
    columns.append("revoked_at")
    table = [[c.upper().removesuffix("_AT").replace("_", " ") for c in columns]]
    table += [[str(row[c] or "-") for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    if not rows:
        print("(no keys)")


@admin_app.command("revoke-key")
def cmd_revoke_key(
    key: Annotated[
        str,
        typer.Argument(metavar="PREFIX_OR_ID", help="Key prefix or id (or the whole key)."),
    ],
    data_dir: DataDirOpt = None,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Revoke an API key (it gets 401 from now on)."""
    from app.db.base import utcnow
    from app.db.repositories import TeamAdminRepository
    from app.db.session import session_scope
    from app.security import KEY_PREFIX, PREFIX_LENGTH, api_key_pepper, hash_api_key

    settings = _admin_settings(data_dir, database_url)
    given = key.strip()
    whole_key = given.startswith(KEY_PREFIX) and len(given) > PREFIX_LENGTH
    with session_scope(settings.database_url) as session:
        repo = TeamAdminRepository(session)
        key_hash = hash_api_key(given, api_key_pepper(settings)) if whole_key else None
        keys = repo.find_keys(given, key_hash)
        if not keys:
            print(
                f"no key with id or prefix {given!r}; see `compaas admin list-keys`",
                file=sys.stderr,
            )
            raise typer.Exit(1)
        if len(keys) > 1:
            ids = ", ".join(k.id for k in keys)
            print(f"{len(keys)} keys match {given!r}; give the id: {ids}", file=sys.stderr)
            raise typer.Exit(1)
        row = keys[0]
        if row.revoked_at is not None:
            print(f"key {row.prefix}… ({row.id}) was already revoked at {_when(row.revoked_at)}")
            return
        repo.revoke_key(row, utcnow())
        print(f"revoked key {row.prefix}… ({row.id}); requests with it now get 401")


class ExampleName(StrEnum):
    digits = "digits"
    mlp = "mlp"


@app.command("example")
def cmd_example(
    name: Annotated[
        ExampleName, typer.Argument(help="digits: a small CNN (.pt2); mlp: an MLP (.onnx).")
    ],
    out: Annotated[Path, typer.Option(help="Directory to write the model and dataset to.")] = Path(
        "examples"
    ),
) -> None:
    """Train and write an example model + dataset (scikit-learn's digits, seconds on CPU)."""
    from engine import examples

    out.mkdir(parents=True, exist_ok=True)
    writers = {"digits": examples.write_digits_example, "mlp": examples.write_digits_mlp}
    written = writers[name.value](out)
    for key, path in written.items():
        if isinstance(path, (str, Path)):
            print(f"{key}: {path}")


@app.command("decode")
def cmd_decode(
    archive: Annotated[Path, typer.Argument(help="The weight_share archive (.cpz).")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Where to write the ONNX model (default: ARCHIVE with .onnx).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Rebuild the ONNX model from a weight_share archive (.cpz): numpy + onnx + zstandard."""
    try:  # the API image has no onnx/zstandard; decode_file imports them only when it runs
        import onnx  # noqa: F401
        import zstandard  # noqa: F401

        from engine.io.cpz import ArchiveError, decode_file
    except ImportError as exc:
        missing = exc.name or "onnx"
        print(
            f"compaas decode needs the {missing!r} package, which is not installed here. "
            "Install what it needs with `pip install 'compaas[decode]'` "
            "(or `pip install onnx zstandard`), then run it again.",
            file=sys.stderr,
        )
        raise typer.Exit(2) from None
    out = output or archive.with_suffix(".onnx")
    try:
        model = decode_file(archive, out)
    except (ArchiveError, OSError) as exc:
        print(f"cannot decode {archive}: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    print(f"{out}: {out.stat().st_size} bytes, {len(model.graph.initializer)} initializers")


def _trusted_keys(key: Path | None, url: str | None) -> list[Ed25519PublicKey]:
    """The public keys from --key (a PEM, or the JSON of GET /v1/keys) or --url's /v1/keys."""
    from engine.provenance import load_public_key

    if key:
        raw = Path(key).read_bytes()
        if raw.lstrip().startswith(b"-----BEGIN"):
            return [load_public_key(raw)]
        items = json.loads(raw)["items"]
    else:
        import httpx

        keys_url = f"{str(url).rstrip('/')}/v1/keys"
        try:
            response = httpx.get(keys_url, timeout=30)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise OSError(f"cannot fetch the public keys from {keys_url}: {exc}") from exc
        items = response.json()["items"]
    return [load_public_key(item["public_key_pem"].encode()) for item in items]


@app.command(
    "verify",
    epilog="Exit 0: the signature is valid and the artifact's sha256 is the statement's "
    "subject. 1: a check failed (the message names it: signature, digest or format). "
    "2: an input could not be read.",
)
def cmd_verify(
    artifact: Annotated[
        Path, typer.Argument(metavar="ARTIFACT", help="The downloaded artifact file.")
    ],
    statement: Annotated[
        Path,
        typer.Argument(metavar="STATEMENT", help="GET /v1/artifacts/{id}/provenance, saved."),
    ],
    key: Annotated[
        Path | None,
        typer.Option(
            metavar="PUBKEY.pem",
            help="A public key PEM, or the saved JSON of GET /v1/keys.",
            show_default=False,
        ),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(
            metavar="URL", help="The API's base URL, to fetch GET /v1/keys.", show_default=False
        ),
    ] = None,
) -> None:
    """Check an artifact against its signed provenance statement (offline with --key)."""
    from engine.provenance import ProvenanceError, verify_envelope

    if key and url:
        print("give --key or --url, not both", file=sys.stderr)
        raise typer.Exit(2)
    if not (key or url):
        print(
            "give --key PUBKEY.pem (saved from GET /v1/keys) or --url API to fetch the keys",
            file=sys.stderr,
        )
        raise typer.Exit(2)
    try:
        keys = _trusted_keys(key, url)
        envelope = json.loads(Path(statement).read_bytes())
        verified = verify_envelope(envelope, Path(artifact), keys)
    except ProvenanceError as exc:
        print(f"FAILED {exc.check} check: {exc.detail}", file=sys.stderr)
        raise typer.Exit(1) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"cannot verify: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    print(
        f"OK {artifact}: sha256 {verified.sha256} is the subject {verified.subject_name!r} "
        f"of a statement signed by key {verified.keyid} (recipe {verified.recipe_sha256})"
    )


register_team_commands(app)


class CommandLine:
    """`compaas` parsed without running anything (the compose and Dockerfile checks):
    `parse_args(argv)` is an argparse-style Namespace with `command` (and `admin_command`) and
    every option of the command; an unknown command or option exits 2, as argparse does."""

    def parse_args(self, argv: list[str]) -> argparse.Namespace:
        command = typer.main.get_command(app)
        ctx = typer.Context(command, info_name="compaas")
        names: list[str] = []
        rest = list(argv)
        while isinstance(command, TyperGroup):
            sub = command.get_command(ctx, rest[0]) if rest else None
            if sub is None:
                unknown = " ".join([*names, *rest[:1]])
                print(f"compaas: unknown command {unknown!r}", file=sys.stderr)
                raise SystemExit(2)
            names.append(rest.pop(0))
            ctx = typer.Context(sub, info_name=names[-1], parent=ctx)
            command = sub
        try:
            parsed = command.make_context(names[-1], rest, parent=ctx.parent)
        except Exception as exc:  # Click's UsageError (Typer vendors Click)
            show = getattr(exc, "show", None)
            if show is None:
                raise
            show()
            raise SystemExit(2) from None
        extra = {"admin_command": names[1]} if names[0] == "admin" and len(names) > 1 else {}
        return argparse.Namespace(command=names[0], **extra, **parsed.params)


def build_parser() -> CommandLine:
    return CommandLine()


def main(argv: list[str] | None = None) -> int:
    """Run the command; its exit code (Typer/Click exit through SystemExit)."""
    try:
        app(args=argv, prog_name="compaas")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        print(exc.code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
