"""Every CLI mistake, as a user meets it: a real `falhook` process, one line on stderr (never
a traceback), and the documented exit code."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

import falhook
from falhook.receiver.store import Store
from falhook.receiver.store.attempts import AttemptRecord
from falhook.receiver.store.engine import make_engine
from falhook.receiver.store.expectations import Expectations, ExpectationState
from falhook.receiver.store.migrations import MIGRATIONS, VERSIONS, upgrade
from falhook.verify.testing import generate_keypair, jwks_document
from tests.fakes.fal_queue import FakeFalQueue
from tests.receiver import store_fixtures
from tests.receiver.store_fixtures import delivery

# Fixtures, re-exported so pytest finds them in this module.
pg_schema_url = store_fixtures.pg_schema_url
store_url = store_fixtures.store_url

REPO_ROOT = Path(__file__).resolve().parents[2]
EXIT_USAGE, EXIT_STORE, EXIT_CANNOT_LISTEN = 2, 3, 4
ENDPOINT = "fal-ai/flux/dev"
# `expect` records a row, a store command like the others (it needs a fal key to).
EXPECT = ["expect", "r-expected", "--endpoint", ENDPOINT, "--fal-key", "k"]


def falhook_cli(
    *argv: str,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    prelude: str = "",
) -> subprocess.CompletedProcess[str]:
    """Run ``falhook ARGV`` in a fresh interpreter (``prelude`` runs first, in it)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FALHOOK_")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), base.get("PYTHONPATH")]))
    code = f"{prelude}\nimport sys\nfrom falhook.receiver.cli import main\nsys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """Assert the exit code and a single stderr line holding every needle; return it."""
    err = result.stderr
    assert result.returncode == code, (result.returncode, err)
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def jwks_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(__import__("json").dumps(jwks_document(generate_keypair(b"\x01" * 32))))
    return path


# -- the parser --------------------------------------------------------------------------


def test_version(tmp_path: Path) -> None:
    result = falhook_cli("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"falhook {falhook.__version__}"


def test_help_documents_the_exit_codes(tmp_path: Path) -> None:
    out = falhook_cli("--help", cwd=tmp_path).stdout
    assert "exit codes:" in out
    for code in ("0", "1", "2", "3", "4"):
        assert f"\n  {code} " in out


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [
        (["serve", "--concurency", "4"], "did you mean --concurrency?"),
        (["deliveries", "list", "--sate", "dead"], "did you mean --state?"),
        (["serv"], "did you mean serve?"),
        (["deliveries", "lsit"], "did you mean list?"),
        # A required flag, mistyped: argparse says it is missing before it says the typo is
        # not a flag, so the suggestion names both.
        (
            ["expect", "rid", "--endpont", "fal-ai/flux/dev"],
            "--endpoint — did you mean --endpoint (not --endpont)?",
        ),
    ],
)
def test_a_mistyped_flag_or_command_suggests_the_right_one(
    tmp_path: Path, argv: list[str], suggestion: str
) -> None:
    one_line(falhook_cli(*argv, cwd=tmp_path), EXIT_USAGE, suggestion)


@pytest.mark.parametrize(
    ("argv", "env", "needles"),
    [
        (["--concurrency", "lots"], {}, ["--concurrency 'lots'", "wants a whole number"]),
        ([], {"FALHOOK_CONCURRENCY": "lots"}, ["FALHOOK_CONCURRENCY='lots'", "whole number"]),
        (["--lease-seconds", "-1"], {}, ["--lease-seconds '-1'", "above 0"]),
        (["--forward-to", "ftp://x/y"], {}, ["--forward-to 'ftp://x/y'", "http://"]),
        (["--port", "http"], {}, ["--port", "'http'", "TCP port"]),
        ([], {"FALHOOK_PORT": "eighty"}, ["FALHOOK_PORT='eighty'", "TCP port"]),
        (["--log-level", "loud"], {}, ["--log-level 'loud'", "debug, info"]),
    ],
)
def test_a_bad_value_is_named_as_given_and_says_what_it_wants(
    tmp_path: Path, argv: list[str], env: dict[str, str], needles: list[str]
) -> None:
    err = one_line(falhook_cli("serve", *argv, cwd=tmp_path, env=env), EXIT_USAGE, *needles)
    assert "int()" not in err and "float" not in err
    assert not (tmp_path / "falhook.db").exists()


# -- callbacks ---------------------------------------------------------------------------


def test_a_callback_module_with_a_syntax_error(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("def handle(delivery)\n    pass\n")
    one_line(
        falhook_cli("serve", "--callback", "broken:handle", cwd=tmp_path),
        EXIT_USAGE,
        "'broken'",
        "syntax error",
        "line 1",
    )


def test_a_callback_module_that_raises_on_import(tmp_path: Path) -> None:
    (tmp_path / "raising.py").write_text("import os\nraise RuntimeError('no config')\n")
    one_line(
        falhook_cli("serve", "--callback", "raising:handle", cwd=tmp_path),
        EXIT_USAGE,
        "'raising'",
        "RuntimeError: no config",
        "line 2",
    )


# -- the store URL -----------------------------------------------------------------------


@pytest.mark.parametrize("command", [["serve"], ["deliveries", "list"], ["prune"]])
def test_sqlite_url_one_slash_short(tmp_path: Path, command: list[str]) -> None:
    result = falhook_cli(*command, cwd=tmp_path, env={"FALHOOK_DATABASE_URL": "sqlite://x.db"})
    one_line(result, EXIT_USAGE, "FALHOOK_DATABASE_URL='sqlite://x.db'", "sqlite:///x.db")


@pytest.mark.parametrize("command", [["serve"], ["deliveries", "show", "r1"]])
def test_postgresql_without_its_driver_says_what_to_install(
    tmp_path: Path, command: list[str]
) -> None:
    result = falhook_cli(
        *command,
        "--database-url",
        "postgresql+psycopg://u@127.0.0.1/db",
        cwd=tmp_path,
        # As if the postgres extra were not installed: psycopg cannot be imported.
        prelude="import sys; sys.modules['psycopg'] = None",
    )
    one_line(result, EXIT_USAGE, "pip install 'psycopg[binary]'")


def test_serve_refuses_a_sqlite_file_whose_directory_does_not_exist(
    tmp_path: Path, jwks_file: Path
) -> None:
    path = tmp_path / "no" / "such" / "dir" / "falhook.db"
    result = falhook_cli(
        "serve",
        "--database-url",
        f"sqlite:///{path}",
        cwd=tmp_path,
        env={"FALHOOK_JWKS_URL": str(jwks_file)},
    )
    one_line(result, EXIT_STORE, str(path), "does not exist")


def test_serve_refuses_a_store_newer_than_it_knows(
    tmp_path: Path, jwks_file: Path, store_url: str
) -> None:
    # A later falhook migrated this store: this one would misread it, so it does not start.
    engine = make_engine(store_url)
    try:
        latest = upgrade(engine)
        with engine.begin() as conn:
            conn.execute(VERSIONS.insert().values(version=latest + 1, description="from later"))
    finally:
        engine.dispose()
    result = falhook_cli(
        "serve",
        "--database-url",
        store_url,
        cwd=tmp_path,
        env={"FALHOOK_JWKS_URL": str(jwks_file)},
    )
    one_line(
        result,
        EXIT_USAGE,
        "falhook serve: ",
        f"schema is version {latest + 1}, newer than this falhook knows ({latest})",
    )


# -- keys --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "needle"), [(None, "not found"), ("{not json", "not valid JSON")]
)
def test_serve_fails_fast_on_an_unusable_jwks_file(
    tmp_path: Path, content: str | None, needle: str
) -> None:
    path = tmp_path / "keys.json"
    if content is not None:
        path.write_text(content)
    result = falhook_cli("serve", cwd=tmp_path, env={"FALHOOK_JWKS_URL": str(path)})
    one_line(result, EXIT_USAGE, "FALHOOK_JWKS_URL", str(path), needle)
    assert not (tmp_path / "falhook.db").exists()


# -- listening ---------------------------------------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_port_in_use_is_one_line_and_its_own_exit_code(
    tmp_path: Path, jwks_file: Path, busy_port: int
) -> None:
    result = falhook_cli(
        "serve",
        "--port",
        str(busy_port),
        cwd=tmp_path,
        env={"FALHOOK_JWKS_URL": str(jwks_file)},
    )
    one_line(result, EXIT_CANNOT_LISTEN, f"127.0.0.1:{busy_port}", "in use")


# -- store commands never create or migrate a schema -------------------------------------


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


@pytest.mark.parametrize(
    "command",
    [
        ["deliveries", "list"],
        ["deliveries", "show", "r1"],
        ["deliveries", "replay", "r1"],
        ["prune"],
        EXPECT,
    ],
)
def test_store_commands_do_not_create_a_schema(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()  # a database, but not falhook's
    result = falhook_cli(*command, "--database-url", f"sqlite:///{path}", cwd=tmp_path)
    one_line(result, EXIT_STORE, "no falhook tables", "falhook serve")
    assert _tables(path) == set()


@pytest.mark.parametrize("command", [["deliveries", "list"], EXPECT], ids=" ".join)
def test_store_commands_do_not_upgrade_an_older_schema(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "old.db"
    engine = make_engine(f"sqlite:///{path}")
    old = MIGRATIONS[:-1]
    upgrade(engine, old)
    engine.dispose()
    result = falhook_cli(*command, "--database-url", f"sqlite:///{path}", cwd=tmp_path)
    one_line(result, EXIT_STORE, f"version {old[-1].version}", f"needs {MIGRATIONS[-1].version}")
    with sqlite3.connect(path) as conn:
        (version,) = conn.execute("SELECT max(version) FROM falhook_schema_version").fetchone()
    assert version == old[-1].version


# -- what --help and the light commands import -------------------------------------------

HEAVY = ("uvicorn", "starlette", "sqlalchemy", "sqlmodel", "nacl", "prometheus_client", "httpx")
# What no command but `serve` (and `demo`) needs: the web server and its metrics.
SERVER = ("uvicorn", "starlette", "prometheus_client")


def _probe(argv: list[str], tmp_path: Path, heavy: tuple[str, ...] = HEAVY) -> tuple[int, set[str]]:
    """Run ``main(argv)`` in a fresh interpreter: its exit code, and which of `heavy` it
    imported."""
    probe = (
        "import sys\n"
        "from falhook.receiver.cli import main\n"
        "try:\n"
        f"    code = main({argv!r})\n"
        "except SystemExit as exc:\n"
        "    code = exc.code or 0\n"
        f"print('IMPORTED:', code, *(m for m in {heavy!r} if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALHOOK_")}
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("IMPORTED:"), result.stdout + result.stderr
    code, *imported = last.split()[1:]
    return int(code), set(imported)


def _imported_by(argv: list[str], tmp_path: Path) -> set[str]:
    return _probe(argv, tmp_path)[1]


@pytest.mark.parametrize(
    "argv", [["--help"], ["--version"], ["serve", "--help"], ["deliveries", "list", "--help"]]
)
def test_help_imports_nothing_heavy(tmp_path: Path, argv: list[str]) -> None:
    assert _imported_by(argv, tmp_path) == set()


def test_send_imports_only_what_it_uses(tmp_path: Path) -> None:
    # No server listens there: send fails (exit 1), having loaded what sending needs.
    (tmp_path / "k").mkdir()
    falhook_cli("keygen", "--out", str(tmp_path / "k"), cwd=tmp_path)
    imported = _imported_by(
        [
            "send",
            "http://127.0.0.1:9/webhooks/fal",
            "--key",
            str(tmp_path / "k" / "falhook-key.json"),
        ],
        tmp_path,
    )
    assert imported == {"httpx", "nacl"}


@pytest.fixture
def seeded_store(store_url: str) -> str:
    """A store as `falhook serve` leaves it: migrated, one delivery done with an attempt."""

    async def seed() -> None:
        store = Store(store_url)
        store.migrate()
        store.start()
        try:
            await store.insert(delivery("r1"))
            (claim,) = (await store.claim(1, 30.0)).claims
            assert await store.finish(claim, attempt=AttemptRecord(1, time.time(), 0.1, None))
        finally:
            await store.stop()

    asyncio.run(seed())
    return store_url


# `deliveries show` also lists the delivery's archived files, read with SQLAlchemy Core on
# the media table (receiver/archive/rows.py), so it is not among them.
STORE_COMMANDS = [
    ["deliveries", "list"],
    ["deliveries", "replay", "r1"],
    ["prune"],
    ["dispatch", "status"],
    ["dispatch", "pause", "--reason", "test"],
    ["dispatch", "resume"],
    ["expectations", "list"],
    EXPECT,
]


@pytest.mark.parametrize("command", STORE_COMMANDS, ids=" ".join)
def test_store_commands_work_without_the_server(
    tmp_path: Path, seeded_store: str, command: list[str]
) -> None:
    # Each runs its query or two on a store `serve` left, without loading the web server.
    code, imported = _probe([*command, "--database-url", seeded_store], tmp_path, heavy=SERVER)
    assert (code, imported) == (0, set())


def test_expect_records_what_serve_reads(tmp_path: Path, seeded_store: str) -> None:
    # The row `falhook expect` wrote is there, as `serve` reads it.
    code, _ = _probe([*EXPECT, "--database-url", seeded_store], tmp_path)
    assert code == 0
    store = Store(seeded_store)
    try:
        found = Expectations(store).get("r-expected")
    finally:
        store.engine.dispose()
    assert found is not None and (found.endpoint_id, found.origin) == (ENDPOINT, "expect")
    assert found.state is ExpectationState.WAITING


def test_expect_on_an_unreachable_postgres_is_one_line_exit_3(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    url = "postgresql+psycopg://u@127.0.0.1:1/none"
    result = falhook_cli(*EXPECT, "--database-url", url, cwd=tmp_path)
    one_line(result, EXIT_STORE, "falhook expect: store unavailable:")


@pytest.fixture
def fake_queue() -> Iterator[FakeFalQueue]:
    with FakeFalQueue(api_key="k") as queue:
        yield queue


def test_submit_records_as_expect_does(
    tmp_path: Path, seeded_store: str, fake_queue: FakeFalQueue
) -> None:
    # fal's queue is called over HTTP (httpx); the expectation is recorded as `expect`
    # records it, without the web server.
    (tmp_path / "in.json").write_text('{"prompt": "dog"}')
    argv = ["submit", ENDPOINT, "--input", "in.json", "--fal-key", "k"]
    argv += ["--queue-url", fake_queue.url, "--database-url", seeded_store]
    code, imported = _probe(argv, tmp_path, heavy=SERVER)
    assert (code, imported) == (0, set())
    (rid,) = fake_queue.request_ids()
    assert fake_queue.get(rid).input == {"prompt": "dog"}
    store = Store(seeded_store)
    try:
        found = Expectations(store).get(rid)
    finally:
        store.engine.dispose()
    assert found is not None and found.origin == "submit"


def test_submit_without_a_schema_asks_fal_nothing(tmp_path: Path, fake_queue: FakeFalQueue) -> None:
    # A request fal accepted whose expectation cannot be recorded would go unrecovered.
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    (tmp_path / "in.json").write_text("{}")
    result = falhook_cli(
        "submit", ENDPOINT, "--input", "in.json", "--fal-key", "k",
        "--queue-url", fake_queue.url, "--database-url", f"sqlite:///{path}",
        cwd=tmp_path,
    )  # fmt: skip
    one_line(result, EXIT_STORE, "falhook submit: no falhook tables")
    assert fake_queue.request_ids() == [] and _tables(path) == set()


def test_a_store_url_with_driver_options_works(tmp_path: Path) -> None:
    # A SQLite URL with driver options is read exactly as `serve` reads it.
    path = tmp_path / "store.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    url = f"sqlite:///{path}?timeout=2"
    code, _ = _probe(["deliveries", "list", "--database-url", url], tmp_path)
    assert code == 0


def test_output_closed_early_is_quiet(tmp_path: Path, seeded_store: str) -> None:
    # `falhook deliveries show r1 | head -1`: the reader went away before the output did.
    read, write = os.pipe()
    os.close(read)  # closed before the command writes anything: every write fails
    try:
        base = {k: v for k, v in os.environ.items() if not k.startswith("FALHOOK_")}
        result = subprocess.run(
            [sys.executable, "-m", "falhook", "deliveries", "show", "r1"],
            cwd=tmp_path,
            env={**base, "FALHOOK_DATABASE_URL": seeded_store},
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (141, "")
