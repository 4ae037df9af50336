"""``reprogram-server --ray``: the same FastAPI app as N Ray Serve replicas.

Each replica is a Ray actor whose constructor loads the model weights once
(:func:`server.app.load_sources`) and then builds ``create_app(settings, models=...)`` behind
``serve.ingress``; Serve's proxy listens on ``--host``/``--port`` and spreads requests over
the replicas. ``--replicas N`` fixes their number; ``--min-replicas``/``--max-replicas`` let
Serve's autoscaler choose between the bounds by requests in flight per replica. Ray is
imported only here and only when asked for (see :mod:`server.ray_cluster`).

Hosted prompts, rate limits and quotas live in each replica unless the state is shared
(``--state redis://...``): with more than one replica and local state a warning says so.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from dataclasses import dataclass
from typing import Any

from reprogram.errors import ConfigError
from server.app import create_app, load_sources
from server.ray_cluster import connect, require_ray
from server.settings import Settings

logger = logging.getLogger(__name__)

APP_NAME = "reprogram"
# requests in flight per replica that the autoscaler aims at
TARGET_ONGOING_REQUESTS = 4


@dataclass(frozen=True, kw_only=True)
class Scale:
    """How many replicas: ``replicas`` fixed, or ``min_replicas..max_replicas`` autoscaled
    (``replicas`` is then the starting number); ``cpus`` per replica; the Ray ``address``."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    cpus: float = 1.0
    address: str = "auto"

    def __post_init__(self) -> None:
        if self.replicas < 1 or not self.cpus > 0:
            raise ConfigError(f"expected --replicas >= 1 and --replica-cpus > 0, got "
                              f"{self.replicas} and {self.cpus}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ConfigError("expected --min-replicas and --max-replicas together, got one")
        if self.max_replicas is not None and not (
                1 <= (self.min_replicas or 0) <= self.replicas <= self.max_replicas):
            raise ConfigError(f"expected 1 <= --min-replicas <= --replicas <= --max-replicas,"
                              f" got {self.min_replicas}, {self.replicas}, {self.max_replicas}")

    @property
    def autoscaled(self) -> bool:
        return self.max_replicas is not None

    def deployment_options(self) -> dict[str, Any]:
        """``serve.deployment`` options: replicas or autoscaling bounds, CPUs per replica."""
        options: dict[str, Any] = {"ray_actor_options": {"num_cpus": self.cpus}}
        if self.autoscaled:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": self.replicas,
                "target_ongoing_requests": TARGET_ONGOING_REQUESTS}
        else:
            options["num_replicas"] = self.replicas
        return options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--ray`` flags of ``reprogram-server``."""
    g = parser.add_argument_group("Ray Serve (scale-out; needs pip install 'reprogram[ray]')")
    g.add_argument("--ray", action="store_true",
                   help="serve the app as Ray Serve replicas on --host/--port")
    g.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="replicas (with autoscaling bounds: the starting number; default 1)")
    g.add_argument("--min-replicas", type=int, default=None, metavar="N",
                   help="autoscaling: fewest replicas (with --max-replicas)")
    g.add_argument("--max-replicas", type=int, default=None, metavar="N",
                   help="autoscaling: most replicas (with --min-replicas)")
    g.add_argument("--replica-cpus", type=float, default=1.0, metavar="N",
                   help="CPUs each replica reserves (its torch threads; default 1)")
    g.add_argument("--ray-address", default="auto", metavar="ADDRESS",
                   help="'auto' (the running cluster, else a local instance on this"
                        " machine's cores; the default), 'local', or a cluster's address")


def scale_from(args: argparse.Namespace) -> Scale | None:
    """The :class:`Scale` of parsed arguments, or ``None`` without ``--ray``."""
    if not args.ray:
        return None
    return Scale(replicas=args.replicas, min_replicas=args.min_replicas,
                 max_replicas=args.max_replicas, cpus=args.replica_cpus,
                 address=args.ray_address)


def shared_state(settings: Settings) -> bool:
    """Whether the replicas share their state (``--state redis://...``)."""
    return str(getattr(settings, "state", "") or "").startswith(("redis://", "rediss://"))


def state_warning(settings: Settings, scale: Scale) -> str | None:
    """The warning for several replicas on local state, else ``None``."""
    most = scale.max_replicas or scale.replicas
    if most <= 1 or shared_state(settings):
        return None
    return (f"{most} replicas with local state: hosted prompts, rate limits and quotas are"
            " per replica (a key gets up to N times its limit; an upload reaches one replica);"
            " use --state redis://HOST:PORT/DB to share them")


class Replica:
    """One replica's state: the settings and the models, loaded once in the constructor."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models = load_sources(settings)

    def __serve_build_asgi_app__(self) -> Any:
        """The replica's app (Serve calls this once, after the constructor)."""
        return create_app(self.settings, models=self.models)


def application(settings: Settings, scale: Scale) -> Any:
    """The bound Ray Serve application (``serve.run`` it, or name it to ``serve run``)."""
    require_ray()
    from ray import serve

    ingress = serve.ingress()(Replica)
    deployment = serve.deployment(name="ReprogramServer", **scale.deployment_options())
    return deployment(ingress).bind(settings)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def serve_on_ray(settings: Settings, scale: Scale) -> None:
    """Deploy on Ray Serve at ``settings.host:port`` and block until SIGTERM or SIGINT, then
    take the application down (and a local Ray instance with it)."""
    ray = require_ray()
    from ray import serve

    warning = state_warning(settings, scale)
    if warning:
        logger.warning(warning)
    how = connect(scale.address, quiet=settings.log_level not in ("info", "debug"))
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(application(settings, scale), name=APP_NAME, route_prefix="/")
        logger.info("%s; serving on http://%s:%d with %s", how, settings.host, settings.port,
                    f"{scale.min_replicas}..{scale.max_replicas} replicas" if scale.autoscaled
                    else f"{scale.replicas} replica(s)")
        _wait_for_signal()
    finally:
        serve.shutdown()
        ray.shutdown()
