"""The zoo tests run tunix's and gemma's own model code, which mixes integer and float
operands (``positions * frequencies``): standard dtype promotion for them, instead of
the strict promotion that ``tests/conftest.py`` sets for jlora's own code."""

import jax
import pytest


@pytest.fixture(autouse=True)
def standard_promotion():
    with jax.numpy_dtype_promotion("standard"):
        yield
