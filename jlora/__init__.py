"""jlora: LoRA for JAX as a pure function over parameter pytrees.

>>> import jax, jax.numpy as jnp, jlora
>>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
>>> spec = jlora.LoraSpec(rank=2, alpha=4.0, targets=["dense"])
>>> adapters = jlora.init(spec, params, jax.random.key(0))
>>> y = jlora.lora(lambda p, x: x @ p["dense"]["kernel"])(params, adapters, jnp.ones((1, 4)))
"""

from jlora import peft
from jlora._adapter import DoraAdapter, Layout, LoraAdapter, LoraBiasAdapter, is_adapter
from jlora._combine import combine
from jlora._compress import LowRankWeight, compress
from jlora._engine import Explanation, Uses
from jlora._extract import extract, spectrum
from jlora._init import init
from jlora._loftq import loftq
from jlora._lora import explain, lora
from jlora._merge import delta, merge, unmerge
from jlora._mixture import MixtureAdapter, SharedRouterMixture
from jlora._optim import labels, optimizer, summary
from jlora._quant import QuantizedWeight, dequantize, quantize
from jlora._spec import LoraSpec
from jlora._stack import StackedAdapter, pad, stack, unstack
from jlora._tokens import TokensAdapter
from jlora._types import Adapters, Params, Path
from jlora.checkpoint import load, save
from jlora.errors import (
    DamagedCheckpointError,
    FileFormatError,
    JloraError,
    MissingFileError,
    WriteRefusedError,
)
from jlora.sharding import init_sharded, partition_specs, shardings, state_shardings

__version__ = "0.1.0"

__all__ = [
    "Adapters",
    "DamagedCheckpointError",
    "DoraAdapter",
    "Explanation",
    "FileFormatError",
    "JloraError",
    "Layout",
    "LoraAdapter",
    "LoraBiasAdapter",
    "LoraSpec",
    "LowRankWeight",
    "MissingFileError",
    "MixtureAdapter",
    "Params",
    "Path",
    "QuantizedWeight",
    "SharedRouterMixture",
    "StackedAdapter",
    "TokensAdapter",
    "Uses",
    "WriteRefusedError",
    "combine",
    "compress",
    "delta",
    "dequantize",
    "explain",
    "extract",
    "init",
    "init_sharded",
    "is_adapter",
    "labels",
    "load",
    "loftq",
    "lora",
    "merge",
    "optimizer",
    "pad",
    "partition_specs",
    "peft",
    "quantize",
    "save",
    "shardings",
    "spectrum",
    "stack",
    "state_shardings",
    "summary",
    "unmerge",
    "unstack",
]
