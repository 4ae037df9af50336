"""``reprogram-server``: serve a frozen classifier with uvicorn.

Example::

    reprogram-server --model default --host 127.0.0.1 --port 8000 --output probs --max-batch 256

The model is loaded before the port is bound, so a bad ``--model``/``--weights`` ends the
command at once with a one-line error and exit status 2 (as do malformed arguments).

API keys come from ``--api-keys-file`` and/or ``$REPROGRAM_API_KEYS`` (see ``server.gate``);
SIGTERM drains and exits 0 (see ``server.lifecycle``); each request is logged as one JSON line
on stderr unless ``--no-access-log``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from reprogram.errors import ConfigError, ReprogramError
from server import ray_serve
from server.app import create_app, load_sources
from server.gate import ENV_VAR, load_api_keys
from server.lifecycle import serve
from server.settings import LOG_LEVELS, FitJobs, OutputKind, Settings

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
    p.add_argument("--model", default=None,
                   help="'default' (the default), 'torchvision:ARCH' (with --weights), or the"
                        " path of a model folder, model config or TorchScript/ONNX file with its"
                        " config")
    p.add_argument("--model-repository", default=None, metavar="DIR",
                   help="serve every model of DIR: one sub-folder per model with its"
                        " config.json and weights (Triton's layout)")
    p.add_argument("--weights", default=None, help="state-dict file (.safetensors or .pt)")
    p.add_argument("--class-names", default=None, help="JSON list or one class name per line")
    p.add_argument("--name", default=None, help="served model name (default: from --model)")
    p.add_argument(
        "--output", default=str(d.output), help="what to reveal: probs|logits|topk:K|label"
    )
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="images per forward pass")
    p.add_argument("--context-input", action="store_true",
                   help="a vision-language model also takes prompt vectors (input 'context',"
                        " FP32 [M, W]) in place of the template, as BPT-VLM assumes; off by"
                        " default")
    p.add_argument(
        "--max-images", type=int, default=d.max_images_per_request, help="images per request"
    )
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    p.add_argument("--prompts-dir", default=None,
                   help="folder of hosted prompts, created on the first upload (default:"
                        " ./prompts with --state local)")
    p.add_argument("--state", default=d.state, metavar="URL",
                   help="where hosted prompts and usage live: local (default) or"
                        " redis://HOST:PORT/DB, shared by every replica")
    p.add_argument("--max-prompt-bytes", type=int, default=d.max_prompt_bytes,
                   help="size cap of an uploaded prompt file")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--log-level", default=d.log_level, choices=LOG_LEVELS)
    g = p.add_argument_group("security and operations")
    g.add_argument("--api-keys-file", default=None, metavar="FILE",
                   help=f"require an API key: one 'name:key' (or bare key) per line; also"
                        f" ${ENV_VAR} (comma-separated). Default: an open server")
    g.add_argument("--images-per-minute", type=int, default=None, metavar="N",
                   help="rate limit per key (per client address without keys): 429 over it")
    g.add_argument("--quota-images", type=int, default=None, metavar="N",
                   help="total images per key (per client address without keys): 403 after")
    g.add_argument("--max-json-depth", type=int, default=d.max_json_depth,
                   help="deepest nesting of a V2 JSON body")
    g.add_argument("--max-json-elements", type=int, default=d.max_json_elements,
                   help="most values in a V2 JSON body (use binary tensors for more)")
    g.add_argument("--max-request-pixels", type=int, default=d.max_request_pixels, metavar="N",
                   help="decoded pixels of all of a request's images together")
    g.add_argument("--max-response-bytes", type=int, default=d.max_response_bytes,
                   metavar="N", help="size cap of an answer")
    g.add_argument("--body-timeout", type=float, default=d.body_timeout, metavar="S",
                   help="seconds for a request's whole body to arrive (408 after)")
    g.add_argument("--request-timeout", type=float, default=d.request_timeout, metavar="S",
                   help="seconds from a request's headers to its answer (503 after)")
    g.add_argument("--drain-seconds", type=float, default=d.drain_seconds,
                   help="after SIGTERM: seconds with readiness false before the listener closes")
    g.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                   help="after SIGTERM: seconds that requests in flight may take to finish")
    j = p.add_argument_group("tuning jobs (/v1/fits)")
    f = FitJobs()
    j.add_argument("--fit-workers", type=int, default=f.workers, metavar="N",
                   help="tuning jobs run at once, each in its own process (default 0: off)")
    j.add_argument("--jobs-dir", default=None, metavar="DIR",
                   help="where jobs, their data sets and checkpoints live (default: jobs); with"
                        " --state redis:// the jobs live in Redis and DIR is this replica's"
                        " scratch folder (default: a temporary one)")
    j.add_argument("--fit-threads", type=int, default=f.threads, metavar="N",
                   help="torch threads per job worker (default 1)")
    j.add_argument("--fit-max-jobs", type=int, default=f.max_jobs, metavar="N",
                   help="unfinished jobs per key (default 2)")
    j.add_argument("--fit-quota", type=int, default=None, metavar="N",
                   help="training image evaluations per key over all its jobs (default:"
                        " unlimited)")
    j.add_argument("--fit-max-files", type=int, default=f.max_files, metavar="N",
                   help="images per data set (default 20000)")
    j.add_argument("--fit-max-bytes", type=int, default=f.max_bytes, metavar="N",
                   help="uncompressed bytes per data set (default 256 MiB)")
    j.add_argument("--fit-max-pixels", type=int, default=f.max_pixels, metavar="N",
                   help="pixels per data-set image, read from its header (default 1048576)")
    j.add_argument("--allow-prompt-download", action="store_true",
                   help="let a job's owner download the learned artifact")
    g.add_argument("--no-access-log", dest="access_log", action="store_false",
                   help="do not write one JSON line per request to stderr")
    g.add_argument("--no-server-timing", dest="server_timing", action="store_false",
                   help="do not send the Server-Timing header (decode/forward/encode ms) on V2"
                        " inference answers; it shows callers how busy the server is")
    g.add_argument("--no-console", dest="console", action="store_false",
                   help="do not serve the web console at /")
    ray_serve.add_arguments(p)
    return p


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    """Parse arguments into validated :class:`Settings` (``ConfigError`` on bad values)."""
    args = build_parser().parse_args(argv)
    d = Settings()
    if args.model and args.model_repository:
        raise ConfigError("expected --model or --model-repository, got both")
    return Settings(
        model=args.model or d.model,
        model_repository=args.model_repository,
        weights=args.weights,
        class_names_file=args.class_names,
        served_name=args.name,
        output=OutputKind.parse(args.output),
        max_batch=args.max_batch,
        max_images_per_request=args.max_images,
        context_input=args.context_input,
        max_body_bytes=args.max_body_bytes,
        max_image_pixels=args.max_image_pixels,
        prompts_dir=(args.prompts_dir if args.prompts_dir is not None
                     else "prompts" if args.state == "local" else None),
        state=args.state,
        max_prompt_bytes=args.max_prompt_bytes,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        api_keys=load_api_keys(args.api_keys_file),
        images_per_minute=args.images_per_minute,
        quota_images=args.quota_images,
        max_json_depth=args.max_json_depth,
        max_json_elements=args.max_json_elements,
        drain_seconds=args.drain_seconds,
        shutdown_timeout=args.shutdown_timeout,
        access_log=args.access_log,
        server_timing=args.server_timing,
        console=args.console,
        max_request_pixels=args.max_request_pixels,
        max_response_bytes=args.max_response_bytes,
        body_timeout=args.body_timeout,
        request_timeout=args.request_timeout,
        fits=FitJobs(workers=args.fit_workers,
                     directory=(args.jobs_dir if args.jobs_dir is not None
                                else "jobs" if args.state == "local" else None),
                     threads=args.fit_threads, max_jobs=args.fit_max_jobs,
                     quota=args.fit_quota, max_files=args.fit_max_files,
                     max_bytes=args.fit_max_bytes, max_pixels=args.fit_max_pixels,
                     allow_download=args.allow_prompt_download),
    )


def _serve_on_ray(settings: Settings, scale: ray_serve.Scale) -> int:
    try:
        ray_serve.serve_on_ray(settings, scale)
    except ReprogramError as exc:
        sys.stderr.write(f"reprogram-server: error: {exc}\n")
        return 2
    logger.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``reprogram-server`` console script."""
    try:
        settings = parse_settings(argv)
        scale = ray_serve.scale_from(build_parser().parse_args(argv))
        if scale is not None:
            ray_serve.require_ray()
        models = load_sources(settings)
    except ReprogramError as exc:
        sys.stderr.write(f"reprogram-server: error: {exc}\n")
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if scale is not None:  # the replicas load the models themselves
        return _serve_on_ray(settings, scale)
    app = create_app(settings, models=models)
    logger.info("serving %s (output %s) on %s:%d; %s", [n for n, _ in models], settings.output,
                settings.host, settings.port,
                f"{len(settings.api_keys)} API key(s) required" if settings.api_keys
                else "no API keys: open to every client")
    serve(app, settings)
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
