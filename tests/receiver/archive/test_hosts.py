"""The host rule: the allow-list, ports, and private addresses (no SSRF)."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from falhook.receiver import Settings, SettingsError
from falhook.receiver.archive import HostRule
from falhook.receiver.errors import ArchiveError, MediaFailure


def _dns(addresses: list[str]):
    async def resolve(host: str, port: int) -> list[str]:
        return addresses

    return resolve


def test_fal_media_and_its_subdomains_by_default_on_default_ports() -> None:
    rule = HostRule(Settings().archive_hosts)
    assert rule.check("https://v3.fal.media/files/a.png")[:3] == ("https", "v3.fal.media", 443)
    assert rule.check("https://fal.media/a")[3] is True  # listed exactly
    assert rule.check("https://v3b.fal.media/a")[3] is False
    for url in (
        "https://evilfal.media/a",
        "https://fal.media.evil.com/a",
        "https://v3.fal.media:8443/a",
        "ftp://fal.media/a",
        "https://user:pw@fal.media/a",
        "https://[::1/a",
    ):
        with pytest.raises(ArchiveError) as info:
            rule.check(url)
        assert info.value.failure is MediaFailure.HOST_REFUSED


def test_an_entry_with_a_port_allows_that_port() -> None:
    rule = HostRule(("127.0.0.1:9000", "cdn.example.com:8443", "[::1]:9001"))
    assert rule.check("http://127.0.0.1:9000/x")[3] is True
    assert rule.check("https://a.cdn.example.com:8443/x")[2] == 8443
    assert rule.check("http://[::1]:9001/x")[1] == "::1"
    with pytest.raises(ArchiveError):
        rule.check("http://127.0.0.1:9001/x")


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.1",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "::ffff:10.0.0.1",
        "0.0.0.0",
    ],
)
def test_a_private_address_is_refused_unless_the_host_is_listed_exactly(address: str) -> None:
    rule = HostRule(("fal.media",), resolver=_dns([address]))
    with pytest.raises(ArchiveError, match="private, loopback or link-local"):
        asyncio.run(rule.resolve("https://v3.fal.media/a.png"))
    exact = HostRule(("v3.fal.media",), resolver=_dns([address]))
    resolved = asyncio.run(exact.resolve("https://v3.fal.media/a.png"))
    assert ipaddress.ip_address(resolved.address) == ipaddress.ip_address(address)


def test_a_public_address_is_connected_to_by_address_with_the_host_named() -> None:
    rule = HostRule(("fal.media",), resolver=_dns(["93.184.216.34", "10.0.0.1"]))
    with pytest.raises(ArchiveError):  # one private answer among public ones is refused
        asyncio.run(rule.resolve("https://v3.fal.media/a.png"))
    rule = HostRule(("fal.media",), resolver=_dns(["93.184.216.34"]))
    resolved = asyncio.run(rule.resolve("https://v3.fal.media/a.png?x=1"))
    assert (
        resolved.url_for("https://v3.fal.media/a.png?x=1") == "https://93.184.216.34:443/a.png?x=1"
    )
    assert resolved.host_header == "v3.fal.media"


@pytest.mark.parametrize(
    "value", ["", " , ", "a b", "x:0", "x:70000", "-bad.com", "http://fal.media"]
)
def test_bad_host_entries_are_one_line_setting_errors(value: str) -> None:
    with pytest.raises(SettingsError, match="FALHOOK_ARCHIVE_HOSTS"):
        Settings.from_env({"FALHOOK_ARCHIVE_HOSTS": value})


@pytest.mark.parametrize(
    ("value", "wanted"),
    [("ftp://x", "wants a folder path"), ("s3://", "bucket"), ("file://rel", "absolute")],
)
def test_bad_archive_urls_are_one_line_setting_errors(value: str, wanted: str) -> None:
    with pytest.raises(SettingsError, match=wanted):
        Settings.from_env({"FALHOOK_ARCHIVE_URL": value})
    assert Settings.from_env({"FALHOOK_ARCHIVE_URL": " "}).archive_url is None
