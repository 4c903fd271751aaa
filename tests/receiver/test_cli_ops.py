"""`falhook deliveries list|show|replay` and `falhook prune`, run in-process on SQLite files."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from falhook.receiver.app import WebhookReceiver
from falhook.receiver.cli import main
from falhook.receiver.models import BodyRow, Delivery, DeliveryRow, State
from falhook.receiver.settings import Settings
from falhook.receiver.store import Store
from falhook.verify.testing import KeyPair, fal_body, sign
from tests.receiver.store_fixtures import delivery

DAY = 86400.0
BIG_SEED = 17454220438242315174  # > 2**53: must survive `show --json` exactly
Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def db(tmp_path: Path) -> str:
    """A migrated, empty SQLite store."""
    url = f"sqlite:///{tmp_path / 'falhook.db'}"
    store = Store(url)
    store.migrate()
    store.engine.dispose()
    return url


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], db: str) -> Run:
    """``run("deliveries", "list", ...)`` → (exit code, stdout, stderr), on `db`."""

    def invoke(*argv: str, database: str | None = db) -> tuple[int, str, str]:
        extra = ["--database-url", database] if database else []
        try:
            code = main([*argv, *extra])
        except SystemExit as exc:  # argparse rejected the arguments
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


DELIVERIES: sa.Table = DeliveryRow.__table__  # type: ignore[attr-defined]
BODIES: sa.Table = BodyRow.__table__  # type: ignore[attr-defined]


def seed(
    url: str,
    request_id: str,
    state: State,
    *,
    age: float = 60.0,
    finished_age: float | None = None,
    attempts: int = 1,
    last_error: str | None = None,
    status: str = "OK",
    due_in: float | None = None,
) -> None:
    """Write one row as the receiver and dispatcher would have left it (`due_in`: a pending
    delivery's next attempt, seconds from now)."""
    now = time.time()
    finished = state in (State.DONE, State.DEAD)
    row = {
        "request_id": request_id,
        "gateway_request_id": request_id,
        "status": status,
        "error": "Invalid status code: 422" if status == "ERROR" else None,
        "payload_error": None,
        "user_id": "user-1",
        "body": fal_body(request_id, status=status, payload={"seed": BIG_SEED}),
        "received_at": now - age,
        "state": state.value,
        "attempts": attempts,
        "due_at": now + due_in
        if due_in is not None
        else now + 30
        if state is State.RUNNING
        else now - age,
        "claim_id": "c1" if state is State.RUNNING else None,
        "last_error": last_error,
        "completed_callbacks": None,
        "updated_at": now,
        "finished_at": now - (finished_age if finished_age is not None else age)
        if finished
        else None,
    }
    body = row.pop("body")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        inserted = conn.execute(sa.insert(DELIVERIES).values(**row))
        key = inserted.inserted_primary_key[0]  # type: ignore[index]
        conn.execute(sa.insert(BODIES).values(id=key, body=body))
    engine.dispose()


def state_of(url: str, request_id: str) -> State | None:
    store = Store(url)
    try:
        row = store.get(request_id)
    finally:
        store.engine.dispose()
    return row.state if row else None


# -- deliveries list -------------------------------------------------------------------


def test_list_table(run: Run, db: str) -> None:
    seed(db, "r-old", State.DONE, age=3 * DAY)
    seed(db, "r-dead", State.DEAD, age=60, attempts=10, last_error="ConnectError: refused\nmore")
    code, out, err = run("deliveries", "list")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == [
        "REQUEST_ID",
        "STATE",
        "STATUS",
        "ATTEMPTS",
        "NEXT",
        "ATTEMPT",
        "RECEIVED",
        "(UTC)",
        "LAST_ERROR",
    ]
    assert lines[1].split()[:4] == ["r-dead", "dead", "OK", "10"]  # newest first
    assert "ConnectError: refused more" in lines[1]  # one line per delivery
    assert lines[2].split()[:2] == ["r-old", "done"]


def test_a_delivery_waiting_for_its_next_attempt_is_shown_retrying(run: Run, db: str) -> None:
    seed(db, "r-due", State.PENDING, age=120, attempts=2, last_error="boom")
    seed(db, "r-later", State.PENDING, age=60, attempts=1, last_error="Retry: later", due_in=900)
    seed(db, "r-new", State.PENDING, age=30, attempts=0)
    code, out, _ = run("deliveries", "list")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["r-later"][1:4] == ["retrying", "OK", "1"]
    assert rows["r-later"][4].endswith("Z")  # its next attempt's time
    assert rows["r-due"][1] == "pending" and rows["r-new"][1] == "pending"
    code, out, _ = run("deliveries", "list", "--state", "retrying", "--json")
    [only] = json.loads(out)
    assert only["request_id"] == "r-later" and only["retrying"] is True
    assert only["state"] == "pending" and only["next_attempt_at"].endswith("Z")
    code, out, _ = run("deliveries", "list", "--state", "retrying", "--state", "dead")
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == ["r-later"]


def test_list_json_filters(run: Run, db: str) -> None:
    seed(db, "r-old-dead", State.DEAD, age=3 * DAY)
    seed(db, "r-new-dead", State.DEAD, age=60, last_error="boom")
    seed(db, "r-pending", State.PENDING, age=30)
    code, out, _ = run("deliveries", "list", "--state", "dead", "--since", "1d", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["request_id"] for r in rows] == ["r-new-dead"]
    assert rows[0]["state"] == "dead" and rows[0]["last_error"] == "boom"
    assert rows[0]["received_at"].endswith("Z") and "body" not in rows[0]

    code, out, _ = run("deliveries", "list", "--state", "dead", "--state", "pending", "--json")
    assert {r["request_id"] for r in json.loads(out)} == {"r-old-dead", "r-new-dead", "r-pending"}

    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - DAY))
    code, out, _ = run("deliveries", "list", "--since", since, "--json")
    assert {r["request_id"] for r in json.loads(out)} == {"r-new-dead", "r-pending"}


def test_list_limit_and_empty(run: Run, db: str) -> None:
    code, out, _ = run("deliveries", "list")
    assert (code, out) == (0, "no deliveries match\n")
    assert run("deliveries", "list", "--json")[:2] == (0, "[]\n")
    for i in range(3):
        seed(db, f"r{i}", State.DONE, age=100 - i)
    code, out, _ = run("deliveries", "list", "--limit", "2")
    assert code == 0 and "r2" in out and "r1" in out and "r0" not in out
    assert "--limit N shows more" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--state", "lost"], "invalid choice"),
        (["--since", "yesterday"], "neither a duration"),
        (["--limit", "0"], "must be at least 1"),
        (["--limit", "ten"], "not a whole number"),
    ],
)
def test_list_bad_arguments(run: Run, argv: list[str], message: str) -> None:
    code, out, err = run("deliveries", "list", *argv)
    assert code == 2 and out == ""
    assert message in err and "Traceback" not in err


def test_missing_sqlite_file_is_exit_3_and_not_created(run: Run, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.db"
    code, out, err = run("deliveries", "list", database=f"sqlite:///{missing}")
    assert code == 3 and out == ""
    assert err.count("\n") == 1 and "no database at" in err and "Traceback" not in err
    assert not missing.exists()


def test_unreachable_postgres_is_one_line_exit_3(run: Run) -> None:
    pytest.importorskip("psycopg")
    code, _, err = run(
        "deliveries", "show", "r1", database="postgresql+psycopg://u@127.0.0.1:1/none"
    )
    assert code == 3
    assert err.startswith("falhook deliveries show: store unavailable:") and err.count("\n") == 1


def test_bad_database_url_is_exit_2(run: Run) -> None:
    code, _, err = run("deliveries", "list", database="mysql://x/y")
    assert code == 2 and "--database-url 'mysql://x/y': wants" in err


def test_database_url_from_env(run: Run, db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(db, "r-env", State.DONE)
    monkeypatch.setenv("FALHOOK_DATABASE_URL", db)
    code, out, _ = run("deliveries", "list", database=None)
    assert code == 0 and "r-env" in out


# -- deliveries show -------------------------------------------------------------------


def test_show(run: Run, db: str) -> None:
    seed(db, "r1", State.DEAD, attempts=10, last_error="RuntimeError: db down", status="ERROR")
    code, out, _ = run("deliveries", "show", "r1")
    assert code == 0
    assert "state " in out and "dead" in out and "RuntimeError: db down" in out
    assert "Invalid status code: 422" in out
    assert f'"seed": {BIG_SEED}' in out  # the body, pretty-printed, integers exact

    code, out, _ = run("deliveries", "show", "r1", "--json")
    document = json.loads(out)
    assert document["request_id"] == "r1" and document["attempts"] == 10
    assert document["state"] == "dead" and document["finished_at"].endswith("Z")
    assert document["body"]["payload"]["seed"] == BIG_SEED


def test_show_unknown_is_exit_1(run: Run) -> None:
    code, out, err = run("deliveries", "show", "nope")
    assert code == 1 and out == ""
    assert err == "falhook deliveries show: no delivery 'nope'\n"


# -- deliveries replay -----------------------------------------------------------------


def test_replay_by_id_says_what_it_did(run: Run, db: str) -> None:
    seed(db, "r1", State.DEAD, attempts=10, last_error="boom")
    seed(db, "r2", State.PENDING)
    seed(db, "r4", State.DONE)
    code, out, _ = run("deliveries", "replay", "r1", "r2", "r3", "r4", "r1")
    assert code == 1  # r3 is unknown
    lines = out.splitlines()
    assert lines[:4] == [
        "replayed r1 (was dead)",
        "replayed r4 (was done)",
        "r2: already pending, left alone",
        "r3: not found",
    ]
    assert "FALHOOK_POLL_SECONDS" in out
    assert state_of(db, "r1") is State.PENDING and state_of(db, "r4") is State.PENDING

    # Idempotent: the second time, nothing more is queued.
    code, out, _ = run("deliveries", "replay", "r1", "--json")
    assert code == 0
    assert json.loads(out) == {
        "replayed": [],
        "left_alone": [{"request_id": "r1", "state": "pending"}],
        "not_found": [],
    }


def test_replay_by_state(run: Run, db: str) -> None:
    seed(db, "old-dead", State.DEAD, age=3 * DAY)
    seed(db, "new-dead", State.DEAD, age=60)
    seed(db, "done", State.DONE, age=60)
    code, out, _ = run("deliveries", "replay", "--state", "dead", "--since", "1d", "--json")
    assert code == 0
    assert json.loads(out)["replayed"] == [{"request_id": "new-dead", "was": "dead"}]
    assert state_of(db, "old-dead") is State.DEAD and state_of(db, "done") is State.DONE

    code, out, _ = run("deliveries", "replay", "--state", "dead")
    assert code == 0 and out.startswith("replayed old-dead (was dead)\n")
    code, out, _ = run("deliveries", "replay", "--state", "dead")
    assert code == 0 and out == "nothing to replay: no dead deliveries\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give the request ids to replay, or --state dead"),
        (["r1", "--state", "dead"], "not both"),
        (["r1", "--since", "1d"], "--since goes with --state"),
    ],
)
def test_replay_bad_arguments(run: Run, argv: list[str], message: str) -> None:
    code, out, err = run("deliveries", "replay", *argv)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1


def test_replay_rejects_pending_state(run: Run) -> None:
    code, _, err = run("deliveries", "replay", "--state", "pending")
    assert code == 2 and "invalid choice" in err


# -- prune -----------------------------------------------------------------------------


def test_prune_default_keeps_a_week_and_only_touches_done(run: Run, db: str) -> None:
    seed(db, "done-old", State.DONE, age=10 * DAY)
    seed(db, "done-recent", State.DONE, age=10 * DAY, finished_age=2 * DAY)
    seed(db, "dead-old", State.DEAD, age=10 * DAY)
    seed(db, "pending-old", State.PENDING, age=10 * DAY)
    seed(db, "running-old", State.RUNNING, age=10 * DAY)
    code, out, _ = run("prune")
    assert code == 0 and out == "pruned 1 done delivery that finished more than 7d ago\n"
    assert state_of(db, "done-old") is None
    for kept in ("done-recent", "dead-old", "pending-old", "running-old"):
        assert state_of(db, kept) is not None

    code, out, _ = run(
        "prune", "--older-than", "1d", "--state", "done", "--state", "dead", "--json"
    )
    assert code == 0
    assert json.loads(out) == {"deleted": 2, "states": ["done", "dead"], "older_than_seconds": DAY}
    assert state_of(db, "pending-old") is State.PENDING
    assert state_of(db, "running-old") is State.RUNNING


def test_prune_refuses_a_short_retention_without_force(run: Run, db: str) -> None:
    seed(db, "done-2h", State.DONE, age=2 * 3600)
    code, out, err = run("prune", "--older-than", "1h")
    assert code == 2 and out == ""
    assert "under 3h" in err and "--force" in err and err.count("\n") == 1
    assert state_of(db, "done-2h") is State.DONE

    code, out, _ = run("prune", "--older-than", "1h", "--force")
    assert code == 0 and out.startswith("pruned 1 ")
    assert state_of(db, "done-2h") is None


@pytest.mark.parametrize(
    "argv", [["--older-than", "week"], ["--older-than", "0s"], ["--state", "pending"]]
)
def test_prune_bad_arguments(run: Run, argv: list[str]) -> None:
    code, out, err = run("prune", *argv)
    assert code == 2 and out == "" and err.startswith("falhook prune: ") and err.count("\n") == 1


# -- the operator's walk: a callback fails, the delivery dies, it is fixed and replayed ----


def test_dead_delivery_replayed_after_the_fix(
    run: Run, db: str, keypair: KeyPair, jwks_file: Path
) -> None:
    fixed = threading.Event()
    handled: list[str] = []

    def handle(delivery: Delivery) -> None:
        if not fixed.is_set():
            raise RuntimeError("downstream is down")
        handled.append(delivery.request_id)

    settings = Settings(
        database_url=db,
        jwks_url=str(jwks_file),
        callback_max_attempts=1,
        poll_seconds=0.05,
    )

    def wait_state(request_id: str, state: State) -> None:
        deadline = time.monotonic() + 10
        while state_of(db, request_id) is not state:
            assert time.monotonic() < deadline, f"{request_id} never became {state}"
            time.sleep(0.02)

    body = fal_body("req-walk")
    with TestClient(WebhookReceiver(settings, callbacks=[handle]).app) as client:
        response = client.post(
            "/webhooks/fal", content=body, headers=sign(body, "req-walk", "u1", keypair=keypair)
        )
        assert response.status_code == 200
        wait_state("req-walk", State.DEAD)

        code, out, _ = run("deliveries", "list", "--state", "dead", "--json")
        [row] = json.loads(out)
        assert row["request_id"] == "req-walk" and "downstream is down" in row["last_error"]

        fixed.set()
        code, out, _ = run("deliveries", "replay", "req-walk")
        assert code == 0 and out.startswith("replayed req-walk (was dead)")
        wait_state("req-walk", State.DONE)  # the running receiver picked it up at its poll
    assert handled == ["req-walk"]


# -- deliveries show: the attempt history ----------------------------------------------


def test_show_lists_every_attempt_and_the_latest_traceback(run: Run, db: str) -> None:
    import asyncio

    from falhook.receiver.store.attempts import AttemptRecord

    trace = 'Traceback (most recent call last):\n  File "myapp.py", line 4, in handle\n'
    trace += "RuntimeError: downstream is down"

    async def dispatch_twice() -> None:
        store = Store(db)
        store.start()
        try:
            await store.insert(delivery("r-hist"))
            (claim,) = (await store.claim(10, 30)).claims
            now = time.time()
            await store.reschedule(
                claim,
                now,
                "RuntimeError: downstream is down",
                attempt=AttemptRecord(1, now, 1.5, trace),
            )
            (claim,) = (await store.claim(10, 30)).claims
            await store.bury(
                claim, "RuntimeError: again", attempt=AttemptRecord(2, now, 0.5, trace)
            )
        finally:
            await store.stop()

    asyncio.run(dispatch_twice())
    code, out, _ = run("deliveries", "show", "r-hist")
    assert code == 0
    table = out[out.index("attempts:") : out.index("traceback of attempt 2:")]
    assert "ATTEMPT" in table and "DURATION" in table and "NEXT ATTEMPT" in table
    lines = table.splitlines()[2:]
    assert lines[0].split()[0] == "1" and "1.500 s" in lines[0] and "retry" in lines[0]
    assert lines[1].split()[0] == "2" and "dead" in lines[1]
    assert "same as attempt 1" in lines[1]  # the same traceback is shown once
    assert "RuntimeError: downstream is down" in lines[0]
    assert 'File "myapp.py", line 4, in handle' in out
    code, out, _ = run("deliveries", "show", "r-hist", "--json")
    history = json.loads(out)["attempt_history"]
    assert [(a["attempt"], a["outcome"]) for a in history] == [(1, "retry"), (2, "dead")]
    assert history[0]["next_attempt_at"] is not None and history[1]["error"] == trace
    assert history[0]["duration_seconds"] == 1.5


def test_show_says_when_no_attempt_was_made(run: Run, db: str) -> None:
    seed(db, "r-new", State.PENDING, attempts=0)
    code, out, _ = run("deliveries", "show", "r-new")
    assert code == 0 and "attempts: none recorded yet" in out
