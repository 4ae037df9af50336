"""Connecting to Ray, imported lazily: everything else works without Ray installed.

``--ray auto`` (or ``--ray-address auto``) joins the running Ray cluster this machine knows of
(``$RAY_ADDRESS``, or the one ``ray start --head`` left here) and otherwise starts a local one
bounded to this machine's cores; ``local`` always starts a fresh local one; any other value is
an address for :func:`ray.init` (``HOST:PORT`` of a head node, ``ray://HOST:10001``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from reprogram.errors import ConfigError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'reprogram[ray]'"
# a local instance's shared-memory object store: tasks and requests here pass small objects
LOCAL_OBJECT_STORE_BYTES = 512 * 1024 * 1024


def require_ray() -> ModuleType:
    """The ``ray`` module, or :class:`ConfigError` in one line when it is not installed."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"expected Ray for --ray, got no 'ray' module; {INSTALL_HINT}"
                          ) from None
    return ray


def local_options(num_cpus: int | None = None) -> dict[str, Any]:
    """:func:`ray.init` options of a local instance: bounded to ``num_cpus`` (default: this
    machine's cores), no dashboard, a small object store."""
    return {"num_cpus": num_cpus or os.cpu_count() or 1, "include_dashboard": False,
            "object_store_memory": LOCAL_OBJECT_STORE_BYTES}


def connect(address: str, *, runtime_env: Mapping[str, Any] | None = None,
            num_cpus: int | None = None, quiet: bool = True) -> str:
    """Initialise Ray for ``address`` (``auto``, ``local`` or an address); returns what it
    did, in words, for a log line. The caller calls ``ray.shutdown()`` when done (which stops
    a local instance it started, and only disconnects from a cluster)."""
    ray = require_ray()
    common: dict[str, Any] = {"runtime_env": dict(runtime_env or {}),
                              "logging_level": logging.WARNING if quiet else logging.INFO,
                              "log_to_driver": not quiet}
    if address not in ("auto", "local"):
        try:
            ray.init(address=address, **common)
        except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"cannot join the Ray cluster at {address!r}: {first}"
                              ) from None
        return f"joined the Ray cluster at {address}"
    if address == "auto":
        try:
            ray.init(address="auto", **common)
            return "joined the running Ray cluster"
        except ConnectionError:
            pass
    options = local_options(num_cpus)
    ray.init(address="local", **options, **common)  # "local": never $RAY_ADDRESS
    return f"started a local Ray instance ({options['num_cpus']} CPUs)"


def cluster_cpus() -> int:
    """CPUs of the connected cluster (at least 1)."""
    ray = require_ray()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
