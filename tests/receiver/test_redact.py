"""shown_url: the one way a forward target's URL is shown."""

from __future__ import annotations

import pytest

from falhook.receiver.redact import shown_url, shown_urls_in


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://app:PW@host/hook?api_key=PW", "http://***@host/hook?api_key=***"),
        ("https://TOKEN@host:8443/in", "https://***@host:8443/in"),
        ("https://host/in?a=PW&b=&flag", "https://host/in?a=***&b=&***"),
        ("https://host/in?PW", "https://host/in?***"),
        ("https://host/in#PW", "https://host/in#***"),
        ("https://a:b@c@host/x", "https://***@host/x"),
        ("http://host/plain/", "http://host/plain/"),
        ("http://u:PW@[::1/x?k=PW", "http://***@[::1/x"),  # not parseable: masked by text
    ],
)
def test_secrets_are_masked_and_the_target_stays(url: str, shown: str) -> None:
    assert shown_url(url) == shown
    assert "PW" not in shown_url(url) and "TOKEN" not in shown_url(url)


def test_a_bad_forward_url_is_named_without_its_secrets() -> None:
    from falhook.receiver.errors import SettingsError
    from falhook.receiver.settings import Settings

    with pytest.raises(SettingsError) as info:
        Settings.from_env({"FALHOOK_FORWARD_TO": "ftp://u:PW@host/in?key=PW"})
    assert str(info.value).startswith("FALHOOK_FORWARD_TO='ftp://***@host/in?key=***'")
    with pytest.raises(SettingsError) as info:
        Settings(forward_to="ftp://u:PW@host/in?key=PW")
    assert "PW" not in str(info.value) and "ftp://***@host" in str(info.value)


def test_every_url_in_an_error_message_is_masked() -> None:
    text = "Invalid URL 'http://u:PW@host/x?k=PW': bad, see https://T@docs/y."
    assert (
        shown_urls_in(text) == "Invalid URL 'http://***@host/x?k=***': bad, see https://***@docs/y."
    )
