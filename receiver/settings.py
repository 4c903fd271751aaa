"""Settings: one frozen object, built once (from the environment, then flags) and passed down.

A setting is one field, ``_setting(default, parser, "ENV", "help")``: env FALHOOK_ENV, flag
--field-name (the flag wins), and `parser` (text -> value, ValueError saying what it wants)
is its one rule, applied however a Settings is built (see ``__post_init__``).

Why not pydantic-settings: the rules and their one-line messages would stay ours (pydantic's
own are multi-line, ``1 validation error for Settings …``), each parser then wrapped as a
validator and each error translated back; flags, the FAL_KEY fallback, a comma list in an
env variable (pydantic-settings reads one as JSON) and defaults shown as typed (``7d``) each
want configuration of their own; ``model_copy(update=…)`` does not validate; and every
command would import pydantic (0.3-0.6 s here; `falhook verify`, `keygen` and `submit` do
not today). The dataclass below does it in fewer lines, with no new dependency.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import importlib.util
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from falhook.receiver.durations import format_duration, parse_duration
from falhook.receiver.errors import SettingsError
from falhook.receiver.redact import shown_url
from falhook.verify.message import DEFAULT_JWKS_URL
from falhook.verify.sources import jwks_file

__all__ = [
    "DEFAULT_DATABASE_URL",
    "DEFAULT_JWKS_URL",
    "DEFAULT_QUEUE_URL",
    "ENV_PREFIX",
    "WEBHOOK_PATH",
    "Settings",
    "check_database_url",
]

ENV_PREFIX = "FALHOOK_"
DEFAULT_DATABASE_URL = "sqlite:///./falhook.db"
DEFAULT_QUEUE_URL = "https://queue.fal.run"
DEFAULT_PLATFORM_URL = "https://api.fal.ai/v1"
# fal's own SDKs read the key from FAL_KEY; FALHOOK_FAL_KEY wins when both are set.
FAL_KEY_FALLBACK_ENV = "FAL_KEY"
_MiB = 1024 * 1024
# fal's CDN: v3.fal.media, v3b.fal.media, fal.media… (an entry covers its subdomains).
DEFAULT_ARCHIVE_HOSTS = ("fal.media",)


# Each parser raises ValueError with what the setting wants, never int()'s or float()'s own
# message ("invalid literal for int() with base 10"), which tells an operator nothing.


def _positive_int(value: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError("wants a whole number, at least 1")
    return number


def _optional_positive_int(value: str) -> int | None:
    return _positive_int(value) if value.strip() else None


def _float(value: str, wanted: str) -> float:
    try:
        return float(value.strip())
    except ValueError:
        raise ValueError(wanted) from None


def _positive_float(value: str) -> float:
    wanted = "wants a number of seconds above 0 (fractions allowed)"
    number = _float(value, wanted)
    if not number > 0 or number == float("inf"):
        raise ValueError(wanted)
    return number


def _proxies(value: str) -> str:
    # uvicorn would take anything it cannot read as an address for a Unix socket's name and
    # trust nothing by it: a typo would silently log the proxy's address for every client.
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise ValueError("wants addresses or networks, comma-separated, or * for any")
    for item in items:
        if item != "*":
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"{item!r} is not an IP address or network (e.g. 10.0.0.1, 10.0.0.0/8, *)"
                ) from None
    return ",".join(items)


def _non_negative_float(value: str) -> float:
    wanted = "wants a number of seconds, 0 or more (fractions allowed)"
    number = _float(value, wanted)
    if not number >= 0 or number == float("inf"):
        raise ValueError(wanted)
    return number


def _retention(value: str) -> float:
    if value.strip() == "0":
        return 0.0  # off
    return parse_duration(value)


def _optional_str(value: str) -> str | None:
    return value.strip() or None


def _fal_key(value: str) -> str | None:
    key = value.strip() or None
    # Sent as a header: a space, newline or non-ASCII character inside would fail every
    # call later, as "fal's queue is unreachable" or a traceback.
    if key is not None and not re.fullmatch(r"[\x21-\x7e]+", key):
        raise ValueError("wants the key as fal shows it: ASCII letters, digits and symbols")
    return key


def _callbacks(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("wants true or false")


def _str(value: str) -> str:
    if not value.strip():
        raise ValueError("wants a value, not an empty string")
    return value.strip()


def _jwks_source(value: str) -> str:
    source = _str(value)
    jwks_file(source)  # verify's rule, checked at start: ValueError for another scheme
    return source


WEBHOOK_PATH = "/webhooks/fal"  # where fal posts: served by the app, told to fal by submit


def _public_url(value: str) -> str | None:
    # fal is told this + /webhooks/fal: a query, a fragment or the webhook path itself
    # would make a URL fal cannot reach, and every result would come by recovery, late.
    url = _http_url(value)
    if url is None:
        return None
    if "?" in url or "#" in url:
        raise ValueError("wants the base URL alone, without ?query or #fragment")
    if url.endswith(WEBHOOK_PATH):
        raise ValueError("wants the base URL: falhook adds /webhooks/fal (drop it from the end)")
    return url


def _log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("wants one of debug, info, warning, error, critical")
    return level


def _http_url(value: str) -> str | None:
    url = value.strip().rstrip("/")
    if not url:
        return None
    if not url.startswith(("http://", "https://")):
        raise ValueError("wants an http:// or https:// URL")
    return url


def _forward_url(value: str) -> str | None:
    # Kept exactly as given: a trailing slash may matter to the app behind it.
    url = _optional_str(value)
    if url is not None and not url.startswith(("http://", "https://")):
        raise ValueError("wants an http:// or https:// URL")
    return url


def _forward_secret(value: str) -> str | None:
    # Standard Webhooks secrets are base64, usually with a "whsec_" prefix. Checked strictly
    # here: the library itself skips characters that are not base64, so a mangled secret
    # would sign with a different key than the app's and every forward would fail.
    secret = _optional_str(value)
    if secret is None:
        return None
    raw = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise ValueError("wants whsec_ followed by the base64 of at least 16 random bytes")
    return secret


def _database_url(value: str) -> str:
    url = _str(value)
    check_database_url(url)
    return url


def check_database_url(url: str) -> None:
    """Raise ValueError saying what is wanted unless `url` names a store falhook can open.

    Read by SQLAlchemy's own parser, as the store reads it, so that a mistyped URL or a
    missing driver is one clear line before anything starts, not a driver traceback later.
    """
    import sqlalchemy as sa  # only where a database URL is checked

    try:
        parsed: sa.URL | None = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        parsed = None
    backend = parsed.get_backend_name() if parsed is not None else None
    if parsed is not None and backend == "sqlite":
        rest = url.partition("://")[2]  # "" is an in-memory database
        if rest and not rest.startswith("/"):
            raise ValueError(
                "wants sqlite:/// and then the path (three slashes before a relative path, "
                f"four before an absolute one): sqlite:///{rest}"
            )
        return
    if parsed is None or backend != "postgresql":
        raise ValueError("wants sqlite:///path.db or postgresql+psycopg://user@host/db")
    driver = parsed.drivername.partition("+")[2] or "psycopg2"  # SQLAlchemy's default
    module = {"psycopg": "psycopg", "psycopg2": "psycopg2"}.get(driver)
    if module is None:
        raise ValueError(f"wants the psycopg driver (postgresql+psycopg://…), not {driver!r}")
    if importlib.util.find_spec(module) is None:
        if module == "psycopg2":
            raise ValueError(
                "postgresql:// means the psycopg2 driver, which is not installed: write "
                "postgresql+psycopg://… and pip install 'psycopg[binary]' "
                "(falhook's postgres extra)"
            )
        raise ValueError(
            "PostgreSQL needs its driver: pip install 'psycopg[binary]' (falhook's postgres extra)"
        )


def _required_http_url(value: str) -> str:
    url = _http_url(value)
    if url is None:
        raise ValueError("wants a URL, not an empty string")
    return url


def _archive_url(value: str) -> str | None:
    # Checked here without importing the storage library: a folder (a path or file:///abs),
    # or object storage named by its scheme; the library reads the rest at start.
    url = value.strip()
    if not url:
        return None
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url  # a folder path, relative to where falhook starts
    if scheme == "file":
        if not rest.startswith("/"):
            raise ValueError("wants file:/// and an absolute path (file:///srv/media)")
        return url
    if scheme not in ("s3", "gs", "az"):
        raise ValueError(
            "wants a folder path, file:///abs/path, s3://bucket/prefix, gs://bucket/prefix "
            "or az://container/prefix"
        )
    if not rest.split("/", 1)[0]:
        raise ValueError(f"wants the bucket's name: {scheme}://bucket/prefix")
    return url.rstrip("/")


_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


def split_host_entry(entry: str) -> tuple[str, int | None]:
    """An archive host entry (``fal.media``, ``127.0.0.1:9000``, ``[::1]:9000``) as
    (host, port or None); ValueError saying what is wanted."""
    item = entry.strip().lower()
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":") if rest.startswith(":") else rest or None
    elif item.count(":") == 1:
        host, port = item.split(":")
    else:
        host, port = item, None  # a name, an IPv4 address or a bare IPv6 address
    wanted = f"{entry.strip()!r} is not a host or host:port (e.g. fal.media, 10.0.0.5:9000)"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(wanted) from None
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(wanted)
    return host, None if port is None else int(port)


def _archive_hosts(value: str) -> tuple[str, ...]:
    items = [item.strip().lower() for item in value.split(",") if item.strip()]
    if not items:
        raise ValueError("wants host names, comma-separated (fal.media, cdn.example.com:8443)")
    for item in items:
        split_host_entry(item)
    return tuple(items)


def _setting(
    default: Any,
    parse: Callable[[str], Any],
    env: str,
    help: str,
    *,
    secret: bool = False,
    show: Callable[[Any], str] | None = None,
    group: str | None = None,
    metavar: str | None = None,
) -> Any:
    # A secret (the fal key) stays out of repr(), so it never reaches a log line. `show`
    # writes the default as an operator types it, where str() would not (a duration).
    # `group` (one of GROUPS) and `metavar` (what the value is, when its name does not say:
    # see `shown_metavar`) place and label the flag in `falhook serve --help`.
    return field(
        default=default,
        repr=not secret,
        metadata={
            "parse": parse,
            "env": env,
            "help": help,
            "secret": secret,
            "show": show,
            "group": group,
            "metavar": metavar,
        },
    )


def _show_duration(seconds: float) -> str:
    return format_duration(seconds) if seconds else "0"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the receiver can be told. Build with `Settings.from_env()` (or in code:
    every value is checked the same way, raising SettingsError); never mutate."""

    database_url: str = _setting(
        DEFAULT_DATABASE_URL,
        _database_url,
        "DATABASE_URL",
        "store: sqlite:///… or postgresql+psycopg://…",
        group="store",
    )
    jwks_url: str = _setting(
        DEFAULT_JWKS_URL,
        _jwks_source,
        "JWKS_URL",
        "JWKS URL, or a local JWKS file path",
        group="keys",
        metavar="URL|FILE",
    )
    jwks_timeout_seconds: float = _setting(
        5.0,
        _positive_float,
        "JWKS_TIMEOUT_SECONDS",
        "deadline for a whole JWKS fetch",
        group="keys",
    )
    jwks_refresh_seconds: float = _setting(
        10.0,
        _non_negative_float,
        "JWKS_REFRESH_SECONDS",
        "at most one JWKS fetch per this interval (unknown key meanwhile: 503)",
        group="keys",
    )
    user_id: str | None = _setting(
        None,
        _optional_str,
        "USER_ID",
        "accept only deliveries signed for this fal user id",
        group="keys",
        metavar="ID",
    )
    tolerance_seconds: float = _setting(
        300.0,
        _non_negative_float,
        "TOLERANCE_SECONDS",
        "timestamp tolerance in seconds",
        group="keys",
    )
    max_body_bytes: int = _setting(
        16 * _MiB,
        _positive_int,
        "MAX_BODY_BYTES",
        "body limit (a webhook's, and a result recovered from fal's queue)",
        group="limits",
    )
    max_buffered_bytes: int = _setting(
        64 * _MiB,
        _positive_int,
        "MAX_BUFFERED_BYTES",
        "request body bytes held at once across all requests (beyond: 503)",
        group="limits",
    )
    body_timeout_seconds: float = _setting(
        10.0,
        _positive_float,
        "BODY_TIMEOUT_SECONDS",
        "deadline to receive a body (beyond: 408)",
        group="limits",
    )
    header_timeout_seconds: float = _setting(
        10.0,
        _positive_float,
        "HEADER_TIMEOUT_SECONDS",
        "serve: close a connection whose request head takes longer",
        group="limits",
    )
    max_connections: int = _setting(
        512,
        _positive_int,
        "MAX_CONNECTIONS",
        "serve: open connections (beyond: 503)",
        group="limits",
    )
    forwarded_allow_ips: str = _setting(
        "127.0.0.1",
        _proxies,
        "FORWARDED_ALLOW_IPS",
        "serve: proxies (comma-separated addresses or networks, * for any) whose "
        "X-Forwarded-For gives the client address in logs, as uvicorn's flag of that name",
        group="listening",
        metavar="ADDRESSES",
    )
    callbacks: tuple[str, ...] = _setting(
        (),
        _callbacks,
        "CALLBACK",
        "module:function callbacks, comma-separated",
        group="callbacks",
        metavar="MODULE:FUNCTION",
    )
    callback_max_attempts: int = _setting(
        10,
        _positive_int,
        "CALLBACK_MAX_ATTEMPTS",
        "attempts before a delivery is dead",
        group="callbacks",
    )
    callback_backoff_seconds: float = _setting(
        2.0,
        _positive_float,
        "CALLBACK_BACKOFF_SECONDS",
        "first retry delay (doubles, jittered)",
        group="callbacks",
    )
    callback_backoff_max_seconds: float = _setting(
        3600.0,
        _positive_float,
        "CALLBACK_BACKOFF_MAX_SECONDS",
        "retry delay cap",
        group="callbacks",
    )
    store_timeout_seconds: float = _setting(
        10.0,
        _positive_float,
        "STORE_TIMEOUT_SECONDS",
        "a delivery not committed within this gets 503 (fal retries)",
        group="store",
    )
    callback_timeout_seconds: float = _setting(
        300.0,
        _positive_float,
        "CALLBACK_TIMEOUT_SECONDS",
        "an attempt's callback is abandoned after this long (a failed attempt)",
        group="callbacks",
    )
    lease_seconds: float = _setting(
        60.0,
        _positive_float,
        "LEASE_SECONDS",
        "claim lease, renewed while a callback runs",
        group="callbacks",
    )
    forward_to: str | None = _setting(
        None,
        _forward_url,
        "FORWARD_TO",
        "POST each delivery to this URL (sidecar mode)",
        group="callbacks",
    )
    forward_secret: str | None = _setting(
        None,
        _forward_secret,
        "FORWARD_SECRET",
        "sign each forward with this Standard Webhooks secret (whsec_…); prefer the env var",
        secret=True,
        group="callbacks",
        metavar="SECRET",
    )
    concurrency: int = _setting(
        64, _positive_int, "CONCURRENCY", "callbacks run at once", group="callbacks"
    )
    poll_seconds: float = _setting(
        5.0,
        _positive_float,
        "POLL_SECONDS",
        "dispatcher poll fallback interval",
        group="store",
    )
    shutdown_timeout_seconds: float = _setting(
        30.0,
        _non_negative_float,
        "SHUTDOWN_TIMEOUT_SECONDS",
        "wait for running callbacks",
        group="callbacks",
    )
    notify_url: str | None = _setting(
        None,
        _forward_url,
        "NOTIFY_URL",
        'POST {"text": …} here (Slack, Discord) when a delivery goes dead, an expectation '
        "fails or expires, or a file cannot be archived; batched, at most one a minute per kind",
        group="notifications",
    )
    console_token: str | None = _setting(
        None,
        _optional_str,
        "CONSOLE_TOKEN",
        "serve the operator's console under /console/, signed in with this token",
        secret=True,
        group="console",
        metavar="TOKEN",
    )
    retention: float = _setting(
        7 * 24 * 3600.0,
        _retention,
        "RETENTION",
        "serve prunes done deliveries older than this (7d, 36h…; 0 = off)",
        show=_show_duration,
        group="store",
        metavar="DURATION",
    )
    log_level: str = _setting(
        "INFO", _log_level, "LOG_LEVEL", "log level", group="logging", metavar="LEVEL"
    )
    log_payloads: bool = _setting(
        False,
        _bool,
        "LOG_PAYLOADS",
        "include payloads in delivery log lines",
        group="logging",
    )
    # -- recovery from fal's queue (receiver/recovery/): off unless a fal key is set ------
    fal_key: str | None = _setting(
        None,
        _fal_key,
        "FAL_KEY",
        "fal API key for submit, expect and recovery from fal's queue (falls back to FAL_KEY)",
        secret=True,
        group="recovery",
        metavar="KEY",
    )
    queue_url: str = _setting(
        DEFAULT_QUEUE_URL,
        _required_http_url,
        "QUEUE_URL",
        "fal's queue (http:// accepted for tests)",
        group="recovery",
    )
    public_url: str | None = _setting(
        None,
        _public_url,
        "PUBLIC_URL",
        "base URL fal calls: the webhook is this + /webhooks/fal",
        group="recovery",
    )
    # fal keeps a result for about 6 minutes after completion when it is 10 KB or more
    # (about 1 hour otherwise), and stops retrying the webhook when it expires. With these
    # defaults a lost result is fetched at most ~60 s after fal completes it (one poll
    # interval, then the grace), far inside those 6 minutes, while a healthy webhook (sent
    # as the request completes) always wins and nothing is polled for it at all.
    recover_after_seconds: float = _setting(
        60.0,
        _non_negative_float,
        "RECOVER_AFTER_SECONDS",
        "no delivery this long after submit/expect: start polling fal's status (60 s: most "
        "requests' webhooks have come by then, so most are never polled)",
        group="recovery",
    )
    recover_poll_seconds: float = _setting(
        30.0,
        _positive_float,
        "RECOVER_POLL_SECONDS",
        "status poll interval cap; polls back off from 1 s to this (30 s: a completion is "
        "seen within 30 s, and a thousand running requests cost ~33 status calls a second)",
        group="recovery",
    )
    recover_grace_seconds: float = _setting(
        30.0,
        _non_negative_float,
        "RECOVER_GRACE_SECONDS",
        "after fal says COMPLETED, wait this for the webhook before fetching the result "
        "(30 s: covers fal's first 15 s delivery attempt twice over)",
        group="recovery",
    )
    expect_ttl_seconds: float = _setting(
        86400.0,
        _positive_float,
        "EXPECT_TTL_SECONDS",
        "give up on an expectation this long after it was recorded (state expired)",
        group="recovery",
    )

    # -- the media archive (receiver/archive/): off unless FALHOOK_ARCHIVE_URL is set -----
    archive_url: str | None = _setting(
        None,
        _archive_url,
        "ARCHIVE_URL",
        "archive every fal media file of an OK delivery here before its callbacks run: a "
        "folder, file:///abs/path, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix",
        group="archive",
    )
    archive_hosts: tuple[str, ...] = _setting(
        DEFAULT_ARCHIVE_HOSTS,
        _archive_hosts,
        "ARCHIVE_HOSTS",
        "fetch files only from these hosts and their subdomains (host or host:port, "
        "comma-separated); a private or loopback address only when listed exactly",
        show=",".join,
        group="archive",
        metavar="HOSTS",
    )
    archive_max_bytes: int = _setting(
        5 * 1024 * _MiB,
        _positive_int,
        "ARCHIVE_MAX_BYTES",
        "a file larger than this is not kept (failed: too_large)",
        group="archive",
    )
    archive_concurrency: int = _setting(
        8, _positive_int, "ARCHIVE_CONCURRENCY", "files downloaded at once", group="archive"
    )
    archive_timeout_seconds: float = _setting(
        900.0,
        _positive_float,
        "ARCHIVE_TIMEOUT_SECONDS",
        "deadline for one file, retries included (then the delivery's attempt is retried)",
        group="archive",
    )

    fal_purge: bool = _setting(
        False,
        _bool,
        "FAL_PURGE",
        "once every file of a delivery is archived, delete its payload and output files at "
        "fal (needs FALHOOK_ARCHIVE_URL and an admin key or the fal key)",
        group="archive",
    )
    fal_admin_key: str | None = _setting(
        None,
        _fal_key,
        "FAL_ADMIN_KEY",
        "fal admin API key for purging at fal (falls back to the fal key)",
        secret=True,
        group="archive",
        metavar="KEY",
    )
    platform_url: str = _setting(
        DEFAULT_PLATFORM_URL,
        _required_http_url,
        "PLATFORM_URL",
        "fal's platform API, for purging (http:// accepted for tests)",
        group="archive",
    )
    fal_media_expiration_seconds: int | None = _setting(
        None,
        _optional_positive_int,
        "FAL_MEDIA_EXPIRATION_SECONDS",
        "ask fal to delete the media of what falhook submits after this many seconds",
        group="recovery",
    )

    def __post_init__(self) -> None:
        # However it was built (from_env, flags, Settings(...), replace()), every value is
        # checked by its field's parser: written as an operator would type it and parsed
        # again, so the rules and the one-line messages are the ones from_env gives (it has
        # named the variable or flag already; a value given in code is named by its field).
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            checked = _parse(f, _as_typed(f, value), f.name, shown=value)
            if checked != value or type(checked) is not type(value):
                object.__setattr__(self, f.name, checked)  # e.g. "7d" -> 604800.0, 5 -> 5.0
        if self.fal_purge and self.archive_url is None:
            raise SettingsError(
                "FALHOOK_FAL_PURGE needs FALHOOK_ARCHIVE_URL: fal's copy is deleted only "
                "once every file is archived"
            )
        if self.fal_purge and self.purge_key is None:
            raise SettingsError(
                "FALHOOK_FAL_PURGE needs FALHOOK_FAL_ADMIN_KEY (or FALHOOK_FAL_KEY) to call "
                "fal's platform API"
            )
        if self.max_buffered_bytes < self.max_body_bytes:
            # A body the budget can never hold would get 503 forever (fal retries for hours).
            raise SettingsError(
                f"FALHOOK_MAX_BUFFERED_BYTES ({self.max_buffered_bytes}) must be at least "
                f"FALHOOK_MAX_BODY_BYTES ({self.max_body_bytes})"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``FALHOOK_*`` variables, then apply `overrides` (flags win over env)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = ENV_PREFIX + f.metadata["env"]
            raw = env.get(name)
            if raw is None and f.name == "fal_key":
                raw = env.get(FAL_KEY_FALLBACK_ENV)
                name = FAL_KEY_FALLBACK_ENV
            if raw is None:
                continue
            values[f.name] = _parse(f, raw, name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def parse_value(cls, name: str, raw: str) -> Any:
        """Parse one raw (flag or env) value for the field `name`, as from_env would."""
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        return _parse(f, raw, "--" + name.replace("_", "-"))

    @classmethod
    def env_table(cls) -> list[tuple[str, str, str]]:
        """(env var, default, help) for every setting, for documentation and --help."""
        return [
            (ENV_PREFIX + f.metadata["env"], shown_default(f), f.metadata["help"])
            for f in dataclasses.fields(cls)
        ]

    @property
    def purge_key(self) -> str | None:
        """The key purges at fal are made with: the admin key, else the fal key."""
        return self.fal_admin_key or self.fal_key

    @property
    def recovery_enabled(self) -> bool:
        """A fal key is configured: submit, expect and recovery from fal's queue work."""
        return self.fal_key is not None

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes` applied (settings stay immutable)."""
        return dataclasses.replace(self, **changes)


# The topics of `falhook serve --help`, in its order; each setting names one (`group=`).
GROUPS = (
    "listening",
    "store",
    "keys",
    "callbacks",
    "limits",
    "recovery",
    "archive",
    "console",
    "notifications",
    "logging",
)


def shown_metavar(f: dataclasses.Field[Any]) -> str:
    """What a setting's flag takes, for --help: its declared ``metavar``, else what its name
    or parser says (``SECONDS``, ``BYTES``, ``URL``, ``N``, ``BOOL``)."""
    declared: str | None = f.metadata.get("metavar")
    if declared:
        return declared
    parse = f.metadata["parse"]
    if f.name.endswith("_seconds"):
        return "SECONDS"
    if f.name.endswith("_bytes"):
        return "BYTES"
    if f.name.endswith(("_url", "_to")):
        return "URL"
    if parse is _positive_int:
        return "N"
    if parse is _bool:
        return "BOOL"
    return "VALUE"


def shown_default(f: dataclasses.Field[Any]) -> str:
    """A setting's default as an operator would write it (``7d``, ``300``, ``false``,
    ``unset``), not as Python holds it (``604800.0``, ``300.0``, ``False``, ``None``)."""
    value: Any = f.default
    if value is None or value == ():
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    show = f.metadata["show"]
    if show is not None:
        return str(show(value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# user:password@ in a URL (a database's, a forward target's): the password never reaches
# an error line, which goes to a terminal, a CI log or a ticket.
# SQLAlchemy's URL grammar: a user name without ":" or "/", a password up to the "@".
_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")


def without_password(text: str) -> str:
    """``text`` with the password of any URL in it replaced by ``***``: for the startup
    line and for errors, including a URL too broken for SQLAlchemy to parse."""
    return _PASSWORD.sub(r"\1***@", text)


def _as_typed(f: dataclasses.Field[Any], value: Any) -> str:
    """`value` written as an operator would type it, for its field's parser."""
    if isinstance(value, str):
        return value  # as typed already: Settings(retention="36h") reads as the env does
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # "inf", "nan": refused by every parser, in its own words
    if f.metadata["show"] is not None:
        with contextlib.suppress(TypeError):  # not its type: the parser says what it wants
            return str(f.metadata["show"](value))
    if isinstance(value, float):
        return repr(value)  # exact, unlike :g
    if isinstance(value, (tuple, list)):
        return ",".join(str(item) for item in value)
    return str(value)


def _parse(f: dataclasses.Field[Any], raw: str, name: str, *, shown: Any = None) -> Any:
    """`raw` parsed for `f`; a SettingsError names `name`: an env variable (NAME='…'), a
    flag (--name '…') or a field (name=…, showing `shown`, the value given in code)."""
    try:
        return f.metadata["parse"](raw)
    except ValueError as exc:
        given = raw if shown is None else shown
        if f.metadata.get("secret"):
            value = "…"
        elif f.name == "forward_to" and isinstance(given, str):
            value = repr(shown_url(given))  # user info and query values masked
        else:
            value = without_password(repr(given))
        # --concurrency 'lots': …; FALHOOK_CONCURRENCY='lots': …; concurrency=0: … (code)
        where = f"{name} {value}" if name.startswith("--") else f"{name}={value}"
        raise SettingsError(f"{where}: {exc}") from exc
