"""Step-size schedules: the learning-rate factor at every step of a fit.

Kinds (:class:`ScheduleSpec`), as a ``LambdaLR`` factor of step ``t = 0, 1, ...`` over a fit of
``T`` steps (``T`` is known before the first step, from epochs or the budget):

- ``constant``: 1.
- ``cosine``: ``(1 + cos(pi t / T)) / 2`` (ours).
- ``warmup-cosine``: linear warm-up ``(t + 1) / warmup_steps`` for the first ``warmup_steps``,
  then cosine over the rest (Bahng et al., ``hjbahng/visual_prompting`` ``utils.py``
  ``cosine_lr`` with ``main_clip.py --warmup 1000``).
- ``poly``: ``lr_min + (lr - lr_min) (1 - min(t, 0.9 T) / (0.9 T))^power`` (BlackVIP's port of
  BAR, ``trainers/reprogramming.py``: ``decay_steps = total_length * 0.9``, power 0.9).
- ``multistep``: multiplied by ``gamma`` at each fraction of ``T`` in ``milestones`` (ILM-VP,
  ``MultiStepLR(milestones=[0.5 * epochs, 0.72 * epochs], gamma=0.1)``).
- ``exponential``: ``gamma ** floor(epoch / decay_epochs)`` (Elsayed et al.'s decay of 0.96
  every 2 epochs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from reprogram.errors import ConfigError, coerce_spec

ScheduleKind = Literal["constant", "cosine", "warmup-cosine", "poly", "multistep", "exponential"]


@dataclass(frozen=True, kw_only=True)
class ScheduleSpec:
    """A learning-rate schedule and its parameters (see the module docstring)."""

    kind: ScheduleKind = "cosine"
    warmup_steps: int = 0
    lr_min: float = 0.0
    power: float = 0.9
    milestones: tuple[float, ...] = (0.5, 0.72)
    gamma: float = 0.1
    decay_epochs: int = 2

    def __post_init__(self) -> None:
        if self.kind not in get_args(ScheduleKind):
            raise ConfigError(f"expected schedule kind in {get_args(ScheduleKind)}, "
                              f"got {self.kind!r}")
        object.__setattr__(self, "milestones", tuple(self.milestones))
        for name in ("warmup_steps", "decay_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (
                    0 if name == "warmup_steps" else 1):
                raise ConfigError(f"expected schedule {name} an int >= "
                                  f"{0 if name == 'warmup_steps' else 1}, got {value!r}")
        for name in ("lr_min", "power", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    math.isfinite(float(value)) and float(value) >= 0):
                raise ConfigError(f"expected schedule {name} a finite number >= 0, "
                                  f"got {value!r}")
        if not all(isinstance(m, int | float) and 0 < float(m) < 1 for m in self.milestones):
            raise ConfigError(f"expected schedule milestones in (0, 1), got {self.milestones!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def coerce(cls, value: ScheduleSpec | Mapping[str, Any] | str) -> ScheduleSpec:
        """A spec from a spec, its dict (as in a saved config), or a bare kind name."""
        return coerce_spec(cls, value, "schedule")

    def factor(self, total_steps: int, steps_per_epoch: int,
               lr: float) -> Callable[[int], float]:
        """The ``LambdaLR`` factor of step ``t`` (0-based) for a base rate ``lr``."""
        total = max(int(total_steps), 1)
        kind = self.kind
        if kind == "constant":
            return lambda t: 1.0
        if kind == "cosine":
            return lambda t: (1.0 + math.cos(math.pi * min(t, total) / total)) / 2.0
        if kind == "warmup-cosine":
            warm = self.warmup_steps

            def warm_cos(t: int) -> float:
                if t < warm:
                    return (t + 1) / warm
                rest = max(total - warm, 1)
                return (1.0 + math.cos(math.pi * min(t - warm, rest) / rest)) / 2.0

            return warm_cos
        if kind == "poly":
            decay = 0.9 * total
            low = self.lr_min / lr if lr else 0.0

            return lambda t: low + (1.0 - low) * (1.0 - min(t, decay) / decay) ** self.power
        if kind == "multistep":
            marks = [m * total for m in self.milestones]
            return lambda t: self.gamma ** sum(t >= m for m in marks)
        per_epoch = max(int(steps_per_epoch), 1)
        return lambda t: self.gamma ** ((t // per_epoch) // self.decay_epochs)
