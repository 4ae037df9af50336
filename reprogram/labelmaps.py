"""Label maps: turn source log-scores ``[..., K_s]`` into target logits ``[..., K_t]``.

Kinds (see DESIGN.md sections 3 and 4):

- ``first``: target class ``t`` reads source class ``t`` (Elsayed et al. 2019).
- ``random``: a seeded random injection of target classes into source classes.
- ``frequency``: greedy one-to-one (or m-to-one) assignment on the frequency matrix of top-1
  source predictions (BAR, Tsai et al. 2020; ILM-VP "FLM", Chen et al. 2023).
- ``iterative``: ``frequency`` re-fitted every epoch under the current program (ILM-VP "ILM").
- ``linear``: a learned ``K_s x K_t`` matrix on the observed scores (AutoVP "FullyMap", Tsao et
  al. 2024). Its gradient is exact even in black-box mode since the scores are observed.
- ``head``: VPT's linear head (Jia et al. 2022) on a ViT's class-token representation
  ``[..., D]`` instead of the source scores (``num_source`` is then ``D``): the source
  classifier is discarded. Needs a local ViT (:mod:`reprogram.tokens`).

Every map takes SOURCE LOG-SCORES (logits, or the log of probabilities; see
:func:`to_log_scores`); leading dimensions are arbitrary (estimators pass ``[P, N, K_s]``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reprogram.errors import ConfigError, DataError, check_int, spec_fields

__all__ = [
    "LabelMap",
    "LabelMapKind",
    "LabelMapScore",
    "LabelMapSpec",
    "Remainder",
    "ScoreKind",
    "build_labelmap",
    "greedy_assignment",
    "to_log_scores",
]

logger = logging.getLogger(__name__)

LabelMapKind = Literal["first", "random", "frequency", "iterative", "linear", "head"]
# kinds with a learned weight and bias (the others hold a discrete assignment)
LEARNED_KINDS = ("linear", "head")
# how a frequency map scores (source, target) pairs: top-1 counts (ILM-VP), or the mean
# probability of a source among an image's top-k predictions (BAR's code)
LabelMapScore = Literal["top1", "top-prob"]
BAR_TOP_K = 30  # BAR adv_reprogramming.py: tf.math.top_k(self.imagenet_prob, 30)
ScoreKind = Literal["probs", "logits", "topk", "label"]
# what a top-k answer's missing classes get: the flat floor, or an equal share of the
# probability the answer leaves unassigned (at most the smallest one shown)
Remainder = Literal["floor", "share"]


def to_log_scores(scores: Tensor, kind: ScoreKind, floor: float = 1e-6,
                  remainder: Remainder = "floor", classes: int | None = None) -> Tensor:
    """Convert what an oracle reveals into log-scores for a label map.

    ``logits`` are returned unchanged. ``probs``, ``topk`` and ``label`` become
    ``log(clamp(scores, min=floor))``. For ``label`` the rows are one-hot, so the predicted
    class gets 0 and all others ``log(floor)``; a row of label votes (the fraction of noisy
    copies answered with each class, :mod:`reprogram.votes`) is mapped linearly between the
    two, ``(v - 1) * -log(floor)``, so a linear label map's output on votes is the mean of
    its outputs on the answers. The floor keeps the log finite (a cross-entropy
    over a subset of classes is invariant to a per-row shift, so logits and log-probabilities
    are interchangeable), at the price that probabilities below the floor carry no signal.

    For ``topk`` the classes outside the top k arrive as 0. With ``remainder="floor"`` they get
    ``log(floor)``; with ``"share"`` each gets an equal share of the mass the answer leaves,
    ``(1 - sum of the top k) / (classes - k)``, capped at the smallest probability shown (a
    class outside the top k is no likelier than the k-th) and floored: the maximum-entropy
    completion of the answer. ``classes`` is how many classes the API has (default: the
    columns; for a label API, the vocabulary slots its answers have filled so far).
    A class's loss then moves with the mass left outside the top k instead of sitting on a
    flat floor, which a zeroth-order estimate needs to see a difference.
    """
    if kind not in get_args(ScoreKind):
        raise ConfigError(f"expected score kind in {get_args(ScoreKind)}, got {kind!r}")
    if not (isinstance(floor, int | float) and 0.0 < floor < 1.0):
        raise ConfigError(f"expected 0 < floor < 1, got {floor!r}")
    if remainder not in get_args(Remainder):
        raise ConfigError(f"expected remainder in {get_args(Remainder)}, got {remainder!r}")
    if kind == "logits":
        return scores
    if kind == "label":  # log(clamp(one-hot, floor)) exactly, and linear between (votes)
        return (scores - 1.0) * -math.log(floor)
    if kind == "topk" and remainder == "share":
        scores = _share_remainder(scores, min(classes or scores.shape[-1], scores.shape[-1]))
    return torch.log(scores.clamp(min=floor))


def _share_remainder(scores: Tensor, classes: int) -> Tensor:
    shown = scores > 0
    k = shown.sum(-1, keepdim=True)
    left = (1.0 - scores.sum(-1, keepdim=True)).clamp(min=0.0)
    share = left / (classes - k).clamp(min=1)
    smallest = torch.where(shown, scores, torch.ones_like(scores)).amin(-1, keepdim=True)
    return torch.where(shown, scores, torch.minimum(share, smallest))


@dataclass(frozen=True, kw_only=True)
class LabelMapSpec:
    """Configuration of a :class:`LabelMap` (JSON-safe via ``to_dict``).

    Attributes:
        kind: ``first`` | ``random`` | ``frequency`` | ``iterative`` | ``linear`` | ``head``.
        num_source: ``K_s``, the number of source classes (``head``: the feature width).
        num_target: ``K_t``, the number of target classes.
        sources_per_target: ``m`` source classes per target class (discrete kinds); their
            scores are averaged as ``logsumexp - log m`` (the mean of probabilities). Must be
            1 for ``linear``.
        seed: seed of the ``random`` permutation.
    """

    kind: LabelMapKind
    num_source: int
    num_target: int
    sources_per_target: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` unless the spec describes a buildable label map."""
        if self.kind not in get_args(LabelMapKind):
            raise ConfigError(f"expected kind in {get_args(LabelMapKind)}, got {self.kind!r}")
        k_s = check_int("num_source", self.num_source, 1)
        k_t = check_int("num_target", self.num_target, 1)
        m = check_int("sources_per_target", self.sources_per_target, 1)
        check_int("seed", self.seed, 0)
        if self.kind in LEARNED_KINDS:
            if m != 1:
                raise ConfigError(f"expected sources_per_target=1 for a {self.kind} map, "
                                  f"got {m}")
        elif m * k_t > k_s:
            raise ConfigError(
                f"expected sources_per_target * num_target <= num_source = {k_s} for a "
                f"{self.kind} map, got {m} * {k_t} = {m * k_t}; use kind='linear' or fewer "
                "sources per target"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; inverse of :meth:`from_dict`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LabelMapSpec:
        """Build and validate a spec from :meth:`to_dict` output; :class:`ConfigError` if bad."""
        return cls(**spec_fields("LabelMapSpec", d, cls.__dataclass_fields__,
                                 ("kind", "num_source", "num_target")))


def greedy_assignment(freq: Tensor, sources_per_target: int = 1) -> Tensor:
    """Greedy (m-to-one) assignment on a frequency matrix ``F[K_s, K_t]`` (BAR / ILM-VP).

    Repeats ``K_t * m`` times: take the argmax ``(s, t)`` among unassigned source rows and
    target columns that still need sources, assign ``s -> t``, strike row ``s`` (and column
    ``t`` once it has ``m`` sources). Ties go to the lowest source index, then the lowest
    target index. Returns ``[K_t, m]`` source indices in the order they were chosen.
    """
    k_s, k_t = freq.shape
    m = sources_per_target
    if m * k_t > k_s:
        raise ConfigError(f"expected m * K_t <= K_s = {k_s}, got {m} * {k_t}")
    work = freq.detach().to(torch.float64).clone()
    if bool((work < 0).any()):
        raise DataError("expected non-negative frequencies, got a negative entry")
    struck = -1.0
    assignment = torch.empty(k_t, m, dtype=torch.long)
    filled = [0] * k_t
    for _ in range(k_t * m):
        flat = int(torch.argmax(work))  # first maximal value: lowest (s, t) in row-major order
        s, t = divmod(flat, k_t)
        assignment[t, filled[t]] = s
        filled[t] += 1
        work[s, :] = struck
        if filled[t] == m:
            work[:, t] = struck
    return assignment


class LabelMap(nn.Module):
    """Map source log-scores ``[..., K_s]`` to target logits ``[..., K_t]``.

    Discrete kinds hold a persistent buffer ``assignment`` (``[K_t, m]`` source indices) and
    return ``logsumexp(log_scores[..., assignment], -1) - log m`` (for ``m = 1`` simply the
    selected score). ``frequency``/``iterative`` start as ``first`` until :meth:`fit` is called.

    ``linear`` (AutoVP FullyMap) holds ``weight [K_s, K_t]`` and ``bias [K_t]`` and returns
    ``log_softmax(log_scores) @ weight + bias``. The ``log_softmax`` removes the per-row shift
    between logits and log-probabilities, so the map sees the same input whatever the oracle
    reveals. ``weight`` starts as the ``first`` mapping (``weight[t, t] = 1``), bias at 0, so an
    untrained linear map equals ``first`` (up to a per-row shift).
    """

    assignment: Tensor

    def __init__(self, spec: LabelMapSpec) -> None:
        super().__init__()
        spec.validate()
        self.spec = spec
        k_s, k_t, m = spec.num_source, spec.num_target, spec.sources_per_target
        self.weight: nn.Parameter | None = None
        self.bias: nn.Parameter | None = None
        if spec.kind == "head":  # torch's nn.Linear initialization, seeded
            gen = torch.Generator().manual_seed(spec.seed)
            bound = 1.0 / math.sqrt(k_s)
            self.weight = nn.Parameter((torch.rand(k_s, k_t, generator=gen) * 2 - 1) * bound)
            self.bias = nn.Parameter((torch.rand(k_t, generator=gen) * 2 - 1) * bound)
            return
        if spec.kind == "linear":
            n = min(k_s, k_t)
            weight = torch.zeros(k_s, k_t)
            weight[torch.arange(n), torch.arange(n)] = 1.0
            self.weight = nn.Parameter(weight)
            self.bias = nn.Parameter(torch.zeros(k_t))
            return
        if spec.kind == "random":
            gen = torch.Generator().manual_seed(spec.seed)
            order = torch.randperm(k_s, generator=gen)[: k_t * m]
        else:
            order = torch.arange(k_t * m)
        self.register_buffer("assignment", order.view(k_t, m).clone(), persistent=True)

    @property
    def needs_fit(self) -> bool:
        """True for kinds fitted from data with :meth:`fit` (``frequency``, ``iterative``)."""
        return self.spec.kind in ("frequency", "iterative")

    @property
    def reads_features(self) -> bool:
        """True for ``head``: it reads a ViT's class-token features, not source scores."""
        return self.spec.kind == "head"

    @property
    def refit_every_epoch(self) -> bool:
        """True only for ``iterative`` (ILM-VP): re-fit under the current program each epoch."""
        return self.spec.kind == "iterative"

    def forward(self, log_scores: Tensor, active: int | None = None) -> Tensor:
        """Target logits ``[..., K_t]`` from source log-scores ``[..., K_s]``.

        ``active``: only the first ``active`` source classes exist yet (an API answering class
        names fills its slots as names appear, :mod:`reprogram.vocabulary`). A linear map then
        reads those alone: the slots never seen neither shift the normalization nor act, all at
        one constant score, as a bias multiplied by their number; their rows stay at their
        initial value until a name arrives. Discrete maps read their assigned slots as usual.
        """
        k_s = self.spec.num_source
        if log_scores.dim() < 1 or log_scores.shape[-1] != k_s:
            raise DataError(
                f"expected source log-scores [..., {k_s}], got shape {tuple(log_scores.shape)}"
            )
        if self.spec.kind == "head" and self.weight is not None and self.bias is not None:
            return log_scores @ self.weight.to(log_scores.dtype) + self.bias.to(log_scores.dtype)
        if self.weight is not None and self.bias is not None:
            n = k_s if active is None else max(1, min(int(active), k_s))
            normalized = F.log_softmax(log_scores[..., :n], dim=-1)
            weight = self.weight[:n]
            return normalized @ weight.to(normalized.dtype) + self.bias.to(normalized.dtype)
        picked = log_scores[..., self.assignment]  # [..., K_t, m]
        if self.spec.sources_per_target == 1:
            return picked.squeeze(-1)
        return torch.logsumexp(picked, dim=-1) - math.log(self.spec.sources_per_target)

    @torch.no_grad()
    def fit(self, source_top1: Tensor, target_labels: Tensor) -> None:
        """Fit ``frequency``/``iterative`` maps: ``F[s, t]`` = #images of target class ``t``
        whose top-1 source prediction is ``s``, then :func:`greedy_assignment`.
        """
        if not self.needs_fit:
            raise ConfigError(
                f"expected a label map kind in ('frequency', 'iterative') for fit, "
                f"got {self.spec.kind!r}"
            )
        k_s, k_t = self.spec.num_source, self.spec.num_target
        if source_top1.dim() != 1 or target_labels.shape != source_top1.shape:
            raise DataError(
                f"expected source_top1 [N] and target_labels [N], got "
                f"{tuple(source_top1.shape)} and {tuple(target_labels.shape)}"
            )
        s = source_top1.detach().to("cpu", torch.long)
        t = target_labels.detach().to("cpu", torch.long)
        if s.numel() and (int(s.min()) < 0 or int(s.max()) >= k_s):
            raise DataError(f"expected source predictions in [0, {k_s}), got out-of-range values")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= k_t):
            raise DataError(f"expected target labels in [0, {k_t}), got out-of-range values")
        freq = torch.bincount(s * k_t + t, minlength=k_s * k_t).view(k_s, k_t)
        self.fit_matrix(freq)
        logger.debug("fitted %s label map on %d images", self.spec.kind, s.numel())

    @torch.no_grad()
    def fit_matrix(self, score: Tensor) -> None:
        """Fit ``frequency``/``iterative`` maps from a score matrix ``[K_s, K_t]`` by
        :func:`greedy_assignment`."""
        if not self.needs_fit:
            raise ConfigError(
                f"expected a label map kind in ('frequency', 'iterative') for fit, "
                f"got {self.spec.kind!r}"
            )
        assignment = greedy_assignment(score, self.spec.sources_per_target)
        self.assignment.copy_(assignment.to(self.assignment.device))

    @torch.no_grad()
    def as_matrix(self) -> Tensor:
        """``[K_s, K_t]``: 0/1 for discrete kinds, the learned weight for ``linear``."""
        if self.weight is not None:
            return self.weight.detach().clone()
        k_s, k_t = self.spec.num_source, self.spec.num_target
        matrix = torch.zeros(k_s, k_t)
        cols = torch.arange(k_t).unsqueeze(1).expand_as(self.assignment)
        matrix[self.assignment.cpu(), cols] = 1.0
        return matrix

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        if self.weight is None:
            a = self.assignment
            k_s = self.spec.num_source
            if a.numel() and (int(a.min()) < 0 or int(a.max()) >= k_s):
                raise DataError(f"expected assignment indices in [0, {k_s}), got out-of-range")
            if torch.unique(a).numel() != a.numel():
                raise DataError("expected distinct source classes in assignment, got repeats")

    def extra_repr(self) -> str:
        return f"spec={self.spec}"


def top_prob_matrix(probs: Tensor, target_labels: Tensor, num_target: int,
                    k: int = BAR_TOP_K) -> Tensor:
    """BAR's mapping scores ``[K_s, K_t]``: for target class ``t`` and source class ``s``, the
    mean probability of ``s`` over the images of class ``t`` that have ``s`` among their top
    ``k`` predictions (0 where it never is); ``adv_reprogramming.py`` sums the top-30 values per
    class and ``mapping_func.freq_idx_search`` divides by their count. ``probs`` are ``[N, K_s]``
    source probabilities, ``k`` is capped at ``K_s``."""
    if probs.dim() != 2 or target_labels.shape != probs.shape[:1]:
        raise DataError(f"expected probs [N, K_s] and labels [N], got {tuple(probs.shape)} and "
                        f"{tuple(target_labels.shape)}")
    k_s = probs.shape[1]
    values, idx = probs.detach().to(torch.float64).topk(min(k, k_s), dim=-1)
    cols = target_labels.detach().to(torch.long)[:, None].expand_as(idx)
    flat = (idx * num_target + cols).reshape(-1)
    total = torch.zeros(k_s * num_target, dtype=torch.float64).index_add_(
        0, flat, values.reshape(-1))
    count = torch.bincount(flat, minlength=k_s * num_target).to(torch.float64)
    return (total / count.clamp(min=1)).view(k_s, num_target)


def build_labelmap(spec: LabelMapSpec) -> LabelMap:
    """Build a :class:`LabelMap` from its spec (``random`` is seeded by ``spec.seed``)."""
    return LabelMap(spec)
