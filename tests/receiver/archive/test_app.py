"""The receiver with and without the archive: off imports nothing of it; on, a delivery's
files are archived before its callbacks, even with no callback registered."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from falhook.receiver import Delivery, MediaState, Settings, WebhookReceiver
from tests.fakes.media_origin import MediaOrigin
from tests.polling import wait_for
from tests.receiver.conftest import Signer


def test_archive_off_imports_nothing_of_it(tmp_path: Path, jwks_file: Path) -> None:
    code = (
        "import asyncio, sys\n"
        "from falhook.receiver import Settings, WebhookReceiver\n"
        f"s = Settings(database_url='sqlite:///{tmp_path / 'f.db'}', jwks_url='{jwks_file}')\n"
        "async def main():\n"
        "    async with WebhookReceiver(s, callbacks=[lambda d: None]):\n"
        "        pass\n"
        "asyncio.run(main())\n"
        "names = ('obstore', 'falhook.receiver.archive.')\n"
        "print(sorted(m for m in sys.modules if m.startswith(names)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    # media.py only: the names a Delivery carries (an empty tuple when off).
    assert result.stdout.strip() == "['falhook.receiver.archive.media']"


def test_files_are_archived_before_the_callbacks(
    tmp_path: Path, jwks_file: Path, signer: Signer
) -> None:
    seen: list[Delivery] = []
    with MediaOrigin() as origin:
        settings = Settings(
            database_url=f"sqlite:///{tmp_path / 'f.db'}",
            jwks_url=str(jwks_file),
            archive_url=str(tmp_path / "media"),
            archive_hosts=(origin.host,),
        )

        async def main() -> None:
            hooks = WebhookReceiver(settings, callbacks=[seen.append])
            async with hooks:
                payload = {"image": {"url": f"{origin.url}/files/x.png?size=64"}}
                body, headers = signer("app-1", payload=payload)
                intake = hooks.app.endpoint.intake
                assert intake is not None
                checked = intake.keys.check_headers(
                    [(k.lower().encode(), v.encode()) for k, v in headers.items()]
                )
                await intake.accept(body, checked)
                await asyncio.to_thread(wait_for, lambda: seen, timeout=20, what="callback")

        asyncio.run(main())
    assert seen[0].media[0].state is MediaState.ARCHIVED
    assert seen[0].stored_url(f"{origin.url}/files/x.png?size=64") == seen[0].media[0].stored_url


def test_with_no_callback_the_archive_still_runs(
    tmp_path: Path, jwks_file: Path, signer: Signer
) -> None:
    with MediaOrigin() as origin:
        settings = Settings(
            database_url=f"sqlite:///{tmp_path / 'f.db'}",
            jwks_url=str(jwks_file),
            archive_url=str(tmp_path / "media"),
            archive_hosts=(origin.host,),
        )

        async def main() -> None:
            hooks = WebhookReceiver(settings)
            async with hooks:
                body, headers = signer("app-2", payload=[f"{origin.url}/files/y.webp"])
                intake = hooks.app.endpoint.intake
                assert intake is not None
                checked = intake.keys.check_headers(
                    [(k.lower().encode(), v.encode()) for k, v in headers.items()]
                )
                await intake.accept(body, checked)

                def done() -> bool:
                    row = hooks.store.get("app-2")
                    return row is not None and row.state.value == "done"

                await asyncio.to_thread(wait_for, done, timeout=20, what="done")

        asyncio.run(main())
        assert origin.count("/files/y.webp") == 1
    assert (tmp_path / "media" / "app-2" / "0" / "y.webp").exists()
