"""`falhook serve`: run the receiver on uvicorn (standalone, or as a sidecar)."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
from typing import Any

from falhook.receiver.errors import ReceiverError, SettingsError
from falhook.receiver.settings import ENV_PREFIX, Settings

__all__ = ["add_parser", "add_settings_flags", "settings_from_args"]

# Flags with a shape of their own; every other setting gets a plain --name VALUE flag.
_SPECIAL = {"callbacks", "forward_to"}


def add_settings_flags(parser: argparse.ArgumentParser, *, only: set[str] | None = None) -> None:
    """One flag per setting (``--lease-seconds``…); each defaults to its env var."""
    for field in dataclasses.fields(Settings):
        if field.name in _SPECIAL or (only is not None and field.name not in only):
            continue
        flag = "--" + field.name.replace("_", "-")
        env = ENV_PREFIX + field.metadata["env"]
        parser.add_argument(
            flag,
            dest=field.name,
            metavar="VALUE",
            help=f"{field.metadata['help']} (env {env}; default {field.default!r})",
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Env first, then every flag given on the command line (flags win)."""
    overrides: dict[str, Any] = {}
    for field in dataclasses.fields(Settings):
        raw = getattr(args, field.name, None)
        if raw is None:
            continue
        if field.name == "callbacks":
            overrides["callbacks"] = tuple(raw)
        else:
            overrides[field.name] = Settings.parse_value(field.name, raw)
    return Settings.from_env(**overrides)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the receiver",
        description="Receive fal webhooks on POST /webhooks/fal and dispatch them to callbacks.",
    )
    parser.add_argument("--host", default=os.environ.get(ENV_PREFIX + "HOST", "127.0.0.1"))
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get(ENV_PREFIX + "PORT", "8000"))
    )
    parser.add_argument(
        "--callback",
        dest="callbacks",
        action="append",
        metavar="MODULE:FUNCTION",
        help=f"call this for every delivery; repeatable (env {ENV_PREFIX}CALLBACK, comma list)",
    )
    parser.add_argument(
        "--forward-to",
        dest="forward_to",
        metavar="URL",
        help=f"sidecar mode: POST each delivery to URL (env {ENV_PREFIX}FORWARD_TO)",
    )
    add_settings_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from falhook.receiver.cli.common import CommandError

    # Like uvicorn: `--callback app:handle` finds app.py in the current directory.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        settings = settings_from_args(args)
        # imported late: keeps `falhook --help` fast
        from falhook.receiver.app import WebhookReceiver

        receiver = WebhookReceiver(settings)
    except (SettingsError, ReceiverError) as exc:
        raise CommandError(str(exc)) from exc

    import uvicorn

    from falhook.receiver.logs import configure_logging

    configure_logging(settings.log_level)
    # Store threads (PostgreSQL's writer for every statement, SQLite's for each commit)
    # release the GIL and then wait behind the busy event loop to get it back — up to
    # CPython's default 5 ms switch interval each time, and every acknowledgement in the
    # batch waits with them. 0.5 ms keeps group commits flowing (bench/README, "Design
    # figures"). We own this process; a mounted receiver leaves the host's settings alone.
    sys.setswitchinterval(0.0005)
    # Everything imported so far lives as long as the process: move it out of the cyclic
    # GC's sight. Without this, each full collection walked it all and stalled the event
    # loop several times a minute under load (bench/README, "Design figures").
    gc.freeze()
    from falhook.receiver.protocol import http_protocol

    uvicorn.run(
        receiver.app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http=http_protocol(settings.header_timeout_seconds),
        # uvicorn counts the connection asking too: +1 so N connections are served.
        limit_concurrency=settings.max_connections + 1,
        lifespan="on",
        access_log=False,
        log_level=settings.log_level.lower() if settings.log_level != "INFO" else "warning",
        timeout_graceful_shutdown=int(settings.shutdown_timeout_seconds) + 5,
    )
    return 0
