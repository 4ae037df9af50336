"""Target datasets: image folders, scikit-learn's digits, and Elsayed's counting squares.

A :class:`TargetDataset` holds uint8 images ``[N, C, H, W]`` (C = 1 or 3), int64 labels and
class names. Nothing is downloaded: ``digits`` ships with scikit-learn, ``squares`` is
generated, and a folder is read from disk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from reprogram.errors import DataError

log = logging.getLogger(__name__)

MAX_FOLDER_IMAGE_PIXELS = 40_000_000


@dataclass(frozen=True)
class TargetDataset:
    """Labelled target-task images (uint8 ``[N, C, H, W]``) with class names."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(f"expected uint8 images [N,C,H,W], got {self.images.dtype} "
                            f"{tuple(self.images.shape)}")
        if self.images.shape[1] not in (1, 3):
            raise DataError(f"expected 1 or 3 channels, got {self.images.shape[1]}")
        if len(self.labels) != len(self.images):
            raise DataError(f"expected one label per image ({len(self.images)}), "
                            f"got {len(self.labels)}")
        if len(self.labels) and (int(self.labels.min()) < 0
                                 or int(self.labels.max()) >= len(self.class_names)):
            raise DataError(f"expected labels in [0, {len(self.class_names)}), got "
                            f"[{int(self.labels.min())}, {int(self.labels.max())}]")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, index: torch.Tensor, suffix: str = "") -> TargetDataset:
        return TargetDataset(self.images[index], self.labels[index], self.class_names,
                             self.name + suffix)

    def split(
        self, val_fraction: float, test_fraction: float, seed: int
    ) -> tuple[TargetDataset, TargetDataset, TargetDataset]:
        """Stratified, seeded train / validation / test split."""
        if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0
                and val_fraction + test_fraction < 1.0):
            raise DataError(f"expected val and test fractions in [0,1) summing below 1, got "
                            f"{val_fraction} and {test_fraction}")
        gen = torch.Generator().manual_seed(seed)
        parts: list[list[torch.Tensor]] = [[], [], []]
        for c in range(self.num_classes):
            idx = torch.nonzero(self.labels == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            n_test = round(len(idx) * test_fraction)
            n_val = round(len(idx) * val_fraction)
            parts[2].append(idx[:n_test])
            parts[1].append(idx[n_test : n_test + n_val])
            parts[0].append(idx[n_test + n_val :])
        out = []
        for part, suffix in zip(parts, (":train", ":val", ":test"), strict=True):
            idx = torch.cat(part) if part else torch.zeros(0, dtype=torch.long)
            idx = idx[torch.randperm(len(idx), generator=gen)]
            out.append(self.subset(idx, suffix))
        if len(out[0]) == 0:
            raise DataError(f"dataset {self.name!r} has too few images to split "
                            f"({len(self)} images)")
        return out[0], out[1], out[2]


def load_digits() -> TargetDataset:
    """scikit-learn's bundled handwritten digits: 1,797 grayscale 8x8 images, 10 classes."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    pixels = np.asarray(bunch.images, dtype=np.float64)  # values 0..16
    images = np.clip(np.rint(pixels * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    labels = np.asarray(bunch.target, dtype=np.int64)
    names = tuple(str(i) for i in range(10))
    return TargetDataset(torch.from_numpy(images), torch.from_numpy(labels), names, "digits")


def make_squares(n: int = 2000, seed: int = 0, grid: int = 9, cell: int = 4) -> TargetDataset:
    """Elsayed et al. (2019) counting squares: 1 to 10 white squares on a black canvas.

    The canvas is a ``grid x grid`` lattice of ``cell x cell`` pixel cells (36x36 by default);
    an image of class ``k`` has ``k + 1`` white squares in distinct random cells.
    """
    rng = np.random.default_rng(seed)
    size = grid * cell
    labels = rng.permutation(np.arange(n) % 10)
    images = np.zeros((n, 1, size, size), dtype=np.uint8)
    for i, k in enumerate(labels):
        cells = rng.choice(grid * grid, size=int(k) + 1, replace=False)
        for c in cells:
            r, q = divmod(int(c), grid)
            images[i, 0, r * cell : (r + 1) * cell, q * cell : (q + 1) * cell] = 255
    names = tuple(str(i) for i in range(1, 11))
    return TargetDataset(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)),
                         names, "squares")


def make_colours(n: int = 1200, seed: int = 0) -> TargetDataset:
    """Six colours by name (red, green, blue, yellow, purple, orange): one shape of that
    colour, any shape, size and place, on a background of another colour; class names that
    mean something to ``shapes-clip`` (:func:`reprogram.zoo.captions.labelled`)."""
    from reprogram.zoo.captions import COLOUR_TASK, labelled

    images, labels = labelled(n, 1000 + seed, COLOUR_TASK, "colour")
    return TargetDataset(images, labels, COLOUR_TASK, "colours")


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, scaling 16-bit grayscale to 8 bits (Pillow's own conversion saturates it)."""
    if img.mode.startswith("I;16"):
        deep = np.asarray(img, dtype=np.float64)  # 0..65535
        img = Image.fromarray(np.clip(np.rint(deep / 257.0), 0, 255).astype(np.uint8))
    return img.convert("RGB")


def _read_image(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_FOLDER_IMAGE_PIXELS:
                raise DataError(f"image {str(path)!r} is too large: {img.width}x{img.height}")
            rgb = _to_rgb(img)
            if size is not None and rgb.size != (size[1], size[0]):
                rgb = rgb.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {str(path)!r}: {exc}") from exc


def load_folder(root: Path, size: int | None = None) -> TargetDataset:
    """A folder with one sub-folder per class, each holding images Pillow can read.

    Hidden files are skipped. Images are converted to RGB; when they differ in size (or
    ``size`` is given) each is resized to ``size x size`` (default: the first image's size).
    """
    if not root.is_dir():
        raise DataError(f"expected a folder with one sub-folder per class, got {str(root)!r}")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"expected at least 2 class sub-folders in {str(root)!r}, "
                        f"got {len(classes)}")
    files: list[tuple[Path, int]] = []
    for label, folder in enumerate(classes):
        found = sorted(p for p in folder.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        if not found:
            raise DataError(f"class folder {str(folder)!r} holds no images")
        files.extend((p, label) for p in found)
    target: tuple[int, int] | None = (size, size) if size else None
    arrays = []
    for path, _ in files:
        arr = _read_image(path, target)
        if target is None:
            target = (arr.shape[1], arr.shape[2])
        arrays.append(arr)
    images = torch.from_numpy(np.stack(arrays))
    labels = torch.tensor([lab for _, lab in files], dtype=torch.long)
    log.info("loaded %d images in %d classes from %s", len(files), len(classes), root)
    return TargetDataset(images, labels, tuple(p.name for p in classes), root.name)


def load_dataset(spec: str, seed: int = 0) -> TargetDataset:
    """``digits``, ``squares``, ``colours`` or a path to a class-per-sub-folder image
    folder."""
    if spec == "digits":
        return load_digits()
    if spec == "squares":
        return make_squares(seed=seed)
    if spec == "colours":
        return make_colours(seed=seed)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"expected 'digits', 'squares', 'colours' or an existing folder, got"
                        f" {spec!r}")
    return load_folder(path)
