"""`falhook serve` drains its log queue when the receiver's lifespan has shut down (uvicorn
then re-raises SIGTERM, ending the process before `uvicorn.run` returns)."""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from falhook.receiver.cli.serve import _DrainLogsAtShutdown
from falhook.receiver.logs import LogPipeline


def test_queued_lines_are_written_before_shutdown_complete_is_sent() -> None:
    stream = io.StringIO()
    pipeline = LogPipeline(stream)
    logger = logging.getLogger("falhook.test-serve-logs")
    logger.addHandler(pipeline.handler)
    logger.propagate = False
    pipeline.start()
    seen_at_complete: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "lifespan"
        logger.warning("last words")
        await send({"type": "lifespan.shutdown.complete"})

    async def send(message: Message) -> None:
        seen_at_complete.append(stream.getvalue())

    async def receive() -> Message:
        return {"type": "lifespan.shutdown"}

    try:
        wrapped = _DrainLogsAtShutdown(app, pipeline)
        asyncio.run(wrapped({"type": "lifespan"}, receive, send))  # type: ignore[arg-type]
    finally:
        pipeline.stop()
        logger.removeHandler(pipeline.handler)
    assert len(seen_at_complete) == 1 and '"last words"' in seen_at_complete[0]


def test_requests_go_straight_to_the_app() -> None:
    calls: list[str] = []

    def app(scope: dict[str, Any], receive: Any, send: Any) -> str:
        calls.append(scope["type"])
        return "the app's own awaitable"

    wrapped = _DrainLogsAtShutdown(app, LogPipeline(io.StringIO()))  # type: ignore[arg-type]
    assert wrapped({"type": "http"}, None, None) == "the app's own awaitable"  # type: ignore[arg-type,comparison-overlap]
    assert calls == ["http"]
