"""Signing in to a real server's console over HTTP (no browser), for the e2e tests."""

from __future__ import annotations

import re

import httpx


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert match, html
    return match.group(1)


def signin_attempt(
    client: httpx.Client, base_url: str, token: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    """One sign-in: the form (its CSRF token and cookie), then the POST."""
    form = client.get(f"{base_url}/console/signin", headers=headers)
    data = {"csrf": csrf_of(form.text), "token": token}
    return client.post(f"{base_url}/console/signin", data=data, headers=headers)


def signed_in(base_url: str, token: str) -> httpx.Client:
    """A client holding a console session (close it when done)."""
    client = httpx.Client(timeout=30.0, follow_redirects=False)
    response = signin_attempt(client, base_url, token)
    assert response.status_code == 303, response.text
    return client
