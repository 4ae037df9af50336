"""Pictures of a hosted prompt, for people: its program, and an image as the model receives it.

:func:`program_png` draws what the prompt learned: a pixel program's pixels (an additive
overlay in [-1, 1] around grey; 0, black, where the image shows through a frame), a
coordinator's program on a grey image, or VPT's prompt tokens as a grey-scale matrix (one row
per token, layers stacked for ``vpt-deep``; the values stretched to [0, 1]), since tokens have
no pixels. :func:`rendered_png` is the image after the prompt's input transform and program:
exactly the frame the source model is sent (``reprogram apply`` and ``/predict`` send the same).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from reprogram.programs import TokenProgram
from server.hosted import PromptServable


def _png(image: torch.Tensor) -> bytes:
    """``[3, H, W]`` in [0, 1] as PNG bytes."""
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()).save(out, format="PNG")
    return out.getvalue()


def _token_matrix(theta: torch.Tensor) -> torch.Tensor:
    """Prompt tokens ``[N, D]`` or ``[L, N, D]`` as a grey ``[3, rows, D]`` image."""
    rows = theta.detach().float().reshape(-1, theta.shape[-1])
    low, high = rows.min(), rows.max()
    scaled = (rows - low) / (high - low) if bool(high > low) else torch.full_like(rows, 0.5)
    return scaled[None].expand(3, -1, -1)


@torch.no_grad()
def program_png(servable: PromptServable) -> bytes:
    """The prompt's program drawn as a PNG (see the module docstring)."""
    program = servable.reprogrammer.program
    if isinstance(program, TokenProgram):
        return _png(_token_matrix(program.theta))
    pixels = program.delta()
    if bool(pixels.min() < 0):
        pixels = (pixels + 1.0) / 2.0
    return _png(pixels)


@torch.no_grad()
def rendered_png(servable: PromptServable, image: np.ndarray) -> bytes:
    """One target image uint8 ``[3, H, W]`` as the source model receives it, as a PNG."""
    x = torch.from_numpy(np.ascontiguousarray(image))[None]
    return _png(servable.reprogrammer.program.render(x)[0])
