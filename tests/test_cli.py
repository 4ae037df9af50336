"""The ``reprogram`` CLI: every bad argument or bad input is one line on stderr and a non-zero
exit (never a traceback); the happy path fits, evaluates, applies and inspects a prompt.

Most paths run ``cli.main([...])`` in-process (fast); a few run the real console script, where
stray log lines and tracebacks would also show.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import free_port
from PIL import Image
from prompt_support import cli_command, random_prompt

from reprogram import cli
from reprogram.artifact import load_prompt
from reprogram.data import load_digits
from reprogram.errors import OracleError
from reprogram.http_oracle import HttpOracle, RetryPolicy

FIT_BUDGET = 3000


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``reprogram ARGV`` in-process: (exit status, stdout, stderr)."""
    try:
        rc = cli.main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, match: str = "") -> None:
    assert rc != 0, f"expected a non-zero exit, stderr: {err!r}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "error" in lines[0]
    assert re.search(match, lines[0]), f"{match!r} not in {lines[0]!r}"


def _png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path, format="PNG")
    return path


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Files and folders for the bad paths (good and bad data, good and bad prompts)."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)

    def image() -> np.ndarray:
        return rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)

    (root / "one" / "a").mkdir(parents=True)
    for i in range(4):
        _png(root / "one" / "a" / f"{i}.png", image())
    for c in ("a", "b"):
        (root / "corrupt" / c).mkdir(parents=True)
        for i in range(3):
            _png(root / "corrupt" / c / f"{i}.png", image())
    (root / "corrupt" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (root / "junk.bin").write_bytes(b"this is neither an image nor a state dict")
    (root / "garbage.safetensors").write_bytes(b"\x07" * 64)
    valid = random_prompt()
    (root / "valid.safetensors").write_bytes(valid)
    (root / "truncated.safetensors").write_bytes(valid[: len(valid) // 2])
    (root / "five-classes.safetensors").write_bytes(random_prompt(num_source=5))
    (root / "frame64.safetensors").write_bytes(random_prompt(frame=(64, 64)))
    (root / "other-weights.safetensors").write_bytes(random_prompt(weights_sha256="ab" * 32))
    _png(root / "digit.png", image())
    return {
        "root": str(root), "missing": str(root / "no-such-folder"),
        "one_class": str(root / "one"), "corrupt_data": str(root / "corrupt"),
        "junk": str(root / "junk.bin"), "png": str(root / "digit.png"),
        "missing_prompt": str(root / "missing.safetensors"),
        "garbage_prompt": str(root / "garbage.safetensors"),
        "truncated_prompt": str(root / "truncated.safetensors"),
        "valid_prompt": str(root / "valid.safetensors"),
        "five_classes": str(root / "five-classes.safetensors"),
        "frame64": str(root / "frame64.safetensors"),
        "other_weights": str(root / "other-weights.safetensors"),
    }


FIT = ("fit", "--data", "digits", "--budget", str(FIT_BUDGET), "--no-progress")

BAD = {
    "unknown subcommand": (("frobnicate",), "invalid choice"),
    "missing --data": (("fit", "--budget", "3000"), "--data"),
    "missing budget": (("fit", "--data", "digits"), "budget"),
    "negative lr": ((*FIT, "--lr", "-0.1"), "lr > 0"),
    "infinite lr": ((*FIT, "--lr", "inf"), "finite lr"),
    "bad --output": ((*FIT, "--output", "everything"), "output kind"),
    "model and endpoint": ((*FIT, "--model", "default", "--endpoint", "http://127.0.0.1:9"),
                           "got both"),
    "unknown model": ((*FIT, "--model", "resnet9000"), "got 'resnet9000' .no such file."),
    "junk torchvision weights": ((*FIT, "--model", "torchvision:resnet18", "--weights",
                                  "{junk}"), "cannot read weights"),
    "missing data folder": (("fit", "--data", "{missing}", "--budget", "3000"),
                            "existing folder"),
    "one class": (("fit", "--data", "{one_class}", "--budget", "3000"), "at least 2 class"),
    "corrupt image": (("fit", "--data", "{corrupt_data}", "--budget", "3000"),
                      "cannot read image .*broken.png"),
    "--out in missing folder": ((*FIT, "--out", "{missing}/p.safetensors"),
                                "existing folder for --out"),
    "--out is a folder": ((*FIT, "--out", "{root}"), "file path for --out"),
    "budget below one step": (("fit", "--data", "digits", "--budget", "100"),
                              "budget of at least"),
    "inner size 0": ((*FIT, "--inner-size", "0"), "inner_size >= 1"),
    "bad split fractions": ((*FIT, "--val-fraction", "1.5"), "fractions"),
    "autograd on labels": ((*FIT, "--output", "label", "--estimator", "autograd"),
                           "differentiable"),
    "junk checkpoint": ((*FIT, "--out", "{root}/x.safetensors", "--checkpoint", "{junk}",
                         "--resume"), "cannot read checkpoint"),
    "eval missing prompt": (("eval", "--prompt", "{missing_prompt}", "--data", "digits"),
                            "no such file"),
    "apply missing prompt": (("apply", "--prompt", "{missing_prompt}", "{png}"),
                             "no such file"),
    "inspect missing prompt": (("inspect", "{missing_prompt}"), "no such file"),
    "eval corrupt prompt": (("eval", "--prompt", "{garbage_prompt}", "--data", "digits"),
                            "truncated or foreign"),
    "apply corrupt prompt": (("apply", "--prompt", "{garbage_prompt}", "{png}"),
                             "truncated or foreign"),
    "inspect corrupt prompt": (("inspect", "{garbage_prompt}"), "truncated or foreign"),
    "inspect truncated prompt": (("inspect", "{truncated_prompt}"), "prompt"),
    "eval prompt for 5 classes": (("eval", "--prompt", "{five_classes}", "--data", "digits"),
                                  "5 source classes"),
    "apply prompt for 5 classes": (("apply", "--prompt", "{five_classes}", "{png}"),
                                   "5 source classes"),
    "apply prompt for 64px": (("apply", "--prompt", "{frame64}", "{png}"), r"\[64, 64\]"),
    "eval prompt for other weights": (("eval", "--prompt", "{other_weights}", "--data",
                                       "digits"), "model weights abab"),
    "eval other classes": (("eval", "--prompt", "{valid_prompt}", "--data", "squares"),
                           "expected classes"),
    "apply unreadable image": (("apply", "--prompt", "{valid_prompt}", "{junk}"),
                               "cannot read image"),
    "apply missing image": (("apply", "--prompt", "{valid_prompt}", "{missing}.png"),
                            "cannot read image"),
    "apply top-k 0": (("apply", "--prompt", "{valid_prompt}", "--top-k", "0", "{png}"),
                      "top-k >= 1"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_and_data_give_one_line_and_nonzero_exit(
        capsys: pytest.CaptureFixture[str], paths: dict[str, str], case: str,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default --out is ./prompt.safetensors
    argv, match = BAD[case]
    rc, out, err = run(capsys, *(a.format(**paths) for a in argv))
    assert_one_line_error(rc, err, match)
    assert out == ""
    assert list(tmp_path.iterdir()) == []  # nothing written


def _script(*argv: str, cwd: Path | None = None,
            timeout: float = 60.0) -> tuple[int, str, str, float]:
    t0 = time.monotonic()
    proc = subprocess.run([*cli_command(), *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, check=False)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0


def test_console_script_errors_are_one_line(paths: dict[str, str]) -> None:
    rc, _, err, _ = _script("frobnicate")
    assert rc == 2
    assert_one_line_error(rc, err, "invalid choice")
    rc, out, err, _ = _script("inspect", paths["garbage_prompt"])
    assert rc == 1 and out == ""
    assert_one_line_error(rc, err, "truncated or foreign")


def test_unreachable_endpoint_fails_fast_with_a_clear_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    rc, out, err, seconds = _script("fit", "--endpoint", url, "--data", "digits", "--budget",
                                    str(FIT_BUDGET), "--no-progress", cwd=tmp_path)
    assert_one_line_error(rc, err, f"Connect.*is a server running at {url}")
    assert out == ""
    # side by side with a command that starts the same interpreter and imports, then fails at
    # once: the unreachable endpoint costs only the bounded connect retries on top (<= 2 s)
    rc, _, _, baseline = _script("fit", "--data", "digits", "--budget", "-1", cwd=tmp_path)
    assert rc != 0
    assert seconds < baseline + 15, (seconds, baseline)


def test_default_retry_policy_bounds_the_wait_for_a_server_that_never_answered() -> None:
    policy = RetryPolicy()
    worst = sum(min(policy.cap, policy.base * 2.0**a) for a in range(policy.connect_retries))
    assert policy.connect_retries <= policy.max_retries and worst <= 2.0
    t0 = time.monotonic()
    with pytest.raises(OracleError, match=f"after {policy.connect_retries + 1} attempts"):
        HttpOracle(f"http://127.0.0.1:{free_port()}")
    assert time.monotonic() - t0 < worst + 5


# ----------------------------------------------------------------------------- happy path
@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """``reprogram fit`` (autograd, tiny budget) in-process: its summary and artifact path."""
    out = tmp_path_factory.mktemp("fit") / "digits.safetensors"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli.main([*FIT, "--estimator", "autograd", "--seed", "0", "--out", str(out)])
    assert rc == 0, stderr.getvalue()
    summary: dict[str, Any] = json.loads(stdout.getvalue())
    return summary, out


@pytest.mark.slow
def test_fit_eval_apply_inspect_end_to_end(capsys: pytest.CaptureFixture[str],
                                           fitted: tuple[dict[str, Any], Path],
                                           tmp_path: Path) -> None:
    summary, out = fitted
    # fit: the artifact, a real PNG learning curve and the checkpoint
    assert summary["prompt"] == str(out) and out.is_file()
    assert summary["queries"]["images"] <= FIT_BUDGET and summary["steps"] >= 1
    curve = out.with_suffix(".curve.png")
    assert summary["learning_curve"] == str(curve)
    with Image.open(curve) as img:
        assert img.format == "PNG" and img.width > 100
    ckpt = out.with_suffix(".ckpt")
    assert ckpt.is_file() and torch.load(ckpt, weights_only=True)["step"] == summary["steps"]
    prompt = load_prompt(out)
    assert summary["test_accuracy"] == round(prompt.metrics["test_accuracy"], 4)

    # eval: the same test split, the same accuracy
    rc, stdout, err = run(capsys, "eval", "--prompt", str(out), "--data", "digits")
    assert rc == 0, err
    ev = json.loads(stdout)
    assert ev["split"] == "test" and ev["images"] == prompt.metrics["splits"]["test"]
    assert ev["accuracy"] == pytest.approx(summary["test_accuracy"], abs=5e-5)
    assert ev["accuracy"] == round(prompt.metrics["test_accuracy"], 6)
    assert ev["accuracy"] > 0.2  # learned something even on this tiny budget

    # apply: one JSON line per image, labels among the target classes
    digits = load_digits()
    files = [str(_png(tmp_path / f"d{i}.png", digits.images[i, 0].numpy())) for i in range(3)]
    rc, stdout, err = run(capsys, "apply", "--prompt", str(out), *files)
    assert rc == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 3
    for path, line in zip(files, lines, strict=True):
        pred = json.loads(line)
        assert pred["image"] == path and pred["label"] in prompt.target_classes
        scores = [t["score"] for t in pred["top"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert pred["top"][0]["label"] == pred["label"]

    # inspect: metadata on stdout, a PNG picture of the program
    picture = tmp_path / "program.png"
    rc, stdout, err = run(capsys, "inspect", str(out), "--png", str(picture))
    assert rc == 0, err
    meta = json.loads(stdout)
    assert meta["program"]["kind"] == "expand" and meta["target_classes"] == list(
        prompt.target_classes)
    with Image.open(picture) as img:
        assert img.format == "PNG"


@pytest.mark.slow
def test_resume_with_other_options_is_refused(capsys: pytest.CaptureFixture[str],
                                              fitted: tuple[dict[str, Any], Path],
                                              tmp_path: Path) -> None:
    _, out = fitted
    ckpt = tmp_path / "copy.ckpt"
    shutil.copyfile(out.with_suffix(".ckpt"), ckpt)
    rc, stdout, err = run(capsys, *FIT, "--estimator", "autograd", "--seed", "0", "--lr", "0.2",
                          "--out", str(tmp_path / "p.safetensors"), "--checkpoint", str(ckpt),
                          "--resume")
    assert_one_line_error(rc, err, r"other settings \(lr\)")
    assert stdout == "" and not (tmp_path / "p.safetensors").exists()

