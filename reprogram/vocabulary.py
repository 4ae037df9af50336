"""Source classes of an API that answers class *names*, learned as the names appear.

A label API (TorchServe's image classifier, a hosted "upload an image, get the top 5" service,
our ``/v1/models/{m}/predict``) reveals the names of its top-k classes per image, from a label
set the client does not know in advance. :class:`Vocabulary` gives every name a fixed *slot*
the first time it appears, so the source dimension ``K_s`` of the label map is the vocabulary's
``capacity`` from the first step on and never grows mid-fit: a name seen late lands in a slot
whose label-map row has been sitting at its initial value (its score was the floor until then).
Top-k scores become a ``[N, capacity]`` row with the revealed probabilities in their slots and
0 elsewhere (the loss floors them, as for ``topk:K``). The artifact records the names in slot
order (``source.vocabulary``); ``reprogram eval``/``apply``/``serve`` give the oracle that
list back first (:meth:`adopt`), so every name keeps its slot.

When all slots are taken (more distinct names than ``capacity``, or a fixed ``--class-names``
list that lacks a name), a new name is dropped from the answer (its mass joins the hidden
remainder) and a warning names it, once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from reprogram.errors import ArtifactError, ConfigError, UpstreamError

log = logging.getLogger(__name__)

NamedRow = list[tuple[str, float]]


class Vocabulary:
    """Name -> slot for up to ``capacity`` source classes; ``fixed`` names take no new ones."""

    def __init__(self, capacity: int, names: Sequence[str] = (), *, fixed: bool = False
                 ) -> None:
        if capacity < 1 or len(names) > capacity:
            raise ConfigError(f"expected 1 <= {len(names)} names <= capacity, got capacity "
                              f"{capacity}")
        if len(set(names)) != len(names):
            raise ConfigError("expected distinct class names, got repeats")
        self.capacity = capacity
        self.fixed = fixed
        self._slots: dict[str, int] = {n: i for i, n in enumerate(names)}
        self._dropped: set[str] = set()
        self._lock = threading.Lock()

    @property
    def names(self) -> tuple[str, ...]:
        """The names seen so far, in slot order."""
        with self._lock:
            return tuple(self._slots)

    def slot_names(self) -> tuple[str, ...]:
        """One name per slot: the names seen, then ``unseen-i`` placeholders."""
        seen = self.names
        return seen + tuple(f"unseen-{i}" for i in range(len(seen), self.capacity))

    def slot(self, name: str) -> int | None:
        """The slot of ``name``, assigning the next free one to a new name (None when full)."""
        with self._lock:
            index = self._slots.get(name)
            if index is not None:
                return index
            if self.fixed or len(self._slots) >= self.capacity:
                if name not in self._dropped:
                    self._dropped.add(name)
                    why = ("not among --class-names" if self.fixed else
                           f"all {self.capacity} slots are taken (raise --max-classes)")
                    log.warning("the endpoint answered the class %r, %s; its score is "
                                "dropped", name, why)
                return None
            index = self._slots[name] = len(self._slots)
            return index

    def adopt(self, names: Iterable[str]) -> None:
        """Give ``names`` (a prompt's recorded vocabulary) their recorded slots; names already
        seen must hold the same slots."""
        with self._lock:
            for i, name in enumerate(names):
                have = self._slots.get(name)
                if have is None and i == len(self._slots) and i < self.capacity:
                    self._slots[name] = i
                elif have != i:
                    raise ArtifactError(f"expected class {name!r} in slot {i} as the prompt "
                                        f"records, got slot {have} on this endpoint")

    def scores(self, rows: Sequence[NamedRow]) -> torch.Tensor:
        """``[N, capacity]`` float32: each row's revealed scores in their slots, 0 elsewhere."""
        out = torch.zeros(len(rows), self.capacity)
        for i, row in enumerate(rows):
            for name, score in row:
                j = self.slot(name)
                if j is not None:
                    out[i, j] = score
        return out


def _score(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UpstreamError(f"expected a number as a class score in {where}, got "
                            f"{type(value).__name__}",
                            public_message="the upstream model server answered something "
                                           "unreadable")
    score = float(value)
    if score != score or score in (float("inf"), float("-inf")):
        raise UpstreamError(f"expected finite class scores in {where}, got {score}",
                            public_message="the upstream model server answered non-finite "
                                           "scores")
    return score


def named_row(answer: Any, where: str) -> NamedRow:
    """One image's named scores from the answer shapes label APIs use: ``{name: score}``
    (TorchServe), ``[{"label": name, "score": s}, ...]`` (hosted image classifiers), and
    ``{"predictions": [{"top": [...]}]}`` (our ``/v1`` predict route) or a one-element list
    of any of these."""
    if isinstance(answer, dict) and isinstance(answer.get("predictions"), list) and len(
            answer["predictions"]) == 1:
        first = answer["predictions"][0]
        top = first.get("top") if isinstance(first, dict) and "top" in first else first
        return named_row(top, where)
    if isinstance(answer, list) and answer:
        if all(isinstance(e, dict) and "label" in e for e in answer):
            return [(str(e["label"]), _score(e.get("score", 1.0), where)) for e in answer]
        if len(answer) == 1:
            return named_row(answer[0], where)
    elif isinstance(answer, dict) and answer and not {"label", "score"} & set(answer):
        return [(str(k), _score(v, where)) for k, v in answer.items()]
    shown = str(answer).replace("\n", " ")[:80]
    raise UpstreamError(f"expected class names with scores from {where} ({{name: score}} or "
                        f"[{{label, score}}]), got {shown!r}",
                        public_message="the upstream model server answered something "
                                       "unreadable")
