"""The console's pages and actions (server-rendered; no script, no CDN, no build step).

Every page but sign-in needs a session; every POST needs the session's CSRF token and a
same-site origin; every action asks for confirmation first, then shows its outcome.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, urlencode

import sqlalchemy as sa
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from falhook.receiver.console import queries, render
from falhook.receiver.console.auth import Auth, Session, SigninThrottle
from falhook.receiver.console.charts import History, charts, svg_chart
from falhook.receiver.errors import ReceiverError
from falhook.receiver.models import State
from falhook.receiver.protocol import PEER
from falhook.receiver.state import RETRYING, SHOWN_STATES
from falhook.receiver.store import Store
from falhook.receiver.store.attempts import StoredAttempt
from falhook.receiver.store.control import DispatchControl
from falhook.receiver.store.expectations import Expectation, Expectations
from falhook.receiver.store.records import StoredDelivery
from falhook.receiver.tracebacks import repeats

if TYPE_CHECKING:
    from falhook.receiver.archive import Archiver, MediaItem


class Operated(Protocol):
    """What the console needs of the receiver (it never imports the app: no cycle)."""

    archiver: Archiver | None  # the media archive (FALHOOK_ARCHIVE_URL), when on

    @property
    def store(self) -> Store: ...

    @property
    def dispatch_paused(self) -> bool | None: ...

    @property
    def history(self) -> History | None: ...

    async def pause(self, reason: str | None = None, *, by: str = "api") -> DispatchControl: ...

    async def resume(self, *, by: str = "api") -> DispatchControl: ...


__all__ = ["build_console"]

log = logging.getLogger("falhook.console")
_CONFIRM_LIST = 20  # request ids listed on a bulk replay's confirmation
_MAX_REASON = 500
_MAX_FORM_BYTES = 64 * 1024
_FORM_TYPE = "application/x-www-form-urlencoded"
_SECURITY_HEADERS = {
    # No script at all; styles only from us; images only from fal's media hosts (the
    # thumbnail rule's hosts: render.thumbnail).
    "content-security-policy": (
        f"default-src 'none'; style-src 'self'; img-src {render.IMG_SRC}; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    # same-origin, not no-referrer: under no-referrer a browser sends "Origin: null" with
    # the console's own forms, and the origin check would refuse them. Other sites (a
    # payload's image host) still get no Referer.
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}

# A raw body: attacker-influenced bytes, shown as text in a sandbox.
_RAW_HEADERS = {
    **_SECURITY_HEADERS,
    "content-security-policy": "default-src 'none'; sandbox; frame-ancestors 'none'",
}

Handler = Callable[[Request], Awaitable[Response]]


def _refresh(value: str) -> int | None:
    """``?refresh=30``: the home page reloads itself every so many seconds (10 to 3600);
    anything else, no reload."""
    try:
        seconds = int(value)
    except ValueError:
        return None
    return seconds if 10 <= seconds <= 3600 else None


@dataclass(frozen=True, slots=True)
class Counters:
    counts: list[tuple[str, int]]
    oldest_pending: str
    control: DispatchControl


class Console:
    """The pages, bound to one receiver and one token."""

    def __init__(self, receiver: Operated, token: str) -> None:
        self.receiver = receiver
        self.auth = Auth(token)
        self.throttle = SigninThrottle()
        self._expected: Expectations | None = None
        env = Environment(
            loader=PackageLoader("falhook.receiver.console", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        env.filters["utc"] = render.utc
        env.filters["oneline"] = render.one_line
        env.filters["segment"] = render.path_segment
        env.filters["size"] = render.size
        self.templates = Jinja2Templates(env=env)
        self.css = (
            resources.files("falhook.receiver.console").joinpath("static/console.css").read_bytes()
        )

    # -- plumbing --------------------------------------------------------------------------

    def page(
        self, request: Request, name: str, context: dict[str, Any], status: int = 200
    ) -> Response:
        response = self.templates.TemplateResponse(request, name, context, status_code=status)
        response.headers.update(_SECURITY_HEADERS)
        return response

    async def _counters(self) -> Counters:
        store = self.receiver.store

        def read() -> Counters:
            counts = store.counts()
            retrying = store.retrying()
            # Pending counts only what is due; what waits for a later attempt is retrying.
            shown = [
                (state.value, counts[state] - (retrying if state is State.PENDING else 0))
                for state in State
            ]
            shown.insert(1, (RETRYING, retrying))
            return Counters(shown, render.age(store.oldest_pending_age()), store.dispatch_control())

        return await asyncio.to_thread(read)

    async def _signed_in_page(
        self, request: Request, session: Session, name: str, context: dict[str, Any], status: int
    ) -> Response:
        counters = await self._counters()
        return self.page(
            request, name, {"csrf": session.csrf, "counters": counters, **context}, status
        )

    def error(self, request: Request, status: int, title: str, message: str) -> Response:
        return self.page(request, "error.html", {"title": title, "message": message}, status)

    def guarded(self, handler: Callable[[Request, Session], Awaitable[Response]]) -> Handler:
        """Session required (else to sign-in); for POST also same origin and CSRF token.
        A store that cannot be reached is a 503 page, never a traceback."""

        async def endpoint(request: Request) -> Response:
            session = self.auth.session(request)
            if request.method == "POST":
                if not self.auth.same_origin(request):
                    return self.error(
                        request, 403, "Refused", "This request came from another site."
                    )
                form = await _read_form(request)
                if form is None:
                    return self.error(request, 400, "Bad form", "Not a form this page sent.")
                if session is None:
                    return self.error(
                        request, 403, "Signed out", "Your session has ended: sign in again."
                    )
                if not self.auth.csrf_matches(_field(form, "csrf"), session.csrf):
                    return self.error(
                        request, 403, "Refused", "The form was stale or forged: reload and retry."
                    )
                request.state.form = form
            elif session is None:
                return RedirectResponse(request.url_for("signin"), status_code=303)
            try:
                return await handler(request, session)
            except ReceiverError as exc:  # store unavailable, or the receiver not started
                log.warning("console: %s", exc)
                return self.error(request, 503, "Store unavailable", str(exc))

        return endpoint

    # -- sign-in ---------------------------------------------------------------------------

    async def signin_form(self, request: Request) -> Response:
        if self.auth.session(request) is not None:
            return RedirectResponse(request.url_for("list"), status_code=303)
        return self._signin(request, None, 200)

    def _signin(self, request: Request, error: str | None, status: int) -> Response:
        nonce, new = self.auth.signin_nonce(request)
        csrf = self.auth.csrf_for(nonce, "signin")
        response = self.page(request, "signin.html", {"csrf": csrf, "error": error}, status)
        if new:
            self.auth.set_signin_nonce(response, request, nonce)
        return response

    async def signin(self, request: Request) -> Response:
        if not self.auth.same_origin(request):
            return self.error(request, 403, "Refused", "This request came from another site.")
        form = await _read_form(request)
        if form is None:
            return self.error(request, 400, "Bad form", "Not a form this page sent.")
        nonce, new = self.auth.signin_nonce(request)
        expected = self.auth.csrf_for(nonce, "signin")
        if new or not self.auth.csrf_matches(_field(form, "csrf"), expected):
            return self._signin(request, "The form was stale: try again.", 403)
        # Counted by the address a proxy claims and by the connection's own: behind a
        # trusted proxy (or from one) a new X-Forwarded-For each time does not reset it.
        client, peer = _client(request), _peer(request)
        addresses = (client,) if peer == client else (client, peer)
        if any(self.throttle.blocked(address) for address in addresses):
            return self._signin(request, "Too many wrong tokens: wait a minute.", 429)
        if not self.auth.token_ok(_field(form, "token")):
            for address in addresses:
                self.throttle.failed(address)
            via = f" (via {peer})" if peer != client else ""
            log.warning("console: a sign-in with a wrong token from %s%s", client, via)
            return self._signin(request, "Wrong token.", 401)
        response = RedirectResponse(request.url_for("list"), status_code=303)
        self.auth.start_session(response, request)
        return response

    async def signout(self, request: Request, session: Session) -> Response:
        response = RedirectResponse(request.url_for("signin"), status_code=303)
        self.auth.end_session(response, request)
        return response

    # -- pages -----------------------------------------------------------------------------

    async def deliveries(self, request: Request, session: Session) -> Response:
        params = request.query_params
        filters, problems = queries.parse_filters(params)
        raw = {
            name: params.get(name, "").strip()
            for name in ("state", "status", "since", "until", "q")
        }
        cursor = queries.Cursor.decode(params.get("before", "")) if params.get("before") else None
        store = self.receiver.store

        def read() -> tuple[list[queries.Row], queries.Cursor | None]:
            with store.engine.connect() as conn:
                return queries.page(conn, filters, cursor)

        try:
            rows, next_cursor = await asyncio.to_thread(read)
        except sa.exc.SQLAlchemyError as exc:
            raise _unavailable(exc) from exc
        query = urlencode({k: v for k, v in raw.items() if v})
        next_query = (
            urlencode({**{k: v for k, v in raw.items() if v}, "before": next_cursor.encode()})
            if next_cursor
            else ""
        )
        history = self.receiver.history
        context = {
            # The home page's charts: only on the unfiltered first page, where one looks
            # at the whole; the list below them is what the filters are for.
            "charts": (
                [Markup(svg_chart(chart)) for chart in charts(history)]
                if history is not None and not query and cursor is None
                else []
            ),
            "refresh": _refresh(params.get("refresh", "")),
            "rows": rows,
            "filters": {"state": raw["state"], "status": raw["status"].upper()},
            "raw": raw,
            "problems": problems,
            "states": SHOWN_STATES,
            "now": time.time(),
            "statuses": queries.STATUSES,
            "cursor": cursor,
            "next_cursor": next_cursor,
            "query": query,
            "next_query": next_query,
        }
        return await self._signed_in_page(request, session, "list.html", context, 200)

    async def delivery(self, request: Request, session: Session) -> Response:
        request_id = request.path_params["request_id"]
        store = self.receiver.store

        archiver = self.receiver.archiver

        def read() -> tuple[StoredDelivery | None, Expectation | None, list[StoredAttempt]]:
            found = store.get(request_id)
            if found is None:
                return None, None, []
            expected = self._expectations(store).get(request_id)
            return found, expected, store.attempts(request_id)

        delivery, expectation, attempts = await asyncio.to_thread(read)
        files: list[MediaItem] = []
        if archiver is not None and delivery is not None:
            files = await asyncio.to_thread(archiver.rows.get, request_id)
        if delivery is None:
            counters = await self._counters()
            return self.page(
                request,
                "error.html",
                {
                    "title": "Not found",
                    "message": f"No delivery {request_id!r} is stored.",
                    "csrf": session.csrf,
                    "counters": counters,
                },
                404,
            )
        # Off the loop (a big body's page is CPU work), and bounded (render.MAX_SHOWN_BYTES).
        view = await asyncio.to_thread(render.body_view, delivery.body)
        context = {
            "d": delivery,
            "view": view,
            "now": time.time(),
            "attempts": attempts,
            # A traceback identical to the one before is shown once: "same as attempt 2".
            "repeats": [
                None if i is None else attempts[i].attempt
                for i in repeats([a.error for a in attempts])
            ],
            "expectation": expectation,
            "files": files,
        }
        return await self._signed_in_page(request, session, "delivery.html", context, 200)

    async def archived(self, request: Request, session: Session) -> Response:
        """One archived file, streamed from the archive (so it shows after fal's copy is
        gone). Served inline only as an image, video or audio type, never as a page."""
        archiver = self.receiver.archiver
        request_id = request.path_params["request_id"]
        pointer = request.query_params.get("pointer", "")
        if archiver is None:
            return self.error(request, 404, "Not found", "The media archive is off.")
        files = await asyncio.to_thread(archiver.rows.get, request_id)
        item = next((f for f in files if f.pointer == pointer), None)
        key = archiver.target.key_of(item.stored_url) if item and item.stored_url else None
        if item is None or key is None:
            return self.error(request, 404, "Not found", "No such archived file.")
        try:
            stream, size = await archiver.target.read(key)
        except ReceiverError as exc:
            return self.error(request, 503, "Unavailable", str(exc))
        kind = item.content_type or ""
        inline = kind.split("/")[0] in ("image", "video", "audio") and "svg" not in kind
        headers = {
            "Content-Length": str(size),
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
            "Cache-Control": "private, max-age=3600",
        }
        if not inline:
            headers["Content-Disposition"] = "attachment"
        return StreamingResponse(
            stream,
            media_type=kind if inline else "application/octet-stream",
            headers=headers,
        )

    async def raw(self, request: Request, session: Session) -> Response:
        """A delivery's body exactly as stored, as plain text the browser runs nothing of."""
        request_id = request.path_params["request_id"]
        delivery = await asyncio.to_thread(self.receiver.store.get, request_id)
        if delivery is None:
            return self.error(request, 404, "Not found", f"No delivery {request_id!r} is stored.")
        return Response(delivery.body, media_type="text/plain; charset=utf-8", headers=_RAW_HEADERS)

    def _expectations(self, store: Store) -> Expectations:
        # One per store: it migrates (a no-op on a current store) on its first use only.
        if self._expected is None or self._expected.store is not store:
            self._expected = Expectations(store)
        return self._expected

    # -- actions ---------------------------------------------------------------------------

    def _confirm(self, request: Request, session: Session, **context: Any) -> Awaitable[Response]:
        return self._signed_in_page(request, session, "confirm.html", context, 200)

    def _outcome(
        self,
        request: Request,
        session: Session,
        title: str,
        lines: list[str],
        links: list[tuple[str, str]],
    ) -> Awaitable[Response]:
        context = {"title": title, "lines": lines, "links": links}
        return self._signed_in_page(request, session, "outcome.html", context, 200)

    async def replay_one(self, request: Request, session: Session) -> Response:
        form: Form = request.state.form
        request_id = _field(form, "request_id")
        page = str(request.url_for("delivery", request_id=render.path_segment(request_id)))
        if _field(form, "confirm") != "yes":
            return await self._confirm(
                request,
                session,
                title="Replay this delivery?",
                question=f"Its callbacks will run again from attempt 1: {request_id}",
                items=[],
                more=0,
                action=str(request.url_for("replay")),
                fields={"request_id": request_id},
                button="Replay",
                back=page,
            )
        previous = await asyncio.to_thread(self.receiver.store.replay, [request_id])
        log.warning("console: replayed %s", request_id, extra={"request_id": request_id})
        if request_id in previous:
            lines = [
                f"Replayed {request_id} (was {previous[request_id].value}).",
                "It is dispatched at once (or as soon as dispatch is resumed, if paused).",
            ]
        else:
            lines = [f"Nothing replayed: {request_id} is not done or dead (or not stored)."]
        links = [("Open the delivery", page), ("All deliveries", str(request.url_for("list")))]
        return await self._outcome(request, session, "Replay", lines, links)

    async def replay_dead(self, request: Request, session: Session) -> Response:
        form: Form = request.state.form
        params = {name: _field(form, name) for name in ("status", "since", "until", "q")}
        filters, problems = queries.parse_filters(params)
        back = (
            str(request.url_for("list"))
            + "?"
            + urlencode({"state": "dead", **{k: v for k, v in params.items() if v}})
        )
        if problems:
            return self.error(request, 400, "Bad filter", "; ".join(problems))
        store = self.receiver.store
        if _field(form, "confirm") != "yes":

            def preview() -> tuple[list[str], int]:
                with store.engine.connect() as conn:
                    return queries.dead_matching(conn, filters, _CONFIRM_LIST)

            try:
                ids, count = await asyncio.to_thread(preview)
            except sa.exc.SQLAlchemyError as exc:
                raise _unavailable(exc) from exc
            return await self._confirm(
                request,
                session,
                title=f"Replay {count} dead deliver{'y' if count == 1 else 'ies'}?",
                question="Their callbacks will run again from attempt 1.",
                items=ids,
                more=max(0, count - len(ids)),
                action=str(request.url_for("replay_dead")),
                fields={k: v for k, v in params.items() if v},
                button=f"Replay {count}",
                back=back,
            )

        def replay_all() -> list[str]:
            # Ids first (the same filter as the preview), then one idempotent replay.
            with store.engine.connect() as conn:
                ids, _ = queries.dead_matching(conn, filters, 1_000_000)
            replayed: list[str] = []
            for start in range(0, len(ids), 500):  # bounded IN lists
                replayed += list(store.replay(ids[start : start + 500]))
            return replayed

        try:
            replayed = await asyncio.to_thread(replay_all)
        except sa.exc.SQLAlchemyError as exc:
            raise _unavailable(exc) from exc
        log.warning("console: replayed %d dead deliveries", len(replayed))
        lines = [f"Replayed {len(replayed)} dead deliver{'y' if len(replayed) == 1 else 'ies'}."]
        return await self._outcome(request, session, "Replay", lines, [("Back to the list", back)])

    async def pause(self, request: Request, session: Session) -> Response:
        form: Form = request.state.form
        reason = " ".join(_field(form, "reason").split())[:_MAX_REASON]
        if _field(form, "confirm") != "yes":
            return await self._confirm(
                request,
                session,
                title="Pause dispatch?",
                question=(
                    "Every replica stops starting callbacks within a second or two. Deliveries "
                    "are still received, stored and acknowledged; running callbacks finish."
                ),
                items=[f"reason: {reason}"] if reason else [],
                more=0,
                action=str(request.url_for("pause")),
                fields={"reason": reason} if reason else {},
                button="Pause dispatch",
                back=str(request.url_for("list")),
            )
        await self.receiver.pause(reason or None, by="console")
        lines = ["Dispatch is paused on every replica. Resume it from the top of any page."]
        return await self._outcome(
            request, session, "Paused", lines, [("Deliveries", str(request.url_for("list")))]
        )

    async def resume(self, request: Request, session: Session) -> Response:
        form: Form = request.state.form
        if _field(form, "confirm") != "yes":
            return await self._confirm(
                request,
                session,
                title="Resume dispatch?",
                question="Every replica starts callbacks again; the backlog drains.",
                items=[],
                more=0,
                action=str(request.url_for("resume")),
                fields={},
                button="Resume dispatch",
                back=str(request.url_for("list")),
            )
        await self.receiver.resume(by="console")
        lines = ["Dispatch resumed on every replica; the backlog is draining."]
        return await self._outcome(
            request, session, "Resumed", lines, [("Deliveries", str(request.url_for("list")))]
        )

    async def static(self, request: Request) -> Response:
        if request.path_params["path"] != "console.css":
            return self.error(request, 404, "Not found", "No such file.")
        return Response(
            self.css,
            media_type="text/css",
            headers={"cache-control": "max-age=3600", "x-content-type-options": "nosniff"},
        )

    async def not_found(self, request: Request, exc: Exception) -> Response:
        return self.error(request, 404, "Not found", "No such page.")


Form = dict[str, str]


async def _read_form(request: Request) -> Form | None:
    """An urlencoded form (all the console's forms are), or None if too big or not one.

    Parsed here rather than by Starlette, which needs python-multipart for any form.
    """
    if request.headers.get("content-type", "").split(";")[0].strip() != _FORM_TYPE:
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM_BYTES:
            return None
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=50)
    except (UnicodeDecodeError, ValueError):
        return None
    return dict(pairs)


def _field(form: Form, name: str) -> str:
    return form.get(name, "")


def _client(request: Request) -> str:
    """The client's address (a trusted proxy's X-Forwarded-For already applied)."""
    return request.client.host if request.client else "?"


def _peer(request: Request) -> str:
    """The address of the connection itself (`falhook serve` notes it; mounted in another
    server, the client's address is all there is)."""
    return str(request.scope.get(PEER) or _client(request))


def _unavailable(exc: Exception) -> ReceiverError:
    from falhook.receiver.errors import StoreUnavailableError
    from falhook.receiver.store.engine import brief

    return StoreUnavailableError(brief(exc))


class _OwnRouter:
    """Makes ``request.url_for`` resolve the console's own route names, below its mount."""

    def __init__(self, app: Starlette) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # url_for builds on app_root_path: make it the console's mount point too.
        root = scope.get("root_path", "")
        await self.app({**scope, "router": self.app.router, "app_root_path": root}, receive, send)


def build_console(receiver: Operated, token: str) -> ASGIApp:
    """The console as an ASGI app, to mount at ``/console``."""
    console = Console(receiver, token)
    g = console.guarded
    routes = [
        Route("/", g(console.deliveries), methods=["GET"], name="list"),
        Route("/signin", console.signin_form, methods=["GET"], name="signin_form"),
        Route("/signin", console.signin, methods=["POST"], name="signin"),
        Route("/signout", g(console.signout), methods=["POST"], name="signout"),
        Route(
            "/deliveries/{request_id:path}", g(console.delivery), methods=["GET"], name="delivery"
        ),
        Route("/archived/{request_id:path}", g(console.archived), methods=["GET"], name="archived"),
        Route("/raw/{request_id:path}", g(console.raw), methods=["GET"], name="raw"),
        Route("/replay", g(console.replay_one), methods=["POST"], name="replay"),
        Route("/replay-dead", g(console.replay_dead), methods=["POST"], name="replay_dead"),
        Route("/pause", g(console.pause), methods=["POST"], name="pause"),
        Route("/resume", g(console.resume), methods=["POST"], name="resume"),
        Route("/static/{path:path}", console.static, methods=["GET"], name="static"),
    ]
    return _OwnRouter(Starlette(routes=routes, exception_handlers={404: console.not_found}))
