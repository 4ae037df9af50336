"""Bad data sets for tuning jobs: each is refused with a 4xx naming the problem, and nothing
of it stays on the server (a real ``reprogram-server`` process)."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from jobs_support import jobs_server, png_bytes, small_imagefolder, submit, zip_of
from PIL import Image

CONFIG = {"budget": 500}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("jobs-archives")
    process = jobs_server(root / "jobs", "--fit-max-files", "40", "--fit-max-pixels", "250000")
    url = process.start()
    yield url, root / "jobs"
    process.stop()


def _zip_with_link() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in small_imagefolder().items():
            archive.writestr(name, data)
        link = zipfile.ZipInfo("c0/link.png")
        link.external_attr = (0o120777 << 16)  # S_IFLNK
        archive.writestr(link, "/etc/passwd")
    return buffer.getvalue()


def _tar(members: dict[str, bytes], link: str | None = None, hard: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link)
            info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
            info.linkname = "c0/0.png" if hard else "/etc/passwd"
            archive.addfile(info)
    return buffer.getvalue()


def _bomb() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in small_imagefolder().items():
            archive.writestr(name, data)
        archive.writestr("c1/huge.png", b"\0" * (64 * 1024 * 1024))
    return buffer.getvalue()


def _big_image() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.zeros((600, 600, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


CASES: dict[str, tuple[bytes, int, str]] = {
    "zip slip": (zip_of({**small_imagefolder(), "../evil.png": png_bytes()}), 422,
                 "'../evil.png'.*leaves it"),
    "absolute path": (zip_of({**small_imagefolder(), "/tmp/evil.png": png_bytes()}), 422,
                      "leaves it"),
    "backslash path": (zip_of({**small_imagefolder(), "c0\\..\\..\\x.png": png_bytes()}), 422,
                       "'/' separators"),
    "zip symlink": (_zip_with_link(), 422, "'c0/link.png'.*link"),
    "tar symlink": (_tar(small_imagefolder(), link="c0/evil.png"), 422, "'c0/evil.png'.*link"),
    "tar hard link": (_tar(small_imagefolder(), link="c1/hard.png", hard=True), 422, "link"),
    "tar slip": (_tar({**small_imagefolder(), "c0/../../x.png": png_bytes()}), 422, "leaves it"),
    "zip bomb": (_bomb(), 413, "'c1/huge.png'.*zip bomb"),
    "too many files": (zip_of(small_imagefolder(per_class=21)), 413, "at most 40 files"),
    "too many pixels": (zip_of({**small_imagefolder(), "c0/big.png": _big_image()}), 413,
                        "'c0/big.png'.*250000 pixels.*600x600"),
    "no images": (zip_of({".DS_Store": b"x", "__MACOSX/c0/0.png": png_bytes()}), 422,
                  "got no images"),
    "empty archive": (zip_of({}), 422, "no images"),
    "empty file": (b"", 422, "empty file"),
    "not an archive": (b"this is not an archive at all", 422, "unreadable tar"),
    "one class": (zip_of(small_imagefolder(classes=1)), 422, "at least 2 class folders"),
    "non-image member": (zip_of({**small_imagefolder(), "c0/notes.txt": b"hello"}), 422,
                         "'c0/notes.txt'.*only images"),
    "fake image": (zip_of({**small_imagefolder(), "c1/fake.png": b"not a png"}), 422,
                   "'c1/fake.png'.*cannot read"),
    "file outside class folders": (zip_of({**small_imagefolder(), "loose.png": png_bytes()}),
                                   422, "'loose.png'.*outside any class folder"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_archive_is_refused_naming_the_problem(server: tuple[str, Path],
                                                     case: str) -> None:
    import re

    url, jobs = server
    archive, status, message = CASES[case]
    response = submit(url, CONFIG, archive)
    assert response.status_code == status, response.text
    assert re.search(message, response.json()["error"]), response.json()["error"]
    assert httpx.get(f"{url}/v1/fits").json() == {"fits": []}
    assert not list(jobs.glob(".new-*")), "the refused upload left files behind"
    assert not (Path("/tmp/evil.png").exists() and case == "absolute path")


def _tensors(n: int, labels: list[int], names: list[str]) -> dict[str, object]:
    images = {"name": "images", "datatype": "UINT8", "shape": [n, 3, 4, 4],
              "data": [7] * (n * 48)}
    return {"config": CONFIG, "images": images, "labels": labels, "class_names": names}


@pytest.mark.parametrize(("body", "message"), [
    (_tensors(3, [0, 1], ["a", "b"]), "one label per image \\(3\\), got 2"),
    (_tensors(3, [0, 1, 5], ["a", "b"]), "labels in \\[0, 2\\)"),
    (_tensors(3, [1, 1, 1], ["a", "b"]), "at least 2 classes"),
    (_tensors(2, [0, 1], ["a"]), "at least 2 non-empty names"),
    ({**_tensors(2, [0, 1], ["a", "b"]), "images": {"datatype": "FP32", "shape": [2, 3, 4, 4],
                                                    "data": [0.5] * 96}}, "UINT8"),
    ({**_tensors(2, [0, 1], ["a", "b"]), "images": {"datatype": "UINT8", "shape": [2, 3, 4, 4],
                                                    "data": [300] * 96}}, "0..255"),
    ({**_tensors(2, [0, 1], ["a", "b"]), "images": {"datatype": "UINT8", "shape": [2, 3, 4, 4],
                                                    "data": [1] * 5}}, "expected 96 values"),
], ids=["mismatched labels", "label out of range", "one class", "one name", "float images",
        "values over 255", "short data"])
def test_bad_tensors_are_refused_naming_the_problem(server: tuple[str, Path],
                                                    body: dict[str, object],
                                                    message: str) -> None:
    import re

    url, _ = server
    response = httpx.post(f"{url}/v1/fits", json=body, timeout=30)
    assert response.status_code == 422, response.text
    assert re.search(message, response.json()["error"]), response.json()["error"]


def test_a_malformed_submission_is_a_400(server: tuple[str, Path]) -> None:
    url, _ = server
    archive = zip_of(small_imagefolder())
    no_config = httpx.post(f"{url}/v1/fits", files={"data": ("d.zip", archive)})
    assert no_config.status_code == 400 and "'config'" in no_config.json()["error"]
    bad_json = httpx.post(f"{url}/v1/fits", files={"data": ("d.zip", archive)},
                          data={"config": "{budget"})
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]
    no_data = httpx.post(f"{url}/v1/fits", data={"config": json.dumps(CONFIG)},
                         files={"other": ("x", b"x")})
    assert no_data.status_code == 400 and "'data'" in no_data.json()["error"]
    text = httpx.post(f"{url}/v1/fits", content=b"x", headers={"content-type": "text/plain"})
    assert text.status_code == 400 and "multipart/form-data" in text.json()["error"]
    unknown = submit(url, {"budget": 10, "learning_rate": 1}, archive)
    assert unknown.status_code == 422 and "learning_rate" in unknown.json()["error"]
    nothing = submit(url, {}, archive)
    assert nothing.status_code == 422 and "budget" in nothing.json()["error"]
    assert httpx.get(f"{url}/v1/fits/fit-0000").status_code == 404
