"""Pictures a user looks at: the learning curve and the learned program."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def learning_curve(history: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Validation accuracy (and training loss) against image queries, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in history if r.get("val_accuracy") is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.plot([r["queries"] for r in rows], [r["val_accuracy"] for r in rows], marker="o",
            markersize=3, color="tab:blue", label="validation accuracy")
    ax.set_xlabel("image queries")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    losses = [r for r in rows if r.get("loss") is not None]
    if losses:
        ax2 = ax.twinx()
        ax2.plot([r["queries"] for r in losses], [r["loss"] for r in losses], color="tab:orange",
                 alpha=0.6, label="training loss")
        ax2.set_ylabel("training loss (batch)")
        ax2.legend(loc="lower right")
    ax.legend(loc="upper left")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _to_pil(img: torch.Tensor, scale: int) -> Image.Image:
    arr = (img.detach().clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    pil = Image.fromarray(arr)
    return pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)


def program_picture(program_pixels: torch.Tensor, framed: torch.Tensor, path: Path,
                    scale: int = 6) -> Path:
    """The program alone (left), then each sample image with the program applied, as a PNG.

    ``program_pixels`` is ``[3,H,W]`` (an additive overlay in [-1,1] is shown around grey);
    ``framed`` is ``[N,3,H,W]`` in [0,1].
    """
    shown = program_pixels
    if bool(shown.min() < 0):
        shown = (shown + 1.0) / 2.0
    tiles = [_to_pil(shown, scale)] + [_to_pil(x, scale) for x in framed]
    gap = 4
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    canvas = Image.new("RGB", (width, max(t.height for t in tiles)), (255, 255, 255))
    x = 0
    for t in tiles:
        canvas.paste(t, (x, 0))
        x += t.width + gap
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
