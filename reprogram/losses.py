"""Training losses on target logits: cross-entropy and the two focal losses of the anchors.

Kinds (:class:`LossSpec`):

- ``ce``: cross-entropy on the target logits (ours, Elsayed et al., Bahng et al., ILM-VP,
  BlackVIP).
- ``focal``: the multi-class focal loss of Lin et al. 2017, ``-(1 - p_y)^gamma log p_y`` with
  ``p = softmax(logits)`` (BlackVIP's port of BAR, ``trainers/utils.py`` ``FocalLoss``, gamma
  from ``TRAINER.BAR.FOCAL_G``).
- ``focal-bar``: the loss of BAR's own code (``cal_func.py`` ``multi_focal_loss``): one binary
  focal term per target class on the mapped probabilities ``p_t`` (the mean source probability
  of the class's sources, not renormalized), ``y_t = p_t`` for the true class and ``1 - p_t``
  for the others, weighted ``alpha`` for the true class and ``1 - alpha`` for the others,
  ``-w_t (1 - y_t)^gamma log y_t``, averaged over the classes; probabilities are clipped to
  ``[1e-7, 1 - 1e-7]`` as there. It needs target logits that are log-probabilities, which the
  objective arranges (:meth:`reprogram.pipeline.Reprogrammer.objective`).

Every loss is per sample (``[M]``); the objective averages over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from reprogram.errors import ConfigError, coerce_spec

LossKind = Literal["ce", "focal", "focal-bar"]

_CLIP = 1e-7  # BAR cal_func.py: epsilon = 1.e-7, tf.clip_by_value(y_pred, epsilon, 1 - epsilon)


@dataclass(frozen=True, kw_only=True)
class LossSpec:
    """Which loss a fit minimises; ``gamma`` and ``alpha`` are the focal losses' parameters."""

    kind: LossKind = "ce"
    gamma: float = 2.0
    alpha: float = 0.8

    def __post_init__(self) -> None:
        if self.kind not in get_args(LossKind):
            raise ConfigError(f"expected loss kind in {get_args(LossKind)}, got {self.kind!r}")
        for name, low, high in (("gamma", 0.0, math.inf), ("alpha", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    low <= float(value) <= high) or not math.isfinite(float(value)):
                raise ConfigError(f"expected loss {name} a number in [{low}, {high}], "
                                  f"got {value!r}")

    @property
    def needs_log_probs(self) -> bool:
        """True when the target logits must be log-probabilities (``focal-bar``)."""
        return self.kind == "focal-bar"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def coerce(cls, value: LossSpec | Mapping[str, Any] | str) -> LossSpec:
        """A spec from a spec, its dict (as in a saved config), or a bare kind name."""
        return coerce_spec(cls, value, "loss")

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        """Per-sample loss ``[M]`` of target logits ``[M, K]`` and labels ``[M]``."""
        if self.kind == "ce":
            return F.cross_entropy(logits, target, reduction="none")
        if self.kind == "focal":
            log_p = F.log_softmax(logits, dim=-1).gather(1, target[:, None])[:, 0]
            # BlackVIP's FocalLoss takes pt = exp(logpt) out of the graph (Variable(.data))
            p = log_p.detach().exp()
            return -((1.0 - p) ** self.gamma) * log_p
        p = logits.exp().clamp(_CLIP, 1.0 - _CLIP)
        onehot = F.one_hot(target, logits.shape[-1]).to(p.dtype)
        y_t = onehot * p + (1.0 - onehot) * (1.0 - p)
        weight = onehot * self.alpha + (1.0 - onehot) * (1.0 - self.alpha)
        return (weight * (1.0 - y_t) ** self.gamma * -torch.log(y_t)).mean(dim=-1)
