"""The archiver against real parts: a loopback origin, a real SQLite store, a folder and
S3 (moto's server mode)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from falhook.receiver import Settings
from falhook.receiver.archive import Archiver, HostRule, MediaRows, MediaState
from falhook.receiver.errors import ArchiveError
from falhook.receiver.models import Delivery
from falhook.receiver.store import Store
from tests.fakes.media_origin import MediaOrigin, content, sha256_of


def _delivery(payload: Any, request_id: str = "req-1") -> Delivery:
    body = json.dumps({"request_id": request_id, "status": "OK", "payload": payload}).encode()
    return Delivery.from_body(body, attempt=1, received_at=time.time())


def _archiver(
    store: Store,
    origin: MediaOrigin,
    url: str,
    on_failed: Any = None,
    **changes: Any,
) -> Archiver:
    settings = Settings(archive_url=url, archive_hosts=(origin.host,), **changes)
    return Archiver(settings, MediaRows(store.engine), first_backoff=0.05, on_failed=on_failed)


async def _archive(archiver: Archiver, delivery: Delivery, **kwargs: Any) -> Delivery:
    try:
        return await archiver.archive(delivery, **kwargs)
    finally:
        await archiver.aclose()


def test_files_are_archived_to_a_folder_with_name_hash_and_type(
    store: Store, origin: MediaOrigin, tmp_path: Path
) -> None:
    folder = tmp_path / "media"
    image = f"{origin.url}/files/cat.png?size=300000"
    payload = {
        "images": [{"url": image, "content_type": "image/png", "file_name": "cat.png"}],
        "audio": f"{origin.url}/files/voice.mp3?size=5000",
        "seed": 42,
        "inline": "data:image/png;base64,AAAA",
    }
    delivery = asyncio.run(_archive(_archiver(store, origin, str(folder)), _delivery(payload)))
    assert [m.pointer for m in delivery.media] == ["/audio", "/images/0/url"]
    image_item = delivery.media[1]
    assert image_item.state is MediaState.ARCHIVED
    assert image_item.size == 300000
    assert image_item.sha256 == sha256_of("cat.png", 300000)
    assert image_item.content_type == "image/png"
    assert image_item.stored_url is not None and image_item.stored_url.startswith("file:///")
    assert image_item.stored_url.endswith("/cat.png")
    stored = Path(image_item.stored_url.removeprefix("file://"))
    assert stored.read_bytes() == content("cat.png", 300000)
    assert delivery.stored_url(image) == image_item.stored_url
    assert delivery.stored_url("https://elsewhere/x.png") is None
    leftovers = [p for p in folder.rglob("*") if p.is_file() and p.suffix not in (".png", ".mp3")]
    assert leftovers == []  # no staging file left beside the objects


def test_a_duplicate_or_replay_fetches_nothing_already_archived(
    store: Store, origin: MediaOrigin, tmp_path: Path
) -> None:
    payload = {"image": {"url": f"{origin.url}/files/a.png?size=1000"}}
    first = asyncio.run(_archive(_archiver(store, origin, str(tmp_path)), _delivery(payload)))
    again = asyncio.run(_archive(_archiver(store, origin, str(tmp_path)), _delivery(payload)))
    assert origin.count("/files/a.png") == 1
    assert again.media == first.media and again.media[0].state is MediaState.ARCHIVED


def test_transient_failures_are_retried_within_the_deadline(
    store: Store, origin: MediaOrigin, tmp_path: Path
) -> None:
    payload = [f"{origin.url}/flaky/b.jpg?size=2000&fail=2"]
    delivery = asyncio.run(_archive(_archiver(store, origin, str(tmp_path)), _delivery(payload)))
    assert delivery.media[0].state is MediaState.ARCHIVED
    assert origin.count("/flaky/b.jpg") == 3
    rows = MediaRows(store.engine).find(request_id="req-1")
    assert rows[0][1].state is MediaState.ARCHIVED


def test_gone_files_fail_for_good_and_the_delivery_goes_on(
    store: Store, origin: MediaOrigin, tmp_path: Path
) -> None:
    payload = {
        "a": f"{origin.url}/status/404/a.png",
        "b": f"{origin.url}/status/410/b.png",
        "c": f"{origin.url}/status/403/c.png",
    }
    failed: list[tuple[str, str]] = []
    archiver = _archiver(store, origin, str(tmp_path), lambda url, e: failed.append((url, e)))
    delivery = asyncio.run(_archive(archiver, _delivery(payload)))
    assert [(m.state, (m.error or "").split(":")[0]) for m in delivery.media] == [
        (MediaState.FAILED, "not_found"),
        (MediaState.FAILED, "not_found"),
        (MediaState.FAILED, "refused"),
    ]
    assert origin.count("/status/404/a.png") == 1  # not retried
    assert sorted(url for url, _ in failed) == sorted(payload.values())  # each one told


def test_a_5xx_past_the_deadline_fails_the_attempt_then_fails_the_file_on_the_last(
    store: Store, origin: MediaOrigin, tmp_path: Path
) -> None:
    payload = {"a": f"{origin.url}/status/503/a.png"}
    archiver = _archiver(store, origin, str(tmp_path), archive_timeout_seconds=0.3)
    with pytest.raises(ArchiveError, match="not archived yet"):
        asyncio.run(_archive(archiver, _delivery(payload)))
    rows = MediaRows(store.engine)
    assert rows.get("req-1")[0].state is MediaState.PENDING
    archiver = _archiver(store, origin, str(tmp_path), archive_timeout_seconds=0.3)
    delivery = asyncio.run(_archive(archiver, _delivery(payload), last_attempt=True))
    assert delivery.media[0].state is MediaState.FAILED
    assert "503" in (delivery.media[0].error or "")


def test_over_the_size_cap_nothing_is_kept(
    store: Store, origin: MediaOrigin, tmp_path: Path
) -> None:
    folder = tmp_path / "media"
    payload = {"big": f"{origin.url}/files/big.mp4?size=3000000"}
    archiver = _archiver(store, origin, str(folder), archive_max_bytes=1_000_000)
    delivery = asyncio.run(_archive(archiver, _delivery(payload)))
    item = delivery.media[0]
    assert item.state is MediaState.FAILED and (item.error or "").startswith("too_large")
    assert [p for p in folder.rglob("*") if p.is_file()] == []


def test_a_size_cap_passed_while_streaming_keeps_nothing(
    store: Store, origin: MediaOrigin, tmp_path: Path
) -> None:
    # No Content-Length: the cap is found while streaming; the upload is abandoned.
    folder = tmp_path / "media"
    payload = {"big": f"{origin.url}/files/big.bin?size=30000000&nolength=1"}
    archiver = _archiver(store, origin, str(folder), archive_max_bytes=20_000_000)
    delivery = asyncio.run(_archive(archiver, _delivery(payload)))
    assert delivery.media[0].state is MediaState.FAILED
    assert (delivery.media[0].error or "").startswith("too_large")
    assert [p for p in folder.rglob("*") if p.is_file()] == []


def _fake_dns(names: dict[str, str]) -> Any:
    async def resolve(host: str, port: int) -> list[str]:
        return [names[host]]

    return resolve


def test_foreign_hosts_and_private_addresses_are_never_fetched(
    store: Store, origin: MediaOrigin, tmp_path: Path
) -> None:
    port = origin.port
    payload = {
        # Not on the list.
        "foreign": "https://example.com/a.png",
        # On the list as a subdomain of an entry, but its name has a loopback address.
        "private": f"http://v3.fal.media:{port}/files/p.png",
        # An allowed host redirecting off the list.
        "redirect": f"{origin.url}/redirect?to=http://127.0.0.2:{port}/files/r.png",
        # An allowed host redirecting to a private address on the list by its parent only.
        "hop": f"{origin.url}/redirect?to=http://v3.fal.media:{port}/files/h.png",
    }
    rule = HostRule(
        (origin.host, f"fal.media:{port}"), resolver=_fake_dns({"v3.fal.media": "127.0.0.1"})
    )
    settings = Settings(archive_url=str(tmp_path), archive_hosts=rule.entries)
    archiver = Archiver(settings, MediaRows(store.engine), rule=rule)
    delivery = asyncio.run(_archive(archiver, _delivery(payload)))
    assert {m.pointer: m.state for m in delivery.media} == {
        "/foreign": MediaState.SKIPPED,
        "/private": MediaState.SKIPPED,
        "/redirect": MediaState.SKIPPED,
        "/hop": MediaState.SKIPPED,
    }
    errors = {m.pointer: m.error or "" for m in delivery.media}
    assert "private, loopback or link-local" in errors["/hop"]
    assert "private, loopback or link-local" in errors["/private"]
    assert "not on FALHOOK_ARCHIVE_HOSTS" in errors["/foreign"]
    for path in ("/files/p.png", "/files/r.png", "/files/h.png"):
        assert origin.count(path) == 0


def test_a_private_address_listed_exactly_is_fetched_by_name(
    store: Store, origin: MediaOrigin, tmp_path: Path
) -> None:
    # The connection goes to the address checked; the request still names the host.
    port = origin.port
    rule = HostRule((f"v3.fal.media:{port}",), resolver=_fake_dns({"v3.fal.media": "127.0.0.1"}))
    settings = Settings(archive_url=str(tmp_path), archive_hosts=rule.entries)
    archiver = Archiver(settings, MediaRows(store.engine), rule=rule)
    payload = {"image": f"http://v3.fal.media:{port}/files/ok.png?size=100"}
    delivery = asyncio.run(_archive(archiver, _delivery(payload)))
    assert delivery.media[0].state is MediaState.ARCHIVED
    assert origin.count("/files/ok.png") == 1


def test_files_are_archived_to_s3_with_their_content_type(
    store: Store, origin: MediaOrigin, s3_bucket: str, s3_server: str
) -> None:
    import boto3

    payload = {"video": {"url": f"{origin.url}/files/clip.mp4?size=12000000"}}
    archiver = _archiver(store, origin, f"s3://{s3_bucket}/fal")
    delivery = asyncio.run(_archive(archiver, _delivery(payload, "req-s3")))
    item = delivery.media[0]
    assert item.state is MediaState.ARCHIVED, item.error
    key = "fal/req-s3/video-url/clip.mp4"
    assert item.stored_url == f"s3://{s3_bucket}/{key}"
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    head = s3.head_object(Bucket=s3_bucket, Key=key)
    assert head["ContentLength"] == 12000000
    assert head["ContentType"] == "video/mp4"
    body = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    assert body == content("clip.mp4", 12000000)


def test_each_download_is_a_client_span_with_tracing_on(
    store: Store, origin: MediaOrigin, tmp_path: Path
) -> None:
    otel = pytest.importorskip("opentelemetry.sdk.trace", reason="needs the falhook[otel] extra")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from falhook.receiver.tracing.spans import Tracing

    exporter = InMemorySpanExporter()
    provider = otel.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    archiver = _archiver(store, origin, str(tmp_path))
    archiver.tracing = Tracing.for_provider(provider)
    url = f"{origin.url}/files/cat.png?size=1000"
    asyncio.run(_archive(archiver, _delivery({"image": url})))
    [span] = exporter.get_finished_spans()
    assert span.name == "GET" and span.kind is SpanKind.CLIENT
    assert span.attributes is not None
    assert span.attributes["url.full"] == f"{origin.url}/files/cat.png"  # no query
    assert span.attributes["http.response.status_code"] == 200
