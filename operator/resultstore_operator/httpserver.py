"""The start/stop of one small aiohttp application on a TCP port (metrics, health).

Why one helper: the /metrics and the probe servers bind, fail and clean up the same way;
a bind failure (OSError) must release the runner before it reaches the caller, who stops
the operator at start-up, and a second `stop()` must be harmless.
"""

from __future__ import annotations

from aiohttp import web


class AppServer:
    """Serves an application on host:port between `start()` and `stop()`."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None

    async def start(self, app: web.Application, host: str, port: int) -> None:
        """Bind and serve `app`; on a bind failure clean up and re-raise the OSError."""
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Close the listener and the runner (nothing to do when not started)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
