"""Property-based fuzzing with hypothesis, sized by the run: a few hundred inputs per property
in the default suite (deterministic: the same inputs on every run), :data:`EXTENDED_EXAMPLES`
(random) with ``pytest --extended``. :func:`fuzz` counts the inputs it really tried and, in
the extended run, fails unless there were at least that many."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

T = TypeVar("T")

DEFAULT_EXAMPLES = 200
EXTENDED_EXAMPLES = 10_000


def fuzz(strategy: st.SearchStrategy[T], check: Callable[[T], Any], *, extended: bool,
         examples: int = DEFAULT_EXAMPLES) -> int:
    """Run ``check`` on generated inputs; returns how many it saw."""
    wanted = EXTENDED_EXAMPLES if extended else examples
    seen = 0

    @settings(max_examples=wanted, deadline=None, database=None, derandomize=not extended,
              suppress_health_check=list(HealthCheck), phases=(Phase.generate, Phase.shrink),
              print_blob=True)
    @given(strategy)
    def run(value: T) -> None:
        nonlocal seen
        seen += 1
        check(value)

    run()
    if extended:
        assert seen >= EXTENDED_EXAMPLES, f"only {seen} inputs were generated"
    return seen


def json_values(max_leaves: int = 30) -> st.SearchStrategy[Any]:
    """Any JSON value: scalars (also huge, negative and non-finite numbers), lists, objects."""
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
        st.sampled_from(["[", "]", "{", "}", '"', "\\", "\\\\", '\\"', ",", "\u00b2"]))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=8), inner, max_size=6)),
        max_leaves=max_leaves)
