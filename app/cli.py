"""The `compaas` command: up, api, worker, reconciler, migrate, admin, example, decode."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from app.config import Settings, get_settings


def _settings() -> Settings:
    get_settings.cache_clear()
    return get_settings()


def _migrate(settings: Settings) -> None:
    from app.db.migrate import upgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)


def worker_command(queues: str, concurrency: int, loglevel: str = "INFO") -> list[str]:
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
        "--hostname=compaas@%h",
    ]


def cmd_up(args: argparse.Namespace) -> int:
    os.environ["COMPAAS_DATA_DIR"] = str(Path(args.data_dir).resolve())
    settings = _settings()
    _migrate(settings)
    worker = subprocess.Popen(worker_command(settings.worker_queues, args.concurrency))
    base = f"http://{args.host}:{args.port}"
    print(f"compaas API:  {base}/v1", flush=True)
    print(f"API docs:     {base}/docs", flush=True)
    print(f"data dir:     {settings.data_dir.resolve()}  (database, blobs, broker)", flush=True)
    print("first team:   compaas admin create-team my-team", flush=True)
    try:
        import uvicorn

        from app.main import create_app

        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run(
        "app.main:create_app", factory=True, host=args.host, port=args.port, workers=args.workers
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings()
    cmd = worker_command(args.queues or settings.worker_queues, args.concurrency)
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


def cmd_create_team(args: argparse.Namespace) -> int:
    from app.db.repositories import TeamAdminRepository
    from app.db.session import session_scope
    from app.security import generate_api_key, hash_api_key

    settings = _settings()
    if settings.mode == "embedded":
        _migrate(settings)
    key = generate_api_key()
    with session_scope(settings.database_url) as session:
        repo = TeamAdminRepository(session)
        team = repo.create_team(args.name)
        repo.add_key(team.id, key[:12], hash_api_key(key, settings.api_key_pepper))
        team_id = team.id
    if args.json:
        print(json.dumps({"team_id": team_id, "api_key": key}))
    else:
        print(f"team {args.name!r} created: {team_id}")
        print(f"API key (shown once, store it now): {key}")
    return 0


def cmd_create_key(args: argparse.Namespace) -> int:
    from app.db.repositories import TeamAdminRepository
    from app.db.session import session_scope
    from app.security import generate_api_key, hash_api_key

    settings = _settings()
    key = generate_api_key()
    with session_scope(settings.database_url) as session:
        repo = TeamAdminRepository(session)
        if repo.get_team(args.team) is None:
            print(f"no team with id {args.team}", file=sys.stderr)
            return 1
        repo.add_key(args.team, key[:12], hash_api_key(key, settings.api_key_pepper))
    print(json.dumps({"team_id": args.team, "api_key": key}) if args.json else key)
    return 0


def cmd_example(args: argparse.Namespace) -> int:
    from worker.engine import examples

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
        from worker.engine.archive import ArchiveError, decode_file
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compaas", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run API + worker on this machine (SQLite, local blobs)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--data-dir", default="./var")
    up.add_argument("--concurrency", type=int, default=1)
    up.set_defaults(func=cmd_up)

    api = sub.add_parser("api", help="run the API server only")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1)
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--queues", default=None)
    worker.add_argument("--concurrency", type=int, default=1)
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
    team = admin_sub.add_parser("create-team", help="create a team and its first API key")
    team.add_argument("name")
    team.add_argument("--json", action="store_true")
    team.set_defaults(func=cmd_create_team)
    key = admin_sub.add_parser("create-key", help="add an API key to a team")
    key.add_argument("--team", required=True)
    key.add_argument("--json", action="store_true")
    key.set_defaults(func=cmd_create_key)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
