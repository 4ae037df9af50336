"""Entry points for Ray's own CLI: ``serve run`` / ``serve deploy`` of the reprogram app.

``serve run server.ray_app:app`` builds the application from ``$REPROGRAM_SERVER_ARGS``
(``reprogram-server`` flags, e.g. ``"--model default --output topk:3 --replicas 2"``);
``serve run deploy/ray-serve.yaml`` (or ``serve run server.ray_app:build args="..."``) passes
the same flags as the builder's ``args``. Serve's own config sets the host and port
(``http_options``); ``--host``/``--port`` are ignored here.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from server.main import build_parser, parse_settings
from server.ray_serve import Scale, application, scale_from, state_warning

ENV_VAR = "REPROGRAM_SERVER_ARGS"


def build(args: dict[str, Any]) -> Any:
    """Application builder: ``args["args"]`` holds ``reprogram-server`` flags in one string."""
    argv = shlex.split(str(args.get("args", "")))
    settings = parse_settings(argv)
    scale = scale_from(build_parser().parse_args([*argv, "--ray"])) or Scale()
    warning = state_warning(settings, scale)
    if warning:
        print(f"warning: {warning}")  # serve run's console
    return application(settings, scale)


def __getattr__(name: str) -> Any:
    """``app``: built on first use from ``$REPROGRAM_SERVER_ARGS``."""
    if name == "app":
        return build({"args": os.environ.get(ENV_VAR, "")})
    raise AttributeError(name)
