"""The console over HTTP (in process, a real SQLite store): every route, sign-in, sessions,
CSRF and origin checks, escaping, filters and keyset pages, and the actions."""

from __future__ import annotations

import html
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from starlette.testclient import TestClient

from falhook.receiver import Settings, WebhookReceiver
from falhook.receiver.console import queries
from falhook.receiver.console.auth import SESSION_COOKIE, Auth, SigninThrottle
from falhook.receiver.console.queries import PAGE_SIZE, Cursor, Filters, page_statement, sql_for
from falhook.receiver.models import BODIES, State
from falhook.receiver.models import DELIVERIES as TABLE
from falhook.receiver.store import Store
from tests.receiver import store_fixtures
from tests.receiver.conftest import Signer

store_url = store_fixtures.store_url
pg_schema_url = store_fixtures.pg_schema_url

TOKEN = "correct horse battery staple"


@pytest.fixture
def hooks(settings: Settings) -> WebhookReceiver:
    return WebhookReceiver(settings.replace(console_token=TOKEN))


@pytest.fixture
def client(hooks: WebhookReceiver) -> Iterator[TestClient]:
    with TestClient(hooks.app, follow_redirects=False) as c:
        yield c


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert match, html
    return match.group(1)


def sign_in(client: TestClient, token: str = TOKEN) -> Any:
    form = client.get("/console/signin")
    return client.post("/console/signin", data={"csrf": csrf_of(form.text), "token": token})


@pytest.fixture
def signed_in(client: TestClient) -> TestClient:
    response = sign_in(client)
    assert response.status_code == 303
    return client


def seed(
    hooks: WebhookReceiver,
    request_id: str,
    *,
    state: State = State.DONE,
    status: str = "OK",
    received_at: float | None = None,
    body: dict[str, Any] | None = None,
    last_error: str | None = None,
    attempts: int = 1,
) -> None:
    """A stored delivery in any state, written straight to the store's tables."""
    now = time.time() if received_at is None else received_at
    document = body or {"request_id": request_id, "status": status, "payload": {"n": 1}}
    with hooks.store.engine.begin() as conn:
        row_id = conn.execute(
            sa.insert(TABLE)
            .values(
                request_id=request_id,
                status=status,
                user_id="user-test",
                received_at=now,
                state=state.value,
                attempts=attempts,
                due_at=now,
                last_error=last_error,
                updated_at=now,
                finished_at=now if state in (State.DONE, State.DEAD) else None,
            )
            .returning(TABLE.c.id)
        ).scalar_one()
        conn.execute(sa.insert(BODIES).values(id=row_id, body=json.dumps(document).encode()))


def post(client: TestClient, path: str, csrf: str | None, **data: str) -> Any:
    if csrf is not None:
        data["csrf"] = csrf
    return client.post(path, data=data)


def page_csrf(client: TestClient) -> str:
    return csrf_of(client.get("/console/").text)


# -- off, on, and where --------------------------------------------------------------------


def test_no_token_no_console(settings: Settings) -> None:
    with TestClient(WebhookReceiver(settings).app) as client:
        response = client.get("/console/")
        assert response.status_code == 404
        assert response.json()["error"] == "not_found"


def test_console_redirects_to_its_slash_and_sign_in(client: TestClient) -> None:
    response = client.get("/console")
    assert (response.status_code, response.headers["location"]) == (308, "/console/")
    response = client.get("/console/")
    assert response.status_code == 303
    assert response.headers["location"].endswith("/console/signin")
    for path in ("/console/deliveries/x", "/console/?state=dead"):
        assert client.get(path).status_code == 303


def test_the_webhook_path_is_untouched(client: TestClient, signer: Signer) -> None:
    body, headers = signer("r-webhook")
    response = client.post("/webhooks/fal", content=body, headers=headers)
    assert response.json() == {"request_id": "r-webhook", "duplicate": False}


def test_static_css_and_security_headers(client: TestClient) -> None:
    css = client.get("/console/static/console.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert client.get("/console/static/other.js").status_code == 404
    page = client.get("/console/signin")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert "frame-ancestors 'none'" in csp
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["referrer-policy"] == "same-origin"
    assert page.headers["cache-control"] == "no-store"
    assert "<script" not in page.text and "http" not in page.text.split("<main>")[0].replace(
        "http://testserver/", ""
    )


def test_unknown_console_path_is_a_404_page(signed_in: TestClient) -> None:
    response = signed_in.get("/console/nope")
    assert response.status_code == 404 and "No such page" in response.text


# -- sign-in and sessions ------------------------------------------------------------------


def test_sign_in_sets_a_strict_httponly_session_cookie(client: TestClient) -> None:
    form = client.get("/console/signin")
    assert "httponly" in form.headers["set-cookie"].lower()
    response = client.post("/console/signin", data={"csrf": csrf_of(form.text), "token": TOKEN})
    assert response.status_code == 303 and response.headers["location"].endswith("/console/")
    cookie = next(c for c in response.headers.get_list("set-cookie") if SESSION_COOKIE + "=" in c)
    lowered = cookie.lower()
    assert "httponly" in lowered and "samesite=strict" in lowered and "path=/console" in lowered
    assert "secure" not in lowered  # plain http here
    assert client.get("/console/").status_code == 200
    assert client.get("/console/signin").status_code == 303  # already signed in


def test_cookie_is_secure_behind_https(hooks: WebhookReceiver) -> None:
    with TestClient(hooks.app, base_url="https://testserver", follow_redirects=False) as client:
        response = sign_in(client)
        cookie = next(
            c for c in response.headers.get_list("set-cookie") if SESSION_COOKIE + "=" in c
        )
        assert "secure" in cookie.lower()


def test_wrong_token_is_refused(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    response = sign_in(client, "wrong")
    assert response.status_code == 401 and "Wrong token." in response.text
    assert SESSION_COOKIE not in response.headers.get("set-cookie", "")
    assert client.get("/console/").status_code == 303
    assert "wrong token" in caplog.text


def test_repeated_wrong_tokens_are_throttled(client: TestClient) -> None:
    for _ in range(5):
        assert sign_in(client, "guess").status_code == 401
    blocked = sign_in(client, TOKEN)  # even the right one, for a minute
    assert blocked.status_code == 429 and "Too many wrong tokens" in blocked.text
    assert client.get("/console/").status_code == 303


def test_throttle_forgets_after_the_window_and_stays_bounded() -> None:
    throttle = SigninThrottle(limit=2, window=60, max_clients=3)
    throttle.failed("a", now=0)
    throttle.failed("a", now=1)
    assert throttle.blocked("a", now=2) and not throttle.blocked("b", now=2)
    assert not throttle.blocked("a", now=61.5)
    for i in range(10):
        throttle.failed(f"spray-{i}", now=100)
    assert len(throttle._failures) <= 3


def test_sign_in_needs_its_csrf_token_and_cookie(client: TestClient) -> None:
    client.get("/console/signin")
    response = client.post("/console/signin", data={"csrf": "0" * 64, "token": TOKEN})
    assert response.status_code == 403
    client.cookies.clear()
    form = client.get("/console/signin")
    client.cookies.clear()  # a page from elsewhere has no sign-in cookie to pair with
    response = client.post("/console/signin", data={"csrf": csrf_of(form.text), "token": TOKEN})
    assert response.status_code == 403


def test_forged_or_expired_sessions_are_refused(hooks: WebhookReceiver) -> None:
    auth = Auth(TOKEN)
    other = Auth("another token")
    value, _ = other.new_session()
    with TestClient(hooks.app, follow_redirects=False) as client:
        client.cookies.set(SESSION_COOKIE, value)
        assert client.get("/console/").status_code == 303
        issued, nonce, _ = auth.new_session()[0].split(".")
        old = str(int(issued) - 13 * 3600)
        expired = f"{old}.{nonce}.{auth._sign('session', f'{old}.{nonce}')}"
        client.cookies.set(SESSION_COOKIE, expired)
        assert client.get("/console/").status_code == 303
        for junk in ("", "a.b", "x.y.z", "1.2.3.4"):
            client.cookies.set(SESSION_COOKIE, junk)
            assert client.get("/console/").status_code == 303


def test_token_compare_is_by_digest() -> None:
    auth = Auth(TOKEN)
    assert auth.token_ok(TOKEN)
    assert not auth.token_ok(TOKEN[:-1]) and not auth.token_ok("") and not auth.token_ok("x" * 999)


def test_sign_out_ends_the_session(signed_in: TestClient) -> None:
    csrf = page_csrf(signed_in)
    copied = signed_in.cookies.get("falhook_console")
    assert copied
    response = post(signed_in, "/console/signout", csrf)
    assert response.status_code == 303
    assert signed_in.get("/console/").status_code == 303
    # A copy of the cookie (a shared screen, a proxy log) no longer works either.
    signed_in.cookies.set("falhook_console", copied, path="/console")
    assert signed_in.get("/console/").status_code == 303
    assert post(signed_in, "/console/pause", csrf, confirm="yes").status_code == 403


# -- CSRF and origins ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/console/replay", "/console/replay-dead", "/console/pause",
                                  "/console/resume", "/console/signout"])  # fmt: skip
def test_every_post_needs_the_csrf_token(
    signed_in: TestClient, hooks: WebhookReceiver, path: str
) -> None:
    seed(hooks, "r-dead", state=State.DEAD)
    for csrf in (None, "", "f" * 64):
        response = post(signed_in, path, csrf, request_id="r-dead", confirm="yes")
        assert response.status_code == 403, (path, csrf)
    assert hooks.store.get("r-dead").state is State.DEAD  # type: ignore[union-attr]
    assert hooks.store.dispatch_control().paused is False


def test_a_page_from_another_origin_cannot_replay(
    signed_in: TestClient, hooks: WebhookReceiver
) -> None:
    seed(hooks, "r-dead", state=State.DEAD)
    csrf = page_csrf(signed_in)
    data = {"csrf": csrf, "request_id": "r-dead", "confirm": "yes"}
    for headers in ({"origin": "https://evil.example"}, {"sec-fetch-site": "cross-site"},
                    {"origin": "null"},
                    {"origin": "http://testserver.evil.example"}):  # fmt: skip
        response = signed_in.post("/console/replay", data=data, headers=headers)
        assert response.status_code == 403 and "another site" in response.text
    assert hooks.store.get("r-dead").state is State.DEAD  # type: ignore[union-attr]
    same = signed_in.post("/console/replay", data=data, headers={"origin": "http://testserver"})
    assert same.status_code == 200
    assert hooks.store.get("r-dead").state is State.PENDING  # type: ignore[union-attr]


def test_a_post_without_a_session_is_refused(client: TestClient, hooks: WebhookReceiver) -> None:
    response = post(client, "/console/pause", "0" * 64, confirm="yes")
    assert response.status_code == 403 and "sign in again" in response.text
    assert hooks.store.dispatch_control().paused is False


def test_a_non_form_post_is_refused(signed_in: TestClient) -> None:
    response = signed_in.post(
        "/console/pause", content=b"{}", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    big = signed_in.post(
        "/console/pause", data={"reason": "x" * 70_000, "csrf": page_csrf(signed_in)}
    )
    assert big.status_code == 400


# -- the list ------------------------------------------------------------------------------


def rows_of(html: str) -> list[str]:
    return re.findall(r'<td class="rid"><a href="[^"]+">([^<]+)</a>', html)


def test_list_newest_first_with_filters(signed_in: TestClient, hooks: WebhookReceiver) -> None:
    now = time.time()
    seed(hooks, "a-done", received_at=now - 300)
    seed(
        hooks,
        "b-dead",
        state=State.DEAD,
        status="ERROR",
        received_at=now - 200,
        last_error="boom <b>",
    )
    seed(hooks, "c-pending", state=State.PENDING, received_at=now - 100)
    seed(hooks, "b-dead-2", state=State.DEAD, received_at=now - 50)
    page = signed_in.get("/console/")
    assert rows_of(page.text) == ["b-dead-2", "c-pending", "b-dead", "a-done"]
    assert "boom &lt;b&gt;" in page.text
    assert "dead <b>2</b>" in page.text and "pending <b>1</b>" in page.text
    get = lambda q: rows_of(signed_in.get("/console/?" + q).text)  # noqa: E731
    assert get("state=dead") == ["b-dead-2", "b-dead"]
    assert get("state=dead&status=ERROR") == ["b-dead"]
    assert get("state=pending") == ["c-pending"]
    assert get("state=done") == ["a-done"]
    assert get("state=running") == []
    assert get("q=b-") == ["b-dead-2", "b-dead"]
    assert get("q=b-dead-") == ["b-dead-2"]
    assert get("q=%25") == []  # LIKE wildcards are literal
    assert get("since=4m") == ["b-dead-2", "c-pending", "b-dead"]
    assert get("until=2m") == ["b-dead", "a-done"]
    assert get("since=4m&until=1m") == ["c-pending", "b-dead"]
    bad = signed_in.get("/console/?state=zombie&status=meh&since=yesterday")
    assert bad.status_code == 200
    assert "unknown state" in bad.text and "unknown status" in bad.text and "since:" in bad.text


def test_keyset_pages_cover_every_row_once(signed_in: TestClient, hooks: WebhookReceiver) -> None:
    now = time.time()
    total = PAGE_SIZE * 2 + 7
    for i in range(total):
        # Pairs share a received_at: ties are broken by id, never skipped or repeated.
        seed(hooks, f"r{i:04d}", received_at=now - (i // 2))
    seen: list[str] = []
    url = "/console/?state=done"
    for _ in range(5):
        html = signed_in.get(url).text
        seen += rows_of(html)
        match = re.search(r'id="older" href="([^"]+)"', html)
        if not match:
            break
        url = match.group(1).replace("&amp;", "&").replace("http://testserver", "")
        assert "state=done" in url
    assert len(seen) == total and len(set(seen)) == total
    assert signed_in.get("/console/?before=garbage").status_code == 200
    # Out of any row id's range: the first page, not an OverflowError from the driver.
    for cursor in ("1.0_9223372036854775808", "1.0_-99999999999999999999"):
        assert signed_in.get(f"/console/?before={cursor}").status_code == 200


@pytest.mark.parametrize(
    ("filters", "index"),
    [
        (Filters(), "ix_falhook_deliveries_received_at"),
        (Filters(state=State.DONE), "ix_falhook_deliveries_received_at"),
        (Filters(state=State.DEAD), "ix_falhook_deliveries_dead_received"),
        (
            Filters(state=State.DEAD, status="ERROR", since=1.0),
            "ix_falhook_deliveries_dead_received",
        ),
        (Filters(state=State.PENDING), "ix_falhook_deliveries_active_due"),
    ],
)
def test_pages_are_served_by_an_index(
    hooks: WebhookReceiver, client: TestClient, filters: Filters, index: str
) -> None:
    """What keeps a page fast at a million rows: an index walk, never a scan and sort of
    every row (SQLite's plan; PostgreSQL chooses by its statistics)."""
    stmt = page_statement(filters, Cursor(time.time(), 10**9))
    with hooks.store.engine.connect() as conn:
        sql, params = sql_for(conn, stmt, filters.state)
        plan = " | ".join(r[3] for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params))
    assert index in plan, plan
    if filters.state is not State.PENDING:  # the backlog alone is sorted
        assert "TEMP B-TREE" not in plan, plan


# -- one delivery --------------------------------------------------------------------------


def test_delivery_page_escapes_the_body_and_links_only_http_urls(
    signed_in: TestClient, hooks: WebhookReceiver
) -> None:
    body = {
        "request_id": "r-x",
        "status": "OK",
        "payload": {
            "images": [{"url": "https://v3.fal.media/files/a.png", "content_type": "image/png"}],
            "video": {"url": "https://v3.fal.media/files/b.mp4", "content_type": "video/mp4"},
            "evil": "<script>alert(1)</script>",
            "js": "javascript:alert(1)",
            "quote": 'https://x.example/"><img src=x onerror=alert(1)>',
            "seed": 17454220438242315174,
        },
    }
    seed(hooks, "r-x", state=State.DEAD, body=body, last_error="Traceback <i>boom</i>")
    page = signed_in.get("/console/deliveries/r-x")
    assert page.status_code == 200
    html = page.text
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<i>boom</i>" not in html and "&lt;i&gt;boom&lt;/i&gt;" in html
    assert 'href="javascript' not in html and "onerror=alert" not in html.replace(
        "onerror=alert(1)&gt;", ""
    )
    assert '<img src="https://v3.fal.media/files/a.png"' in html
    assert '<img src="https://v3.fal.media/files/b.mp4"' not in html  # a video: a link only
    assert '<a href="https://v3.fal.media/files/b.mp4"' in html
    assert "17454220438242315174" in html  # big integers exact
    assert "user-test" in html and 'id="replay"' in html


def test_delivery_page_unknown_and_odd_ids(signed_in: TestClient, hooks: WebhookReceiver) -> None:
    assert signed_in.get("/console/deliveries/nope").status_code == 404
    seed(hooks, "odd/id <x>", state=State.DONE)
    page = signed_in.get("/console/deliveries/odd/id%20%3Cx%3E")
    assert page.status_code == 200 and "odd/id &lt;x&gt;" in page.text


# ("%" in an id is left out: Starlette's TestClient decodes a path twice, uvicorn once.)
@pytest.mark.parametrize("request_id", ["a?b=1#frag", "../../etc/passwd", "x y/z", "x/y#"])
def test_every_listed_delivery_opens_from_its_link(
    signed_in: TestClient, hooks: WebhookReceiver, request_id: str
) -> None:
    # Links quote the id as one path segment: unquoted, "?" and "#" cut it short, "%" was
    # decoded into another id, and "../" took the browser out of the console.
    seed(hooks, request_id, state=State.DEAD)
    listing = signed_in.get("/console/").text
    hrefs = re.findall(r'<td class="rid"><a href="([^"]+)">', listing)
    assert len(hrefs) == 1 and "/../" not in hrefs[0] and "?" not in hrefs[0], hrefs
    page = signed_in.get(html.unescape(hrefs[0]))
    assert page.status_code == 200 and html.escape(request_id) in page.text


def test_non_json_body_is_shown_as_text(signed_in: TestClient, hooks: WebhookReceiver) -> None:
    seed(hooks, "r-raw", state=State.DONE)
    with hooks.store.engine.begin() as conn:
        conn.execute(sa.update(BODIES).values(body=b"<b>not json</b> \xff"))
    page = signed_in.get("/console/deliveries/r-raw")
    assert "&lt;b&gt;not json&lt;/b&gt;" in page.text


# -- actions ---------------------------------------------------------------------------------


def test_replay_one_confirms_then_replays(signed_in: TestClient, hooks: WebhookReceiver) -> None:
    seed(hooks, "r-dead", state=State.DEAD, last_error="boom")
    csrf = page_csrf(signed_in)
    confirm = post(signed_in, "/console/replay", csrf, request_id="r-dead")
    assert confirm.status_code == 200 and "Replay this delivery?" in confirm.text
    assert hooks.store.get("r-dead").state is State.DEAD  # type: ignore[union-attr]
    done = post(
        signed_in, "/console/replay", csrf_of(confirm.text), request_id="r-dead", confirm="yes"
    )
    assert "Replayed r-dead (was dead)." in done.text
    assert hooks.store.get("r-dead").state is State.PENDING  # type: ignore[union-attr]
    again = post(signed_in, "/console/replay", csrf, request_id="r-dead", confirm="yes")
    assert "Nothing replayed" in again.text


def test_replay_all_dead_matching_the_filter(signed_in: TestClient, hooks: WebhookReceiver) -> None:
    now = time.time()
    seed(hooks, "old-dead", state=State.DEAD, received_at=now - 7200)
    seed(hooks, "new-dead-1", state=State.DEAD, received_at=now - 60)
    seed(hooks, "new-dead-2", state=State.DEAD, status="ERROR", received_at=now - 30)
    seed(hooks, "new-done", state=State.DONE, received_at=now - 30)
    listing = signed_in.get("/console/?state=dead&since=1h")
    assert 'id="replay-dead"' in listing.text
    csrf = csrf_of(listing.text)
    confirm = post(signed_in, "/console/replay-dead", csrf, state="dead", since="1h")
    assert "Replay 2 dead deliveries?" in confirm.text
    assert "new-dead-1" in confirm.text and "old-dead" not in confirm.text
    done = post(signed_in, "/console/replay-dead", csrf, since="1h", confirm="yes")
    assert "Replayed 2 dead deliveries." in done.text
    got = {r: hooks.store.get(r) for r in ("old-dead", "new-dead-1", "new-dead-2", "new-done")}
    states = {r: d.state for r, d in got.items() if d is not None}
    assert states == {
        "old-dead": State.DEAD,
        "new-dead-1": State.PENDING,
        "new-dead-2": State.PENDING,
        "new-done": State.DONE,
    }
    bad = post(signed_in, "/console/replay-dead", csrf, since="whenever", confirm="yes")
    assert bad.status_code == 400


def test_pause_and_resume_from_the_page(signed_in: TestClient, hooks: WebhookReceiver) -> None:
    csrf = page_csrf(signed_in)
    confirm = post(signed_in, "/console/pause", csrf, reason="db <maintenance>")
    assert "Pause dispatch?" in confirm.text and "db &lt;maintenance&gt;" in confirm.text
    assert hooks.store.dispatch_control().paused is False
    done = post(signed_in, "/console/pause", csrf, reason="db <maintenance>", confirm="yes")
    assert "Dispatch is paused" in done.text
    control = hooks.store.dispatch_control()
    assert (control.paused, control.reason, control.changed_by) == (
        True,
        "db <maintenance>",
        "console",
    )
    page = signed_in.get("/console/").text
    assert "dispatch <b>paused</b>" in page and 'id="resume"' in page
    assert hooks.dispatch_paused is True
    confirm = post(signed_in, "/console/resume", csrf)
    assert "Resume dispatch?" in confirm.text and hooks.store.dispatch_control().paused
    done = post(signed_in, "/console/resume", csrf, confirm="yes")
    assert "Dispatch resumed" in done.text
    assert hooks.store.dispatch_control().paused is False
    assert "dispatch <b>running</b>" in signed_in.get("/console/").text


def test_store_unavailable_is_a_503_page(hooks: WebhookReceiver) -> None:
    # Not started (no lifespan): the store cannot be had, and the page says so.
    client = TestClient(hooks.app, follow_redirects=False)
    value, _ = Auth(TOKEN).new_session()
    client.cookies.set(SESSION_COOKIE, value)
    response = client.get("/console/")
    assert response.status_code == 503 and "Store unavailable" in response.text


def test_mounted_under_a_host_app(settings: Settings) -> None:
    hooks = WebhookReceiver(settings.replace(console_token=TOKEN))
    host = FastAPI(lifespan=hooks.lifespan)
    host.mount("/fal", hooks.app)
    with TestClient(host, follow_redirects=False) as client:
        first = client.get("/fal/console/")
        assert first.headers["location"].endswith("/fal/console/signin")
        form = client.get("/fal/console/signin")
        assert "path=/fal/console" in form.headers["set-cookie"].lower()
        assert 'action="http://testserver/fal/console/signin"' in form.text
        response = client.post(
            "/fal/console/signin", data={"csrf": csrf_of(form.text), "token": TOKEN}
        )
        assert response.status_code == 303
        assert client.get("/fal/console/").status_code == 200


def test_queries_on_both_dialects(store_url: str) -> None:
    """The page and dead-replay queries as the console runs them, SQLite and PostgreSQL."""
    store = Store(store_url)
    try:
        store.migrate()
        now = time.time()
        with store.engine.begin() as conn:
            for i in range(7):
                state = State.DEAD if i % 2 else State.DONE
                conn.execute(
                    sa.insert(TABLE).values(
                        request_id=f"q{i}", status="OK", received_at=now - i, state=state.value,
                        attempts=1, due_at=now, updated_at=now,
                    )
                )  # fmt: skip
        with store.engine.connect() as conn:
            rows, cursor = queries.page(conn, Filters(), None, size=3)
            assert [r.request_id for r in rows] == ["q0", "q1", "q2"] and cursor is not None
            rows, cursor = queries.page(conn, Filters(), cursor, size=3)
            assert [r.request_id for r in rows] == ["q3", "q4", "q5"]
            dead = Filters(state=State.DEAD)
            assert [r.request_id for r in queries.page(conn, dead, None)[0]] == ["q1", "q3", "q5"]
            done = Filters(state=State.DONE, prefix="q")
            assert [r.request_id for r in queries.page(conn, done, None)[0]] == [
                "q0",
                "q2",
                "q4",
                "q6",
            ]
            assert queries.dead_matching(conn, Filters(since=now - 3.5), 10) == (["q1", "q3"], 2)
    finally:
        store.engine.dispose()


def test_the_prefix_filter_is_exact_on_both_dialects(store_url: str) -> None:
    """Case-sensitive, and % and _ are themselves: one rule on SQLite and PostgreSQL."""
    store = Store(store_url)
    ids = ["Ab-1", "ab-2", "a%c", "a_c", "abc", "xa"]
    try:
        store.migrate()
        now = time.time()
        with store.engine.begin() as conn:
            for i, rid in enumerate(ids):
                conn.execute(
                    sa.insert(TABLE).values(
                        request_id=rid, status="OK", received_at=now - i, state="done",
                        attempts=1, due_at=now, updated_at=now,
                    )
                )  # fmt: skip
        with store.engine.connect() as conn:

            def found(prefix: str) -> list[str]:
                return [r.request_id for r in queries.page(conn, Filters(prefix=prefix), None)[0]]

            assert found("a") == ["ab-2", "a%c", "a_c", "abc"]
            assert found("A") == ["Ab-1"]
            assert found("AB") == []
            assert found("a%") == ["a%c"]
            assert found("a_") == ["a_c"]
            assert found("%") == found("_") == []
            assert queries.dead_matching(conn, Filters(prefix="A"), 10) == ([], 0)
    finally:
        store.engine.dispose()


@pytest.mark.parametrize("raw", ["\x00", "ab\x00", "a\nb", "\x7f"])
def test_a_prefix_with_control_characters_is_a_message(raw: str) -> None:
    # A NUL cannot reach PostgreSQL at all (it was a 503 page): the filter is refused.
    filters, problems = queries.parse_filters({"q": raw})
    assert filters.prefix is None
    assert problems == ["request id prefix: control characters are not part of a request id"]


def test_a_nul_in_the_prefix_is_a_message_not_an_error_page(
    signed_in: TestClient, hooks: WebhookReceiver
) -> None:
    seed(hooks, "r-1", state=State.DONE)
    page = signed_in.get("/console/?q=%00")
    assert page.status_code == 200
    assert "control characters are not part of a request id" in page.text
    assert rows_of(page.text) == ["r-1"]


def test_delivery_page_shows_its_expectation(signed_in: TestClient, hooks: WebhookReceiver) -> None:
    from falhook.receiver.store.expectations import Expectations, NewExpectation

    seed(hooks, "r-expected", state=State.DONE)
    seed(hooks, "r-plain", state=State.DONE)
    Expectations(hooks.store).add(
        NewExpectation("r-expected", "fal-ai/flux/dev"), recover_after=60, ttl=3600
    )
    page = signed_in.get("/console/deliveries/r-expected")
    assert page.status_code == 200
    assert "Expectation" in page.text and "fal-ai/flux/dev" in page.text
    assert 'id="expectation-state">waiting' in page.text
    assert "webhook" in page.text
    plain = signed_in.get("/console/deliveries/r-plain")
    assert "<h2>Expectation</h2>" not in plain.text


def test_delivery_page_lists_every_attempt_with_its_error(
    settings: Settings, signer: Signer
) -> None:
    hooks = WebhookReceiver(
        settings.replace(
            console_token=TOKEN, callback_max_attempts=2, callback_backoff_seconds=0.01
        )
    )

    @hooks.on_delivery
    def downstream_down(delivery: Any) -> None:
        raise RuntimeError(f"downstream <down> on attempt {delivery.attempt}")

    with TestClient(hooks.app, follow_redirects=False) as client:
        body, headers = signer("r-attempts")
        assert client.post("/webhooks/fal", content=body, headers=headers).status_code == 200
        deadline = time.monotonic() + 20
        while hooks.store.get("r-attempts").state is not State.DEAD:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "never dead"
            time.sleep(0.02)
        assert sign_in(client).status_code == 303
        page = client.get("/console/deliveries/r-attempts").text
    section = page[page.index('class="attempts"') :]
    rows = re.findall(r"<tr><td class=\"num\">(\d+)</td>.*?<td>(\w+)</td>", section)
    assert rows == [("1", "retry"), ("2", "dead")]
    assert "downstream &lt;down&gt; on attempt 1" in section  # escaped, with its traceback
    assert "downstream &lt;down&gt; on attempt 2" in section
    assert "Traceback" in section


def test_a_repeated_traceback_is_shown_once(settings: Settings, signer: Signer) -> None:
    hooks = WebhookReceiver(
        settings.replace(
            console_token=TOKEN, callback_max_attempts=3, callback_backoff_seconds=0.01
        )
    )

    @hooks.on_delivery
    def always_down(delivery: Any) -> None:
        raise RuntimeError("downstream is down")

    with TestClient(hooks.app, follow_redirects=False) as client:
        body, headers = signer("r-same")
        assert client.post("/webhooks/fal", content=body, headers=headers).status_code == 200
        deadline = time.monotonic() + 20
        while hooks.store.get("r-same").state is not State.DEAD:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "never dead"
            time.sleep(0.02)
        assert sign_in(client).status_code == 303
        page = client.get("/console/deliveries/r-same").text
    section = page[page.index('class="attempts"') :]
    assert section.count("RuntimeError: downstream is down") == 1
    assert section.count("same as attempt 1") == 2
    assert "frames of falhook&#39;s own folded" in section or "falhook's own folded" in section


def test_the_home_page_charts_the_last_day(
    hooks: WebhookReceiver, signed_in: TestClient, signer: Signer
) -> None:
    from falhook.receiver.console.charts import Sampler

    assert hooks.history is not None and not hooks.history.samples
    page = signed_in.get("/console/").text
    assert page.count('<svg class="chart"') == 4 and "no data yet" in page
    sampler = Sampler(hooks.metrics, lambda: {"pending": 2.0}, hooks.history)
    body, headers = signer("r-chart")
    assert signed_in.post("/webhooks/fal", content=body, headers=headers).status_code == 200
    sampler.sample()
    page = signed_in.get("/console/").text
    assert "received 1" in page and "pending 2" in page
    assert '<meta http-equiv="refresh"' not in page
    assert '<meta http-equiv="refresh" content="30">' in signed_in.get("/console/?refresh=30").text
    assert '<meta http-equiv="refresh"' not in signed_in.get("/console/?refresh=1").text
    filtered = signed_in.get("/console/?state=dead").text
    assert '<svg class="chart"' not in filtered  # charts on the home page only


def test_a_scheduled_retry_is_shown_retrying_not_stuck(settings: Settings, signer: Signer) -> None:
    from falhook.receiver import Retry

    hooks = WebhookReceiver(settings.replace(console_token=TOKEN))

    @hooks.on_delivery
    async def later(delivery: Any) -> None:
        raise Retry(after=900, message="rate limited upstream")

    with TestClient(hooks.app, follow_redirects=False) as client:
        body, headers = signer("r-later")
        assert client.post("/webhooks/fal", content=body, headers=headers).status_code == 200
        deadline = time.monotonic() + 20
        while hooks.store.get("r-later").attempts < 1:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "never attempted"
            time.sleep(0.02)
        while hooks.store.get("r-later").state is not State.PENDING:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "never rescheduled"
            time.sleep(0.02)
        assert sign_in(client).status_code == 303
        home = client.get("/console/").text
        retrying = client.get("/console/?state=retrying").text
        pending = client.get("/console/?state=pending").text
        page = client.get("/console/deliveries/r-later").text
    counters = home[home.index('aria-label="counters"') :]
    assert re.search(r"pending <b>0</b>", counters) and re.search(r"retrying <b>1</b>", counters)
    assert "oldest pending <b>0s</b>" in counters  # a scheduled retry is not stuck
    assert '<span class="state state-retrying">retrying</span>' in retrying
    assert "r-later" in retrying and "r-later" in pending  # retrying is a kind of pending
    assert 'id="state">retrying</span>' in page
    assert re.search(r'id="next-attempt">[^<]+ · last error: [^<]*rate limited upstream', page)
