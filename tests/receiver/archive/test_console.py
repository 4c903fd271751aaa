"""The console's delivery page lists a delivery's archived files, with thumbnails served
from the archive by an authenticated route (so they show once fal's copy is gone)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from starlette.testclient import TestClient

from falhook.receiver import Delivery, Settings, WebhookReceiver
from tests.fakes.media_origin import MediaOrigin, content
from tests.receiver.test_console import TOKEN, seed, sign_in


def test_the_delivery_page_shows_archived_files_and_serves_them(
    settings: Settings, tmp_path: Path
) -> None:
    with MediaOrigin() as origin:
        hooks = WebhookReceiver(
            settings.replace(
                console_token=TOKEN,
                archive_url=str(tmp_path / "media"),
                archive_hosts=(origin.host,),
            )
        )
        payload = {
            "images": [{"url": f"{origin.url}/files/thumb.png?size=2048"}],
            "page": f"{origin.url}/files/page.html?size=64",
            "gone": f"{origin.url}/status/404/x.png",
        }
        body = json.dumps({"request_id": "c1", "status": "OK", "payload": payload}).encode()
        with TestClient(hooks.app, follow_redirects=False) as client:
            assert hooks.archiver is not None
            parsed = Delivery.from_body(body, attempt=1, received_at=time.time())
            assert client.portal is not None  # the app's own loop, where its archiver lives
            client.portal.call(hooks.archiver.archive, parsed)
            seed(hooks, "c1", body=json.loads(body))
            anonymous = client.get("/console/archived/c1?pointer=/images/0/url")
            assert anonymous.status_code in (302, 303, 401)
            sign_in(client)
            page = client.get("/console/deliveries/c1")
            assert page.status_code == 200
            assert "Archived files" in page.text and "not_found" in page.text
            assert '/console/archived/c1?pointer=/images/0/url" alt="/images/0/url"' in page.text
            image = client.get("/console/archived/c1", params={"pointer": "/images/0/url"})
            assert image.status_code == 200
            assert image.headers["content-type"] == "image/png"
            assert image.content == content("thumb.png", 2048)
            html = client.get("/console/archived/c1", params={"pointer": "/page"})
            assert html.headers["content-type"] == "application/octet-stream"
            assert html.headers["content-disposition"] == "attachment"
            missing = client.get("/console/archived/c1", params={"pointer": "/gone"})
            assert missing.status_code == 404
