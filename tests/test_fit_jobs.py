"""Tuning jobs end to end: real ``reprogram-server`` processes with ``--fit-workers 1``."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jobs_support import (
    auth,
    digits_folder,
    jobs_server,
    keys_file,
    max_diff,
    prompt_tensors,
    submit,
    wait_for,
    zip_of,
)
from prompt_support import ServerProcess, cli_command, model_server, run_cli

from reprogram.data import load_folder
from reprogram.fit import fit
from reprogram.oracles import LocalOracle
from reprogram.remote import zip_folder
from reprogram.zoo.registry import load_model
from server.jobs.service import job_config


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_folder(tmp_path_factory.mktemp("digits-folder") / "digits")


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A server with two API keys, jobs and prompt downloads allowed."""
    root = tmp_path_factory.mktemp("jobs-keyed")
    server = jobs_server(root / "jobs", "--allow-prompt-download", keys_file=keys_file(root))
    url = server.start()
    yield url, root
    server.stop()


def _local_fit(config: dict[str, Any], folder: Path) -> Any:
    """The uninterrupted local white-box fit of a job's config (what `reprogram fit --model
    default --data DIR` runs)."""
    cfg = job_config(config)
    return fit(cfg, LocalOracle(load_model(), output="probs", wire="uint8"), load_folder(folder))


def test_a_zipped_folder_job_equals_the_local_fit_and_its_hosted_prompt_predicts_alike(
        keyed: tuple[str, Path], digits_dir: Path, tmp_path: Path) -> None:
    url, _ = keyed
    common = ("--data", str(digits_dir), "--budget", "3000", "--seed", "0", "--no-progress")
    job = run_cli("fit", "--endpoint", url, "--on-server", "--api-key", "alice-secret-key",
                  *common, "--out", str(tmp_path / "job.safetensors"), timeout=300)
    local = run_cli("fit", "--model", "default", *common, "--out", str(tmp_path / "local.st"))
    assert job["state"] == "succeeded" and job["prompt_id"]
    assert max_diff(prompt_tensors(tmp_path / "job.safetensors"),
                    prompt_tensors(tmp_path / "local.st")) < 1e-5
    assert job["test_accuracy"] == pytest.approx(local["test_accuracy"], abs=1e-4)
    assert job["val_accuracy"] == pytest.approx(local["val_accuracy"], abs=1e-4)
    assert job["queries"]["images"] == local["queries"]["images"]

    images = sorted(digits_dir.rglob("*.png"))[::200]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in images]
    hosted = httpx.post(f"{url}/v1/prompts/{job['prompt_id']}/predict", files=files,
                        headers=auth("alice"), timeout=60)
    assert hosted.status_code == 200, hosted.text
    applied = _apply(tmp_path / "local.st", images)
    assert [p["label"] for p in hosted.json()["predictions"]] == applied

    # another key sees neither the job nor its prompt, and cannot cancel it
    bob = auth("bob")
    assert httpx.get(f"{url}/v1/fits/{job['job']}", headers=bob).status_code == 404
    assert httpx.delete(f"{url}/v1/fits/{job['job']}", headers=bob).status_code == 404
    assert httpx.get(f"{url}/v1/fits", headers=bob).json() == {"fits": []}
    assert httpx.get(f"{url}/v1/prompts/{job['prompt_id']}", headers=bob).status_code == 404
    mine = httpx.get(f"{url}/v1/fits", headers=auth("alice")).json()["fits"]
    assert [j["id"] for j in mine] == [job["job"]] and mine[0]["curve"]


def _apply(prompt: Path, images: list[Path]) -> list[str]:
    import subprocess

    proc = subprocess.run([*cli_command(), "apply", "--model", "default", "--prompt",
                           str(prompt), *map(str, images)], capture_output=True, text=True,
                          timeout=120, check=True)
    return [json.loads(line)["label"] for line in proc.stdout.splitlines()]


def test_a_job_survives_sigkill_of_the_server_and_ends_as_an_uninterrupted_fit(
        tmp_path: Path, digits_dir: Path) -> None:
    config = {"budget": 9000, "checkpoint_every": 10, "eval_every": 20, "seed": 1}
    server = jobs_server(tmp_path / "jobs", "--allow-prompt-download")
    url = server.start()
    try:
        response = submit(url, config, zip_folder(digits_dir))
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        wait_for(url, job_id, lambda j: j["state"] == "running" and j["progress"]["step"] >= 35)
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=10)
        _wait_worker_gone(tmp_path / "jobs" / job_id / "lock")
        url = server.start()
        done = wait_for(url, job_id, lambda j: j["state"] in ("succeeded", "failed"))
        assert done["state"] == "succeeded", done["error"]
        assert done["attempts"] == 2
        served = httpx.get(f"{url}/v1/fits/{job_id}/prompt", timeout=30)
        assert served.status_code == 200
        (tmp_path / "job.st").write_bytes(served.content)
    finally:
        server.stop()
    whole = _local_fit(config, digits_dir)
    assert max_diff(prompt_tensors(tmp_path / "job.st"), dict(whole.prompt.tensors)) < 1e-5
    assert done["result"]["test_accuracy"] == pytest.approx(whole.test_accuracy, abs=1e-6)


def _wait_worker_gone(lock: Path, timeout: float = 15.0) -> None:
    """The killed server's worker dies with it: the job's lock comes free."""
    deadline = time.monotonic() + timeout
    with open(lock, "w") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                assert time.monotonic() < deadline, "the worker outlived the killed server"
                time.sleep(0.1)
                continue
            fcntl.flock(handle, fcntl.LOCK_UN)
            return


def test_cancel_stops_a_running_job_and_hosts_nothing(keyed: tuple[str, Path],
                                                       digits_dir: Path) -> None:
    url, _ = keyed
    alice = auth("alice")
    before = httpx.get(f"{url}/v1/prompts", headers=alice).json()["prompts"]
    response = submit(url, {"budget": 200_000}, zip_folder(digits_dir), alice)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/fits/{response.json()['id']}"
    job_id = response.json()["id"]
    wait_for(url, job_id, lambda j: j["progress"]["step"] >= 3, alice)
    assert httpx.delete(f"{url}/v1/fits/{job_id}", headers=alice).status_code == 200
    done = wait_for(url, job_id, lambda j: j["state"] == "cancelled", alice, timeout=30)
    assert 0 < done["progress"]["images"] < 200_000 and done["prompt"] is None
    again = httpx.delete(f"{url}/v1/fits/{job_id}", headers=alice)
    assert again.status_code == 409 and "cancelled" in again.json()["error"]
    assert httpx.get(f"{url}/v1/prompts", headers=alice).json()["prompts"] == before


def test_events_stream_the_job_until_it_ends(keyed: tuple[str, Path]) -> None:
    url, _ = keyed
    alice = auth("alice")
    archive = zip_of({f"{c}/{i}.png": _png(c, i) for c in "ab" for i in range(12)})
    response = submit(url, {"epochs": 3, "batch_size": 4}, archive, alice)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    events: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream("GET", f"{url}/v1/fits/{job_id}/events", headers=alice,
                      timeout=120) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: ") and kind:
                events.append((kind, json.loads(line[len("data: "):])))
    assert events[-1] == ("end", {"state": "succeeded"})
    states = [e["state"] for k, e in events if k == "job"]
    assert states[-1] == "succeeded" and len(states) >= 2
    images = [e["progress"]["images"] for k, e in events if k == "job"]
    assert images == sorted(images)


def _png(c: str, i: int) -> bytes:
    from jobs_support import png_bytes

    return png_bytes(side=8, value=(30 if c == "a" else 200) + i)


def test_limits_per_key_and_a_server_without_jobs(tmp_path: Path) -> None:
    off = model_server()
    url = off.start()
    try:
        refused = submit(url, {"budget": 100}, zip_of({"a/1.png": _png("a", 1)}))
        assert refused.status_code == 403 and "--fit-workers" in refused.json()["error"]
    finally:
        off.stop()
    server = jobs_server(tmp_path / "jobs", "--fit-max-jobs", "1", "--fit-quota", "250000")
    url = server.start()
    try:
        archive = zip_of({f"{c}/{i}.png": _png(c, i) for c in "ab" for i in range(8)})
        first = submit(url, {"budget": 200_000}, archive)
        assert first.status_code == 202, first.text
        second = submit(url, {"budget": 1000}, archive)
        assert second.status_code == 429 and "--fit-max-jobs" in second.json()["error"]
        httpx.delete(f"{url}/v1/fits/{first.json()['id']}")
        wait_for(url, first.json()["id"], lambda j: j["state"] == "cancelled")
        over = submit(url, {"budget": 260_000}, archive)
        assert over.status_code == 403 and "fit quota of 250000" in over.json()["error"]
        unmetered = submit(url, {"epochs": 1}, archive)
        assert unmetered.status_code == 422 and "budget" in unmetered.json()["error"]
        vpt = submit(url, {"budget": 100, "program": "vpt-deep"}, archive)
        assert vpt.status_code == 422 and "ViT" in vpt.json()["error"]
        path = submit(url, {"budget": 100, "surrogate": "/etc/passwd"}, archive)
        assert path.status_code == 422 and "zoo" in path.json()["error"]
        bad = submit(url, {"budget": 100, "lr": "fast"}, archive)
        assert bad.status_code == 422 and "lr" in bad.json()["error"]
    finally:
        server.stop()


def test_a_vpt_deep_job_on_shapes_vit_runs_end_to_end(tmp_path: Path) -> None:
    server = jobs_server(tmp_path / "jobs", "--model", "shapes-vit")
    url = server.start()
    try:
        summary = run_cli("fit", "--endpoint", url, "--on-server", "--data", "digits",
                          "--program", "vpt-deep", "--tokens", "10", "--budget", "3000",
                          "--no-progress", "--out", str(tmp_path / "vpt.st"), timeout=400)
        assert summary["state"] == "succeeded" and summary["prompt"] is None  # kept there
        assert summary["test_accuracy"] > 0.3  # ten classes: chance is 0.1
        hosted = httpx.get(f"{url}/v1/prompts/{summary['prompt_id']}").json()
        assert hosted["program_kind"] == "vpt-deep" and hosted["labelmap_kind"] == "head"
        v2 = httpx.get(f"{url}/v2/models/{summary['prompt_id']}/ready")
        assert v2.status_code == 200
    finally:
        server.stop()
    assert not (tmp_path / "vpt.st").exists()


def test_on_server_errors_are_one_line(tmp_path: Path) -> None:
    import subprocess

    proc = subprocess.run([*cli_command(), "fit", "--on-server", "--data", "digits",
                           "--budget", "100"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "--endpoint" in proc.stderr
    server: ServerProcess = model_server()
    url = server.start()
    try:
        proc = subprocess.run([*cli_command(), "fit", "--endpoint", url, "--on-server",
                               "--data", "digits", "--budget", "100", "--out",
                               str(tmp_path / "p.st")], capture_output=True, text=True,
                              timeout=60)
    finally:
        server.stop()
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "403" in proc.stderr and "--fit-workers" in proc.stderr


def test_a_job_that_fails_keeps_its_error_in_words_and_hosts_nothing(
        keyed: tuple[str, Path]) -> None:
    url, root = keyed
    alice = auth("alice")
    before = httpx.get(f"{url}/v1/prompts", headers=alice).json()["prompts"]
    archive = zip_of({f"{c}/{i}.png": _png(c, i) for c in "ab" for i in range(12)})
    response = submit(url, {"budget": 10}, archive, alice)  # too small for two validations
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    done = wait_for(url, job_id, lambda j: j["state"] in ("failed", "succeeded"), alice)
    assert done["state"] == "failed" and done["prompt"] is None
    assert done["error"].startswith("expected a budget of at least")
    assert "Traceback" not in done["error"]
    assert not (root / "jobs" / job_id / "prompt.safetensors").exists()
    assert httpx.get(f"{url}/v1/prompts", headers=alice).json()["prompts"] == before
