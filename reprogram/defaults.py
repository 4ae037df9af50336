"""The one table of defaults: estimator options, fit settings and the CLI's recommended values.

:class:`reprogram.estimators.RGFEstimator` and :class:`~reprogram.estimators.SPSAEstimator`
take their keyword defaults from :data:`ESTIMATOR`, :class:`reprogram.config.FitConfig` its
estimator fields from the same entries, and ``reprogram fit`` (with
:func:`reprogram.config.recommended_config`) starts from :data:`RECOMMENDED`, which repeats no
estimator value. The values are the ones that learned fastest per query *on validation* in the
sweep the README reports ("The sweep that chose the defaults").
"""

from __future__ import annotations

from typing import Any

# estimator options (keyword names of the estimator classes)
ESTIMATOR: dict[str, dict[str, Any]] = {
    # a radius that survives the 8-bit wire (1/255 per pixel is far below mu = 1.0 spread over
    # d = 192 directions of a unit vector)
    "rgf": {"q": 10, "mu": 1.0, "antithetic": False},
    "spsa": {"c": 0.05, "gamma": 0.1, "n_draws": 1, "query_theta": True},
    # CMA-ES on the 8x8 grid (d = 192): the best mean validation accuracy at 30k and 100k of
    # the sweep in bench/sweeps/cma.txt (README, "CMA-ES"); a small spread and the smallest
    # population learn fastest per query at these budgets
    "cma": {"sigma": 0.02, "popsize": 2},
}

# SPSA-GC's step-size schedule a / (k + o)^alpha and gradient-correction momentum (BlackVIP's
# tl_bench.sh: spsa_os=1.0, alpha=0.4, b1=0.9)
SPSA_GC: dict[str, float] = {"alpha": 0.4, "o": 1.0, "beta": 0.9}

# what `reprogram fit` adds when the API answers labels only (reprogram.votes): 8 noisy copies
# of every training frame at noise std 0.1, and batches of 8 images so a step costs what one of
# 32 images costs on probabilities with 2 votes; chosen on validation (README, "Label-only")
LABEL_VOTES: dict[str, Any] = {"label_votes": 8, "vote_noise": 0.1, "batch_size": 8}

# the black-box estimator `reprogram fit` picks when none is given: CMA-ES for a budget up to
# CMA_MAX_BUDGET image queries on a probability API, RGF above it, for a fit bounded by epochs
# alone, and on top-k or label answers (where CMA-ES was not measured). Validation means over 3
# seeds (README, "Which estimator for which budget"): CMA-ES 0.431, 0.576, 0.613, 0.708 at 10k,
# 30k, 50k, 70k against RGF's 0.292, 0.482, 0.572, 0.660; RGF 0.734 against 0.700 at 100k
CMA_MAX_BUDGET = 80_000

# the warm start's default length (white-box epochs on the surrogate)
WARM_START_EPOCHS = 20


def blackbox_estimator(budget: int | None, output: str = "probs") -> str:
    """The default estimator of a black-box fit (:data:`CMA_MAX_BUDGET`); ``output`` is the
    API's answer kind (``probs``, ``logits``, ``topk``, ``label``)."""
    if output in ("probs", "logits") and budget is not None and budget <= CMA_MAX_BUDGET:
        return "cma"
    return "rgf"


# what `reprogram fit` adds for a token program (vpt-shallow, vpt-deep): VPT's own head on the
# class token (Jia et al. 2022, Sec. 3.2: the source classifier is discarded) and 10 tokens
TOKEN_PROGRAM: dict[str, Any] = {"labelmap": "head", "tokens": 10}
# CoOp's context vectors (coop, coop-csc) on a zero-shot model, as CoOp trains them
# (KaiyangZhou/CoOp configs/trainers/CoOp/*.yaml: OPTIM.NAME sgd, LR 0.002, cosine schedule;
# DATALOADER.TRAIN_X.BATCH_SIZE 32; TRAINER.COOP.N_CTX 16); the identity label map, since the
# model's classes are the target's. Not modelled: its one-epoch warm-up at a constant 1e-5.
CONTEXT_PROGRAM: dict[str, Any] = {"labelmap": "first", "tokens": 16, "optimizer": "sgd",
                                   "lr": 0.002, "momentum": 0.9, "batch_size": 32}
# context vectors learned through an API (a server's `context` input): BPT-VLM's text half,
# CMA-ES with population 30 on 8 vectors, each entry spread by the token embeddings' std
# (shapes-clip's 0.86); the preset `bpt-vlm` names the line of each value
CONTEXT_BLACK_BOX: dict[str, Any] = {"labelmap": "first", "tokens": 8, "optimizer": "cma",
                                     "cma_sigma": 0.86, "cma_popsize": 30, "batch_size": 64}

# what `reprogram fit` uses per estimator, on top of FitConfig's defaults
RECOMMENDED: dict[str, dict[str, Any]] = {
    "autograd": {"program": "expand", "labelmap": "linear", "optimizer": "adam", "lr": 0.05,
                 "batch_size": 32},
    # black-box: a full-frame overlay on an 8x8 grid (d = 192), the target image filling the
    # frame, a learned linear label map (exact gradient) and Adam; the estimator's own
    # defaults above
    "rgf": {"program": "full", "resolution": 8, "labelmap": "linear",
            "optimizer": "adam", "lr": 0.05, "batch_size": 32},
    "spsa": {"program": "full", "resolution": 8, "labelmap": "linear",
             "optimizer": "adam", "lr": 0.05, "batch_size": 32},
    # P-RGF (a surrogate's prior): the black-box defaults, RGF's q and mu
    "prgf": {"program": "full", "resolution": 8, "labelmap": "linear",
             "optimizer": "adam", "lr": 0.05, "batch_size": 32},
    # CMA-ES sets theta to its mean; Adam at lr trains the linear label map
    "cma": {"program": "full", "resolution": 8, "labelmap": "linear",
            "optimizer": "cma", "lr": 0.05, "batch_size": 32},
}
