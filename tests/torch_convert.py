"""Copy a Hugging Face Flax model's weights into its PyTorch twin (for the interop tests).

``transformers``' ``from_pretrained(..., from_flax=True)`` leaves the weights on the
meta device with torch 2.13, so the tests build the PyTorch model from the same config
and copy every parameter explicitly. Hugging Face's Flax models use PyTorch's module
names; only the leaf names and orientations differ:

- ``<module>/kernel`` (2-D) -> ``<module>.weight`` transposed (Flax ``Dense`` is
  ``(in, out)``, ``nn.Linear`` ``(out, in)``; Flax GPT-2 stores its ``Conv1D`` kernels
  ``(out, in)`` and PyTorch's ``Conv1D`` ``(in, out)``: a transpose as well)
- ``<module>/embedding`` -> ``<module>.weight``
- ``<module>/scale`` (LayerNorm) or ``<module>/weight`` (RMSNorm) -> ``<module>.weight``
- ``<module>/bias`` -> ``<module>.bias``

Every PyTorch parameter must receive a value and every Flax leaf must be used once
(tied parameters appear once in ``named_parameters``), so a silent mismatch cannot
pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from jlora._paths import leaves_with_paths

_WEIGHT_LEAVES = ("kernel", "embedding", "scale", "weight")


def flax_to_torch_state(flax_params: Any, torch_model: torch.nn.Module) -> dict[str, Any]:
    """The PyTorch state dict (parameters only) holding ``flax_params``' values."""
    flax_leaves = {path.replace("/", "."): leaf for path, leaf in leaves_with_paths(flax_params)}
    used: set[str] = set()
    state = {}
    for name, parameter in torch_model.named_parameters():
        module, leaf_name = name.rsplit(".", 1)
        candidates = ("bias",) if leaf_name == "bias" else _WEIGHT_LEAVES
        found = [f"{module}.{c}" for c in candidates if f"{module}.{c}" in flax_leaves]
        if len(found) != 1:
            raise KeyError(f"PyTorch parameter {name!r}: Flax leaves found {found}")
        key = found[0]
        value = np.array(flax_leaves[key], dtype=np.float32)
        if key.endswith(".kernel") and value.ndim == 2:
            value = value.T
        if tuple(value.shape) != tuple(parameter.shape):
            raise ValueError(
                f"{key} ({list(value.shape)}) does not fit {name} ({list(parameter.shape)})"
            )
        state[name] = torch.from_numpy(np.ascontiguousarray(value))
        used.add(key)
    unused = sorted(set(flax_leaves) - used)
    if unused:
        raise KeyError(f"Flax leaves with no PyTorch parameter: {unused[:8]}")
    return state


def copy_into(flax_params: Any, torch_model: torch.nn.Module) -> torch.nn.Module:
    """Copy ``flax_params`` into ``torch_model`` in place and put it in eval mode."""
    state = flax_to_torch_state(flax_params, torch_model)
    with torch.no_grad():
        for name, parameter in torch_model.named_parameters():
            parameter.copy_(state[name])
    return torch_model.eval()
