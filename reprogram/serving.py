"""``reprogram serve``: host prompts over HTTP in front of any model, local or remote.

It runs the model server's own application (:func:`server.create_app`) on an
:class:`~reprogram.oracles.Oracle` source: with ``--endpoint URL`` an ``HttpOracle`` (the
program is applied here and the black-box API is queried, so a prompt learned against a
third-party API is served from the user's side), with ``--model NAME`` a ``LocalOracle``.
Every ``--prompt`` file is validated against that model and served under its content id at
``/v1/prompts/{id}/predict`` and ``/v2/models/{id}/infer``; the source model is proxied at
``/v2/models/{name}``. When the endpoint fails, clients get 502 (it answered an error or
garbage), 503 (unreachable or unavailable) or 504 (no answer in time) with a one-line error of
ours, never the endpoint's own body; retries in front of an endpoint end within seconds
(:data:`~reprogram.http_transport.SERVE_RETRY`). Example::

    reprogram serve --prompt digits.safetensors --endpoint http://127.0.0.1:8000 --port 8080
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

from reprogram.errors import ConfigError
from reprogram.oracles import Oracle

log = logging.getLogger(__name__)

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def add_serve_parser(sub: Any, model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the ``serve`` sub-command; ``model_args`` adds the shared source-model options."""
    s = sub.add_parser("serve", help="serve prompts over HTTP (V2 + /v1) in front of a model "
                                     "or an API")
    model_args(s)
    s.add_argument("--prompt", action="append", default=[], metavar="FILE",
                   help="prompt artifact to serve (repeatable)")
    s.add_argument("--prompts-dir", default=None,
                   help="folder to store uploaded prompts in and load at startup (default: "
                        "uploads are kept in memory only)")
    s.add_argument("--name", default=None,
                   help="served name of the source model (default: the model's own name)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--max-images", type=int, default=4096, help="images per request")
    s.add_argument("--api-keys-file", default=None,
                   help="keys that clients of this server must present, one 'name:key' per "
                        "line (and/or $REPROGRAM_API_KEYS); default: open")
    s.add_argument("--log-level", choices=LOG_LEVELS, default="info")


def cmd_serve(args: argparse.Namespace, oracle: Oracle) -> int:
    """Serve ``args.prompt`` on ``oracle`` until SIGTERM or Ctrl-C (as ``reprogram-server``)."""
    from server.app import create_app  # submodules: robust to a stale editable install
    from server.gate import load_api_keys
    from server.lifecycle import serve
    from server.settings import OutputKind, Settings

    if not args.prompt and not args.prompts_dir:
        raise ConfigError("expected at least one --prompt FILE (or a --prompts-dir to upload"
                          " to)")
    kind = oracle.info.output_kind.replace("topk-names:", "topk:")  # served as top-k scores
    settings = Settings(served_name=args.name, output=OutputKind.parse(kind),
                        max_images_per_request=args.max_images, prompts_dir=args.prompts_dir,
                        host=args.host, port=args.port, log_level=args.log_level,
                        api_keys=load_api_keys(args.api_keys_file))
    logging.getLogger().setLevel(args.log_level.upper())
    if args.log_level != "debug":  # httpx logs every proxied request at INFO
        logging.getLogger("httpx").setLevel(logging.WARNING)
    app = create_app(settings, oracle=oracle)
    app.state.prompts.allow_unverified = args.allow_unverified_model
    for path in args.prompt:
        servable = app.state.prompts.add_file(path)
        log.info("serving prompt %s as %s (classes %s)", path, servable.prompt_id,
                 ", ".join(servable.class_names))
    log.info("source: %s (%s); listening on http://%s:%d", oracle.info.name,
             getattr(oracle, "url", "local"), args.host, args.port)
    try:
        serve(app, settings)  # graceful SIGTERM: readiness off, in-flight requests finish
    finally:
        close = getattr(oracle, "close", None)
        if callable(close):
            close()
    return 0
