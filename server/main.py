"""``reprogram-server``: serve a frozen classifier with uvicorn.

Example::

    reprogram-server --model default --host 127.0.0.1 --port 8000 --output probs --max-batch 256

The model is loaded before the port is bound, so a bad ``--model``/``--weights`` ends the
command at once with a one-line error and exit status 2 (as do malformed arguments).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from reprogram.errors import ReprogramError
from server.app import create_app, load_source
from server.settings import LOG_LEVELS, OutputKind, Settings

logger = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``reprogram-server``."""
    d = Settings()
    p = _Parser(
        prog="reprogram-server",
        description="Serve a frozen image classifier over KServe V2 and /v1 with uvicorn.",
    )
    p.add_argument("--model", default=d.model, help="'default' or 'torchvision:ARCH'")
    p.add_argument("--weights", default=None, help="state-dict file (.safetensors or .pt)")
    p.add_argument("--class-names", default=None, help="JSON list or one class name per line")
    p.add_argument("--name", default=None, help="served model name (default: from --model)")
    p.add_argument(
        "--output", default=str(d.output), help="what to reveal: probs|logits|topk:K|label"
    )
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="images per forward pass")
    p.add_argument(
        "--max-images", type=int, default=d.max_images_per_request, help="images per request"
    )
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    p.add_argument("--prompts-dir", default="prompts",
                   help="folder of hosted prompts, created on the first upload (default:"
                        " ./prompts)")
    p.add_argument("--max-prompt-bytes", type=int, default=d.max_prompt_bytes,
                   help="size cap of an uploaded prompt file")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--log-level", default=d.log_level, choices=LOG_LEVELS)
    return p


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    """Parse arguments into validated :class:`Settings` (``ConfigError`` on bad values)."""
    args = build_parser().parse_args(argv)
    return Settings(
        model=args.model,
        weights=args.weights,
        class_names_file=args.class_names,
        served_name=args.name,
        output=OutputKind.parse(args.output),
        max_batch=args.max_batch,
        max_images_per_request=args.max_images,
        max_body_bytes=args.max_body_bytes,
        max_image_pixels=args.max_image_pixels,
        prompts_dir=args.prompts_dir,
        max_prompt_bytes=args.max_prompt_bytes,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``reprogram-server`` console script."""
    try:
        settings = parse_settings(argv)
        model = load_source(settings)
    except ReprogramError as exc:
        sys.stderr.write(f"reprogram-server: error: {exc}\n")
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    app = create_app(settings, model=model)
    logger.info("serving %s (output %s) on %s:%d", model.meta.name, settings.output,
                settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
