"""Sign-in, sessions and CSRF for the console, all derived from the console token.

- Sign-in compares SHA-256 digests of the given and configured tokens in constant time.
- A session is a cookie ``issued.nonce.signature`` (HMAC-SHA256 under a key derived from
  the token): any replica with the same token accepts it, and changing the token signs
  everyone out. It expires after `SESSION_SECONDS`.
- The CSRF token of a session is an HMAC of its nonce; every POST must carry it, and a
  POST whose Origin (or Sec-Fetch-Site) names another site is refused before that.
- Before sign-in, a short-lived random cookie plays the nonce's part for the sign-in form.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

__all__ = [
    "SESSION_COOKIE",
    "SESSION_SECONDS",
    "SIGNIN_COOKIE",
    "Auth",
    "Session",
    "SigninThrottle",
]

SESSION_COOKIE = "falhook_console"
SIGNIN_COOKIE = "falhook_console_signin"
SESSION_SECONDS = 12 * 3600
_SIGNIN_SECONDS = 3600
_MAX_ENDED = 10_000  # signed-out sessions remembered (each needed a valid session)


@dataclass(frozen=True, slots=True)
class Session:
    nonce: str
    csrf: str


class Auth:
    """Checks tokens, issues and reads session cookies, and makes/verifies CSRF tokens."""

    def __init__(self, token: str, *, session_seconds: float = SESSION_SECONDS) -> None:
        self._token_digest = hashlib.sha256(token.encode()).digest()
        self._key = hmac.new(token.encode(), b"falhook console v1", hashlib.sha256).digest()
        self.session_seconds = session_seconds
        # Signed-out sessions (nonce -> when the cookie would expire), refused until then.
        # In this process: another replica still takes a copied cookie (README says so).
        self._ended: dict[str, float] = {}

    # -- tokens and signatures -----------------------------------------------------------

    def token_ok(self, given: str) -> bool:
        """Whether `given` is the console token (constant time, whatever its length)."""
        digest = hashlib.sha256(given.encode()).digest()
        return hmac.compare_digest(digest, self._token_digest)

    def _sign(self, purpose: str, text: str) -> str:
        message = f"{purpose}:{text}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def csrf_for(self, nonce: str, purpose: str = "csrf") -> str:
        return self._sign(purpose, nonce)

    # -- sessions --------------------------------------------------------------------------

    def new_session(self) -> tuple[str, Session]:
        """A fresh session: (cookie value, session)."""
        issued = str(int(time.time()))
        nonce = secrets.token_urlsafe(18)
        value = f"{issued}.{nonce}.{self._sign('session', f'{issued}.{nonce}')}"
        return value, Session(nonce, self.csrf_for(nonce))

    def session(self, request: Request) -> Session | None:
        """The request's valid session, or None (missing, forged, or expired)."""
        value = request.cookies.get(SESSION_COOKIE, "")
        parts = value.split(".")
        if len(parts) != 3:
            return None
        issued, nonce, signature = parts
        expected = self._sign("session", f"{issued}.{nonce}")
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            return None
        try:
            age = time.time() - int(issued)
        except ValueError:
            return None
        if not 0 <= age < self.session_seconds:
            return None
        if nonce in self._ended:
            return None  # signed out
        return Session(nonce, self.csrf_for(nonce))

    def signin_nonce(self, request: Request) -> tuple[str, bool]:
        """The sign-in form's nonce: (nonce, whether it is new and must be set as a cookie)."""
        nonce = request.cookies.get(SIGNIN_COOKIE, "")
        if 16 <= len(nonce) <= 64 and nonce.replace("-", "").replace("_", "").isalnum():
            return nonce, False
        return secrets.token_urlsafe(18), True

    # -- cookies ---------------------------------------------------------------------------

    @staticmethod
    def cookie_path(request: Request) -> str:
        # Where the console is mounted ("/console", or below a host app's own mount).
        return str(request.scope.get("root_path", "")) or "/"

    def set_cookie(
        self, response: Response, request: Request, name: str, value: str, max_age: int
    ) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path=self.cookie_path(request),
            httponly=True,
            samesite="strict",
            # The scheme is https behind a TLS proxy only when uvicorn trusts the proxy's
            # X-Forwarded-Proto (--forwarded-allow-ips); a client cannot fake it.
            secure=request.url.scheme == "https",
        )

    def start_session(self, response: Response, request: Request) -> None:
        value, _ = self.new_session()
        self.set_cookie(response, request, SESSION_COOKIE, value, int(self.session_seconds))
        response.delete_cookie(SIGNIN_COOKIE, path=self.cookie_path(request))

    def end_session(self, response: Response, request: Request) -> None:
        """Sign out: the browser's cookie is deleted, and a copy of it refused here."""
        session = self.session(request)
        if session is not None:
            now = time.time()
            self._ended = {n: until for n, until in self._ended.items() if until > now}
            if len(self._ended) >= _MAX_ENDED:
                self._ended.pop(next(iter(self._ended)))  # the oldest sign-out
            self._ended[session.nonce] = now + self.session_seconds
        response.delete_cookie(SESSION_COOKIE, path=self.cookie_path(request))

    def set_signin_nonce(self, response: Response, request: Request, nonce: str) -> None:
        self.set_cookie(response, request, SIGNIN_COOKIE, nonce, _SIGNIN_SECONDS)

    # -- requests from elsewhere -------------------------------------------------------------

    @staticmethod
    def same_origin(request: Request) -> bool:
        """False when the browser says the request came from another site."""
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return False
        origin = request.headers.get("origin")
        if origin is None:
            return True  # older browsers and non-browsers: the CSRF token still decides
        return origin == f"{request.url.scheme}://{request.url.netloc}"

    @staticmethod
    def csrf_matches(given: str, expected: str) -> bool:
        return hmac.compare_digest(given.encode(), expected.encode())


class SigninThrottle:
    """At most `limit` failed sign-ins per client address per `window` seconds.

    Guessing a long random token is hopeless anyway; this keeps a short one from being
    guessed quickly and keeps the log of wrong tokens readable. In memory, per process.
    """

    def __init__(self, limit: int = 5, window: float = 60.0, max_clients: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._failures: dict[str, list[float]] = {}

    def _recent(self, client: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(client, ()) if now - t < self.window]
        if times:
            self._failures[client] = times
        else:
            self._failures.pop(client, None)
        return times

    def blocked(self, client: str, now: float | None = None) -> bool:
        return len(self._recent(client, time.time() if now is None else now)) >= self.limit

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if len(self._failures) >= self.max_clients and client not in self._failures:
            # Bounded memory under a spray from many addresses: forget the stale ones.
            for other in list(self._failures):
                self._recent(other, now)
            if len(self._failures) >= self.max_clients:
                self._failures.pop(next(iter(self._failures)))
        self._failures.setdefault(client, []).append(now)
