"""AutoVP's input-scaling search: the size of the embedded target image, chosen on validation.

AutoVP (Tsao et al., ICLR 2024, "AutoVP: An Automated Visual Prompting Framework and
Benchmark") embeds the target image at a searched scale inside the source frame and lets the
prompt fill the rest. Its public code fixes the values used here:

- the base size is 128 px in a 224 px frame (``auto_vp/const.py``, ``IMG_SIZE = 128`` for
  every dataset; the frame is ``output_size=(3, 224, 224)`` in ``ray_tune_setting.py``); we keep
  the ratio, ``base = round(min(H, W) * 128 / 224)``, so the search scales with the frame;
- the scales searched are ``scale_range = [0.5, 1.0, 1.5]`` (``ray_tune_setting.py``,
  ``Parameter_Tune``), the image side being ``int(base * scale)`` capped at the frame
  (``img_resize = int(img_resize*scale)`` and ``if img_resize > 224`` in ``train_model``).

Where we differ, and why: AutoVP's tuner ranks trials by *training* accuracy
(``tune.report(accuracy=total_train_acc...)`` in ``Training_local``); we rank by validation
accuracy, as every selection in this project does. AutoVP can also learn the scale by gradient
(``Trainable_Resize``); a black-box fit has no gradient for it, so only the searched variant is
offered. Each trial is a short fit on ``share`` of the budget split evenly (one epoch each for
epoch-bounded fits); the winner is then fitted afresh with what is left, and the trials'
queries count against the budget like any other.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import Any

from reprogram.config import FitConfig
from reprogram.data import TargetDataset
from reprogram.errors import ConfigError
from reprogram.oracles import Oracle

__all__ = ["AUTOVP_BASE", "AUTOVP_SCALES", "ScaleTrial", "scaled_inner", "search_scale"]

log = logging.getLogger(__name__)

AUTOVP_BASE = 128 / 224  # auto_vp/const.py IMG_SIZE (128) over the 224 px frame
AUTOVP_SCALES = (0.5, 1.0, 1.5)  # auto_vp/ray_tune_setting.py scale_range
SEARCH_SHARE = 0.3  # of the budget, split over the trials


@dataclass(frozen=True, kw_only=True)
class ScaleTrial:
    """One trial of the search: the scale, the inner size it gives, what it reached."""

    scale: float
    inner_size: int
    val_accuracy: float
    queries: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scaled_inner(program: str, frame_size: tuple[int, int], scale: float) -> int:
    """The target image side for ``scale`` (AutoVP: ``int(base * scale)``, capped so the
    program keeps a border: ``min(H, W) - 2`` for ``expand``, ``min(H, W)`` for ``full``)."""
    border = program in ("pad", "expand")  # ILM-VP's expansive prompt (``expand``, was ``pad``)
    if not border and program != "full":
        raise ConfigError(f"expected a pad (expand) or full program for --scale (the image size"
                          f" is what it sets), got {program!r}")
    if not 0 < scale <= 8:
        raise ConfigError(f"expected a scale in (0, 8], got {scale}")
    short = min(frame_size)
    base = round(short * AUTOVP_BASE)
    cap = short - 2 if border else short
    return max(1, min(cap, int(base * scale)))


def search_scale(cfg: FitConfig, oracle: Oracle, data: TargetDataset, *,
                 scales: tuple[float, ...] = AUTOVP_SCALES,
                 share: float = SEARCH_SHARE) -> tuple[FitConfig, list[ScaleTrial]]:
    """Short fits at each scale; ``cfg`` with the best one's ``inner_size`` (by validation
    accuracy, the smaller image on ties) and the remaining budget, and the trials."""
    from reprogram.fit import fit

    if not 0 < share < 1:
        raise ConfigError(f"expected a search share in (0, 1), got {share}")
    frame = oracle.info.input_size
    inners = sorted({scaled_inner(cfg.program, frame, s): s for s in scales}.items())
    start = oracle.images_used
    total = oracle.budget if oracle.budget is not None else (
        start + cfg.budget if cfg.budget is not None else None)
    per = int(cfg.budget * share / len(inners)) if cfg.budget is not None else None
    trials = []
    for inner, scale in inners:
        before = oracle.images_used
        trial_cfg = replace(cfg, inner_size=inner, budget=per, checkpoint=None,
                            epochs=1 if cfg.budget is None else None)
        oracle.budget = None if per is None else before + per
        try:
            result = fit(trial_cfg, oracle, data, evaluate_test=False)
        finally:
            oracle.budget = total
        trials.append(ScaleTrial(scale=scale, inner_size=inner,
                                 val_accuracy=result.best_val_accuracy,
                                 queries=oracle.images_used - before))
        log.info("scale %.2f (inner %d px): val accuracy %.4f", scale, inner,
                 result.best_val_accuracy)
    best = max(trials, key=lambda t: (t.val_accuracy, -t.inner_size))
    left = None if cfg.budget is None else cfg.budget - (oracle.images_used - start)
    return replace(cfg, inner_size=best.inner_size, budget=left), trials
