"""`chat-service` command line: serve, migrate, openapi, asyncapi, bench."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from pydantic import ValidationError

from chat_service.settings import Settings, load_settings

log = logging.getLogger("chat_service.cli")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="chat-service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP and WebSocket server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.set_defaults(handler=_serve)

    migrate = commands.add_parser("migrate", help="upgrade the database schema and exit")
    migrate.add_argument("--revision", default="head")
    migrate.set_defaults(handler=_migrate)

    openapi = commands.add_parser("openapi", help="print the OpenAPI document")
    openapi.add_argument("--output", type=Path, help="write to this file instead of stdout")
    openapi.set_defaults(handler=_openapi)

    asyncapi = commands.add_parser("asyncapi", help="print the AsyncAPI document (WebSocket)")
    asyncapi.add_argument("--output", type=Path, help="write to this file instead of stdout")
    asyncapi.set_defaults(handler=_asyncapi)

    bench = commands.add_parser("bench", help="run the benchmark suite (docs/performance.md)")
    bench.add_argument(
        "scenario",
        help="fanout, ingest, connections, history, login-storm, slow-consumer or workers; "
        "`chat-service bench SCENARIO -h` lists its options",
    )
    # Everything after the scenario is the benchmark's own command line.
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(handler=_bench)

    args = parser.parse_args(argv)
    sys.exit(args.handler(args))


def _settings() -> Settings:
    """Settings with logging set up from them, or a one-line error for the operator."""
    from chat_service.logging_config import configure_logging

    try:
        configure_logging(Settings())
        return load_settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        sys.exit(f"chat-service: invalid configuration: {problems}")
    except ValueError as exc:
        sys.exit(f"chat-service: invalid configuration: {exc}")


def _serve(args: argparse.Namespace) -> int:
    settings = _settings()
    import uvicorn

    from chat_service.server import uvicorn_options

    if args.workers > 1 and settings.broker_url.startswith("memory://"):
        log.error(
            "--workers %d needs a shared broker: with BROKER_URL=memory:// each worker "
            "would see only its own sockets. Set BROKER_URL=redis://... or use one worker.",
            args.workers,
        )
        return 2
    if settings.auto_migrate:
        _upgrade(settings)
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; this
    # handler turns that into a plain exit 0, so supervisors see a clean stop.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.run(
        "chat_service.app:app_factory",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        **uvicorn_options(settings),
    )
    return 0


def _exit_cleanly(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _migrate(args: argparse.Namespace) -> int:
    _upgrade(_settings(), args.revision)
    return 0


def _upgrade(settings: Settings, revision: str = "head") -> None:
    """Migrate, or exit with one line saying which database could not be reached."""
    from sqlalchemy import make_url
    from sqlalchemy.exc import DBAPIError

    from chat_service.db import migrate

    url = settings.resolved_database_url
    try:
        migrate(url, revision)
    except (OSError, DBAPIError) as exc:
        where = make_url(url).render_as_string(hide_password=True)
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        sys.exit(f"chat-service: cannot migrate the database at {where}: {reason}")


def _openapi(args: argparse.Namespace) -> int:
    from chat_service.app import create_app
    from chat_service.openapi_export import render_openapi

    return _write(render_openapi(create_app(Settings(jwt_secret="x" * 32))), args.output)


def _asyncapi(args: argparse.Namespace) -> int:
    from chat_service.realtime.asyncapi import render_asyncapi

    return _write(render_asyncapi(), args.output)


def _bench(args: argparse.Namespace) -> int:
    # Imported here: the suite needs the optional `bench` extra (matplotlib).
    from chat_service.bench import main as bench_main

    return bench_main([args.scenario, *args.bench_args])


def _write(document: str, output: Path | None) -> int:
    if output:
        output.write_text(document)
    else:
        sys.stdout.write(document)
    return 0
