"""Tuning jobs shared in a real Redis: replicas of one server run one queue.

A job submitted to one replica is listed and followed on the other at once (never another
key's); when the replica that runs it dies (SIGKILL), the other queues it again once its lease
has expired, resumes it from the checkpoint copied to Redis, and ends with the parameters of an
uninterrupted local fit; a cancel sent to one replica stops the job the other runs; with Redis
stopped, the job routes answer 503 with ``Retry-After``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jobs_support import auth, digits_folder, keys_file, max_diff, prompt_tensors, submit, wait_for
from prompt_support import ServerProcess, model_server
from redis_support import RedisProcess

from reprogram.data import load_folder
from reprogram.fit import fit
from reprogram.oracles import LocalOracle
from reprogram.remote import zip_folder
from reprogram.zoo.registry import load_model
from server.jobs.redis_jobs import LEASE_S
from server.jobs.service import job_config

pytestmark = pytest.mark.slow


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    proc = RedisProcess(tmp_path / "redis").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_folder(tmp_path_factory.mktemp("digits-folder") / "digits")


def _replica(root: Path, name: str, redis_url: str) -> ServerProcess:
    return model_server("--state", redis_url, "--fit-workers", "1", "--jobs-dir",
                        str(root / f"scratch-{name}"), "--api-keys-file", str(root / "keys.txt"),
                        "--allow-prompt-download")


def test_a_job_moves_to_the_other_replica_when_its_replica_dies(
        tmp_path: Path, redis_server: RedisProcess, digits_dir: Path) -> None:
    keys_file(tmp_path)
    config = {"budget": 9000, "checkpoint_every": 10, "eval_every": 20, "seed": 1}
    a = _replica(tmp_path, "a", redis_server.url)
    b = _replica(tmp_path, "b", redis_server.url)
    alice = auth("alice")
    try:
        url_a = a.start()
        response = submit(url_a, config, zip_folder(digits_dir), alice)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        wait_for(url_a, job_id, lambda j: j["state"] == "running"
                 and j["progress"]["step"] >= 35, alice)
        url_b = b.start()  # a runs the job; b sees it at once, with its progress
        seen = httpx.get(f"{url_b}/v1/fits", headers=alice, timeout=30).json()["fits"]
        assert [j["id"] for j in seen] == [job_id] and seen[0]["state"] == "running"
        assert seen[0]["progress"]["step"] >= 35
        assert httpx.get(f"{url_b}/v1/fits", headers=auth("bob"), timeout=30).json() == {
            "fits": []}
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait(timeout=10)
        done = wait_for(url_b, job_id, lambda j: j["state"] in ("succeeded", "failed"), alice,
                        timeout=240 + LEASE_S)
        assert done["state"] == "succeeded", done["error"]
        assert done["attempts"] == 2
        served = httpx.get(f"{url_b}/v1/fits/{job_id}/prompt", headers=alice, timeout=30)
        assert served.status_code == 200, served.text
        (tmp_path / "job.st").write_bytes(served.content)
        predicted = httpx.post(f"{url_b}/v1/prompts/{done['prompt']}/predict", headers=alice,
                               files=[("files", ("x.png", next(digits_dir.rglob("*.png"))
                                                 .read_bytes(), "image/png"))], timeout=60)
        assert predicted.status_code == 200, predicted.text
    finally:
        a.stop()
        b.stop()
    whole = _local_fit(config, digits_dir)
    assert max_diff(prompt_tensors(tmp_path / "job.st"), dict(whole.prompt.tensors)) < 1e-5
    assert done["result"]["test_accuracy"] == pytest.approx(whole.test_accuracy, abs=1e-6)


def _local_fit(config: dict[str, Any], folder: Path) -> Any:
    cfg = job_config(config)
    return fit(cfg, LocalOracle(load_model(), output="probs", wire="uint8"), load_folder(folder))


def test_a_cancel_on_one_replica_stops_the_job_the_other_runs(
        tmp_path: Path, redis_server: RedisProcess, digits_dir: Path) -> None:
    keys_file(tmp_path)
    a = _replica(tmp_path, "a", redis_server.url)
    b = model_server("--state", redis_server.url, "--api-keys-file", str(tmp_path / "keys.txt"),
                     "--fit-workers", "1", "--fit-max-jobs", "1", "--jobs-dir",
                     str(tmp_path / "scratch-b"))
    alice = auth("alice")
    try:
        url_a = a.start()
        response = submit(url_a, {"budget": 200_000}, zip_folder(digits_dir), alice)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        wait_for(url_a, job_id, lambda j: j["progress"]["step"] >= 3, alice)
        url_b = b.start()
        # the key's caps count its jobs on every replica: b refuses a second unfinished one
        again = submit(url_b, {"budget": 1000}, zip_folder(digits_dir), alice)
        assert again.status_code == 429, again.text
        assert httpx.delete(f"{url_b}/v1/fits/{job_id}", headers=alice).status_code == 200
        done = wait_for(url_b, job_id, lambda j: j["state"] == "cancelled", alice, timeout=30)
        assert 0 < done["progress"]["images"] < 200_000 and done["prompt"] is None
        assert httpx.get(f"{url_a}/v1/fits/{job_id}", headers=alice).json()["state"] == (
            "cancelled")

        redis_server.stop()
        down = httpx.get(f"{url_a}/v1/fits", headers=alice, timeout=30)
        assert down.status_code == 503 and down.headers["retry-after"] == "5"
        assert "unavailable" in down.json()["error"]
        redis_server.start()
        back = httpx.get(f"{url_a}/v1/fits/{job_id}", headers=alice, timeout=30)
        assert back.status_code == 200 and back.json()["state"] == "cancelled"
    finally:
        a.stop()
        b.stop()
