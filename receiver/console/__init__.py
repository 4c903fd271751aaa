"""The operator's console: deliveries, one delivery, replay, pause/resume, in a browser.

Served by the receiver under ``/console/`` only when ``FALHOOK_CONSOLE_TOKEN`` is set.
Server-rendered with Jinja2 templates shipped in this package; no script, nothing fetched
from elsewhere, so it works offline.
"""

from falhook.receiver.console.views import build_console

__all__ = ["build_console"]
