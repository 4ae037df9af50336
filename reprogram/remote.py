"""Tuning jobs from the client's side: ``reprogram fit --on-server`` and ``reprogram jobs``.

The data set is uploaded as the server expects it (:mod:`server.routes_fits`): a folder as a
zip of its files, byte for byte (the server reads exactly what ``reprogram fit --data DIR``
reads), a built-in data set (``digits``, ``squares``) as tensors, in its own order (so the
server's splits are the local ones). The config is the one ``reprogram fit --model`` would
fit, sent whole. Progress is followed by polling the job, drawn with the same progress bar as
a local fit; the result is the hosted prompt's id and metadata, and the artifact itself only
when the server allows downloads.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any

from reprogram.config import FitConfig
from reprogram.data import load_dataset
from reprogram.errors import ConfigError, DataError, UpstreamError
from reprogram.http_transport import Refused, RetryPolicy, Transport

POLL_SECONDS = 0.5
FINAL = ("succeeded", "failed", "cancelled")
BUILTIN = ("digits", "squares")
# a submission is not retried on a server error: a retry could queue the job twice
SUBMIT_RETRY = RetryPolicy(max_retries=0, connect_retries=2)


def transport(args: argparse.Namespace, retry: RetryPolicy | None = None) -> Transport:
    if not args.endpoint:
        raise ConfigError("expected --endpoint URL (the server that runs the job)")
    return Transport(args.endpoint, api_key=args.api_key or os.environ.get("REPROGRAM_API_KEY"),
                     timeout=getattr(args, "endpoint_timeout", None) or 120.0, retry=retry)


def zip_folder(root: Path) -> bytes:
    """The files of an ImageFolder, as a zip (hidden files left out, as the loader does)."""
    if not root.is_dir():
        raise DataError(f"expected 'digits', 'squares' or an existing folder, got {str(root)!r}")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if path.is_file() and not any(p.startswith(".") for p in rel.parts):
                archive.write(path, rel.as_posix())
    return buffer.getvalue()


def submission(data_spec: str, cfg: FitConfig) -> dict[str, Any]:
    """The ``httpx`` arguments of ``POST /v1/fits`` for a data set and config."""
    config = {k: v for k, v in cfg.to_dict().items() if k != "checkpoint"}
    if data_spec in BUILTIN:
        data = load_dataset(data_spec, seed=cfg.seed)
        images = {"name": "images", "datatype": "UINT8", "shape": list(data.images.shape),
                  "data": data.images.flatten().tolist()}
        return {"json": {"config": config, "images": images, "labels": data.labels.tolist(),
                         "class_names": list(data.class_names)}}
    archive = zip_folder(Path(data_spec))
    return {"files": {"data": ("data.zip", archive, "application/zip")},
            "data": {"config": json.dumps(config)}}


def submit(client: Transport, data_spec: str, cfg: FitConfig) -> dict[str, Any]:
    job: dict[str, Any] = client.json("POST", "/v1/fits", "the queued job",
                                      **submission(data_spec, cfg))
    return job


def follow(client: Transport, job_id: str, bar: Any = None) -> dict[str, Any]:
    """Poll the job until it ends, updating ``bar`` (a tqdm) with its image evaluations."""
    while True:
        job: dict[str, Any] = client.json("GET", f"/v1/fits/{job_id}", "the job")
        if bar is not None:
            progress = job.get("progress") or {}
            if bar.total is None and progress.get("budget"):
                bar.total = progress["budget"]
            bar.update(max(0, int(progress.get("images") or 0) - bar.n))
            val = job.get("val_accuracy")
            bar.set_postfix({"state": job["state"],
                             "best_val": "-" if val is None else f"{val:.3f}"}, refresh=False)
        if job["state"] in FINAL:
            return job
        time.sleep(POLL_SECONDS)


def download(client: Transport, job_id: str, out: Path) -> bool:
    """Save the job's artifact at ``out``; False when the server keeps it (403)."""
    from reprogram.fsutil import write_atomic

    try:
        response = client.request("GET", f"/v1/fits/{job_id}/prompt")
    except Refused as exc:
        if exc.status == 403:
            return False
        raise
    write_atomic(out, response.content)
    return True


def summary(job: dict[str, Any], out: Path | None) -> dict[str, Any]:
    result = job.get("result") or {}
    return {"job": job["id"], "state": job["state"], "prompt_id": job.get("prompt"),
            "prompt": None if out is None else str(out),
            "val_accuracy": result.get("val_accuracy"),
            "test_accuracy": result.get("test_accuracy"),
            "queries": {"images": result.get("images")}, "steps": result.get("steps"),
            "error": job.get("error")}


def view_line(job: dict[str, Any]) -> dict[str, Any]:
    """What ``reprogram jobs list`` prints per job."""
    progress = job.get("progress") or {}
    return {"id": job["id"], "state": job["state"], "images": progress.get("images"),
            "budget": progress.get("budget"), "val_accuracy": job.get("val_accuracy"),
            "prompt": job.get("prompt"), "error": job.get("error")}


def cmd_jobs(args: argparse.Namespace) -> int:
    """``reprogram jobs list|show|cancel``."""
    client = transport(args)
    try:
        if args.action == "list":
            listing = client.json("GET", "/v1/fits", "the job list")
            for job in listing.get("fits", []):
                print(json.dumps(view_line(job)))
            return 0
        if not args.job:
            raise ConfigError(f"expected a job id: reprogram jobs {args.action} JOB")
        if args.action == "show":
            print(json.dumps(client.json("GET", f"/v1/fits/{args.job}", "the job"), indent=2))
        else:
            job = client.json("DELETE", f"/v1/fits/{args.job}", "the cancelled job")
            print(json.dumps(view_line(job)))
        return 0
    finally:
        client.close()


def add_jobs_parser(sub: Any, model_args: Any) -> None:
    j = sub.add_parser("jobs", help="list, show or cancel tuning jobs on a server")
    j.add_argument("action", choices=("list", "show", "cancel"))
    j.add_argument("job", nargs="?", default=None, help="job id (show, cancel)")
    j.add_argument("--endpoint", required=True, help="URL of the reprogram server")
    j.add_argument("--api-key", default=None, help="API key (default: $REPROGRAM_API_KEY)")


def fit_on_server(args: argparse.Namespace, cfg: FitConfig, progress: Any) -> dict[str, Any]:
    """``reprogram fit --endpoint URL --on-server``: submit, follow, report."""
    out = Path(args.out)
    client = transport(args, SUBMIT_RETRY)
    try:
        job = submit(client, args.data, cfg)
        client.retry = RetryPolicy()  # polling is safe to retry
        bar = progress(cfg.budget)
        try:
            job = follow(client, job["id"], bar)
        finally:
            bar.close()
        if job["state"] != "succeeded":
            raise UpstreamError(f"tuning job {job['id']} {job['state']}"
                                + (f": {job['error']}" if job.get("error") else ""))
        saved = download(client, job["id"], out)
        return summary(job, out if saved else None)
    finally:
        client.close()
