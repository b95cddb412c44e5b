"""Hugging Face PEFT (and vLLM) adapter files: ``adapter_model.safetensors`` in and out.

A PEFT LoRA adapter directory holds ``adapter_config.json`` (``r``, ``lora_alpha``,
``target_modules``, ``rank_pattern``, ...) and ``adapter_model.safetensors`` with, per
adapted PyTorch module ``<module>``:

- ``base_model.model.<module>.lora_A.weight``: ``(r, in_features)``
- ``base_model.model.<module>.lora_B.weight``: ``(out_features, r)``
- for an ``nn.Embedding``: ``...<module>.lora_embedding_A`` ``(r, num_embeddings)`` and
  ``...<module>.lora_embedding_B`` ``(embedding_dim, r)``

so that ``delta_W = scale * lora_B @ lora_A`` in PyTorch's ``(out, in)`` orientation.
jlora's ``lora_a`` is ``(*stack, prod(in), r)`` and ``lora_b`` ``(*stack, r, prod(out))``
with the input and output axes flattened in the weight's axis order (see
:class:`jlora.Layout`), so a PEFT tensor is a jlora factor transposed, one module per
index of the stack axes (layers under ``scan``).

A *key map* names the PyTorch module of a param path. It is any callable
``key_map(path) -> str | None``: ``path`` is the jlora path of the targeted leaf
(``"params/transformer/h/0/attn/c_attn/kernel"``) and the result the PyTorch module name
relative to the model (``"transformer.h.0.attn.c_attn"``), or ``None`` when the path has
no PyTorch counterpart. A stacked weight (one adapter for all layers of a ``scan``) maps
to a name with one ``{}`` field per stack axis, filled with the layer index:
``"model.layers.{}.self_attn.q_proj"``. :class:`KeyMap` builds such a callable from a
regex and renames; the built-in maps for the Hugging Face Flax families are in
:data:`KEY_MAPS` and can be passed by name (``key_map="gpt2"``, ``"llama"``, ``"bert"``,
or ``"flax"`` for any model whose Flax module names mirror PyTorch's). A leaf named
``embedding`` (Flax ``nn.Embed``) is written as a PEFT embedding adapter.

Files are read with safetensors only, never with pickle.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from jlora import _io
from jlora._adapter import (
    NOT_WEIGHTS,
    DoraAdapter,
    Layout,
    LoraAdapter,
    LoraBiasAdapter,
    lora_scale,
    scale_denominator,
)
from jlora._paths import describe, leaves_with_paths, path_str, shape_of
from jlora._regex import compile_untrusted, peft_match
from jlora._spec import GENERIC_LEAF_NAMES, LoraSpec, _matches
from jlora._tree import adapter_items, build_like
from jlora._types import Adapters, Params, Path, Selector, is_int, is_real
from jlora._weights import is_weight_node
from jlora.errors import FileFormatError, MissingFileError, through_link

__all__ = [
    "CONFIG_NAME",
    "KEY_MAPS",
    "VLLM_RANKS",
    "WEIGHTS_NAME",
    "KeyMap",
    "is_adapter_dir",
    "load",
    "load_bnb_4bit",
    "load_stack",
    "read",
    "save",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
VLLM_RANKS = frozenset({1, 8, 16, 32, 64, 128, 256, 320, 512})

KeyMapLike = str | Callable[[Path], str | None]


# -- key maps -------------------------------------------------------------------------


def module_path(path: Path) -> tuple[str, str]:
    """Split a leaf path into its module path and leaf name, without the Flax wrappers.

    A leading ``params/`` collection and a trailing NNX ``/value`` are dropped.

    Example:
      >>> module_path("params/transformer/h/0/attn/c_attn/kernel")
      ('transformer/h/0/attn/c_attn', 'kernel')
    """
    parts = path.split("/")
    if len(parts) > 2 and parts[-1] == "value":
        parts = parts[:-1]
    if len(parts) > 1 and parts[0] == "params":
        parts = parts[1:]
    return "/".join(parts[:-1]), parts[-1]


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """Flax param path -> PyTorch module name, for models whose module names mirror PyTorch's.

    The module path of a leaf (its path without a leading ``params/``, a trailing
    ``/value`` and the leaf's own name) must ``re.fullmatch`` ``modules``. With
    ``leaf_names=True`` a weight with a name of its own (not a generic one such as
    ``kernel`` or ``w``) is its own module and keeps its name: gm.nn's
    ``mlp/gating_einsum``, or the stacked ``mlp/gate_proj`` of an MoE layer, told apart
    from its sibling ``mlp/up_proj``. Each
    ``(regex, replacement)`` of ``rename`` is then applied with ``re.sub``, and ``/``
    becomes ``.``. Hugging Face's Flax models use PyTorch's module names, so the
    built-in maps only list which modules exist and how kernels are stored.

    Attributes:
      name: a short name for messages.
      modules: regex of the module paths that have a PyTorch counterpart.
      rename: ``(regex, replacement)`` substitutions on the module path; put ``{}``
        where a stacked weight's layer index goes (``(r"^layers/", "model/layers/{}/")``).
      transposed: regex of module paths whose 2-D kernels are stored ``(out, in)``
        (Hugging Face Flax GPT-2's ``Conv1D``); other kernels are ``(in, out)``.
      fan_in_fan_out: PEFT's ``fan_in_fan_out`` for the config (True for ``Conv1D``).
      leaf_names: whether ``modules`` and ``rename`` see a weight's own non-generic
        name as the last component of its module path (:data:`GENERIC_LEAF_NAMES`).
      fused: ``(regex, parts)`` for fused kernels: a module path that ``re.fullmatch`` es
        ``regex`` holds several PyTorch modules, whose names replace the last component
        of its name (gm.nn's ``qkv_einsum`` -> ``("q_proj", "k_proj", "v_proj")``). The
        weight's leading output axis (in axis order) indexes the parts, one each. On
        export the adapter's one A is every part's A and its B is sliced, which is
        exact at the same rank; on import the parts' different A's are concatenated,
        so the adapter's rank is the sum of theirs (also exact) unless their A's and
        scales are equal, as in a file jlora wrote.
      embeddings: regex of module paths whose weight is a lookup table ``(vocab, dim)``
        written as a PEFT embedding adapter (``lora_embedding_A``/``_B``), besides leaves
        named ``embedding``.
      tied_head: the PyTorch name of an output head that shares the embedding's weight
        (tied embeddings, as every Gemma): the one adapter on the shared table is
        written to the embedding and, transposed, to this head, since PEFT adapts the
        two modules apart; on import the two must agree.
      vllm_modules: regex of the PyTorch module names vLLM serves LoRA on for this
        family; ``save(..., target="vllm")`` refuses the others. None: not checked.
      expert_params: ``(regex, parameter)`` for MoE expert weights that the JAX model
        keeps as bare parameters of their own name, stacked ``(E, in, out)`` (tunix's
        ``mlp/gate_proj``), and PyTorch as one 3-D parameter of an experts module
        (transformers 5's ``mlp.experts.gate_up_proj``). A weight whose module path
        (with its own name) ``re.fullmatch`` es ``regex`` is written to the parameter
        ``parameter``, a name that replaces the last component of the renamed module
        name (``"experts.gate_up_proj"``), as PEFT's ``target_parameters``. Entries that
        name one parameter are its parts, stacked along its output features in the
        order listed (gate, then up): the part adapters' A's are concatenated and their
        B's placed block-diagonally, which is exact at the sum of their ranks (the
        parameter gets a ``rank_pattern`` entry). Weights under a generic leaf name
        (``.../gate_proj/kernel``: a dense MLP) are not expert weights. Entries are
        listed in the order the PyTorch module registers its parameters, which fixes
        PEFT's nesting of its wrappers.
      expert_out_in: whether the PyTorch expert parameters are stored ``(E, out, in)``
        and used as ``x @ W[e].T`` (transformers 5), else ``(E, in, out)``.

    Example:
      >>> gpt2 = KEY_MAPS["gpt2"]
      >>> gpt2("params/transformer/h/0/attn/c_attn/kernel")
      'transformer.h.0.attn.c_attn'
      >>> scanned = KeyMap("decoder", rename=((r"^layers/", "model/layers/{}/"),))
      >>> scanned("params/layers/query/kernel")
      'model.layers.{}.query'
      >>> KeyMap("moe", leaf_names=True)("layers/0/mlp/gate_proj/value")  # a named leaf
      'layers.0.mlp.gate_proj'
      >>> gemma = KEY_MAPS["gemma"]
      >>> gemma.parts("layer_0/attn/kv_einsum/w")  # one fused kernel, two PyTorch modules
      ('model.layers.0.self_attn.k_proj', 'model.layers.0.self_attn.v_proj')
      >>> moe = KEY_MAPS["tunix-qwen3-moe"]
      >>> moe.expert_param("layers/0/mlp/up_proj/value")  # part 1 of 2 of one parameter
      ('model.layers.0.mlp.experts', 'gate_up_proj', 1, 2)
      >>> moe.expert_param("layers/0/mlp/up_proj/kernel") is None  # a dense MLP's kernel
      True
    """

    name: str
    modules: str = ".*"
    rename: tuple[tuple[str, str], ...] = ()
    transposed: str | None = None
    fan_in_fan_out: bool = False
    leaf_names: bool = False
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    embeddings: str | None = None
    tied_head: str | None = None
    vllm_modules: str | None = None
    expert_params: tuple[tuple[str, str], ...] = ()
    expert_out_in: bool = True

    def __post_init__(self):
        patterns = [("modules", self.modules), ("transposed", self.transposed)]
        patterns += [("rename", regex) for regex, _ in self.rename]
        patterns += [("fused", regex) for regex, _ in self.fused]
        patterns += [("expert_params", regex) for regex, _ in self.expert_params]
        for regex, param in self.expert_params:
            if not isinstance(param, str) or not re.fullmatch(r"[\w.]*\w", param):
                raise ValueError(
                    f"KeyMap {self.name!r}: expert_params {regex!r} needs a parameter name "
                    f"such as 'experts.gate_up_proj'; found {param!r}"
                )
        patterns += [("embeddings", self.embeddings), ("vllm_modules", self.vllm_modules)]
        for regex, parts in self.fused:
            if len(parts) < 2 or not all(isinstance(p, str) and p for p in parts):
                raise ValueError(
                    f"KeyMap {self.name!r}: fused {regex!r} needs two or more part names; "
                    f"found {parts!r}"
                )
        for field, regex in patterns:
            if regex is not None:
                try:
                    re.compile(regex)
                except (re.error, TypeError) as error:
                    raise ValueError(
                        f"KeyMap {self.name!r}: {field} {regex!r} is not a valid regex: {error}"
                    ) from None

    def _module(self, path: Path) -> str:
        module, leaf = module_path(path)
        if self.leaf_names and leaf not in GENERIC_LEAF_NAMES:  # its own module (gm.nn, MoE)
            module = f"{module}/{leaf}" if module else leaf
        return module

    def parts(self, path: Path) -> tuple[str, ...] | None:
        """The PyTorch module names of a fused kernel's parts (None: not fused)."""
        name = self(path)
        if name is None:
            return None
        module = self._module(path)
        for regex, parts in self.fused:
            if re.fullmatch(regex, module) is not None:
                head = name.rsplit(".", 1)[0] + "." if "." in name else ""
                return tuple(head + part for part in parts)
        return None

    def expert_param(self, path: Path) -> tuple[str, str, int, int] | None:
        """``(PyTorch module, parameter, part, parts)`` for an MoE expert weight that
        ``expert_params`` names, else None: the weight is part ``part`` of ``parts``
        stacked along the parameter's output features."""
        module, leaf = module_path(path)
        if not self.expert_params or leaf in GENERIC_LEAF_NAMES:
            return None
        name = self(path)
        if name is None:
            return None
        own = self._module(path)
        for regex, param in self.expert_params:
            if re.fullmatch(regex, own) is not None:
                same = [r for r, p in self.expert_params if p == param]
                head = name.rsplit(".", 1)[0] + "." if "." in name else ""
                module, _, leaf_param = (head + param).rpartition(".")
                return module, leaf_param, same.index(regex), len(same)
        return None

    def is_embedding(self, path: Path) -> bool:
        """Whether the weight at ``path`` is a lookup table (a PEFT embedding adapter)."""
        if module_path(path)[1] == "embedding":
            return True
        return self.embeddings is not None and (
            re.fullmatch(self.embeddings, self._module(path)) is not None
        )

    def __call__(self, path: Path) -> str | None:
        module = self._module(path)
        if not module or re.fullmatch(self.modules, module) is None:
            return None
        for regex, replacement in self.rename:
            module = re.sub(regex, replacement, module)
        return module.replace("/", ".")

    def layout(self, path: Path, shape: Sequence[int], stack: int = 0) -> Layout | None:
        """The layout of the weight at ``path`` as this family stores it (``stack`` leading
        stack axes, then ``(in, out)``, or ``(out, in)`` for ``transposed`` kernels)."""
        module, leaf = module_path(path)
        flipped = (
            self.transposed is not None
            and leaf == "kernel"
            and re.fullmatch(self.transposed, module) is not None
        )
        return _default_layout(shape, stack, transposed=flipped)


def _default_layout(shape: Sequence[int], stack: int, *, transposed: bool = False) -> Layout | None:
    if len(shape) != stack + 2:
        return None
    stack_axes = tuple(range(stack))
    first, second = (stack,), (stack + 1,)
    if transposed:
        return Layout(tuple(shape), stack_axes, second, first)
    return Layout(tuple(shape), stack_axes, first, second)


KEY_MAPS: dict[str, KeyMap] = {
    "flax": KeyMap("flax"),
    "gpt2": KeyMap(
        "gpt2",
        modules=r"(transformer/)?(wte|wpe|h/\d+/(attn/(c_attn|c_proj)|mlp/(c_fc|c_proj)))|lm_head",
        transposed=r".*(c_attn|c_proj|c_fc)",
        fan_in_fan_out=True,
    ),
    "llama": KeyMap(
        "llama",
        modules=(
            r"(model/)?(embed_tokens|layers/\d+/(self_attn/(q_proj|k_proj|v_proj|o_proj)"
            r"|mlp/(gate_proj|up_proj|down_proj)))|lm_head|score"
        ),
    ),
    "bert": KeyMap(
        "bert",
        modules=(
            r"(bert/)?(embeddings/(word|position|token_type)_embeddings"
            r"|encoder/layer/\d+/(attention/(self/(query|key|value)|output/dense)"
            r"|intermediate/dense|output/dense)|pooler/dense)"
            r"|classifier|qa_outputs|cls/predictions/transform/dense"
        ),
    ),
}


_TUNIX_RENAME = (
    (r"^embedder/input_embedding$", "model/embed_tokens"),
    (r"^layers/(\d+)/attn/", r"model/layers/\1/self_attn/"),
    (r"^layers/", "model/layers/"),
)
# What vLLM serves LoRA on in these families: the attention and MLP projections (its
# Llama, Qwen 3 and Gemma 3 classes list no embedding modules for LoRA).
_VLLM_DECODER = r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
_TUNIX_DECODER = KeyMap(
    "tunix",
    modules=(
        r"embedder/input_embedding|lm_head"
        r"|layers/\d+/(attn/(q_proj|k_proj|v_proj|o_proj)|mlp/(gate_proj|up_proj|down_proj))"
    ),
    rename=_TUNIX_RENAME,
    leaf_names=True,
    embeddings=r"embedder/input_embedding",
    vllm_modules=_VLLM_DECODER,
)
_GEMMA_ATTENTION = (
    (r"/attn/q_einsum$", "/attn/q_proj"),
    (r"/attn/kv_einsum$", "/attn/kv_proj"),
    (r"/attn/qkv_einsum$", "/attn/qkv_proj"),
    (r"/attn/attn_vec_einsum$", "/attn/o_proj"),
)
_GEMMA_FUSED = (
    (r".*/attn/qkv_einsum", ("q_proj", "k_proj", "v_proj")),
    (r".*/attn/kv_einsum", ("k_proj", "v_proj")),
)
KEY_MAPS["tunix-llama3"] = dataclasses.replace(_TUNIX_DECODER, name="tunix-llama3")
KEY_MAPS["tunix-qwen3"] = dataclasses.replace(_TUNIX_DECODER, name="tunix-qwen3")
# tunix's Qwen 3 MoE layer keeps its experts as bare parameters gate_proj, up_proj
# (E, D, F) and down_proj (E, F, D); transformers 5's Qwen3MoeExperts registers
# gate_up_proj (E, 2F, D), gate rows first (it chunks the output in two), then down_proj
# (E, D, F). The router (mlp/router, transformers' Qwen3MoeTopKRouter) is no Linear, so
# PEFT cannot adapt it: it is left out of modules, and an adapter on it is refused.
KEY_MAPS["tunix-qwen3-moe"] = dataclasses.replace(
    _TUNIX_DECODER,
    name="tunix-qwen3-moe",
    expert_params=(
        (r"layers/\d+/mlp/gate_proj", "experts.gate_up_proj"),
        (r"layers/\d+/mlp/up_proj", "experts.gate_up_proj"),
        (r"layers/\d+/mlp/down_proj", "experts.down_proj"),
    ),
    vllm_modules=rf"{_VLLM_DECODER}|model\.layers\.\d+\.mlp\.experts\.(gate_up|down)_proj",
)
KEY_MAPS["tunix-gemma3"] = KeyMap(
    "tunix-gemma3",
    modules=(
        r"embedder/input_embedding|layers/\d+/(attn/(q_einsum|kv_einsum|qkv_einsum"
        r"|attn_vec_einsum)|mlp/(gate_proj|up_proj|down_proj))"
    ),
    rename=(*_GEMMA_ATTENTION, *_TUNIX_RENAME),
    leaf_names=True,
    fused=_GEMMA_FUSED,
    embeddings=r"embedder/input_embedding",
    tied_head="lm_head",
    vllm_modules=_VLLM_DECODER,
)
KEY_MAPS["gemma"] = KeyMap(
    "gemma",
    modules=(
        r"embedder/input_embedding|layer_\d+/(attn/(q_einsum|kv_einsum|qkv_einsum"
        r"|attn_vec_einsum)|mlp/(gating_einsum|linear))"
    ),
    rename=(
        *_GEMMA_ATTENTION,
        (r"/mlp/gating_einsum$", "/mlp/gate_up_proj"),
        (r"/mlp/linear$", "/mlp/down_proj"),
        (r"^embedder/input_embedding$", "model/embed_tokens"),
        (r"^layer_(\d+)/attn/", r"model/layers/\1/self_attn/"),
        (r"^layer_(\d+)/", r"model/layers/\1/"),
    ),
    leaf_names=True,
    fused=(*_GEMMA_FUSED, (r".*/mlp/gating_einsum", ("gate_proj", "up_proj"))),
    embeddings=r"embedder/input_embedding",
    tied_head="lm_head",
    vllm_modules=_VLLM_DECODER,
)


def _resolve_key_map(key_map: KeyMapLike) -> Callable[[Path], str | None]:
    if isinstance(key_map, str):
        if key_map not in KEY_MAPS:
            raise ValueError(
                f"unknown key_map {key_map!r}: expected one of {sorted(KEY_MAPS)} or a "
                "callable path -> PyTorch module name (see jlora.peft.KeyMap)"
            )
        return KEY_MAPS[key_map]
    if not callable(key_map):
        raise TypeError(
            "key_map: expected a built-in name such as 'gpt2' or a callable path -> "
            f"PyTorch module name; found {type(key_map).__name__}"
        )
    return key_map


def _key_map_name(key_map: Callable) -> str:
    return getattr(key_map, "name", getattr(key_map, "__name__", repr(key_map)))


def _is_embedding(path: Path, key_map: Callable | None = None) -> bool:
    rule = getattr(key_map, "is_embedding", None)
    return rule(path) if rule is not None else module_path(path)[1] == "embedding"


# -- saving ---------------------------------------------------------------------------


def save(
    directory: str | os.PathLike,
    adapters: Adapters,
    spec: LoraSpec,
    *,
    key_map: KeyMapLike,
    target: str | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    adapter_names: Sequence[str] | None = None,
    experts: Selector | None = None,
    parameter_order: Sequence[str] | None = None,
) -> None:
    """Write ``adapters`` as a PEFT LoRA adapter directory that ``PeftModel.from_pretrained`` loads.

    A stack (:func:`jlora.stack`) is written in PEFT's multi-adapter layout: one
    adapter directory per slot, ``<directory>/<name>/``, named by ``adapter_names``
    (default ``adapter_0``, ``adapter_1``, ...), each slot with its own rank and scale.
    PEFT loads them with ``PeftModel.from_pretrained(model, f"{directory}/{name}",
    adapter_name=name)`` and ``load_adapter``, and serves a mixed batch with
    ``adapter_names=[...]``; :func:`load_stack` reads them back.

    Writes ``adapter_model.safetensors`` (each factor in its own dtype, transposed to
    PyTorch's orientation, one module per layer for stacked weights) and
    ``adapter_config.json``. The defaults ``r`` and ``lora_alpha`` are ``spec.rank`` and
    ``spec.alpha``; modules whose rank or scale differ get ``rank_pattern`` /
    ``alpha_pattern`` entries under their full module name.

    Args:
      directory: the adapter directory (created if needed). One holding only adapter
        files is replaced whole, once the new one is complete; in one that holds other
        files too, the two adapter files are each replaced atomically. Never written
        through a symbolic link.
      adapters: the adapters tree (from :func:`jlora.init` or training).
      spec: the spec the adapters were made with (``rank``, ``alpha``, ``rslora``,
        ``dropout``).
      key_map: a built-in name (``"gpt2"``, ``"llama"``, ``"bert"``, ``"flax"``) or a
        callable ``path -> PyTorch module name`` (see the module docstring).
      target: ``"vllm"`` to check vLLM's constraints first (ranks in
        :data:`VLLM_RANKS`, one scale for every module, no bias, no DoRA, no extra
        saved modules).
      base_model_name_or_path: written to the config, for PEFT's ``from_pretrained``
        conveniences.
      task_type: PEFT's ``task_type`` (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...).
      experts: which adapters are on MoE expert weights (below): a regex on the path
        or a list of names of path components, as ``LoraSpec.targets``.
      parameter_order: for expert weights, the names of the expert parameters of one
        PyTorch module in the order the module registers them; PEFT nests one wrapper
        per parameter in that order, which fixes the file's keys. Default: the order of
        the adapters tree.

    MoE expert weights (chosen by ``experts``) have one more stack axis than the key
    map's module name has ``{}`` fields (``(E, in, out)``, or ``(layers, E, in, out)``
    named ``model.layers.{}.mlp.experts``): each is a 3-D expert parameter, the last
    stack axis its experts. It is written as PEFT's ``target_parameters`` reads it
    (``<module>.<leaf name>``, e.g. ``model.layers.0.mlp.experts.gate_up_proj``): one
    ``lora_A.weight (E·r, ·)`` and ``lora_B.weight (·, E·r)`` per parameter, whose
    per-expert product is jlora's delta of that expert in the weight's own axis order.
    PEFT's ``target_parameters`` takes no DoRA or dropout; a parameter's own rank and
    alpha go in ``rank_pattern`` / ``alpha_pattern`` under its full name, which PEFT
    applies to target parameters as to modules.

    A key map with ``expert_params`` (``"tunix-qwen3-moe"``) picks its expert weights
    itself, with no ``experts`` argument, and may stack several JAX weights into one
    PyTorch parameter (tunix's ``gate_proj`` and ``up_proj`` into transformers'
    ``experts.gate_up_proj``, at the sum of their ranks, which ``target="vllm"`` checks
    against :data:`VLLM_RANKS` too).

    Raises:
      ValueError: a path the key map cannot name, a stacked adapter whose module name
        lacks one ``{}`` per stack axis, two adapters for one module, trainable base
        leaves (PEFT ``modules_to_save``; use :func:`jlora.checkpoint.save`), or with
        ``target="vllm"`` the first constraint that fails.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, jlora, jlora.peft
      >>> params = {"params": {"dense": {"kernel": jnp.ones((6, 4))}}}
      >>> spec = jlora.LoraSpec(rank=2, alpha=4.0, targets=["dense"])
      >>> adapters = jlora.init(spec, params, jax.random.key(0))
      >>> directory = tempfile.mkdtemp()
      >>> jlora.peft.save(directory, adapters, spec, key_map="flax")
      >>> loaded, _ = jlora.peft.load(directory, params, key_map="flax")
      >>> loaded["params"]["dense"]["kernel"].lora_a.shape
      (6, 2)
    """
    key_map = _resolve_key_map(key_map)
    items = adapter_items(adapters)
    from jlora._stack import StackedAdapter, unstack

    if any(isinstance(node, StackedAdapter) for _, node in items):
        slots = unstack(adapters)
        names = _slot_names(adapter_names, len(slots))
        for name, slot in zip(names, slots):
            first = next(n for _, n in adapter_items(slot) if isinstance(n, LoraAdapter))
            slot_spec = dataclasses.replace(
                spec,
                rank=first.rank,
                alpha=first.scale * scale_denominator(first.rank, spec.rslora),
                rank_pattern=None,
                alpha_pattern=None,
            )
            save(os.path.join(os.fspath(directory), name), slot, slot_spec, key_map=key_map,
                 target=target, base_model_name_or_path=base_model_name_or_path,
                 task_type=task_type)  # fmt: skip
        return
    if adapter_names is not None:
        raise ValueError("save: adapter_names is for a stack of adapters (jlora.stack)")
    if target is not None and target != "vllm":
        raise ValueError(f"target must be None or 'vllm'; found {target!r}")
    from jlora._tokens import TokensAdapter

    token_items = [(p, n) for p, n in items if isinstance(n, TokensAdapter)]
    items = [(p, n) for p, n in items if not isinstance(n, TokensAdapter)]
    if target == "vllm" and token_items:
        raise ValueError(
            "vLLM does not load trainable tokens (PEFT trainable_token_indices): merge them "
            "into the embedding (jlora.merge) and serve the merged model"
        )
    if token_items and not any(isinstance(n, LoraAdapter) for _, n in items):
        raise ValueError(
            "save: the adapters hold trainable tokens only; jlora.peft writes them beside "
            "LoRA modules (a LoraConfig with trainable_token_indices). Save them with "
            "jlora.checkpoint.save, or add LoRA targets"
        )
    if target == "vllm":
        _check_vllm(items, spec)
    unwritable = [(p, n.KIND) for p, n in items if isinstance(n, LoraAdapter)
                  and n.KIND not in ("lora", "dora", "lora_bias")]  # fmt: skip
    if unwritable:
        path, kind = unwritable[0]
        raise ValueError(
            f"the adapter at {path!r} is a {kind} adapter (a mixture of LoRA experts routes "
            "per token); PEFT's LoRA files hold one A and B per module, so it has no PEFT "
            "form. Save it with jlora.checkpoint.save"
        )
    others = [path for path, node in items if not isinstance(node, LoraAdapter)]
    if others:
        raise ValueError(
            f"the adapters hold trained base leaves {others[:5]} (LoraSpec.trainable): "
            "PEFT export of modules_to_save / biases is not supported by jlora.peft; "
            "save them with jlora.checkpoint.save, or drop them from the tree"
        )

    tensors: dict[str, np.ndarray] = {}
    modules: dict[str, tuple[Path, LoraAdapter]] = {}
    by_expert_module: dict[str, list[tuple[str, Path, np.ndarray, np.ndarray]]] = {}
    patterns: dict[str, tuple[int, float]] = {}  # expert parameter -> (rank, alpha)
    expert_rule = getattr(key_map, "expert_param", None)
    by_param: dict[tuple[str, str], list[tuple[int, int, Path, Any]]] = {}
    for path, node in items:
        where = expert_rule(path) if expert_rule is not None else None
        if where is not None:  # a key map's MoE expert weight (a part of one parameter)
            module, param, part, n_parts = where
            by_param.setdefault((module, param), []).append((part, n_parts, path, node))
            continue
        if experts is not None and _matches(experts, path, node, need_matrix=False):
            for module, param, lora_a, lora_b in _expert_params_of(path, node, key_map, spec):
                by_expert_module.setdefault(module, []).append((param, path, lora_a, lora_b))
                patterns[f"{module}.{param}"] = (node.rank, _alpha_of(spec, path, node))
            continue
        for name, a_in_r, b_r_out, magnitude, bias in _modules_of(path, node, key_map):
            if name in modules:
                raise ValueError(
                    f"adapters at {modules[name][0]!r} and {path!r} both map to the PyTorch "
                    f"module {name!r} with key_map {_key_map_name(key_map)!r}"
                )
            modules[name] = (path, node)
            a_name, b_name = (
                ("lora_embedding_A", "lora_embedding_B")
                if _is_embedding(path, key_map) and name == key_map(path)
                else ("lora_A.weight", "lora_B.weight")
            )
            tensors[f"{PREFIX}{name}.{a_name}"] = np.ascontiguousarray(a_in_r.T)
            tensors[f"{PREFIX}{name}.{b_name}"] = np.ascontiguousarray(b_r_out.T)
            if magnitude is not None:  # DoRA: one value per output feature, as B's rows
                tensors[f"{PREFIX}{name}.{MAGNITUDE}"] = np.ascontiguousarray(magnitude)
            if bias is not None:  # lora_bias: lora_B's own bias, one value per output
                tensors[f"{PREFIX}{name}.lora_B.bias"] = np.ascontiguousarray(bias)
    served = getattr(key_map, "vllm_modules", None)
    if target == "vllm" and served is not None:
        for name, (path, _node) in sorted(modules.items()):
            if re.fullmatch(served, name) is None:
                raise ValueError(
                    f"vLLM serves LoRA for key_map {_key_map_name(key_map)!r} on the "
                    f"modules matching {served!r} only; the adapter at {path!r} is for "
                    f"{name!r}: merge it into the base (jlora.merge) and serve that, or "
                    "leave it out of targets"
                )
    if any(isinstance(node, LoraBiasAdapter) for _, node in modules.values()):
        # PEFT's lora_bias is one switch: every lora_B has a bias (zero for plain LoRA).
        for name, (path, _node) in modules.items():
            if _is_embedding(path, key_map):
                raise ValueError(
                    f"PEFT's lora_bias is one switch for the whole adapter, and it refuses "
                    f"embedding layers: {path!r} is an embedding; save it apart"
                )
            key = f"{PREFIX}{name}.lora_B.bias"
            if key not in tensors:
                b = tensors[f"{PREFIX}{name}.lora_B.weight"]
                tensors[key] = np.zeros((b.shape[0],), b.dtype)

    token_indices: dict[str, list[int]] = {}
    for path, node in token_items:
        name = key_map(path)
        if name is None or "{}" in name:
            raise ValueError(
                f"key_map {_key_map_name(key_map)!r} has no PyTorch module name for the "
                f"trainable-tokens embedding at {path!r}"
            )
        # PEFT stores the rows' values (its "delta" is the new rows), (k, embedding_dim).
        tensors[f"{PREFIX}{name}.{TOKENS}"] = np.ascontiguousarray(np.asarray(node.rows))
        token_indices[name] = [int(i) for i in node.indices]
    for module, param, path, lora_a, lora_b, rank, alpha in _key_map_expert_params(
        by_param, key_map, spec
    ):
        by_expert_module.setdefault(module, []).append((param, path, lora_a, lora_b))
        patterns[f"{module}.{param}"] = (rank, alpha)
    if target == "vllm":
        for name, (rank, _alpha) in sorted(patterns.items()):
            if rank not in VLLM_RANKS:
                raise ValueError(
                    f"vLLM supports LoRA ranks {sorted(VLLM_RANKS)}; the expert parameter "
                    f"{name!r} holds its parts' adapters stacked, at rank {rank} (the sum "
                    "of theirs): pick a rank whose sum over the parts is one of these"
                )
            if served is not None and re.fullmatch(served, name) is None:
                raise ValueError(
                    f"vLLM serves LoRA for key_map {_key_map_name(key_map)!r} on the "
                    f"modules matching {served!r} only, not the expert parameter {name!r}"
                )
    if parameter_order is None and by_param:
        parameter_order = list(
            dict.fromkeys(p.rpartition(".")[2] for _, p in key_map.expert_params)
        )
    parameters = _write_expert_params(by_expert_module, modules, tensors, parameter_order)
    config = _config(spec, modules, key_map, base_model_name_or_path, task_type)
    for name, (rank, alpha) in sorted(patterns.items()):
        if rank != spec.rank:
            config["rank_pattern"][name] = rank
        if not math.isclose(alpha, spec.alpha, rel_tol=1e-6):
            config["alpha_pattern"][name] = _number(alpha)
    if token_indices:
        config["trainable_token_indices"] = token_indices
    if parameters:
        config["target_parameters"] = parameters
    _write_adapter_dir(os.fspath(directory), tensors, config)


def _expert_params_of(path: Path, node: LoraAdapter, key_map: Callable, spec: LoraSpec):
    """``(module, parameter, lora_A (E·r, d1), lora_B (d0, E·r))`` per layer of one expert
    weight ``(*layers, E, d0, d1)``, as PEFT's ``ParamWrapper`` stores them: expert
    ``e``'s delta in the weight's order is ``s·B_e·A_e`` with ``A_e`` rows ``e·r..e·r+r``
    of ``lora_A`` and ``B_e`` the columns ``e, E+e, ...`` of ``lora_B``."""
    layout = node.layout
    if type(node) is not LoraAdapter:
        raise ValueError(
            f"the adapter at {path!r} is a {node.KIND} adapter on an expert weight; PEFT's "
            "target_parameters takes plain LoRA only (no DoRA)"
        )
    if spec.dropout:
        raise ValueError(
            f"the adapter at {path!r} is on an expert weight, which PEFT adapts through "
            f"target_parameters; PEFT refuses lora_dropout there (spec has {spec.dropout})"
        )
    module = key_map(path)
    if module is None:
        raise ValueError(
            f"key_map {_key_map_name(key_map)!r} has no PyTorch module name for the expert "
            f"weight at {path!r}; pass a key_map that names it (see jlora.peft.KeyMap)"
        )
    n_outer = len(layout.stack_axes) - 1
    if n_outer < 0 or module.count("{}") != n_outer:
        raise ValueError(
            f"the expert weight at {path!r} has {len(layout.stack_axes)} stack axes (layout "
            f"{layout}) and key_map names its module {module!r}: an expert weight needs one "
            "'{}' per stack axis but the last, which is the experts'"
        )
    matrix = [a for a in range(len(layout.weight_shape)) if a not in layout.stack_axes]
    if (
        layout.stack_axes != tuple(range(n_outer + 1))
        or len(matrix) != 2
        or (len(layout.in_axes) != 1)
    ):
        raise ValueError(
            f"the expert weight at {path!r} has layout {layout}; PEFT's target_parameters "
            "reads 3-D parameters (experts, d0, d1), so jlora writes weights whose stack "
            "axes lead and whose last two axes are one input and one output axis"
        )
    transposed = layout.in_axes[0] > layout.out_axes[0]  # stored (E, out, in)
    param = module_path(path)[1]
    if module.endswith(f".{param}"):  # a KeyMap names the parameter itself: keep its module
        module = module[: -len(param) - 1]
    a_all, b_all = np.asarray(node.lora_a), np.asarray(node.lora_b)
    for index in np.ndindex(*layout.stack_shape[:n_outer]):
        a, b = a_all[index], b_all[index]  # (E, in, r), (E, r, out)
        left, right = (np.swapaxes(b, 1, 2), np.swapaxes(a, 1, 2)) if transposed else (a, b)
        yield module.format(*index), param, *_param_wrapper_factors(left, right)


def _param_wrapper_factors(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PEFT ``ParamWrapper``'s ``(lora_A (E·r, d1), lora_B (d0, r·E))`` for the expert
    deltas ``s·left_e (d0, r)·right_e (r, d1)``: ``A_e`` is rows ``e·r..e·r+r`` of
    lora_A, ``B_e`` the columns ``e, E+e, ...`` of lora_B."""
    n_experts, d0, rank = left.shape
    lora_a = right.reshape(n_experts * rank, right.shape[-1])
    lora_b = np.transpose(left, (1, 2, 0)).reshape(d0, rank * n_experts)
    return lora_a, lora_b


def _expert_factors(path: Path, node: Any, key_map: Callable, spec: LoraSpec):
    """``(a (…, E, in, r), b (…, E, r, out))`` of one expert weight ``(…, E, in, out)``
    whose outer stack axes (all but the experts') lead, checked for PEFT's
    ``target_parameters``: a plain LoRA adapter, no dropout."""
    if type(node) is not LoraAdapter:
        kind = getattr(node, "KIND", type(node).__name__)
        raise ValueError(
            f"the adapter at {path!r} is a {kind} adapter on an MoE expert weight; PEFT's "
            "target_parameters takes plain LoRA only (no DoRA, lora_bias or trained base "
            "leaves)"
        )
    if spec.dropout:
        raise ValueError(
            f"the adapter at {path!r} is on an MoE expert weight, which PEFT adapts through "
            f"target_parameters; PEFT refuses lora_dropout there (spec has {spec.dropout})"
        )
    layout = node.layout
    n_stack = len(layout.stack_axes)
    if (
        n_stack < 1
        or layout.stack_axes != tuple(range(n_stack))
        or layout.in_axes != (n_stack,)
        or layout.out_axes != (n_stack + 1,)
    ):
        raise ValueError(
            f"key_map {_key_map_name(key_map)!r} names the weight at {path!r} an MoE expert "
            f"weight, which must be stacked (…, experts, in, out); its layout is {layout} "
            "(create the adapters with jlora.init(..., fn=<model>, args=<inputs>))"
        )
    return np.asarray(node.lora_a), np.asarray(node.lora_b)


def _key_map_expert_params(by_param, key_map: Callable, spec: LoraSpec):
    """Per layer of each expert parameter a key map names (``KeyMap.expert_params``):
    ``(module, parameter, path, lora_A (E·R, d1), lora_B (d0, E·R), R, alpha)`` in the
    PyTorch parameter's ``(E, d0, d1)`` order, its parts' adapters stacked: expert
    ``e``'s delta is ``s'·B_e·A_e`` (``B_e`` the columns ``e, E+e, …`` of lora_B),
    with the parts' A's concatenated and their B's block-diagonal, each part's scale
    over ``s'`` folded into its block, ``s' = alpha / R`` (or ``/ sqrt(R)``)."""
    out_in = getattr(key_map, "expert_out_in", True)
    for (module, param), entries in sorted(by_param.items()):
        entries = sorted(entries, key=lambda entry: entry[0])
        n_parts = entries[0][1]
        full = f"{module}.{param}"
        have = [part for part, *_ in entries]
        if have != list(range(n_parts)):
            paths = [path for _, _, path, _ in entries]
            raise ValueError(
                f"the PyTorch expert parameter {full!r} holds {n_parts} weights stacked "
                f"along its output features (key_map {_key_map_name(key_map)!r}); the "
                f"adapters have {paths}, which is not one of each: PEFT adapts the "
                "parameter as one, so target every part (e.g. both gate_proj and up_proj)"
            )
        factors = [_expert_factors(path, node, key_map, spec) for _, _, path, node in entries]
        stack = {a.shape[:-2] for a, _ in factors}
        widths = {a.shape[-2] for a, _ in factors}
        if len(stack) != 1 or len(widths) != 1:
            raise ValueError(
                f"the weights stacked into the expert parameter {full!r} differ in their "
                f"experts or input features: {[list(a.shape[:-1]) for a, _ in factors]}"
            )
        (stack_shape,) = stack
        n_outer = len(stack_shape) - 1
        if module.count("{}") != n_outer:
            raise ValueError(
                f"the expert weight at {entries[0][2]!r} has {n_outer + 1} stack axes and "
                f"key_map names its parameter {full!r}: an expert weight needs one '{{}}' "
                "per stack axis but the last, which is the experts'"
            )
        nodes = [node for *_, node in entries]
        scale = nodes[0].scale
        rank = sum(node.rank for node in nodes)
        alpha = scale * scale_denominator(rank, spec.rslora)
        for index in np.ndindex(*stack_shape[:n_outer]):
            blocks, shared = [], []
            for (a, b), node in zip(factors, nodes):
                a, b = a[index], b[index] * (node.scale / scale)  # (E, in, r), (E, r, out)
                if out_in:  # delta_e (out, in) = b_eᵀ·a_eᵀ: B = b's, A = a's
                    blocks.append(np.swapaxes(b, 1, 2))
                    shared.append(np.swapaxes(a, 1, 2))
                else:  # delta_e (in, out) = a_e·b_e, parts side by side in out
                    blocks.append(b)
                    shared.append(a)
            if out_in:
                left = _block_diagonal(blocks)  # (E, Σout, R)
                right = np.concatenate(shared, axis=1)  # (E, R, in)
            else:
                left = np.concatenate(shared, axis=2)  # (E, in, R)
                right = _block_diagonal(blocks)  # (E, R, Σout)
            lora_a, lora_b = _param_wrapper_factors(left, right)
            yield module.format(*index), param, entries[0][2], lora_a, lora_b, rank, alpha


def _block_diagonal(blocks: list[np.ndarray]) -> np.ndarray:
    """``(E, Σm, Σn)`` from blocks ``(E, m_k, n_k)`` on the diagonal, zeros elsewhere."""
    rows, cols = sum(b.shape[1] for b in blocks), sum(b.shape[2] for b in blocks)
    out = np.zeros((blocks[0].shape[0], rows, cols), np.result_type(*blocks))
    i = j = 0
    for block in blocks:
        out[:, i : i + block.shape[1], j : j + block.shape[2]] = block
        i, j = i + block.shape[1], j + block.shape[2]
    return out


def _write_expert_params(experts, modules, tensors, parameter_order) -> list[str]:
    """Put each expert parameter's tensors under PEFT's nested ``ParamWrapper`` keys:
    of ``n`` parameters of one module, the ``k``-th registered is ``n-1-k`` wrappers
    deep (``<module>.base_layer.….lora_A.weight``). Returns the target parameter names."""
    names = []
    for module, params in sorted(experts.items()):
        if module in modules:
            raise ValueError(
                f"the PyTorch module {module!r} gets both a LoRA module adapter (from "
                f"{modules[module][0]!r}) and expert parameter adapters"
            )
        own = [param for param, *_ in params]
        if len(set(own)) != len(own):
            raise ValueError(f"two adapters map to one expert parameter of {module!r}: {own}")
        order = own if parameter_order is None else [p for p in parameter_order if p in own]
        missing = sorted(set(own) - set(order))
        if missing:
            raise ValueError(
                f"parameter_order={list(parameter_order)} does not list {missing}, expert "
                f"parameters of {module!r}"
            )
        by_param = {param: (lora_a, lora_b) for param, _, lora_a, lora_b in params}
        for k, param in enumerate(order):
            key = f"{PREFIX}{module}." + "base_layer." * (len(order) - 1 - k)
            lora_a, lora_b = by_param[param]
            tensors[f"{key}lora_A.weight"] = np.ascontiguousarray(lora_a)
            tensors[f"{key}lora_B.weight"] = np.ascontiguousarray(lora_b)
            names.append(f"{module}.{param}")
    return sorted(names)


# What peft.save writes (PEFT's save_pretrained adds a README.md, which is kept).
_ADAPTER_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, "README.md"})


def is_adapter_dir(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds nothing but a PEFT adapter's files (what :func:`save`
    replaces whole, and ``jlora convert --overwrite`` may replace).

    Example:
      >>> import os, tempfile, jax, jax.numpy as jnp, jlora, jlora.peft
      >>> params = {"dense": {"kernel": jnp.ones((6, 4))}}
      >>> spec = jlora.LoraSpec(rank=2, targets=["dense"])
      >>> directory = tempfile.mkdtemp()
      >>> jlora.peft.save(directory, jlora.init(spec, params, jax.random.key(0)), spec,
      ...                 key_map="flax")
      >>> jlora.peft.is_adapter_dir(directory)
      True
      >>> open(os.path.join(directory, "notes.txt"), "w").close()
      >>> jlora.peft.is_adapter_dir(directory)
      False
    """
    names = set(os.listdir(directory))
    return CONFIG_NAME in names and names <= _ADAPTER_FILES


def _write_adapter_dir(directory: str, tensors, config) -> None:
    """Write the adapter so that a save killed at any point leaves the old one whole.

    A directory holding only adapter files (or nothing) is replaced whole: the new
    one is built beside it and swapped in. A directory that also holds other files (a
    trainer's output directory) gets each file replaced atomically, the weights
    first; there a kill between the two replaces leaves new weights beside the old
    config. Links are never written through.
    """

    def write_files(path: str) -> None:
        _io.write_file(
            os.path.join(path, WEIGHTS_NAME),
            lambda handle: _io.write_safetensors(handle, tensors, {"format": "pt"}),
        )
        _io.write_json(os.path.join(path, CONFIG_NAME), config)

    _io.check_target(directory, what="PEFT adapter directory")
    if os.path.isdir(directory) and os.listdir(directory) and not is_adapter_dir(directory):
        os.makedirs(directory, exist_ok=True)
        write_files(directory)
        return
    old_readme = os.path.join(directory, "README.md")

    def build(fresh: str) -> None:
        os.mkdir(fresh)
        if os.path.isfile(old_readme) and not os.path.islink(old_readme):
            shutil.copyfile(old_readme, os.path.join(fresh, "README.md"))
        write_files(fresh)

    _io.replace_dir(directory, build, replaceable=is_adapter_dir, what="PEFT adapter directory")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _slot_names(names: Sequence[str] | None, n: int) -> list[str]:
    names = [f"adapter_{k}" for k in range(n)] if names is None else list(names)
    if len(names) != n:
        raise ValueError(f"adapter_names: the stack has {n} slots; found {len(names)} names")
    for name in names:
        if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
            raise ValueError(
                f"adapter_names: {name!r} is not a plain directory name (letters, digits, "
                "'_', '.', '-')"
            )
    if len(set(names)) != n:
        raise ValueError(f"adapter_names: the names {names} repeat")
    return names


def load_stack(
    directory: str | os.PathLike,
    params: Params,
    *,
    key_map: KeyMapLike,
    adapter_names: Sequence[str] | None = None,
    fn: Callable | None = None,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
) -> tuple[Adapters, list[str]]:
    """Read PEFT's multi-adapter layout (``<directory>/<name>/``) as one stack.

    Each named subdirectory is read by :func:`load` and the adapters are stacked
    (:func:`jlora.stack`): slot ``k`` is ``adapter_names[k]`` (default: every
    subdirectory holding an adapter, sorted).

    Returns:
      ``(stacked, names)``.

    Raises:
      jlora.MissingFileError: no adapter subdirectory, or a named one is missing.
      ValueError: as :func:`load`, or adapters that cannot stack (other targets).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, jlora, jlora.peft
      >>> params = {"dense": {"kernel": jnp.ones((6, 4))}}
      >>> spec = jlora.LoraSpec(rank=2, targets=["dense"])
      >>> one = jlora.init(spec, params, jax.random.key(0))
      >>> directory = tempfile.mkdtemp()
      >>> jlora.peft.save(directory, jlora.stack([one, one]), spec, key_map="flax",
      ...                 adapter_names=["sql", "docs"])
      >>> stacked, names = jlora.peft.load_stack(directory, params, key_map="flax")
      >>> names, stacked["dense"]["kernel"].lora_a.shape
      (['docs', 'sql'], (2, 6, 2))
    """
    from jlora._stack import stack

    root = os.fspath(directory)
    if adapter_names is None:
        found = sorted(os.listdir(root)) if os.path.isdir(root) else []
        names = [n for n in found if os.path.isfile(os.path.join(root, n, CONFIG_NAME))]
    else:
        names = list(adapter_names)
        names = _slot_names(names, len(names))
    if not names:
        raise MissingFileError(
            f"no PEFT adapter subdirectory (<name>/{CONFIG_NAME}) in {root}: expected PEFT's "
            "multi-adapter layout"
        )
    trees = [
        load(os.path.join(root, name), params, key_map=key_map, fn=fn, args=args,
             kwargs=kwargs)[0]
        for name in names
    ]  # fmt: skip
    return stack(trees), names


def _modules_of(path: Path, node: LoraAdapter, key_map: Callable):
    """``(module name, A (in, r), B (r, out), DoRA magnitude | None, lora_bias | None)``
    for each layer of one adapter."""
    name = key_map(path)
    if name is None:
        raise ValueError(
            f"key_map {_key_map_name(key_map)!r} has no PyTorch module name for the "
            f"adapter at {path!r}; pass a key_map that names it (see jlora.peft.KeyMap)"
        )
    layout = node.layout
    fields = name.count("{}")
    if fields != len(layout.stack_axes):
        raise ValueError(
            f"adapter at {path!r} has {len(layout.stack_axes)} stack axes (shape "
            f"{list(layout.weight_shape)}, layout {layout}) but key_map names it {name!r} "
            f"with {fields} '{{}}' fields: a stacked weight needs one '{{}}' per stack axis "
            "for the layer index (e.g. 'model.layers.{}.self_attn.q_proj'); for MoE expert "
            "weights pass experts=<their names>"
        )
    expected = getattr(key_map, "layout", None)
    if expected is not None and not layout.stack_axes:
        want = expected(path, layout.weight_shape, 0)
        if want is not None and want != layout:
            raise ValueError(
                f"adapter at {path!r} has layout in_axes={layout.in_axes}, "
                f"out_axes={layout.out_axes}, but key_map {_key_map_name(key_map)!r} stores "
                f"that weight with in_axes={want.in_axes}, out_axes={want.out_axes}: create "
                "the adapters with jlora.init(..., fn=<model>, args=<example inputs>) so the "
                "layout is learned from the model"
            )
    lora_a = np.asarray(node.lora_a)
    lora_b = np.asarray(node.lora_b)
    magnitude = np.asarray(node.magnitude) if isinstance(node, DoraAdapter) else None
    bias = np.asarray(node.lora_bias) if isinstance(node, LoraBiasAdapter) else None
    parts = _parts_of(path, layout, key_map)
    head = getattr(key_map, "tied_head", None) if _is_embedding(path, key_map) else None
    if head is not None and (layout.stack_axes or magnitude is not None or bias is not None):
        raise ValueError(
            f"the adapter at {path!r} is on an embedding tied to the output head {head!r}; "
            "PEFT adapts the two apart, so jlora writes the one update to both, which "
            "needs a plain LoRA adapter on an unstacked table (not DoRA or lora_bias)"
        )
    stack_shape = layout.stack_shape
    for index in np.ndindex(*stack_shape):
        m = None if magnitude is None else magnitude[index]
        b = None if bias is None else bias[index]
        if parts is None:
            yield name.format(*index), lora_a[index], lora_b[index], m, b
        else:  # one shared A, B sliced at the parts' output features: exact
            width = lora_b.shape[-1] // len(parts)
            for k, part in enumerate(parts):
                cut = slice(k * width, (k + 1) * width)
                m_k = None if m is None else m[..., cut]
                b_k = None if b is None else b[..., cut]
                yield part.format(*index), lora_a[index], lora_b[index][..., cut], m_k, b_k
        if head is not None:  # the tied head: out = vocab, in = dim; the same update
            yield head, lora_b[index].T, lora_a[index].T, None, None


def _parts_of(path: Path, layout: Layout, key_map: Callable) -> tuple[str, ...] | None:
    """The fused kernel's part names, checked against its layout (None: not fused)."""
    rule = getattr(key_map, "parts", None)
    parts = rule(path) if rule is not None else None
    if parts is None:
        return None
    lead = min(layout.out_axes)
    if layout.weight_shape[lead] != len(parts):
        raise ValueError(
            f"key_map {_key_map_name(key_map)!r} splits the fused weight at {path!r} into "
            f"{len(parts)} modules {list(parts)} along its leading output axis, but that "
            f"axis ({lead}) has size {layout.weight_shape[lead]} (shape "
            f"{list(layout.weight_shape)}, layout {layout}); create the adapters with "
            "jlora.init(..., fn=<model>, args=<example inputs>) so the layout is learned"
        )
    return parts


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def _config(spec, modules, key_map, base_model_name_or_path, task_type) -> dict[str, Any]:
    kinds = {type(node).KIND for _, node in modules.values()}
    lora_bias = "lora_bias" in kinds
    kinds -= {"lora_bias"} if kinds == {"lora", "lora_bias"} else set()  # zero biases
    if len(kinds) > 1:
        raise ValueError(
            "PEFT's use_dora is one switch for the whole adapter; these adapters mix "
            f"kinds {sorted(kinds)}: save the DoRA and the plain LoRA targets apart"
        )
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float | int] = {}
    for name, (path, node) in sorted(modules.items()):
        rank = node.rank
        alpha = _alpha_of(spec, path, node)
        if rank != spec.rank:
            rank_pattern[name] = rank
        if not math.isclose(alpha, spec.alpha, rel_tol=1e-6):
            alpha_pattern[name] = _number(alpha)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(spec.rank),
        "lora_alpha": _number(spec.alpha),
        "target_modules": sorted(modules),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": bool(spec.rslora),
        "lora_dropout": float(spec.dropout),
        "fan_in_fan_out": bool(getattr(key_map, "fan_in_fan_out", False)),
        # PEFT takes lora_bias only with init_lora_weights True or False.
        "init_lora_weights": "gaussian" if spec.init == "gaussian" and not lora_bias else True,
        "bias": "none",
        "lora_bias": lora_bias,
        "use_dora": kinds == {"dora"},
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "revision": None,
    }


def _alpha_of(spec: LoraSpec, path: Path, node: LoraAdapter) -> float:
    """The alpha that gives ``node.scale`` at ``node.rank`` (the spec's own when it does)."""
    rank = node.rank
    denominator = scale_denominator(rank, spec.rslora)
    if spec.rank_for(path) == rank and math.isclose(spec.scale_for(path), node.scale):
        return spec.alpha_for(path)
    return node.scale * denominator


def _check_vllm(items, spec: LoraSpec) -> None:
    for path, node in items:
        if not isinstance(node, LoraAdapter):
            if module_path(path)[1] == "bias":
                raise ValueError(
                    f"vLLM does not load LoRA biases (PEFT bias must be 'none'): the "
                    f"adapters train the base bias at {path!r}"
                )
            raise ValueError(
                f"vLLM does not load extra saved modules (PEFT modules_to_save): the "
                f"adapters train the base leaf at {path!r}"
            )
    if spec.lora_bias or any(isinstance(node, LoraBiasAdapter) for _, node in items):
        raise ValueError(
            "vLLM has deprecated LoRA biases (its enable_lora_bias option; PEFT's "
            "lora_bias): merge the adapters into the base (jlora.merge adds the biases to "
            "the layers' own) and serve the merged model, or train without lora_bias"
        )
    if spec.dora or any(isinstance(node, DoraAdapter) for _, node in items):
        raise ValueError(
            "vLLM does not load DoRA adapters (use_dora): merge them into the base "
            "(jlora.merge) and serve the merged model, or train plain LoRA"
        )
    scale = lora_scale(spec.alpha, spec.rank, spec.rslora)
    for path, node in items:
        if node.rank not in VLLM_RANKS:
            raise ValueError(
                f"vLLM supports LoRA ranks {sorted(VLLM_RANKS)}; the adapter at {path!r} "
                f"has rank {node.rank}"
            )
        if not math.isclose(node.scale, scale, rel_tol=1e-6):
            raise ValueError(
                f"vLLM scales every module by lora_alpha / r = {spec.alpha} / {spec.rank} "
                f"= {scale:g} (no alpha_pattern); the adapter at {path!r} has scale "
                f"{node.scale:g} (rank {node.rank})"
            )


# -- loading --------------------------------------------------------------------------

_KEY = re.compile(
    r"base_model\.model\.(?P<module>.+)\."
    r"(?:(?P<linear>lora_[AB])\.weight|(?P<embedding>lora_embedding_[AB]))"
)


def load(
    directory: str | os.PathLike,
    params: Params,
    *,
    key_map: KeyMapLike,
    fn: Callable | None = None,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
) -> tuple[Adapters, LoraSpec]:
    """Read a PEFT LoRA adapter directory into a jlora adapters tree for ``params``.

    Every module in the file is matched to the leaf of ``params`` the key map names
    that way; the layout of each weight comes from ``fn`` when given (as in
    :func:`jlora.init`), else from the key map (``KeyMap.layout``: GPT-2's transposed
    kernels) or the 2-D rule. Factors keep the file's dtype, bit for bit.

    Args:
      directory: a directory with ``adapter_config.json`` and
        ``adapter_model.safetensors`` (``.bin`` pickle files are refused).
      params: the frozen base the adapters are for (arrays or ``ShapeDtypeStruct`` s).
      key_map: a built-in name or a callable ``path -> PyTorch module name``.
      fn: the model function, to learn layouts of stacked or multi-axis weights.
      args: example positional arguments of ``fn`` after ``params``.
      kwargs: example keyword arguments of ``fn``.

    Returns:
      ``(adapters, spec)``: the spec's ``targets`` is a regex of exactly the loaded
      paths; per-path ranks and alphas that differ from ``r`` / ``lora_alpha`` are in
      its ``rank_pattern`` / ``alpha_pattern``.

    Raises:
      FileNotFoundError: a file is missing.
      ValueError: a malformed or truncated file (named), a feature jlora does not
        load (biases, ``modules_to_save``), a module no leaf of ``params`` maps
        to, or tensors whose shapes do not fit the weight (path and shapes named).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, jlora, jlora.peft
      >>> params = {"dense": {"kernel": jnp.ones((6, 4))}}
      >>> spec = jlora.LoraSpec(rank=2, alpha=4.0, targets=["dense"])
      >>> directory = tempfile.mkdtemp()
      >>> jlora.peft.save(directory, jlora.init(spec, params, jax.random.key(0)), spec,
      ...                 key_map="flax")
      >>> adapters, loaded_spec = jlora.peft.load(directory, params, key_map="flax")
      >>> loaded_spec.rank, loaded_spec.alpha, adapters["dense"]["kernel"].scale
      (2, 4.0, 2.0)
    """
    key_map = _resolve_key_map(key_map)
    directory = _io.existing(directory)
    config, _, by_module, base_weights, weights_file = _read_adapter(directory)
    by_module = _join_modules(by_module, params, key_map, config, weights_file)
    where = _locate(by_module, params, key_map, weights_file)
    _check_base_weights(base_weights, params, key_map, weights_file)

    leaves = dict(leaves_with_paths(params, is_leaf=is_weight_node))
    layouts = _load_layouts(where, leaves, params, key_map, fn, args, kwargs)
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    rslora = bool(config.get("use_rslora", False))

    nodes: dict[Path, LoraAdapter] = {}
    spec_ranks: dict[str, int] = {}
    spec_alphas: dict[str, float] = {}
    tokens = config.pop("_tokens")
    if tokens:
        from jlora._tokens import TokensAdapter

        token_where = _locate(dict.fromkeys(tokens), params, key_map, weights_file)
        for path, layers in token_where.items():
            module = layers[()]
            indices, rows = tokens[module]
            layout = Layout.dense(tuple(shape_of(leaves[path])))
            if rows.shape[1] != layout.out_features or max(indices) >= layout.in_features:
                raise FileFormatError(
                    weights_file, f"the embedding at {path!r} is {describe(leaves[path])}",
                    key=f"{module}.{TOKENS}",
                    expected=f"rows of {layout.out_features} values, indices below "
                    f"{layout.in_features}", found=f"rows {list(rows.shape)}, indices {indices}",
                )  # fmt: skip
            nodes[path] = TokensAdapter(scale=1.0, layout=layout, rows=jnp.asarray(rows),
                                        indices=indices)  # fmt: skip
    for path, layers in where.items():
        node, path_alpha = _adapter(path, layers, layouts[path], by_module, config, weights_file)
        nodes[path] = node
        if node.rank != rank:
            spec_ranks[re.escape(path)] = node.rank
        if path_alpha != alpha:
            spec_alphas[re.escape(path)] = path_alpha

    init = "gaussian" if config.get("init_lora_weights") == "gaussian" else "kaiming"
    token_paths = {p for p, n in nodes.items() if type(n).__name__ == "TokensAdapter"}
    spec = LoraSpec(
        rank=rank,
        alpha=alpha,
        targets="|".join(re.escape(p) for p, n in nodes.items() if p not in token_paths),
        dropout=float(config.get("lora_dropout") or 0.0),
        init=init,
        rslora=rslora,
        rank_pattern=spec_ranks or None,
        alpha_pattern=spec_alphas or None,
        dora=bool(config.get("use_dora", False)),
        lora_bias=bool(config.get("lora_bias", False)),
        trainable_token_indices={path.split("/")[-2]: nodes[path].indices for path in token_paths}
        or None,
    )
    return build_like(params, nodes), spec


def read(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A PEFT adapter directory's checked config and its factors per PyTorch module.

    The same readers and checks as :func:`load` (safetensors only, config values
    validated), with no params to match: for tools that work on module names.

    Returns:
      ``(config, modules)``: ``modules[name]`` holds ``A`` (PEFT's ``(r, in)``), ``B``
      (``(out, r)``), ``magnitude`` (DoRA, else None), ``lora_bias`` (lora_B's bias
      ``(out,)`` with ``lora_bias``, else None), ``embedding`` (whether the
      factors are ``lora_embedding_*``), and the module's ``rank``, ``alpha`` and
      ``scale`` (``rank_pattern`` / ``alpha_pattern`` applied). Full base weights PEFT
      may save beside the factors are left out.

    Raises:
      FileNotFoundError, ValueError: as :func:`load`.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, jlora, jlora.peft
      >>> params = {"dense": {"kernel": jnp.ones((6, 4))}}
      >>> spec = jlora.LoraSpec(rank=2, alpha=4.0, targets=["dense"])
      >>> directory = tempfile.mkdtemp()
      >>> jlora.peft.save(directory, jlora.init(spec, params, jax.random.key(0)), spec,
      ...                 key_map="flax")
      >>> config, modules = jlora.peft.read(directory)
      >>> modules["dense"]["A"].shape, modules["dense"]["scale"]
      ((2, 6), 2.0)
    """
    directory = _io.existing(directory)
    config, tensors, by_module, _, _ = _read_adapter(directory)
    config.pop("_tokens")
    modules = {}
    for module, factors in by_module.items():
        modules[module] = {
            "A": factors["A"],
            "B": factors["B"],
            "magnitude": factors.get("M"),
            "lora_bias": factors.get("bias"),
            "embedding": f"{PREFIX}{module}.lora_embedding_A" in tensors,
            "rank": factors["rank"],
            "alpha": factors["alpha"],
            "scale": factors["scale"],
        }
    return config, modules


_BOOLEANS = ("use_rslora", "use_dora", "fan_in_fan_out", "inference_mode", "lora_bias")
_UNSUPPORTED = {
    "modules_to_save": "extra saved modules (modules_to_save)",
    # jlora.peft.save writes these for expert weights, but the nested keys name a depth,
    # not a parameter: reading them back needs the PyTorch module's registration order.
    "target_parameters": "adapters on bare parameters (target_parameters)",
}


def _check_rank(value: Any, file: str, key: str) -> int:
    if not is_int(value) or value <= 0:
        raise FileFormatError(file, key=key, expected="a positive integer", found=value)
    return value


def _check_alpha(value: Any, file: str, key: str) -> float:
    if not is_real(value) or not math.isfinite(value) or value < 0:
        raise FileFormatError(file, key=key, expected="a finite non-negative number", found=value)
    return float(value)


def _read_config(directory) -> dict[str, Any]:
    """``adapter_config.json``, every value jlora uses checked (file and key named)."""
    config_file = os.path.join(os.fspath(directory), CONFIG_NAME)
    if not os.path.exists(config_file):
        raise MissingFileError(f"no PEFT adapter config: {config_file} does not exist")
    try:
        config = json.loads(_io.read_small_file(config_file, what="adapter config").decode())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise FileFormatError(config_file, f"not valid UTF-8 JSON ({error})") from None
    except OSError as error:
        raise FileFormatError(config_file, f"cannot be read ({error.strerror})") from None
    if not isinstance(config, dict):
        raise FileFormatError(
            config_file, key="(top level)", expected="a JSON object", found=type(config).__name__
        )
    if config.get("peft_type", "LORA") != "LORA":
        raise FileFormatError(
            config_file, key="peft_type", expected="'LORA'", found=config.get("peft_type")
        )
    _check_rank(config.get("r"), config_file, "r")
    _check_alpha(config.get("lora_alpha"), config_file, "lora_alpha")
    for field in _BOOLEANS:
        value = config.get(field)
        if value is not None and not isinstance(value, bool):
            raise FileFormatError(config_file, key=field, expected="true or false", found=value)
    dropout = config.get("lora_dropout")
    if dropout is not None and (not is_real(dropout) or not 0.0 <= dropout < 1.0):
        raise FileFormatError(
            config_file, key="lora_dropout", expected="a number in [0, 1)", found=dropout
        )
    for field, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
        pattern = config.get(field)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise FileFormatError(
                config_file, key=field, expected="an object {regex: value}", found=pattern
            )
        for regex, value in pattern.items():
            compile_untrusted(peft_match(regex), file=config_file, key=f"{field}[{regex!r}]")
            check(value, config_file, f"{field}[{regex!r}]")
    for field in ("target_modules", "exclude_modules"):
        value = config.get(field)
        if isinstance(value, str):
            if value != "all-linear":
                compile_untrusted(value, file=config_file, key=field)
        elif value is not None and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise FileFormatError(
                config_file,
                key=field,
                expected="a regex string or a list of module names",
                found=value,
            )
    for field, what in _UNSUPPORTED.items():
        if config.get(field):
            raise FileFormatError(
                config_file,
                f"uses {what}; jlora.peft loads plain LoRA adapters only",
                key=field,
                expected="null or empty",
                found=config[field],
            )
    if config.get("bias", "none") != "none":
        raise FileFormatError(
            config_file,
            "jlora.peft loads adapters with bias='none' only",
            key="bias",
            expected="'none'",
            found=config["bias"],
        )
    return config


def _read_tensors(directory) -> dict[str, np.ndarray]:
    weights_file = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    if os.path.exists(weights_file) and not os.path.isfile(weights_file):
        raise FileFormatError(weights_file, "the adapter weights are not a regular file")
    if not os.path.isfile(weights_file):
        pickled = os.path.join(os.fspath(directory), "adapter_model.bin")
        if os.path.exists(pickled):
            raise FileFormatError(
                pickled,
                f"a pickle file, which jlora never reads; convert it to {WEIGHTS_NAME} "
                "(e.g. PeftModel.save_pretrained(..., safe_serialization=True)) in a "
                "trusted environment",
            )
        raise MissingFileError(f"no PEFT adapter weights: {weights_file} does not exist")
    try:
        tensors = safetensors.numpy.load_file(weights_file)
    except (SafetensorError, ValueError, TypeError, OverflowError, MemoryError) as error:
        text = "" if through_link(weights_file) else f": {error}"
        raise FileFormatError(
            weights_file, f"not a readable safetensors file (malformed or truncated){text}"
        ) from None
    except OSError as error:
        raise FileFormatError(weights_file, f"cannot be read ({error.strerror})") from None
    for key, value in tensors.items():
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise FileFormatError(
                weights_file, key=key, expected="a floating-point tensor", found=str(value.dtype)
            )
        if not np.isfinite(value).all():
            raise FileFormatError(
                weights_file, key=key, expected="finite values", found="NaN or Inf"
            )
    return tensors


MAGNITUDE = "lora_magnitude_vector"
TOKENS = "token_adapter.trainable_tokens_delta"  # PEFT's trainable tokens: the new rows
_TOKENS_KEY = re.compile(
    r"base_model\.model\.(?P<module>.+)\.token_adapter\.trainable_tokens_delta"
)
# PEFT writes Linear magnitudes without ``.weight`` and Embedding ones with it.
_LORA_BIAS_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_B\.bias")
_MAGNITUDE_KEY = re.compile(rf"base_model\.model\.(?P<module>.+)\.{MAGNITUDE}(?:\.weight)?")
_BASE_KEY = re.compile(r"base_model\.model\.(?P<module>.+?)(?:\.base_layer)?\.weight")


def _group(tensors: Mapping[str, np.ndarray], weights_file: str, tokens: dict | None = None):
    """``{module: {"A": array, "B": array}}`` and ``{module: base weight}`` from the keys.

    PEFT saves the full base weight of a targeted embedding beside its factors
    (``save_embedding_layers``, for resized vocabularies): those are returned apart.
    """
    by_module: dict[str, dict[str, Any]] = {}
    kinds: dict[str, set[str]] = {}
    base_weights: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        found = _KEY.fullmatch(key)
        if found is None:
            dora = _MAGNITUDE_KEY.fullmatch(key)
            if dora is not None:
                by_module.setdefault(dora["module"], {})["M"] = value
                continue
            token = _TOKENS_KEY.fullmatch(key)
            if token is not None and tokens is not None:
                if value.ndim != 2:
                    raise FileFormatError(weights_file, key=key, expected="a 2-D tensor",
                                          found=list(value.shape))  # fmt: skip
                tokens[token["module"]] = value
                continue
            bias = _LORA_BIAS_KEY.fullmatch(key)
            if bias is not None:
                if value.ndim != 1:
                    raise FileFormatError(weights_file, key=key, expected="a 1-D tensor",
                                          found=list(value.shape))  # fmt: skip
                by_module.setdefault(bias["module"], {})["bias"] = value
                continue
            base = _BASE_KEY.fullmatch(key)
            if base is not None and ".lora_" not in key:
                base_weights[base["module"]] = value
                continue
            raise FileFormatError(
                weights_file,
                "which is not a PEFT LoRA factor",
                key=key,
                expected="base_model.model.<module>.lora_A.weight / lora_B.weight / "
                "lora_embedding_A / lora_embedding_B",
            )
        factor = (found["linear"] or found["embedding"])[-1]
        kinds.setdefault(found["module"], set()).add("linear" if found["linear"] else "embedding")
        if value.ndim != 2:
            raise FileFormatError(
                weights_file, key=key, expected="a 2-D tensor", found=list(value.shape)
            )
        by_module.setdefault(found["module"], {})[factor] = value
    for module, factors in by_module.items():
        if len(kinds.get(module, ())) > 1:
            raise FileFormatError(
                weights_file,
                key=module,
                expected="either lora_A/lora_B or lora_embedding_A/lora_embedding_B",
                found="both",
            )
        if set(factors) - {"M", "bias"} != {"A", "B"}:
            raise FileFormatError(
                weights_file,
                key=module,
                expected="both lora_A and lora_B",
                found=f"lora_{''.join(sorted(factors))} only",
            )
    return by_module, base_weights


def _names(config: Mapping[str, Any], field: str, module: str, config_file: str) -> bool:
    """PEFT's rule for whether ``target_modules`` / ``exclude_modules`` names ``module``:
    a string is a regex the whole name must match, a list holds names or name suffixes."""
    names = config.get(field)
    if isinstance(names, str):
        regex = compile_untrusted(names, file=config_file, key=field)
        return regex.fullmatch(module) is not None
    return any(module == t or module.endswith(f".{t}") for t in names or ())


def _targeted(config: Mapping[str, Any], module: str, config_file: str) -> bool:
    if config.get("target_modules") in (None, "all-linear"):
        return True
    return _names(config, "target_modules", module, config_file)


def _excluded(config: Mapping[str, Any], module: str, config_file: str) -> bool:
    return _names(config, "exclude_modules", module, config_file)


def _token_entries(config, token_rows, config_file, weights_file) -> dict[str, tuple]:
    """``{module: (indices, rows)}`` from ``trainable_token_indices`` and the token keys,
    checked to agree (PEFT's dict keys are module names or suffixes of them)."""
    indices = config.get("trainable_token_indices")
    if not indices and not token_rows:
        return {}
    if not indices or not token_rows:
        raise FileFormatError(
            weights_file if indices else config_file,
            "trainable_token_indices and the token_adapter tensors disagree",
            key="trainable_token_indices",
            expected="both or neither",
            found=f"indices {indices!r}, tensors for {sorted(token_rows)}",
        )
    if isinstance(indices, Mapping):
        pairs = list(indices.items())
    elif isinstance(indices, list) and len(token_rows) == 1:
        pairs = [(next(iter(token_rows)), indices)]
    else:
        raise FileFormatError(config_file, key="trainable_token_indices",
                              expected="{module: [indices]} (or a list for one embedding)",
                              found=indices)  # fmt: skip
    entries: dict[str, tuple] = {}
    for name, group in pairs:
        if not isinstance(group, list) or not group or not all(is_int(i) and i >= 0
                                                              for i in group):  # fmt: skip
            raise FileFormatError(
                config_file,
                key=f"trainable_token_indices[{name!r}]",
                expected="a non-empty list of token indices",
                found=group,
            )
        modules = [m for m in token_rows if m == name or m.endswith(f".{name}")]
        if len(modules) != 1:
            raise FileFormatError(
                weights_file,
                key=f"trainable_token_indices[{name!r}]",
                expected="one token_adapter tensor for the module it names",
                found=sorted(token_rows),
            )
        rows = token_rows[modules[0]]
        if rows.shape[0] != len(group) or len(set(group)) != len(group):
            raise FileFormatError(
                weights_file,
                key=f"{modules[0]}.{TOKENS}",
                expected=f"{len(group)} rows for distinct indices {group}",
                found=list(rows.shape),
            )
        entries[modules[0]] = (tuple(int(i) for i in group), rows)
    unnamed = sorted(set(token_rows) - set(entries))
    if unnamed:
        raise FileFormatError(
            weights_file,
            key=f"{unnamed[0]}.{TOKENS}",
            expected="indices for it in trainable_token_indices",
            found="none",
        )
    return entries


def _read_adapter(directory) -> tuple[dict[str, Any], dict[str, np.ndarray], dict, dict, str]:
    """The checked config, tensors, factors per module, base weights and the weights file.

    Every module's factors must agree with the config: its rank (``r`` or
    ``rank_pattern``) with both factors' shapes, ``target_modules`` and
    ``exclude_modules`` with its name, ``use_dora`` with its magnitude. The module's
    ``rank``, ``alpha`` and ``scale`` are added to its entry.
    """
    directory = os.fspath(directory)
    config_file = os.path.join(directory, CONFIG_NAME)
    config = _read_config(directory)
    tensors = _read_tensors(directory)
    weights_file = os.path.join(directory, WEIGHTS_NAME)
    token_rows: dict[str, np.ndarray] = {}
    by_module, base_weights = _group(tensors, weights_file, token_rows)
    if not by_module:
        raise FileFormatError(weights_file, "holds no LoRA factors")
    config["_tokens"] = _token_entries(config, token_rows, config_file, weights_file)
    dora = bool(config.get("use_dora"))
    for module, factors in by_module.items():
        rank = _peft_value(config.get("rank_pattern") or {}, module, config["r"], config_file)
        alpha = _peft_value(
            config.get("alpha_pattern") or {}, module, config["lora_alpha"], config_file
        )
        if factors["A"].shape[0] != rank or factors["B"].shape[1] != rank:
            raise FileFormatError(
                weights_file,
                f"the config ({CONFIG_NAME}: r / rank_pattern) gives it rank {rank}",
                key=module,
                expected=f"lora_A of {rank} rows and lora_B of {rank} columns",
                found=f"lora_A {list(factors['A'].shape)}, lora_B {list(factors['B'].shape)}",
            )
        if not _targeted(config, module, config_file) or _excluded(config, module, config_file):
            raise FileFormatError(
                config_file,
                f"the weights file adapts {module!r}, which the config's target_modules / "
                "exclude_modules leave out: the files disagree",
                key="target_modules",
                expected=f"a selection that includes {module!r}",
                found=config.get("target_modules"),
            )
        if bool(config.get("lora_bias")) != ("bias" in factors):
            has = bool(config.get("lora_bias"))
            raise FileFormatError(
                weights_file,
                f"the config sets lora_bias={str(has).lower()}: the files disagree",
                key=module,
                expected=f"{'a' if has else 'no'} lora_B.bias",
                found="none" if has else "one",
            )
        if "bias" in factors and factors["bias"].shape != (factors["B"].shape[0],):
            raise FileFormatError(
                weights_file,
                key=f"{module}.lora_B.bias",
                expected=f"{factors['B'].shape[0]} values (lora_B's rows)",
                found=list(factors["bias"].shape),
            )
        if dora != ("M" in factors):
            raise FileFormatError(
                weights_file,
                f"the config sets use_dora={str(dora).lower()}: the files disagree",
                key=module,
                expected=f"{'a' if dora else 'no'} {MAGNITUDE}",
                found="none" if dora else "one",
            )
        factors["rank"], factors["alpha"] = rank, float(alpha)
        factors["scale"] = lora_scale(float(alpha), rank, bool(config.get("use_rslora")))
    return config, tensors, by_module, base_weights, weights_file


def _check_base_weights(base_weights, params, key_map, weights_file) -> None:
    """Full base weights in the file must be the ones in ``params``: jlora loads adapters only.

    PEFT saves them for embedding targets (``save_embedding_layers``, in case the
    vocabulary was resized); a tied output layer with no leaf of its own must equal
    one of the embeddings.
    """
    if not base_weights:
        return
    leaves = leaves_with_paths(params, is_leaf=is_weight_node)
    names = {key_map(path): (path, leaf) for path, leaf in leaves if _torch_weight_kind(path, leaf)}
    embeddings = [(p, leaf) for p, leaf in leaves if _torch_weight_kind(p, leaf) == "embedding"]
    for module, saved in base_weights.items():
        if module in names:
            path, leaf = names[module]
            if not _same_weight(saved, path, leaf):
                raise ValueError(
                    f"{weights_file} holds the base weight of {module!r} ({saved.dtype}"
                    f"{list(saved.shape)}), which is not the one params has at {path!r} "
                    f"({describe(leaf)}): the adapter was saved with another or a resized "
                    "base model, and jlora.peft loads LoRA factors only"
                )
        elif not any(_same_weight(saved, path, leaf) for path, leaf in embeddings):
            raise ValueError(
                f"{weights_file} holds a full weight for the PyTorch module {module!r} (PEFT "
                "modules_to_save or saved embedding layers) that is neither a leaf of params "
                f"under key_map {_key_map_name(key_map)!r} nor a tied embedding; jlora.peft "
                "loads LoRA factors only"
            )


def _torch_weight_kind(path: Path, leaf: Any) -> str | None:
    name = module_path(path)[1]
    if name == "embedding" and _is_weight(leaf):
        return "embedding"
    if name == "kernel" and _is_weight(leaf) and len(shape_of(leaf)) == 2:
        return "kernel"
    return None


def _same_weight(saved: np.ndarray, path: Path, leaf: Any) -> bool:
    """Whether PyTorch's ``weight`` ``saved`` is this Flax leaf (kernels are transposed)."""
    kind = _torch_weight_kind(path, leaf)
    shape = shape_of(leaf)
    if kind == "kernel":
        shape = shape[::-1]
    if kind is None or tuple(saved.shape) != tuple(shape):
        return False
    if not isinstance(leaf, (np.ndarray, jax.Array)) or isinstance(leaf, jax.core.Tracer):
        return True  # abstract params: the shape is all there is to check
    ours = np.asarray(leaf, np.float32)
    if kind == "kernel":
        ours = ours.T
    coarsest = max(float(jnp.finfo(leaf.dtype).eps), float(jnp.finfo(saved.dtype).eps))
    return bool(np.allclose(saved.astype(np.float32), ours, rtol=coarsest, atol=0.0))


def _locate(by_module, params, key_map, weights_file) -> dict[Path, dict[tuple, str]]:
    """``{path: {stack index: module}}``: which leaf of ``params`` each module adapts."""
    exact: dict[str, Path] = {}
    stacked: list[tuple[re.Pattern, Path]] = []
    for path, leaf in leaves_with_paths(params, is_leaf=is_weight_node):
        if not _is_weight(leaf) or module_path(path)[1] in NOT_WEIGHTS:
            continue  # stacked biases and norm scales share their module's name
        name = key_map(path)
        if name is None:
            continue
        if "{}" in name:
            stacked.append((_field_regex(name), path))
        else:
            exact.setdefault(name, path)
    where: dict[Path, dict[tuple, str]] = {}
    for module in by_module:
        if module in exact:
            where.setdefault(exact[module], {})[()] = module
            continue
        for regex, path in stacked:
            found = regex.fullmatch(module)
            if found:
                where.setdefault(path, {})[tuple(int(i) for i in found.groups())] = module
                break
        else:
            known = sorted(exact)[:6] + [r.pattern for r, _ in stacked[:3]]
            raise ValueError(
                f"{weights_file} adapts the PyTorch module {module!r}, but no leaf of params "
                f"maps to it with key_map {_key_map_name(key_map)!r} (it names e.g. {known}); "
                "is this adapter for another model, or do you need another key_map?"
            )
    return where


def _join_modules(by_module, params, key_map, config, weights_file) -> dict[str, dict[str, Any]]:
    """The file's modules as jlora's weights hold them: the parts of a fused kernel
    (``KeyMap.fused``) become one entry under the kernel's own name, and a tied head
    (``KeyMap.tied_head``) folds into its embedding."""
    parts_rule = getattr(key_map, "parts", None)
    head = getattr(key_map, "tied_head", None)
    if parts_rule is None and head is None:
        return by_module
    by_module = dict(by_module)
    rslora = bool(config.get("use_rslora"))
    for path, leaf in leaves_with_paths(params, is_leaf=is_weight_node):
        name = key_map(path) if _is_weight(leaf) else None
        if name is None:
            continue
        if head is not None and head in by_module and _is_embedding(path, key_map):
            _check_tied_head(by_module, name, head, weights_file)
            del by_module[head]
        parts = parts_rule(path) if parts_rule is not None else None
        if parts is None:
            continue
        for index, names in _part_groups(parts, by_module):
            by_module[name.format(*index)] = _joined(
                [by_module.pop(n, None) for n in names], names, path, rslora, weights_file
            )
    if head is not None and head in by_module:
        raise FileFormatError(
            weights_file, f"key_map {_key_map_name(key_map)!r} ties the output head to the "
            "embedding, so a LoRA on the head alone changes a weight the lookup shares",
            key=head, expected=f"{head} with the embedding's own update, or no {head}",
            found=f"{head} alone",
        )  # fmt: skip
    return by_module


def _check_tied_head(by_module, embedding: str, head: str, weights_file) -> None:
    """Check that the head's factors are the embedding's transposed (one tied update)."""
    emb, out = by_module.get(embedding), by_module[head]
    same = emb is not None and (
        np.array_equal(out["A"], emb["B"].T) and np.array_equal(out["B"], emb["A"].T)
        and math.isclose(out["scale"], emb["scale"]) and not ({"M", "bias"} & set(out))
    )  # fmt: skip
    if not same:
        raise FileFormatError(
            weights_file, f"the output head {head!r} is tied to {embedding!r} in this model "
            "family, and jlora holds one update for the shared table",
            key=head, expected=f"the factors of {embedding!r}, transposed",
            found="other factors" if emb is not None else f"no adapter on {embedding!r}",
        )  # fmt: skip


def _part_groups(parts: tuple[str, ...], by_module) -> list[tuple[tuple[int, ...], list[str]]]:
    """``(stack index, part names)`` for each layer with at least one part in the file."""
    if not any("{}" in p for p in parts):
        return [((), list(parts))] if any(p in by_module for p in parts) else []
    indices = set()
    for part in parts:
        regex = _field_regex(part)
        for module in by_module:
            found = regex.fullmatch(module)
            if found:
                indices.add(tuple(int(i) for i in found.groups()))
    return [(i, [p.format(*i) for p in parts]) for i in sorted(indices)]


def _joined(entries, names, path, rslora: bool, weights_file) -> dict[str, Any]:
    """One module entry for a fused kernel from its parts' (None: absent from the file).

    Parts with equal A's and scales (a file jlora wrote) share them: B is stacked, at
    the same rank. Otherwise the A's are concatenated and B is block-diagonal, each
    part's block scaled to the first part's scale: rank = the sum of the parts' ranks,
    the same update exactly; an absent part's block is zero."""
    present = [(k, e) for k, e in enumerate(entries) if e is not None]
    widths = {e["B"].shape[0] for _, e in present}
    if len(widths) > 1:
        raise FileFormatError(
            weights_file, f"the modules {names} are the parts of one fused weight at {path!r}",
            key=names[present[0][0]], expected="parts with equal output features",
            found=f"lora_B rows {[e['B'].shape[0] for _, e in present]}",
        )  # fmt: skip
    width, first = widths.pop(), present[0][1]
    dora, bias = "M" in first, "bias" in first
    if dora and len(present) < len(entries):
        missing = [n for n, e in zip(names, entries) if e is None]
        raise FileFormatError(
            weights_file, f"a DoRA magnitude covers every output of the fused weight at "
            f"{path!r}", key=missing[0], expected=f"all of {names}", found="absent",
        )  # fmt: skip
    shared = len(present) == len(entries) and all(
        np.array_equal(e["A"], first["A"]) and math.isclose(e["scale"], first["scale"])
        for _, e in present
    )
    dtype = first["B"].dtype
    if shared:
        entry = dict(first, B=np.concatenate([e["B"] for e in entries]))
    else:
        rank = sum(e["rank"] for _, e in present)
        joined_b = np.zeros((width * len(entries), rank), dtype)
        offset = 0
        for k, e in present:
            ratio = e["scale"] / first["scale"]
            block = e["B"] if ratio == 1 else (e["B"].astype(np.float64) * ratio).astype(dtype)
            joined_b[k * width : (k + 1) * width, offset : offset + e["rank"]] = block
            offset += e["rank"]
        entry = {
            "A": np.concatenate([e["A"] for _, e in present]),
            "B": joined_b,
            "rank": rank,
            "alpha": first["scale"] * scale_denominator(rank, rslora),
            "scale": first["scale"],
        }
    if dora:
        entry["M"] = np.concatenate([np.reshape(e["M"], -1) for e in entries])
    if bias:
        entry["bias"] = np.concatenate([
            e["bias"] if e is not None else np.zeros(width, first["bias"].dtype) for e in entries
        ])  # fmt: skip
    return entry


def _field_regex(name: str) -> re.Pattern:
    """A regex of the concrete names of a stacked module name: each ``{}`` a layer index."""
    return re.compile(
        "".join(r"(\d+)" if bit == "{}" else re.escape(bit) for bit in re.split(r"(\{\})", name))
    )


def _is_weight(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating) and len(shape_of(leaf)) >= 2


def _load_layouts(where, leaves, params, key_map, fn, args, kwargs) -> dict[Path, Layout]:
    if fn is not None:
        from jlora._layout import discover

        found = discover(fn, params, list(where), args, kwargs)
        missing = [p for p in where if p not in found]
        if missing:
            raise ValueError(
                f"fn never uses {missing[:5]} as a matmul, convolution or lookup weight, "
                "so their layouts cannot be learned"
            )
        return {path: found[path] for path in where}
    layouts = {}
    for path, layers in where.items():
        shape = shape_of(leaves[path])
        stack = len(next(iter(layers)))
        rule = getattr(key_map, "layout", None)
        layout = rule(path, shape, stack) if rule else _default_layout(shape, stack)
        if layout is None:
            raise ValueError(
                f"cannot tell the input and output axes of {path!r} ({describe(leaves[path])}) "
                f"with {stack} stack axes: pass fn=<the model function> and args=<example "
                "inputs> to jlora.peft.load so the layout is learned from the model"
            )
        layouts[path] = layout
    return layouts


def _adapter(path, layers, layout, by_module, config, weights_file) -> tuple[LoraAdapter, float]:
    """The adapter of ``path`` from its PEFT modules (one per stack index), and its alpha."""
    if len(next(iter(layers))) != len(layout.stack_axes):
        raise ValueError(
            f"key_map names {path!r} with {len(next(iter(layers)))} '{{}}' fields but "
            f"its layout {layout} has {len(layout.stack_axes)} stack axes"
        )
    missing = [i for i in np.ndindex(*layout.stack_shape) if i not in layers]
    if missing:
        raise ValueError(
            f"the adapter file has no module for layer {list(missing[0])} of the "
            f"stacked weight {path!r} (found layers {sorted(layers)[:8]})"
        )
    ranks = {by_module[m]["rank"] for m in layers.values()}
    alphas = {by_module[m]["alpha"] for m in layers.values()}
    if len(ranks) > 1 or len(alphas) > 1:
        raise ValueError(
            f"the modules of the stacked weight {path!r} have ranks {sorted(ranks)} and "
            f"alphas {sorted(alphas)}: one jlora adapter holds one rank and alpha"
        )
    rank, alpha = ranks.pop(), alphas.pop()
    dora = bool(config.get("use_dora", False))
    with_bias = bool(config.get("lora_bias", False))
    a_rows, b_cols, magnitudes, biases = [], [], [], []
    for index in np.ndindex(*layout.stack_shape):
        module = layers[index]
        lora_a, lora_b = _factors(by_module[module], module, path, layout, rank, weights_file)
        a_rows.append(lora_a.T)
        b_cols.append(lora_b.T)
        magnitudes.append(_magnitude(by_module[module], module, path, layout, dora, weights_file))
        if with_bias:
            biases.append(by_module[module]["bias"])
    denominator = scale_denominator(rank, bool(config.get("use_rslora")))
    node = LoraAdapter(
        lora_a=jnp.asarray(np.stack(a_rows).reshape(layout.a_shape(rank))),
        lora_b=jnp.asarray(np.stack(b_cols).reshape(layout.b_shape(rank))),
        scale=alpha / denominator,
        layout=layout,
        dropout=float(config.get("lora_dropout") or 0.0),
    )
    shape = (*layout.stack_shape, layout.out_features)
    if dora:
        node = DoraAdapter(**vars(node), magnitude=jnp.asarray(np.stack(magnitudes).reshape(shape)))
    elif with_bias:
        node = LoraBiasAdapter(**vars(node), lora_bias=jnp.asarray(np.stack(biases).reshape(shape)))
    return node, alpha


def _magnitude(factors, module, path, layout, dora: bool, weights_file) -> np.ndarray | None:
    """PEFT's DoRA magnitude of ``module``: one value per output feature."""
    magnitude = factors.get("M")
    if not dora:
        return None  # _read_adapter checked that the files agree
    # Linear and Embedding store (out,); PEFT's convolutions keep (1, out, 1, ...).
    if magnitude.size != layout.out_features or max(magnitude.shape, default=0) != magnitude.size:
        raise FileFormatError(
            weights_file,
            f"the weight at {path!r} has {layout.out_features} output features",
            key=f"{module}.{MAGNITUDE}",
            expected=f"{layout.out_features} values",
            found=list(magnitude.shape),
        )
    return magnitude.reshape(layout.out_features)


def _peft_value(pattern: Mapping[str, Any], module: str, default: Any, config_file: str) -> Any:
    """PEFT's rule: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``.

    Matched with RE2 (linear time): the keys come from a file.
    """
    for key, value in pattern.items():
        regex = compile_untrusted(peft_match(key), file=config_file, key=f"pattern {key!r}")
        if regex.match(module):
            return value
    return default


def _factors(factors, module, path, layout, rank, weights_file) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``(r, in)`` A and ``(out, r)`` B of ``module``, checked against the weight."""
    lora_a, lora_b = factors["A"], factors["B"]
    want_a = (rank, layout.in_features)
    want_b = (layout.out_features, rank)
    if lora_a.shape != want_a or lora_b.shape != want_b:
        raise FileFormatError(
            weights_file,
            f"the adapter is for another model: the weight at {path!r} (shape "
            f"{list(layout.weight_shape)}, {layout.in_features} inputs, "
            f"{layout.out_features} outputs) at rank {rank} needs other factors",
            key=module,
            expected=f"lora_A {list(want_a)} and lora_B {list(want_b)}",
            found=f"lora_A {list(lora_a.shape)} and lora_B {list(lora_b.shape)}",
        )
    return lora_a, lora_b


# -- pre-quantized (bitsandbytes 4-bit) base checkpoints -------------------------------


def load_bnb_4bit(
    path: str | os.PathLike,
    params: Params,
    *,
    key_map: KeyMapLike,
    layouts: Mapping[Path, Layout] | None = None,
) -> Params:
    """Put the NF4 weights of a bitsandbytes 4-bit checkpoint into ``params``, still packed.

    Reads the safetensors files that Hugging Face transformers writes for a model loaded
    with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` (the
    "-bnb-4bit" checkpoints): per quantized module the packed ``.weight``, its
    ``.absmax`` (8-bit codes with ``.nested_absmax`` under double quantization),
    ``.quant_map`` and ``.quant_state.bitsandbytes__nf4``. Each leaf of ``params`` whose
    PyTorch module (by ``key_map``) is quantized in the file becomes a
    :class:`jlora.QuantizedWeight` holding the file's codes unchanged; nothing is
    dequantized on the host. Other leaves are returned as they are (load the
    checkpoint's float weights the usual way).

    Args:
      path: a ``model.safetensors`` file, or a directory of ``*.safetensors`` shards.
      params: the model's params (arrays or ``ShapeDtypeStruct`` s); each quantized
        leaf keeps its dtype (what ``fn`` sees) and must have the file's shape.
      key_map: a built-in name or a callable ``path -> PyTorch module name``.
      layouts: per path, the weight's layout when not the key map's (or 2-D) rule.

    Returns:
      params with a ``QuantizedWeight`` at each quantized module.

    Raises:
      FileNotFoundError: no safetensors file at ``path``.
      ValueError: no quantized module maps to a leaf, a module of the file maps to no
        leaf, a malformed quant state, or shapes that disagree (all named).
    """
    from jlora import _nf4
    from jlora._quant import QuantizedWeight

    key_map = _resolve_key_map(key_map)
    files = _safetensors_keys(path)
    suffix = ".weight.quant_state.bitsandbytes__nf4"
    modules = sorted(k[: -len(suffix)] for k in files if k.endswith(suffix))
    other_states = [k for k in files if ".quant_state.bitsandbytes__" in k and k.endswith("fp4")]
    if other_states:
        raise ValueError(
            f"{path}: {other_states[0]!r} is a bitsandbytes FP4 weight; jlora reads NF4 only"
        )
    if not modules:
        raise ValueError(f"{path} holds no bitsandbytes NF4 weight (no '*{suffix}' key)")
    leaves = dict(leaves_with_paths(params, is_leaf=is_weight_node))
    by_module = {}
    for leaf_path, leaf in leaves.items():
        name = key_map(leaf_path)
        if name is not None and _is_weight(leaf):
            by_module.setdefault(name, leaf_path)
    # Only the quantized modules' own tensors are read: the float ones (often bfloat16,
    # which numpy has no type for) are left to the caller's loader.
    wanted = [k for k in files if any(k.startswith(f"{m}.weight") for m in modules)]
    tensors = _read_safetensors_keys(files, wanted)
    nodes = {}
    for module in modules:
        leaf_path = by_module.get(module)
        if leaf_path is None:
            raise ValueError(
                f"{path} quantizes the PyTorch module {module!r}, but no leaf of params maps "
                f"to it with key_map {_key_map_name(key_map)!r}"
            )
        record = _nf4.read_bnb_4bit(tensors, module)
        leaf = leaves[leaf_path]
        shape = shape_of(leaf)
        layout = (layouts or {}).get(leaf_path)
        if layout is None:
            rule = getattr(key_map, "layout", None)
            layout = rule(leaf_path, shape, 0) if rule else None
            layout = layout or _default_layout(shape, 0)
        if layout is None or (layout.out_features, layout.in_features) != tuple(record["shape"]):
            raise ValueError(
                f"{path}: module {module!r} holds a weight of PyTorch shape "
                f"{list(record['shape'])}, but params has {describe(leaf)} at {leaf_path!r}"
            )
        nested = record.get("nested_block_size")
        if nested is not None:
            quant_map = record.get("absmax_quant_map")
            if quant_map is not None and not np.array_equal(quant_map, _nf4.dynamic_map_signed()):
                raise ValueError(
                    f"{path}: module {module!r} quantizes its absmax with a map other than "
                    "bitsandbytes' signed dynamic map"
                )
            if nested != 256:
                raise ValueError(
                    f"{path}: module {module!r} has nested_blocksize {nested}; jlora reads 256"
                )
        nodes[leaf_path] = QuantizedWeight(
            codes=jnp.asarray(record["codes"]),
            absmax=None if nested is not None else jnp.asarray(record["absmax"], jnp.float32),
            absmax_codes=None if nested is None else jnp.asarray(record["absmax_codes"]),
            absmax_scales=None if nested is None else jnp.asarray(record["absmax_scales"]),
            absmax_offset=None if nested is None else jnp.asarray(record["absmax_offset"]),
            kind="nf4",
            layout=layout,
            dtype=jnp.dtype(leaf.dtype),
            block_size=int(record["block_size"]),
            quant_dtype=jnp.dtype(record["dtype"]),
        )
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: nodes.get(path_str(kp), leaf), params, is_leaf=is_weight_node
    )


def _safetensors_keys(path) -> dict[str, str]:
    """``{tensor name: file}`` over a safetensors file or a directory of shards."""
    from safetensors import safe_open

    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")
        )
    else:
        files = [path] if os.path.isfile(path) else []
    if not files:
        raise FileNotFoundError(f"no safetensors file at {path}")
    keys: dict[str, str] = {}
    for file in files:
        try:
            with safe_open(file, framework="numpy") as handle:
                keys.update(dict.fromkeys(handle.keys(), file))
        except (SafetensorError, ValueError, TypeError, OSError) as error:
            raise ValueError(f"{file} is not a readable safetensors file: {error}") from None
    return keys


def _read_safetensors_keys(files: Mapping[str, str], wanted: list[str]) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    tensors: dict[str, np.ndarray] = {}
    for file in sorted(set(files[k] for k in wanted)):
        try:
            with safe_open(file, framework="numpy") as handle:
                for key in wanted:
                    if files[key] == file:
                        tensors[key] = handle.get_tensor(key)
        except (SafetensorError, ValueError, TypeError) as error:
            raise ValueError(f"{file}: cannot read the 4-bit tensors: {error}") from None
    return tensors
