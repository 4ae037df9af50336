"""One tuning job, run in its own process: the library's fit loop on the served model.

:func:`run_job` is the target of a spawned process. It dies with the server (Linux's
parent-death signal, and a watchdog thread elsewhere), holds the job folder's lock so that no
two workers ever write one job (a restarted server's worker waits for an orphan's exit), and
resumes from ``checkpoint.pt`` when one exists, so a job killed at any point ends with the
parameters of an uninterrupted one. It reports progress in ``progress.json`` (at most every
:data:`REPORT_SECONDS` and at each validation), stops at the first step after the ``cancel``
flag appears, and on success writes ``prompt.safetensors`` then ``result.json``; on failure,
``result.json`` holds the error in words. The exit code says which: 0 done, 1 failed,
:data:`EXIT_CANCELLED` cancelled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

EXIT_CANCELLED = 3
REPORT_SECONDS = 0.5
CURVE_POINTS = 500  # validation points kept in progress.json

logger = logging.getLogger(__name__)


class Cancelled(Exception):
    """The job's ``cancel`` flag was set."""


def _die_with_parent() -> None:
    parent = os.getppid()
    try:  # Linux: the kernel kills us when the server process dies, even by SIGKILL
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(EXIT_CANCELLED)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    from reprogram.fsutil import write_atomic

    write_atomic(path, json.dumps(obj).encode("utf-8"))


class _Reporter:
    """The fit's callback: progress to ``progress.json``, and the cancel check."""

    def __init__(self, folder: Path) -> None:
        from server.jobs.store import CANCEL, PROGRESS

        self.path = folder / PROGRESS
        self.cancel = folder / CANCEL
        old: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            old = json.loads(self.path.read_text(encoding="utf-8"))
        self.curve: list[dict[str, Any]] = list(old.get("curve", []))
        self.last = 0.0

    def __call__(self, row: dict[str, Any]) -> None:
        if self.cancel.exists():
            raise Cancelled
        evaluated = row.get("val_accuracy") is not None
        if evaluated:
            self.curve = [p for p in self.curve if p["step"] < row["step"]]  # after a resume
            self.curve.append({"step": row["step"], "images": row["queries"],
                               "val_accuracy": row["val_accuracy"]})
            self.curve = self.curve[-CURVE_POINTS:]
        now = time.monotonic()
        if evaluated or now - self.last >= REPORT_SECONDS:
            self.last = now
            _write_json(self.path, {
                "step": row["step"], "steps": row.get("total_steps"), "images": row["queries"],
                "budget": row.get("budget"), "loss": row.get("loss"),
                "best_val_accuracy": row.get("best_val_accuracy"), "curve": self.curve,
                "updated": time.time()})


def _dataset(folder: Path) -> Any:
    import torch

    from reprogram.data import TargetDataset, load_folder
    from server.jobs.store import DATA_DIR, DATA_TENSORS

    if (folder / DATA_TENSORS).exists():
        saved = torch.load(str(folder / DATA_TENSORS), weights_only=True)
        return TargetDataset(saved["images"], saved["labels"], tuple(saved["class_names"]),
                             "tensors")
    return load_folder(folder / DATA_DIR)


def _fit(folder: Path, source: dict[str, Any]) -> dict[str, Any]:
    from reprogram.artifact import save_prompt
    from reprogram.config import FitConfig
    from reprogram.fit import fit
    from reprogram.oracles import LocalOracle
    from reprogram.zoo.registry import load_model
    from server.jobs.store import CHECKPOINT, PROMPT, RECORD

    record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    checkpoint = folder / CHECKPOINT
    cfg = FitConfig.from_dict({**record["config"], "checkpoint": str(checkpoint)})
    model = load_model(source["model"], source.get("weights"), source.get("class_names"))
    oracle = LocalOracle(model, output="probs", wire="uint8")  # what `reprogram fit --model` uses
    result = fit(cfg, oracle, _dataset(folder), resume=checkpoint.is_file(),
                 callback=_Reporter(folder))
    save_prompt(result.prompt, folder / PROMPT)
    return {"val_accuracy": result.best_val_accuracy, "test_accuracy": result.test_accuracy,
            "images": result.queries["images"], "steps": result.steps,
            "stopped": result.stop_reason, "seconds": round(result.seconds, 2)}


def run_job(folder: str, source: dict[str, Any], threads: int) -> None:
    """Process target: run the job in ``folder`` on the model ``source`` names."""
    _die_with_parent()
    import fcntl

    import torch

    from reprogram.errors import ReprogramError
    from server.jobs.store import RESULT

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(max(1, threads))
    path = Path(folder)
    with open(path / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # an orphaned worker of this job exits first
        try:
            summary = _fit(path, source)
        except Cancelled:
            sys.exit(EXIT_CANCELLED)
        except ReprogramError as exc:
            _write_json(path / RESULT, {"error": str(exc)})
            sys.exit(1)
        except Exception as exc:  # reported in words; the traceback goes to the server log
            logger.exception("tuning job %s failed", path.name)
            _write_json(path / RESULT, {"error": f"internal error ({type(exc).__name__}: {exc})"})
            sys.exit(1)
        _write_json(path / RESULT, summary)
