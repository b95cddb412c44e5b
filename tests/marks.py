"""Parametrize cases with the long ones behind the ``slow`` marker (``-m slow`` runs them)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest


def slow_where(
    cases: Iterable[tuple], *, ids: Callable[..., str], slow: Callable[..., bool]
) -> list:
    """``pytest.param(*case, id=ids(*case))`` for each case, marked slow where ``slow(*case)``."""
    return [
        pytest.param(*case, id=ids(*case), marks=pytest.mark.slow if slow(*case) else ())
        for case in cases
    ]


def mode(use_jit: bool) -> str:
    """The id suffix of a jit or eager case."""
    return "jit" if use_jit else "eager"
