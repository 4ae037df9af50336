"""The CLI's endpoint options: which API an endpoint speaks and what its metadata leaves out.

``add_endpoint_args`` adds them to a sub-command; :func:`http_oracle` turns the parsed
arguments into an :class:`~reprogram.http_oracle.HttpOracle`. Every value is checked here, so a
bad one is a one-line usage error before anything is sent.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from reprogram.apis import EndpointOptions
from reprogram.errors import ConfigError
from reprogram.http_transport import RetryPolicy
from reprogram.wire import parse_wire


def input_size(text: str) -> tuple[int, int]:
    """``H,W`` (or ``HxW``, or one side ``S`` for a square) -> ``(H, W)``."""
    parts = text.replace("x", ",").split(",")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        sides = []
    if len(sides) == 1:
        sides *= 2
    if len(sides) != 2 or min(sides) < 1:
        raise argparse.ArgumentTypeError(f"expected H,W (positive integers), got {text!r}")
    return sides[0], sides[1]


def wire(text: str) -> str:
    try:
        return str(parse_wire(text))
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def read_class_names(path: str) -> tuple[str, ...]:
    """Class names from a file: a JSON list, an ``index_to_name.json`` object (TorchServe's
    ``{"0": name}`` or ``{"0": [id, name]}``), or one name per line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read --class-names {path!r}: {exc}") from None
    try:
        obj: Any = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        try:
            items = sorted(obj.items(), key=lambda kv: int(kv[0]))
        except ValueError:
            raise ConfigError(f"expected integer keys in {path!r}, got {list(obj)[:3]}") from None
        obj = [v[-1] if isinstance(v, list) else v for _, v in items]
    names = [str(n) for n in obj] if isinstance(obj, list) else [
        line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ConfigError(f"expected class names in {path!r}, got none")
    if len(set(names)) != len(names):
        raise ConfigError(f"expected distinct class names in {path!r}, got repeats")
    return tuple(names)


def add_endpoint_args(g: Any) -> None:
    """The options for ``--endpoint`` (an argparse group)."""
    g.add_argument("--protocol", choices=("auto", "v2", "kserve-v1", "torchserve", "labels"),
                   default="auto", help="the endpoint's API (default: auto: probe and say)")
    g.add_argument("--tensor-format", choices=("auto", "json", "binary"), default="auto",
                   help="V2 tensors as binary data or JSON (default: auto: the server's "
                        "extensions, JSON after a failed binary request)")
    g.add_argument("--input-size", type=input_size, default=None, metavar="H,W",
                   help="the model's input size where the endpoint does not say")
    g.add_argument("--layout", choices=("NCHW", "NHWC"), default=None,
                   help="image tensor layout (default: from the input shape, else NCHW)")
    g.add_argument("--class-names", default=None, metavar="FILE",
                   help="source class names (JSON list, index_to_name.json, or one a line)")
    g.add_argument("--max-batch", type=int, default=None,
                   help="images per request (default: the server's cap, else 256)")
    g.add_argument("--max-classes", type=int, default=1000,
                   help="vocabulary slots for an API that answers class names (default 1000)")
    g.add_argument("--max-in-flight", type=int, default=4,
                   help="requests in flight at once (default 4)")
    g.add_argument("--endpoint-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="seconds to wait for one answer from the endpoint (default 60)")
    g.add_argument("--allow-unverified-model", action="store_true",
                   help="use a prompt on an endpoint whose model cannot be shown to be the "
                        "one it was made for")


def endpoint_options(args: argparse.Namespace) -> EndpointOptions:
    names = read_class_names(args.class_names) if args.class_names else None
    return EndpointOptions(protocol=args.protocol, tensor_format=args.tensor_format,
                           input_size=args.input_size, layout=args.layout, class_names=names,
                           max_batch=args.max_batch, output_kind=args.output,
                           max_classes=args.max_classes)


def http_oracle(args: argparse.Namespace, *, budget: int | None = None,
                retry: RetryPolicy | None = None) -> Any:
    """An HttpOracle for ``--endpoint`` and the options above."""
    from reprogram.http_oracle import HttpOracle

    if args.max_in_flight < 1:
        raise ConfigError(f"expected --max-in-flight >= 1, got {args.max_in_flight}")
    timeout = getattr(args, "endpoint_timeout", 60.0)
    if not 0 < timeout <= 3600:
        raise ConfigError(f"expected --endpoint-timeout in (0, 3600] seconds, got {timeout}")
    return HttpOracle(args.endpoint, model=args.endpoint_model,
                      api_key=args.api_key or os.environ.get("REPROGRAM_API_KEY"),
                      wire=args.wire, options=endpoint_options(args), retry=retry,
                      max_in_flight=args.max_in_flight, budget=budget, timeout=timeout,
                      max_requests=args.max_requests)
