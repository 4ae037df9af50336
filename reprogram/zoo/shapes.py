"""Procedurally generated source task: ten geometric shape classes.

Each image is an RGB picture of one shape with a random colour, size, position and rotation
over a random (possibly two-tone gradient) background, plus Gaussian pixel noise. The task
contains no digits or letters, so reprogramming it into a digit reader is a real transfer.
Generation is deterministic given a seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPE_CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "cross",
    "star",
    "ring",
    "crescent",
    "bar",
    "hourglass",
    "ell",
)

_SUPERSAMPLE = 4


def _polygon(name: str) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape in unit coordinates (radius about 1, centred at 0)."""
    if name == "square":
        return [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
    if name == "triangle":
        return [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if name == "cross":
        a, b = 0.3, 1.0
        return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a),
                (-b, a), (-b, -a), (-a, -a)]
    if name == "star":
        pts = []
        for i in range(10):
            r = 1.0 if i % 2 == 0 else 0.42
            t = -math.pi / 2 + i * math.pi / 5
            pts.append((r * math.cos(t), r * math.sin(t)))
        return pts
    if name == "bar":
        return [(-1.0, -0.25), (1.0, -0.25), (1.0, 0.25), (-1.0, 0.25)]
    if name == "hourglass":
        return [(-0.8, -1.0), (0.8, -1.0), (0.0, 0.0), (0.8, 1.0), (-0.8, 1.0), (0.0, 0.0)]
    if name == "ell":
        return [(-0.7, -1.0), (-0.2, -1.0), (-0.2, 0.5), (0.8, 0.5), (0.8, 1.0), (-0.7, 1.0)]
    raise KeyError(name)


def _draw_mask(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """A supersampled L-mode mask of one shape with random scale, position and rotation."""
    big = size * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    radius = rng.uniform(0.22, 0.40) * big
    cx = rng.uniform(radius, big - radius)
    cy = rng.uniform(radius, big - radius)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    if name == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    elif name == "ring":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
        r2 = radius * 0.55
        draw.ellipse((cx - r2, cy - r2, cx + r2, cy + r2), fill=0)
    elif name == "crescent":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
        ox, oy = 0.45 * radius * math.cos(theta), 0.45 * radius * math.sin(theta)
        r2 = radius * 0.85
        draw.ellipse((cx + ox - r2, cy + oy - r2, cx + ox + r2, cy + oy + r2), fill=0)
    else:
        c, s = math.cos(theta), math.sin(theta)
        pts = [(cx + radius * (x * c - y * s), cy + radius * (x * s + y * c))
               for x, y in _polygon(name)]
        draw.polygon(pts, fill=255)
    return mask.resize((size, size), Image.Resampling.BOX)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A flat or linear-gradient RGB background in [0,1], shape (H, W, 3)."""
    c0 = rng.uniform(0.0, 1.0, 3)
    if rng.random() < 0.5:
        return np.broadcast_to(c0, (size, size, 3)).copy()
    c1 = rng.uniform(0.0, 1.0, 3)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = (xs * math.cos(angle) + ys * math.sin(angle))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return c0 * (1 - t[..., None]) + c1 * t[..., None]


def _foreground_colour(bg_mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random colour at a clear distance from the background's mean colour."""
    for _ in range(100):
        colour = rng.uniform(0.0, 1.0, 3)
        if float(np.abs(colour - bg_mean).sum()) > 0.6:
            return colour
    return 1.0 - bg_mean


def render_shape(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one image of class ``label`` as uint8 (3, size, size)."""
    name = SHAPE_CLASSES[label]
    bg = _background(size, rng)
    colour = _foreground_colour(bg.reshape(-1, 3).mean(0), rng)
    alpha = np.asarray(_draw_mask(name, size, rng), dtype=np.float64)[..., None] / 255.0
    img = bg * (1 - alpha) + colour * alpha
    img = img + rng.normal(0.0, rng.uniform(0.0, 0.08), img.shape)
    out = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return out.transpose(2, 0, 1)


def generate_shapes(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate ``n`` labelled shape images (balanced classes, shuffled).

    Returns ``(images uint8 [n,3,size,size], labels int64 [n])``; the same seed gives the
    same images.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(SHAPE_CLASSES))
    images = np.stack([render_shape(int(y), size, rng) for y in labels]) if n else np.zeros(
        (0, 3, size, size), dtype=np.uint8)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
