"""The shapes world with words: (image, caption) pairs for the zoo's CLIP-style model.

Each image is one of the ten shapes (:data:`~reprogram.zoo.shapes.SHAPE_CLASSES`) in a named
colour, small or large, in one of five places, on a flat background of another named colour,
with Gaussian pixel noise. Its caption says some of that in words, in a random order of
templates: the shape always, each other attribute with probability one half, sometimes after
"a photo of", so that a hand-written template such as ``"a photo of a {}."`` means something
to the model without being the only thing it has read. Generation is deterministic given a
seed. :func:`colour_task` draws a target task from the same world whose class names are colour
names: words the model has read, unlike the digits' ``"0"`` .. ``"9"``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from reprogram.zoo.shapes import _SUPERSAMPLE, SHAPE_CLASSES, _polygon

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.10), "green": (0.10, 0.65, 0.20), "blue": (0.15, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10), "purple": (0.55, 0.15, 0.70), "orange": (1.00, 0.55, 0.05),
    "white": (0.95, 0.95, 0.95), "black": (0.05, 0.05, 0.05), "gray": (0.50, 0.50, 0.50),
    "cyan": (0.10, 0.80, 0.85), "pink": (1.00, 0.55, 0.75), "brown": (0.45, 0.25, 0.10),
}
SIZES: dict[str, tuple[float, float]] = {"small": (0.17, 0.24), "large": (0.33, 0.42)}
PLACES: dict[str, tuple[float, float]] = {  # centre as a fraction of the side
    "top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7), "center": (0.5, 0.5)}
COLOUR_TASK = ("red", "green", "blue", "yellow", "purple", "orange")
JITTER = 0.07


def _mask(shape: str, size: int, radius: float, centre: tuple[float, float],
          theta: float) -> np.ndarray:
    big = size * _SUPERSAMPLE
    r, (cx, cy) = radius * big, (centre[0] * big, centre[1] * big)
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if shape in ("circle", "ring", "crescent"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if shape == "ring":
            draw.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=0)
        elif shape == "crescent":
            ox, oy, r2 = 0.45 * r * math.cos(theta), 0.45 * r * math.sin(theta), 0.85 * r
            draw.ellipse((cx + ox - r2, cy + oy - r2, cx + ox + r2, cy + oy + r2), fill=0)
    else:
        c, s = math.cos(theta), math.sin(theta)
        draw.polygon([(cx + r * (x * c - y * s), cy + r * (x * s + y * c))
                      for x, y in _polygon(shape)], fill=255)
    small = mask.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64)[..., None] / 255.0


def _colour(name: str, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.asarray(COLOURS[name]) + rng.uniform(-JITTER, JITTER, 3), 0.0, 1.0)


def render(shape: str, colour: str, size_word: str, place: str, background: str,
           size: int, rng: np.random.Generator) -> np.ndarray:
    """One image as uint8 ``(3, size, size)``."""
    lo, hi = SIZES[size_word]
    radius = rng.uniform(lo, hi)
    px, py = PLACES[place]
    room = max(0.0, 0.5 - radius - 0.02)  # keep the shape inside the frame
    centre = (float(np.clip(px + rng.uniform(-0.05, 0.05), 0.5 - room, 0.5 + room)),
              float(np.clip(py + rng.uniform(-0.05, 0.05), 0.5 - room, 0.5 + room)))
    alpha = _mask(shape, size, radius, centre, rng.uniform(0.0, 2.0 * math.pi))
    img = _colour(background, rng) * (1 - alpha) + _colour(colour, rng) * alpha
    img = img + rng.normal(0.0, rng.uniform(0.0, 0.05), img.shape)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8).transpose(2, 0, 1)


def caption(shape: str, colour: str, size_word: str, place: str, background: str,
            rng: np.random.Generator) -> str:
    """Words for the picture: the shape always, the rest each with probability 1/2."""
    words = [w for w, keep in ((size_word, rng.random() < 0.5), (colour, rng.random() < 0.5))
             if keep]
    text = " ".join([*words, shape])
    text = f"an {text}" if text[0] in "aeiou" else f"a {text}"
    extras = []
    if rng.random() < 0.5:
        extras.append(f"on a {background} background")
    if rng.random() < 0.5:
        extras.append(f"in the {place}" if place != "center" else "in the center")
    rng.shuffle(extras)
    text = " ".join([text, *extras])
    if rng.random() < 0.5:
        text = f"a photo of {text}"
    return text + "."


def _attributes(rng: np.random.Generator, shape: str | None = None,
                colour: str | None = None) -> tuple[str, str, str, str, str]:
    names = list(COLOURS)
    colour = colour or names[int(rng.integers(len(names)))]
    background = colour
    while background == colour:
        background = names[int(rng.integers(len(names)))]
    return (shape or SHAPE_CLASSES[int(rng.integers(len(SHAPE_CLASSES)))], colour,
            list(SIZES)[int(rng.integers(len(SIZES)))],
            list(PLACES)[int(rng.integers(len(PLACES)))], background)


def generate_pairs(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, list[str]]:
    """``n`` (image, caption) pairs: uint8 ``[n, 3, size, size]`` and their captions."""
    rng = np.random.default_rng(seed)
    images, texts = [], []
    for _ in range(n):
        attrs = _attributes(rng)
        images.append(render(*attrs, size=size, rng=rng))
        texts.append(caption(*attrs, rng=rng))
    stacked = np.stack(images) if images else np.zeros((0, 3, size, size), dtype=np.uint8)
    return torch.from_numpy(stacked), texts


def labelled(n: int, seed: int, classes: tuple[str, ...], by: str,
             size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images labelled by shape (``by="shape"``) or colour (``by="colour"``) among
    ``classes``, balanced and shuffled; the other attributes at random."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(classes))
    images = []
    for y in labels:
        name = classes[int(y)]
        attrs = _attributes(rng, shape=name if by == "shape" else None,
                            colour=name if by == "colour" else None)
        images.append(render(*attrs, size=size, rng=rng))
    stacked = np.stack(images) if images else np.zeros((0, 3, size, size), dtype=np.uint8)
    return torch.from_numpy(stacked), torch.from_numpy(labels.astype(np.int64))
