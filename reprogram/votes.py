"""Label votes: class probabilities for a label-only API, estimated from its answers.

A label-only API answers one class per image, so a small change of the program rarely changes
any answer and a zeroth-order estimate sees no difference between candidates. Smoothing the
classifier as randomized smoothing does (Cohen, Rosenfeld, Kolter, ICML 2019: the class
probabilities of ``f(x + delta)``, ``delta ~ N(0, sigma^2 I)``) turns the answers into a
quantity that moves continuously with the program: every training frame is sent ``V`` times,
each copy with one of ``V`` Gaussian noise images added, and the fraction of copies answered
with each class is its vote (Ilyas et al., ICML 2018, estimate a label-only model's scores
the same way). A step costs ``V`` times the images of a step on probabilities.

The noise images are the same for every frame and every candidate of a step (common random
numbers: two candidates differ only by their programs) and are drawn anew each step from the
fit's seed and the step number, so a resumed fit draws the same ones. Validation, test and
every prediction ask once per image, without noise: a linear label map reads votes and single
answers on one linear scale (:func:`reprogram.labelmaps.to_log_scores`), so what it learned on
votes is what it applies to an answer.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["vote_noise"]

_STEP_STRIDE = 1_000_003


def vote_noise(votes: int, sigma: float, frame: tuple[int, int], *, seed: int,
               step: int) -> Tensor | None:
    """The ``[votes, 3, H, W]`` noise images of one step, or None when ``votes`` is 1."""
    if votes <= 1:
        return None
    gen = torch.Generator().manual_seed(seed * _STEP_STRIDE + step)
    return sigma * torch.randn((votes, 3, *frame), generator=gen)
