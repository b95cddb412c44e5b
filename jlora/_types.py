"""Type aliases used across jlora (defined once, as in optax's ``base.py``)."""

from collections.abc import Callable
from typing import Any

import jax

Array = jax.Array
Params = Any  # the frozen base: any pytree of arrays, exactly as the framework made it
Adapters = Any  # mirrors ``Params``, holding only targeted leaves (adapter nodes)
Path = str  # "/"-joined keys of a leaf, e.g. "params/layer_0/attn/query/kernel"
Selector = str | list[str] | tuple[str, ...] | Callable[[Path, Any], bool]
