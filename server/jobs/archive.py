"""A tuning job's data set, unpacked safely: a zip or tar of an ImageFolder, or V2 tensors.

An archive is checked member by member *before* anything is decoded, and refused (422, or
413 for a limit) with a message naming the member and the problem:

- a member whose path is absolute, climbs out with ``..`` or holds a backslash or NUL
  ("zip slip"); a symbolic or hard link, a device or FIFO;
- more than ``max_files`` members, more than ``max_bytes`` uncompressed in total (as
  declared, then as actually read: a member that inflates past its declared size is cut off),
  a member compressed more than :data:`MAX_RATIO` times (a zip bomb);
- a member that is not an image (by suffix, then by Pillow reading its header), or an image
  of more than ``max_pixels`` pixels (read from the header, before decoding);
- fewer than 2 class folders, a class folder without images, no images at all.

The layout is ``CLASS/IMAGE`` (or ``TOP/CLASS/IMAGE``: a zipped folder); hidden files and
``__MACOSX`` are skipped. Tensors (``images`` UINT8 ``[N, 3|1, H, W]``, ``labels`` ``[N]``,
``class_names``) are checked for shape, label range and one label per image.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from reprogram.data import TargetDataset
from reprogram.errors import DataError
from server.inference import HTTPStatusError, TooLarge

MAX_RATIO = 200  # uncompressed / compressed bytes of one member
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm",
                            ".tif", ".tiff"})
_SKIPPED = ("__MACOSX",)
CHUNK = 1 << 16


class BadDataset(HTTPStatusError):
    """A data set that cannot be trained on (422)."""

    status_code = 422


@dataclass(frozen=True, kw_only=True)
class DataLimits:
    """Per-job caps on an uploaded data set (``--fit-max-files``, ``--fit-max-bytes``,
    ``--fit-max-pixels``)."""

    max_files: int
    max_bytes: int
    max_pixels: int


@dataclass(frozen=True)
class _Member:
    name: str
    size: int
    compressed: int
    regular: bool
    opener: Any  # () -> binary file


def _zip_members(data: bytes) -> Iterator[_Member]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise BadDataset(f"expected a zip or tar archive, got an unreadable zip: {exc}") from None
    for info in archive.infolist():
        if info.is_dir():
            continue
        kind = (info.external_attr >> 16) & 0o170000
        regular = kind in (0, 0o100000)  # no Unix mode (Windows zips), or a regular file
        yield _Member(info.filename, info.file_size, max(info.compress_size, 1), regular,
                      lambda info=info: archive.open(info))


def _tar_members(data: bytes) -> Iterator[_Member]:
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")  # noqa: SIM115
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BadDataset(f"expected a zip or tar archive, got an unreadable tar: {exc}") from None
    with archive:
        for info in archive:
            if info.isdir():
                continue

            def opener(info: tarfile.TarInfo = info) -> IO[bytes]:
                handle = archive.extractfile(info)
                if handle is None:
                    raise BadDataset(f"member {info.name!r} is not a regular file")
                return handle

            # a tar's payload is stored as is (gzip compresses the whole stream)
            yield _Member(info.name, info.size, max(info.size, 1), info.isreg(), opener)


def _members(data: bytes) -> Iterator[_Member]:
    if data[:4] == b"PK\x03\x04" or data[:4] == b"PK\x05\x06":
        return _zip_members(data)
    return _tar_members(data)


def _safe_parts(name: str) -> tuple[str, ...]:
    """The path parts of a member name, or 422 for one that could leave the folder."""
    if "\\" in name or "\x00" in name:
        raise BadDataset(f"member {name!r}: expected a relative path with '/' separators")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise BadDataset(f"member {name!r}: expected a path inside the archive, got one that"
                         " leaves it (absolute or with '..')")
    return tuple(p for p in path.parts if p not in ("", "."))


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p in _SKIPPED for p in parts)


def _copy(member: _Member, dest: Path, left: int) -> int:
    """Copy a member to ``dest``, reading at most its declared size and ``left`` bytes."""
    cap = min(member.size, left)
    written = 0
    with member.opener() as src, open(dest, "wb") as out:
        while True:
            chunk = src.read(min(CHUNK, cap - written + 1))
            if not chunk:
                break
            written += len(chunk)
            if written > cap:
                raise TooLarge(f"member {member.name!r} inflates past its declared size or the"
                               f" data-set limit of the server (--fit-max-bytes)")
            out.write(chunk)
    return written


def _check_image(path: Path, name: str, max_pixels: int) -> None:
    """Pillow must recognise the file from its header; its size must be under the cap."""
    try:
        with Image.open(path) as img:  # reads the header only
            w, h = img.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError):
        raise BadDataset(f"member {name!r}: expected an image (PNG, JPEG, ...), got a file"
                         " Pillow cannot read") from None
    if w * h > max_pixels:
        raise TooLarge(f"member {name!r}: expected at most {max_pixels} pixels per image"
                       f" (--fit-max-pixels), got {w}x{h}")


def extract_archive(data: bytes, dest: Path, limits: DataLimits) -> dict[str, int]:
    """Unpack an ImageFolder archive into the empty folder ``dest``; returns images per
    class. Raises :class:`BadDataset` (422) or :class:`TooLarge` (413), naming the problem."""
    if not data:
        raise BadDataset("expected a zip or tar archive of class folders, got an empty file")
    members = []
    declared = 0
    for member in _members(data):
        parts = _safe_parts(member.name)
        if not member.regular:
            raise BadDataset(f"member {member.name!r}: expected regular files only, got a link"
                             " or special file")
        if not parts or _hidden(parts):
            continue
        members.append((parts, member))
        if len(members) > limits.max_files:
            raise TooLarge(f"expected at most {limits.max_files} files in the data set"
                           " (--fit-max-files), got more")
        declared += member.size
        if declared > limits.max_bytes:
            raise TooLarge(f"expected at most {limits.max_bytes} bytes of images in the data"
                           " set (--fit-max-bytes), got more")
        if member.size / member.compressed > MAX_RATIO:
            ratio = member.size // member.compressed
            raise TooLarge(f"member {member.name!r} is compressed {ratio} times (more than"
                           f" {MAX_RATIO}): refused as a possible zip bomb")
        if PurePosixPath(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
            raise BadDataset(f"member {member.name!r}: expected only images "
                             f"({', '.join(sorted(IMAGE_SUFFIXES))}), got another file")
    if not members:
        raise BadDataset("expected class folders of images in the archive, got no images")
    tops = {parts[0] for parts, _ in members}
    strip = 1 if len(tops) == 1 and all(len(p) >= 3 for p, _ in members) else 0
    counts: dict[str, int] = {}
    left = limits.max_bytes
    for parts, member in members:
        rel = parts[strip:]
        if len(rel) < 2:
            raise BadDataset(f"member {member.name!r}: expected CLASS/IMAGE (one folder per"
                             " class), got a file outside any class folder")
        target = dest.joinpath(*rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        left -= _copy(member, target, left)
        _check_image(target, member.name, limits.max_pixels)
        counts[rel[0]] = counts.get(rel[0], 0) + 1
    if len(counts) < 2:
        raise BadDataset(f"expected at least 2 class folders, got {len(counts)}"
                         f" ({', '.join(counts)}): one class has nothing to tell apart")
    return counts


def tensor_dataset(body: dict[str, Any], limits: DataLimits) -> TargetDataset:
    """A data set sent as tensors: ``images`` (a V2 UINT8 tensor ``[N, C, H, W]``),
    ``labels`` (``N`` integers) and ``class_names``."""
    names = body.get("class_names")
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n
                                                               for n in names):
        raise BadDataset("expected 'class_names': a list of at least 2 non-empty names")
    raw = body.get("images")
    if not isinstance(raw, dict):
        raise BadDataset("expected 'images': a V2 tensor {name, datatype: UINT8, shape, data}")
    shape = raw.get("shape")
    if (not isinstance(shape, list) or len(shape) != 4 or not all(
            isinstance(s, int) and s > 0 for s in shape)):
        raise BadDataset(f"expected images of shape [N, C, H, W], got {shape!r}")
    if shape[0] > limits.max_files:
        raise TooLarge(f"expected at most {limits.max_files} images (--fit-max-files), got"
                       f" {shape[0]}")
    if shape[2] * shape[3] > limits.max_pixels:
        raise TooLarge(f"expected at most {limits.max_pixels} pixels per image"
                       f" (--fit-max-pixels), got {shape[2]}x{shape[3]}")
    if raw.get("datatype") != "UINT8":
        raise BadDataset(f"expected UINT8 images, got datatype {raw.get('datatype')!r}")
    flat = raw.get("data")
    count = shape[0] * shape[1] * shape[2] * shape[3]
    if not isinstance(flat, list) or len(flat) != count:
        raise BadDataset(f"expected {count} values in images.data for shape {shape}, got"
                         f" {len(flat) if isinstance(flat, list) else type(flat).__name__}")
    try:
        values = np.asarray(flat, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise BadDataset("expected integers 0..255 in images.data") from None
    if values.ndim != 1 or (values.size and (values.min() < 0 or values.max() > 255)):
        raise BadDataset("expected integers 0..255 in images.data")
    images = torch.from_numpy(values.astype(np.uint8).reshape(shape))
    labels = body.get("labels")
    if not isinstance(labels, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                               for v in labels):
        raise BadDataset("expected 'labels': a list of integer class indices")
    if len(labels) != shape[0]:
        raise BadDataset(f"expected one label per image ({shape[0]}), got {len(labels)}")
    try:
        data = TargetDataset(images, torch.tensor(labels, dtype=torch.long), tuple(names),
                             "tensors")
    except DataError as exc:
        raise BadDataset(str(exc)) from None
    present = set(labels)
    if len(present) < 2:
        raise BadDataset(f"expected images of at least 2 classes, got only {sorted(present)}")
    return data
