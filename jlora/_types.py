"""Type aliases used across jlora (defined once, as in optax's ``base.py``)."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Params = Any  # the frozen base: any pytree of arrays, exactly as the framework made it
Adapters = Any  # mirrors ``Params``, holding only targeted leaves (adapter nodes)
Path = str  # "/"-joined keys of a leaf, e.g. "params/layer_0/attn/query/kernel"
Selector = str | list[str] | tuple[str, ...] | Callable[[Path, Any], bool]


def is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool: the one test of every count jlora reads."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """A real number (Python, numpy or a 0-d JAX scalar), not a bool or a string."""
    if isinstance(value, (bool, np.bool_, str, bytes)):
        return False
    if isinstance(value, (int, float, np.integer, np.floating)):
        return True
    dtype = getattr(value, "dtype", None)
    return (
        getattr(value, "shape", None) == ()
        and dtype is not None
        and (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))
    )
