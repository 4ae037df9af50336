"""Running the app with uvicorn: graceful shutdown on SIGTERM, JSON access log lines.

On the first SIGTERM (or SIGINT) :class:`GracefulServer` sets ``app.state.draining``, so
``/v2/health/ready`` answers 503 at once; after ``drain_seconds`` (time for a load balancer to
notice) uvicorn stops accepting connections, lets the requests in flight finish for up to
``shutdown_timeout`` seconds (then cancels them), runs the lifespan shutdown and the process
exits with status 0. A second SIGINT forces an immediate exit. Unlike plain ``uvicorn.run`` the
signal is not re-raised after shutdown, so orchestrators see a clean exit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn

from server.settings import Settings

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulServer(uvicorn.Server):
    """A uvicorn server that drains (readiness false) before it stops, and exits cleanly."""

    def __init__(self, config: uvicorn.Config, *, on_drain: Callable[[], None],
                 drain_seconds: float = 0.0) -> None:
        super().__init__(config)
        self.on_drain = on_drain
        self.drain_seconds = drain_seconds
        self.draining = False
        self._timer: threading.Timer | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Install :meth:`handle_exit` for SIGINT/SIGTERM; restore the old handlers after."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)
            if self._timer is not None:
                self._timer.cancel()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First signal: drain, then stop; a second SIGINT: stop now, without waiting."""
        if self.draining or self.should_exit:
            self.should_exit = True
            if sig == signal.SIGINT:
                self.force_exit = True
            return
        self.draining = True
        self.on_drain()
        logger.info("signal %s: readiness off; stopping in %.1f s, then waiting up to %s s for"
                    " requests in flight", signal.Signals(sig).name, self.drain_seconds,
                    self.config.timeout_graceful_shutdown)
        if self.drain_seconds > 0:
            self._timer = threading.Timer(self.drain_seconds, self._stop)
            self._timer.daemon = True
            self._timer.start()
        else:
            self.should_exit = True

    def _stop(self) -> None:
        self.should_exit = True


def configure_access_log(enabled: bool) -> None:
    """Send ``server.access`` records (already JSON) to stderr as bare lines."""
    access = logging.getLogger("server.access")
    access.propagate = False
    access.handlers.clear()
    if enabled:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
    else:
        access.setLevel(logging.CRITICAL + 1)


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    """uvicorn's configuration for ``app``: h11 and the standard asyncio loop, whatever else
    is installed (uvicorn would pick httptools and uvloop where present, e.g. next to Ray
    Serve, and they parse and bound requests differently), so the server behaves the same in
    every environment."""
    return uvicorn.Config(app, host=settings.host, port=settings.port, http="h11",
                          loop="asyncio", log_level=settings.log_level, access_log=False,
                          timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout))


def serve(app: Any, settings: Settings) -> None:
    """Run ``app`` on ``settings.host:port`` until SIGTERM/SIGINT; return after a clean stop."""
    configure_access_log(settings.access_log)
    config = uvicorn_config(app, settings)

    def drain() -> None:
        app.state.draining = True

    GracefulServer(config, on_drain=drain, drain_seconds=settings.drain_seconds).run()
