"""Pixel-range helpers shared by the programs and the oracles."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["clamp01"]


def clamp01(x: Tensor) -> Tensor:
    """``clamp(x, 0, 1)`` whose gradient also passes AT the bounds (torch's is 0 there).

    A pixel exactly at 0 or 1 is in range and must keep its gradient: Elsayed's overlay starts at
    ``tanh(0) = 0`` on a black frame, exactly on the lower bound, and a white image pixel sits on
    the upper one. With torch's clamp the gradient there would be identically zero.
    """
    return torch.where((x >= 0) & (x <= 1), x, x.clamp(0.0, 1.0))
