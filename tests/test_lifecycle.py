"""``server.lifecycle`` and the new command-line flags, without starting a server.

The first SIGTERM turns readiness off and stops uvicorn after ``drain_seconds``; a second
SIGINT forces the exit; the access-log switch routes ``server.access`` lines (bare JSON) to
stderr or nowhere. The end-to-end SIGTERM test is in ``test_ops_live``.
"""

from __future__ import annotations

import logging
import signal
import time

import pytest
import uvicorn

from server import Settings, create_app
from server.lifecycle import GracefulServer, configure_access_log, uvicorn_config
from server.main import parse_settings


def _server(drain: float) -> tuple[GracefulServer, list[str]]:
    calls: list[str] = []
    app = create_app(Settings())
    config = uvicorn.Config(app, timeout_graceful_shutdown=5)
    return GracefulServer(config, on_drain=lambda: calls.append("drain"),
                          drain_seconds=drain), calls


def test_sigterm_drains_then_stops() -> None:
    server, calls = _server(0.0)
    server.handle_exit(signal.SIGTERM, None)
    assert calls == ["drain"] and server.should_exit and not server.force_exit
    server, calls = _server(0.3)
    server.handle_exit(signal.SIGTERM, None)
    assert calls == ["drain"] and not server.should_exit  # still draining: readiness off
    deadline = time.monotonic() + 5
    while not server.should_exit and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.should_exit and not server.force_exit
    server.handle_exit(signal.SIGINT, None)  # impatient: a second Ctrl-C
    assert server.force_exit and calls == ["drain"]


def test_access_log_switch() -> None:
    access = logging.getLogger("server.access")
    saved = access.handlers[:], access.level, access.propagate
    try:
        configure_access_log(True)
        assert not access.propagate and len(access.handlers) == 1
        assert access.isEnabledFor(logging.INFO)
        configure_access_log(False)
        assert not access.handlers and not access.isEnabledFor(logging.CRITICAL)
    finally:
        access.handlers[:], access.propagate = saved[0], saved[2]
        access.setLevel(saved[1])  # setLevel also clears the logging module's level cache


def test_new_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REPROGRAM_API_KEYS", raising=False)
    s = parse_settings(["--images-per-minute", "600", "--quota-images", "10000",
                        "--max-json-depth", "16", "--max-json-elements", "1000",
                        "--drain-seconds", "2.5", "--shutdown-timeout", "10",
                        "--no-access-log"])
    assert (s.images_per_minute, s.quota_images, s.max_json_depth, s.max_json_elements,
            s.drain_seconds, s.shutdown_timeout, s.access_log) == (600, 10000, 16, 1000, 2.5,
                                                                    10.0, False)
    d = parse_settings([])
    assert d.api_keys == () and d.images_per_minute is None and d.access_log


def test_uvicorn_config_is_the_same_everywhere() -> None:
    """h11 and asyncio even where httptools and uvloop are installed (Ray Serve brings them):
    the request parser and its bounds do not depend on the environment."""
    config = uvicorn_config(create_app(Settings()), Settings(port=8123, shutdown_timeout=2.5))
    config.load()
    assert (config.http, config.loop, config.port) == ("h11", "asyncio", 8123)
    assert config.timeout_graceful_shutdown == 3
    assert config.http_protocol_class.__module__ == "uvicorn.protocols.http.h11_impl"
