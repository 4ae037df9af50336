"""Tests for reprogram.data: the dataset record, the seeded stratified split and the loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reprogram.data import TargetDataset, load_dataset, load_digits, load_folder, make_squares
from reprogram.errors import DataError


def _indexed(counts: list[int]) -> TargetDataset:
    """A dataset whose image i carries its own index in its first two pixels."""
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    n = len(labels)
    labels = labels[torch.randperm(n, generator=torch.Generator().manual_seed(5))]
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    idx = torch.arange(n)
    images[:, 0, 0, 0] = (idx % 256).to(torch.uint8)
    images[:, 0, 0, 1] = (idx // 256).to(torch.uint8)
    names = tuple(f"c{k}" for k in range(len(counts)))
    return TargetDataset(images, labels, names, "indexed")


def _ids(ds: TargetDataset) -> list[int]:
    im = ds.images.to(torch.long)
    return (im[:, 0, 0, 0] + 256 * im[:, 0, 0, 1]).tolist()


# ----------------------------------------------------------------------------- TargetDataset
def test_dataset_validates_its_fields() -> None:
    ok = torch.zeros(4, 3, 5, 5, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1])
    ds = TargetDataset(ok, labels, ("a", "b"), "x")
    assert len(ds) == 4 and ds.num_classes == 2
    with pytest.raises(DataError, match="uint8"):
        TargetDataset(ok.float(), labels, ("a", "b"), "x")
    with pytest.raises(DataError, match="uint8"):
        TargetDataset(ok[0], labels, ("a", "b"), "x")
    with pytest.raises(DataError, match="channels"):
        TargetDataset(torch.zeros(4, 2, 5, 5, dtype=torch.uint8), labels, ("a", "b"), "x")
    with pytest.raises(DataError, match="one label per image"):
        TargetDataset(ok, labels[:3], ("a", "b"), "x")
    with pytest.raises(DataError, match="labels in"):
        TargetDataset(ok, torch.tensor([0, 1, 2, 0]), ("a", "b"), "x")
    with pytest.raises(DataError, match="labels in"):
        TargetDataset(ok, torch.tensor([0, -1, 1, 0]), ("a", "b"), "x")


# ----------------------------------------------------------------------------- split
def test_split_is_stratified_disjoint_and_complete() -> None:
    counts = [40, 23, 7, 60]
    ds = _indexed(counts)
    train, val, test = ds.split(0.2, 0.3, seed=3)
    ids = [_ids(part) for part in (train, val, test)]
    assert sum(len(i) for i in ids) == len(ds)
    assert sorted(ids[0] + ids[1] + ids[2]) == list(range(len(ds)))  # disjoint, covers all
    for part, part_ids in zip((train, val, test), ids, strict=True):
        # labels travel with their images
        assert part.labels.tolist() == ds.labels[part_ids].tolist()
        assert part.class_names == ds.class_names
    for k, c in enumerate(counts):
        n_test, n_val = round(c * 0.3), round(c * 0.2)
        assert int((test.labels == k).sum()) == n_test
        assert int((val.labels == k).sum()) == n_val
        assert int((train.labels == k).sum()) == c - n_test - n_val
    assert (train.name, val.name, test.name) == ("indexed:train", "indexed:val", "indexed:test")


def test_split_is_seeded() -> None:
    ds = _indexed([30, 30, 30])
    a = [_ids(p) for p in ds.split(0.2, 0.2, seed=1)]
    b = [_ids(p) for p in ds.split(0.2, 0.2, seed=1)]
    c = [_ids(p) for p in ds.split(0.2, 0.2, seed=2)]
    assert a == b
    assert [sorted(p) for p in a] != [sorted(p) for p in c]  # other members, not only order


def test_split_edge_cases() -> None:
    ds = _indexed([10, 10])
    train, val, test = ds.split(0.0, 0.0, seed=0)
    assert len(train) == 20 and len(val) == 0 and len(test) == 0
    for bad in ((-0.1, 0.2), (0.5, 0.5), (1.0, 0.0), (0.2, 1.2)):
        with pytest.raises(DataError, match="fractions"):
            ds.split(*bad, seed=0)
    with pytest.raises(DataError, match="too few"):
        _indexed([1, 1]).split(0.3, 0.6, seed=0)


# ----------------------------------------------------------------------------- builtin sets
def test_digits_shapes_and_range() -> None:
    ds = load_digits()
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and sorted(set(ds.labels.tolist())) == list(range(10))
    assert int(ds.images.min()) == 0 and int(ds.images.max()) == 255
    assert ds.class_names == tuple(str(i) for i in range(10))
    assert load_dataset("digits").images.equal(ds.images)


def test_squares_label_is_count_minus_one() -> None:
    grid, cell = 9, 4
    ds = make_squares(n=200, seed=4, grid=grid, cell=cell)
    assert ds.images.shape == (200, 1, grid * cell, grid * cell)
    assert ds.class_names == tuple(str(i) for i in range(1, 11))
    assert sorted(set(ds.images.unique().tolist())) == [0, 255]
    cells = ds.images[:, 0].view(200, grid, cell, grid, cell).to(torch.long)
    sums = cells.sum(dim=(2, 4))  # [N, grid, grid]
    # every cell is all black or all white
    assert bool(((sums == 0) | (sums == 255 * cell * cell)).all())
    count = (sums > 0).flatten(1).sum(1)
    assert count.tolist() == (ds.labels + 1).tolist()
    assert torch.bincount(ds.labels, minlength=10).tolist() == [20] * 10  # balanced
    assert make_squares(n=50, seed=4).images.equal(make_squares(n=50, seed=4).images)
    assert not make_squares(n=50, seed=4).images.equal(make_squares(n=50, seed=5).images)
    assert load_dataset("squares", seed=4).images.shape[0] == 2000


# ----------------------------------------------------------------------------- folders
def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _make_folder(root: Path) -> dict[str, np.ndarray]:
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    a = _rgb(8, 8, 0)
    Image.fromarray(a).save(root / "cat" / "a.png")
    gray = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(root / "cat" / "b.png")
    Image.fromarray(_rgb(12, 10, 2)).save(root / "dog" / "c.jpg", quality=95)
    Image.fromarray(_rgb(8, 8, 3)).save(root / "dog" / "d.jpeg")
    # hidden things are skipped, even when they are not images
    (root / "cat" / ".DS_Store").write_bytes(b"\x00\x01garbage")
    (root / "dog" / ".thumbs").mkdir()
    (root / "dog" / ".thumbs" / "x.png").write_bytes(b"not an image")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "README.txt").write_text("a stray file at the top is not a class\n")
    return {"a": a, "gray": gray}


def test_load_folder_reads_png_and_jpeg(tmp_path: Path) -> None:
    raw = _make_folder(tmp_path / "set")
    ds = load_folder(tmp_path / "set")
    assert ds.class_names == ("cat", "dog")
    assert ds.name == "set"
    assert ds.images.shape == (4, 3, 8, 8) and ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == [0, 0, 1, 1]
    # PNG is lossless: exact pixels, channels first
    assert np.array_equal(ds.images[0].numpy(), raw["a"].transpose(2, 0, 1))
    # grayscale becomes three equal channels
    gray = ds.images[1].numpy()
    assert np.array_equal(gray[0], raw["gray"]) and np.array_equal(gray[0], gray[2])
    # the 12x10 JPEG was resized to the first image's 8x8
    assert ds.images[2].float().std() > 0
    sized = load_folder(tmp_path / "set", size=6)
    assert sized.images.shape == (4, 3, 6, 6)
    via_spec = load_dataset(str(tmp_path / "set"))
    assert via_spec.images.equal(ds.images)


def test_load_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="expected a folder"):
        load_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="'digits', 'squares', 'colours' or an existing folder"):
        load_dataset(str(tmp_path / "missing"))

    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    Image.fromarray(_rgb(4, 4, 0)).save(one / "only" / "x.png")
    (one / ".hidden").mkdir()
    with pytest.raises(DataError, match="at least 2 class"):
        load_folder(one)

    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir()
    Image.fromarray(_rgb(4, 4, 0)).save(empty / "a" / "x.png")
    (empty / "b" / ".hidden.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"class folder '.*/b' holds no images"):
        load_folder(empty)


@pytest.mark.parametrize("content", [b"this is not an image", b"", b"truncated-png"])
def test_load_folder_corrupt_image_names_the_file(tmp_path: Path, content: bytes) -> None:
    root = tmp_path / "set"
    _make_folder(root)
    bad = root / "dog" / "bad.png"
    if content == b"truncated-png":
        Image.fromarray(_rgb(16, 16, 9)).save(bad)
        content = bad.read_bytes()[:60]
    bad.write_bytes(content)
    with pytest.raises(DataError, match=r"cannot read image .*bad\.png"):
        load_folder(root)


def test_load_folder_scales_16_bit_grayscale(tmp_path: Path) -> None:
    root = tmp_path / "deep"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    deep = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(deep).save(root / "a" / "x.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "b" / "y.png")
    assert Image.open(root / "a" / "x.png").mode.startswith("I;16")
    ds = load_folder(root)
    want = np.clip(np.rint(deep / 257.0), 0, 255).astype(np.uint8)
    for c in range(3):
        assert np.array_equal(ds.images[0, c].numpy(), want)  # not saturated at 255
