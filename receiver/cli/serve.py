"""`falhook serve`: run the receiver on uvicorn (standalone, or as a sidecar).

Before anything starts, what cannot fix itself is refused with one line: a bad setting or
callback (exit 2), a SQLite file whose directory does not exist (3), a local JWKS file that
is missing or unusable (2), a port that is in use (4). A database or JWKS URL that is down
is not refused: it may come back, and the receiver recovers by itself.
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import gc
import os
import socket
import sys
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from falhook.receiver.cli.common import (
    EXIT_CANNOT_LISTEN,
    EXIT_STORE,
    CommandError,
    add_settings_flags,
    settings_from_args,
    settings_groups,
)
from falhook.receiver.errors import ReceiverError, SettingsError
from falhook.receiver.settings import ENV_PREFIX, Settings

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from falhook.receiver.logs import LogPipeline

__all__ = ["add_parser"]


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: wants a TCP port number, 0 to 65535")
    return port


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the receiver",
        # Each flag is shown with its topic below: the usage line names only the common ones.
        usage="%(prog)s [--host HOST] [--port PORT] [--callback MODULE:FUNCTION] [OPTION ...]",
        description=(
            "Receive fal webhooks on POST /webhooks/fal and dispatch them to callbacks. "
            "Every setting is also an environment variable (shown with each flag); a flag "
            "wins. Stop it with Ctrl-C or SIGTERM: running callbacks are given "
            "--shutdown-timeout-seconds to finish."
        ),
    )
    groups = settings_groups(parser)
    listening, callbacks = groups["listening"], groups["callbacks"]
    listening.add_argument(
        "--host",
        metavar="HOST",
        help=f"address to listen on; 0.0.0.0 for every interface "
        f"(env {ENV_PREFIX}HOST; default 127.0.0.1)",
    )
    listening.add_argument(
        "--port",
        type=_port,
        metavar="PORT",
        help=f"TCP port to listen on (env {ENV_PREFIX}PORT; default 8000)",
    )
    callbacks.add_argument(
        "--callback",
        dest="callbacks",
        action="append",
        metavar="MODULE:FUNCTION",
        help=f"call this for every delivery; repeatable (env {ENV_PREFIX}CALLBACK, comma list)",
    )
    callbacks.add_argument(
        "--forward-to",
        dest="forward_to",
        metavar="URL",
        help=f"sidecar mode: POST each delivery to URL (env {ENV_PREFIX}FORWARD_TO)",
    )
    add_settings_flags(parser, groups=groups)
    parser.set_defaults(func=run)


def _listen_address(args: argparse.Namespace) -> tuple[str, int]:
    """--host/--port, else FALHOOK_HOST/FALHOOK_PORT, else 127.0.0.1:8000."""
    host = args.host or os.environ.get(ENV_PREFIX + "HOST", "").strip() or "127.0.0.1"
    if args.port is not None:
        return host, int(args.port)
    raw = os.environ.get(ENV_PREFIX + "PORT", "").strip()
    if not raw:
        return host, 8000
    try:
        return host, _port(raw)
    except argparse.ArgumentTypeError:
        raise CommandError(
            f"{ENV_PREFIX}PORT={raw!r}: wants a TCP port number, 0 to 65535"
        ) from None


def _listen(host: str, port: int) -> socket.socket:
    """Bind the listening socket now, so that a port in use is one line and its own exit
    code — not uvicorn's log line after the store and the dispatcher have started."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        why = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            why += " (another falhook serve? choose another --port)"
        raise CommandError(
            f"cannot listen on {host}:{port}: {why}", exit_code=EXIT_CANNOT_LISTEN
        ) from None
    sock.set_inheritable(True)
    return sock


def _check_store(settings: Settings, args: argparse.Namespace) -> None:
    """Refuse a SQLite file that can never be created (its directory does not exist), and
    a store whose schema a later falhook wrote (this one would misread it).

    A database server that is down is different: it may come back, so serve starts anyway,
    answers 503 and recovers by itself.
    """
    from falhook.receiver.store.engine import sqlite_file

    path = sqlite_file(settings.database_url)
    if path is not None and not path.parent.is_dir():
        source = "--database-url" if args.database_url else f"{ENV_PREFIX}DATABASE_URL"
        raise CommandError(
            f"cannot create the SQLite database {path}: its directory {path.parent} does not "
            f"exist (create it, or point {source} elsewhere)",
            exit_code=EXIT_STORE,
        )
    if path is not None and not path.exists():
        return  # a new store: serve creates it
    from falhook.receiver.errors import StoreSchemaError, StoreUnavailableError
    from falhook.receiver.store.admin import Admin
    from falhook.receiver.store.migrations import check_not_newer

    admin = Admin.open(settings.database_url)
    try:
        version = admin.schema_version()
    except StoreUnavailableError:
        return  # down now: serve starts, answers 503 and migrates once it is back
    finally:
        admin.close()
    try:
        check_not_newer(version)
    except StoreSchemaError as exc:
        raise CommandError(str(exc)) from None


def _check_keys(settings: Settings, args: argparse.Namespace) -> None:
    """A local JWKS file must load now: unlike a URL, it cannot start working later."""
    from falhook.verify import KeysUnavailableError
    from falhook.verify.keys import load_jwks_file
    from falhook.verify.sources import jwks_file

    path = jwks_file(settings.jwks_url)
    if path is None:
        return  # a URL: fetched once started; a failure is a warning, the cache retries
    try:
        load_jwks_file(path)
    except KeysUnavailableError as exc:
        source = "--jwks-url" if args.jwks_url else f"{ENV_PREFIX}JWKS_URL"
        raise CommandError(f"{source}: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    # Like uvicorn: `--callback app:handle` finds app.py in the current directory.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        raise CommandError(str(exc)) from exc
    host, port = _listen_address(args)
    _check_store(settings, args)
    _check_keys(settings, args)
    from falhook.receiver.tracing.setup import provider_from_environ

    try:
        # Tracing from the standard OTEL_* variables (None: off, nothing imported).
        tracer_provider = provider_from_environ(os.environ)
        # imported late: keeps `falhook --help` fast
        from falhook.receiver.app import WebhookReceiver

        receiver = WebhookReceiver(
            settings, listen=_url(host, port), tracer_provider=tracer_provider
        )
    except ReceiverError as exc:
        raise CommandError(str(exc)) from exc
    sock = _listen(host, port)

    import uvicorn

    from falhook.receiver.logs import configure_logging

    logs = configure_logging(settings.log_level)
    # uvicorn's own warnings and errors (a request it cannot parse, an exception outside
    # the app) as JSON lines too: stderr stays one JSON object per line.
    logs.route("uvicorn")
    # A fatal signal (SIGBUS from SQLite's mapped -shm file on a filesystem that refuses to
    # grow it, SIGSEGV in a C extension) would otherwise kill the process without a word:
    # this writes the Python stack of every thread to stderr first.
    faulthandler.enable()
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

    config = uvicorn.Config(
        _DrainLogsAtShutdown(receiver.app, logs, tracer_provider),
        interface="asgi3",
        loop="uvloop",
        http=http_protocol(settings.header_timeout_seconds),
        ws="none",  # the receiver serves no WebSocket: an upgrade is answered 400 (protocol)
        # uvicorn counts the connection asking too: +1 so N connections are served.
        limit_concurrency=settings.max_connections + 1,
        # The client address in log lines: X-Forwarded-For is believed only from these.
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        lifespan="on",
        access_log=False,
        log_config=None,  # its handlers and format would replace the routing above
        log_level=settings.log_level.lower() if settings.log_level != "INFO" else "warning",
        timeout_graceful_shutdown=int(settings.shutdown_timeout_seconds) + 5,
    )
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        logs.stop()  # e.g. the server failed to start
    return 0 if server.started else 1


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _DrainLogsAtShutdown:
    """Writes the queued log lines once the receiver has shut down.

    After a graceful shutdown uvicorn raises the SIGTERM/SIGINT it caught again, which ends
    the process before ``Server.run`` returns: draining there would be too late. Requests
    go straight to the receiver's app (no extra coroutine frame on the hot path).
    """

    def __init__(self, app: ASGIApp, logs: LogPipeline, tracer_provider: Any = None) -> None:
        self.app = app
        self.logs = logs
        self.tracer_provider = tracer_provider  # its last spans are exported here too

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] == "lifespan":
            return self.app(scope, receive, self._send_after_drain(send))
        return self.app(scope, receive, send)

    def _send_after_drain(self, send: Send) -> Send:
        async def lifespan_send(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                if self.tracer_provider is not None:
                    self.tracer_provider.force_flush()  # exports the spans still batched
                self.logs.stop()  # a short join, once, after the last callback has ended
            await send(message)

        return lifespan_send
