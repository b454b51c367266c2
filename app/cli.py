"""The `compaas` command: up, api, worker, reconciler, migrate, admin, example, decode, verify."""

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
from pathlib import Path
from typing import TYPE_CHECKING

from app.config import Settings, get_settings

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


def cmd_up(args: argparse.Namespace) -> int:
    # uvicorn re-raises SIGTERM after its graceful shutdown; as SystemExit it reaches `finally`
    signal.signal(signal.SIGTERM, _exit_on_signal)
    os.environ["COMPAAS_DATA_DIR"] = str(Path(args.data_dir).resolve())
    settings = _settings()
    _migrate(settings)
    workers = [start_worker_group(c) for c in embedded_worker_commands(settings, args.concurrency)]
    try:
        base = f"http://{args.host}:{args.port}"
        print(f"compaas API:  {base}/v1", flush=True)
        print(f"API docs:     {base}/docs", flush=True)
        print(f"data dir:     {settings.data_dir.resolve()}  (database, blobs, broker)", flush=True)
        print("first team:   compaas admin create-team my-team", flush=True)
        import uvicorn

        from app.main import create_app

        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not orphan the worker
        stop_worker_groups(workers, WORKER_STOP_GRACE_S)
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from app.processes import TooManyProcesses, api_processes

    if args.workers is not None:
        os.environ["COMPAAS_API_WORKERS"] = str(args.workers)
    try:
        workers = api_processes(_settings())
    except TooManyProcesses as exc:
        print(f"compaas api: {exc}", file=sys.stderr)
        return 2
    # every process reads it back in create_app, to size its share of the database pool
    os.environ["COMPAAS_API_WORKERS"] = str(workers)
    print(f"compaas API: {workers} process(es)", flush=True)
    uvicorn.run(
        "app.main:create_app", factory=True, host=args.host, port=args.port, workers=workers
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings()
    queues = args.queues or settings.worker_queues
    cmd = worker_command(queues, args.concurrency, name=worker_name(settings, queues))
    os.execv(cmd[0], cmd)


def cmd_migrate(_args: argparse.Namespace) -> int:
    _migrate(_settings())
    print("database is at the latest schema")
    return 0


def cmd_reconciler(args: argparse.Namespace) -> int:
    import logging
    import time

    from app.services.reconciler import reconcile_once

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = _settings()
    while True:
        try:
            reconcile_once(settings)
        except Exception:
            logging.exception("reconcile pass failed; will try again")
        if args.once:
            return 0
        time.sleep(settings.reconcile_interval_s)


def _admin_settings() -> Settings:
    settings = _settings()
    if settings.mode == "embedded":
        _migrate(settings)
    return settings


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of days ≥ 1, not {text}")
    return value


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


def cmd_create_team(args: argparse.Namespace) -> int:
    from app.db.repositories import TeamAdminRepository
    from app.db.session import session_scope

    settings = _admin_settings()
    with session_scope(settings.database_url) as session:
        repo = TeamAdminRepository(session)
        team = repo.create_team(args.name)
        issued = _issue_key(settings, repo, team, args.expires_in_days)
    if not args.json:
        print(f"team {args.name!r} created: {issued['team_id']}")
    _print_key(issued, args.json)
    return 0


def cmd_create_key(args: argparse.Namespace) -> int:
    from app.db.repositories import TeamAdminRepository
    from app.db.session import session_scope

    settings = _admin_settings()
    with session_scope(settings.database_url) as session:
        repo = TeamAdminRepository(session)
        team = _one_team(repo, args.team)
        if team is None:
            return 1
        issued = _issue_key(settings, repo, team, args.expires_in_days)
    _print_key(issued, args.json)
    return 0


def cmd_list_keys(args: argparse.Namespace) -> int:
    from app.db.base import utcnow
    from app.db.repositories import TeamAdminRepository
    from app.db.session import session_scope
    from app.services.auth import key_status

    settings = _admin_settings()
    now = utcnow()
    with session_scope(settings.database_url) as session:
        repo = TeamAdminRepository(session)
        team_id = None
        if args.team is not None:
            team = _one_team(repo, args.team)
            if team is None:
                return 1
            team_id = team.id
        rows = [
            {
                "id": key.id,
                "prefix": key.prefix,
                "team_id": team.id,
                "team": team.name,
                "created_at": _when(key.created_at),
                "last_used_at": _when(key.last_used_at),
                "expires_at": _when(key.expires_at),
                "revoked_at": _when(key.revoked_at),
                "status": key_status(key, now),
            }
            for key, team in repo.list_keys(team_id)
        ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ["prefix", "id", "team", "status", "created_at", "last_used_at", "expires_at"]
    columns.append("revoked_at")
    table = [[c.upper().removesuffix("_AT").replace("_", " ") for c in columns]]
    table += [[str(row[c] or "-") for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    if not rows:
        print("(no keys)")
    return 0


def cmd_revoke_key(args: argparse.Namespace) -> int:
    from app.db.base import utcnow
    from app.db.repositories import TeamAdminRepository
    from app.db.session import session_scope
    from app.security import KEY_PREFIX, PREFIX_LENGTH, api_key_pepper, hash_api_key

    settings = _admin_settings()
    given = args.key.strip()
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
            return 1
        if len(keys) > 1:
            ids = ", ".join(k.id for k in keys)
            print(f"{len(keys)} keys match {given!r}; give the id: {ids}", file=sys.stderr)
            return 1
        key = keys[0]
        if key.revoked_at is not None:
            print(f"key {key.prefix}… ({key.id}) was already revoked at {_when(key.revoked_at)}")
            return 0
        repo.revoke_key(key, utcnow())
        print(f"revoked key {key.prefix}… ({key.id}); requests with it now get 401")
    return 0


def cmd_example(args: argparse.Namespace) -> int:
    from engine import examples

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    writer = {"digits": examples.write_digits_example, "mlp": examples.write_digits_mlp}[args.name]
    written = writer(out)
    for key, path in written.items():
        if isinstance(path, (str, Path)):
            print(f"{key}: {path}")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    """Rebuild the ONNX model a weight_share `cpz` archive holds (numpy + onnx + zstandard)."""
    try:
        from engine.io.cpz import ArchiveError, decode_file
    except ImportError as exc:  # the API image has no onnx/zstandard
        print(f"compaas decode needs onnx and zstandard installed ({exc})", file=sys.stderr)
        return 2
    out = Path(args.output) if args.output else Path(args.archive).with_suffix(".onnx")
    try:
        model = decode_file(args.archive, out)
    except (ArchiveError, OSError) as exc:
        print(f"cannot decode {args.archive}: {exc}", file=sys.stderr)
        return 1
    print(f"{out}: {out.stat().st_size} bytes, {len(model.graph.initializer)} initializers")
    return 0


def _trusted_keys(args: argparse.Namespace) -> list[Ed25519PublicKey]:
    """The public keys from --key (a PEM, or the JSON of GET /v1/keys) or --url's /v1/keys."""
    from engine.provenance import load_public_key

    if args.key:
        raw = Path(args.key).read_bytes()
        if raw.lstrip().startswith(b"-----BEGIN"):
            return [load_public_key(raw)]
        items = json.loads(raw)["items"]
    else:
        import httpx

        url = f"{args.url.rstrip('/')}/v1/keys"
        try:
            response = httpx.get(url, timeout=30)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise OSError(f"cannot fetch the public keys from {url}: {exc}") from exc
        items = response.json()["items"]
    return [load_public_key(item["public_key_pem"].encode()) for item in items]


def cmd_verify(args: argparse.Namespace) -> int:
    """Check an artifact against its provenance statement: the signature, then the sha256."""
    from engine.provenance import ProvenanceError, verify_envelope

    if not (args.key or args.url):
        print(
            "give --key PUBKEY.pem (saved from GET /v1/keys) or --url API to fetch the keys",
            file=sys.stderr,
        )
        return 2
    try:
        keys = _trusted_keys(args)
        envelope = json.loads(Path(args.statement).read_bytes())
        verified = verify_envelope(envelope, Path(args.artifact), keys)
    except ProvenanceError as exc:
        print(f"FAILED {exc.check} check: {exc.detail}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"cannot verify: {exc}", file=sys.stderr)
        return 2
    print(
        f"OK {args.artifact}: sha256 {verified.sha256} is the subject {verified.subject_name!r} "
        f"of a statement signed by key {verified.keyid} (recipe {verified.recipe_sha256})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compaas", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser(
        "up", help="run API + job worker + inspection worker on this machine (SQLite, local blobs)"
    )
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--data-dir", default="./var")
    up.add_argument("--concurrency", type=int, default=1)
    up.set_defaults(func=cmd_up)

    api = sub.add_parser("api", help="run the API server only")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument(
        "--workers",
        type=int,
        default=None,
        help="API processes (default: COMPAAS_API_WORKERS, else one per usable CPU core)",
    )
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="run a Celery worker")
    worker.add_argument(
        "--queues",
        default=None,
        help="comma-separated queues to consume (default: COMPAAS_WORKER_QUEUES, 'default'); "
        "model inspections go to COMPAAS_INSPECT_QUEUE ('inspect'), which needs a worker of "
        "its own: `compaas worker --queues inspect`",
    )
    worker.add_argument("--concurrency", type=int, default=1, help="pool processes (default: 1)")
    worker.set_defaults(func=cmd_worker)

    migrate = sub.add_parser("migrate", help="upgrade the database schema to the latest")
    migrate.set_defaults(func=cmd_migrate)

    reconciler = sub.add_parser(
        "reconciler", help="re-publish lost jobs, re-queue or fail expired leases (a loop)"
    )
    reconciler.add_argument("--once", action="store_true", help="one pass, then exit")
    reconciler.set_defaults(func=cmd_reconciler)

    admin = sub.add_parser("admin", help="teams and API keys")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    expiry = argparse.ArgumentParser(add_help=False)
    expiry.add_argument(
        "--expires-in-days",
        type=_positive_int,
        default=None,
        metavar="N",
        help="the key stops working after N days (default: never)",
    )
    team = admin_sub.add_parser(
        "create-team", parents=[expiry], help="create a team and its first API key"
    )
    team.add_argument("name")
    team.add_argument("--json", action="store_true")
    team.set_defaults(func=cmd_create_team)
    key = admin_sub.add_parser("create-key", parents=[expiry], help="add an API key to a team")
    key.add_argument("team", metavar="TEAM", help="team id or name")
    key.add_argument("--json", action="store_true")
    key.set_defaults(func=cmd_create_key)
    keys = admin_sub.add_parser(
        "list-keys", help="API keys: prefix, team, status, created, last used, expiry, revoked"
    )
    keys.add_argument("team", metavar="TEAM", nargs="?", default=None, help="team id or name")
    keys.add_argument("--json", action="store_true")
    keys.set_defaults(func=cmd_list_keys)
    revoke = admin_sub.add_parser("revoke-key", help="revoke an API key (it gets 401 from now on)")
    revoke.add_argument("key", metavar="PREFIX_OR_ID", help="key prefix or id (or the whole key)")
    revoke.set_defaults(func=cmd_revoke_key)

    example = sub.add_parser("example", help="train and write an example model + dataset")
    example.add_argument("name", choices=["digits", "mlp"])
    example.add_argument("--out", default="examples")
    example.set_defaults(func=cmd_example)

    decode = sub.add_parser(
        "decode", help="rebuild the ONNX model from a weight_share archive (.cpz)"
    )
    decode.add_argument("archive")
    decode.add_argument("-o", "--output", default=None, help="default: ARCHIVE with .onnx")
    decode.set_defaults(func=cmd_decode)

    verify = sub.add_parser(
        "verify",
        help="check an artifact against its signed provenance statement (offline with --key)",
        description="Exit 0: the signature is valid and the artifact's sha256 is the statement's "
        "subject. 1: a check failed (the message names it: signature, digest or format). "
        "2: an input could not be read.",
    )
    verify.add_argument("artifact", metavar="ARTIFACT", help="the downloaded artifact file")
    verify.add_argument(
        "statement", metavar="STATEMENT", help="GET /v1/artifacts/{id}/provenance, saved"
    )
    source = verify.add_mutually_exclusive_group()
    source.add_argument(
        "--key", metavar="PUBKEY.pem", help="a public key PEM, or the saved JSON of GET /v1/keys"
    )
    source.add_argument("--url", metavar="URL", help="the API's base URL, to fetch GET /v1/keys")
    verify.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
