"""``LoraSpec``: what to adapt and how, and matching it against leaf paths."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jlora._adapter import NOT_WEIGHTS, lora_scale
from jlora._paths import describe, leaves_with_paths, shape_of
from jlora._regex import compile_trusted, compile_untrusted
from jlora._types import Params, Path, Selector, is_int, is_real
from jlora._weights import is_weight_node

_INITS = ("kaiming", "gaussian", "orthogonal", "pissa", "olora", "loftq")


def _as_selector(value: Any, field: str) -> Any:
    if value is None or isinstance(value, str) or callable(value):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        names = tuple(value)
        for name in names:
            if not isinstance(name, str):
                raise TypeError(
                    f"LoraSpec.{field}: expected a regex string, a list of names or a "
                    f"callable (path, leaf) -> bool; found a list holding {name!r}"
                )
        return names
    raise TypeError(
        f"LoraSpec.{field}: expected a regex string, a list of names or a callable "
        f"(path, leaf) -> bool; found {type(value).__name__}"
    )


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how: the LoRA hyper-parameters of a fine-tuning run.

    Args:
      rank: rank ``r`` of every adapter (overridden per path by ``rank_pattern``).
      alpha: LoRA alpha; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)``
        with ``rslora=True``).
      targets: which leaves get an adapter. A ``str`` is a regex matched with
        ``re.fullmatch`` against the leaf path (``"params/.*/(query|value)/kernel"``);
        a list of names targets a leaf when a name equals one of the components of
        its module path, or the leaf's own name unless that is a generic one
        (``kernel``, ``weight``, ``w``, ``embedding``, ``value``): ``["query", "value"]``
        hits ``.../attention/query/kernel``, and ``["gating_einsum"]`` the gm.nn leaf
        ``mlp/gating_einsum``. Every listed name must match some weight; one that
        matches none is an error that lists the near names. A callable
        ``(path, leaf) -> bool`` decides itself. With names or a regex only floating
        leaves of two or more dimensions are eligible (kernels and embeddings, never
        biases or norm scales, even stacked ones); when ``jlora.init`` gets ``fn``,
        only leaves ``fn`` uses as a matmul, convolution or lookup weight.
      exclude: leaves never targeted, in any of the forms of ``targets``; a list of
        names follows the rule of ``targets`` (module names and non-generic leaf names,
        each matching some leaf).
      dropout: LoRA dropout rate on the low-rank path's input (needs ``lora_key``).
      init: ``"kaiming"`` (kaiming-uniform A, zero B, as PEFT's default),
        ``"gaussian"`` (A ~ N(0, (1/r)^2), zero B, as PEFT's ``"gaussian"``),
        ``"orthogonal"`` (random A and B with ``A·B = 0``, even ranks, PEFT's),
        ``"pissa"`` / ``"pissa_niter_K"`` (``s·A·B`` = the weight's top-r singular
        part, by exact or K-iteration randomized SVD) or ``"olora"`` (from a QR of the
        weight). PiSSA and OLoRA change the base: train against the residual
        ``jlora.unmerge(params, adapters)``. ``"loftq"`` / ``"loftq_iter_K"``:
        ``s·A·B`` = the rank-r part of the weight's NF4 quantization error, after ``K``
        alternating rounds (LoftQ); :func:`jlora.loftq` returns the NF4 base with the
        adapters (with one round it is ``jlora.quantize(params, targets)``).
      rslora: scale by ``alpha / sqrt(r)`` (rank-stabilized LoRA).
      rank_pattern: ``{regex: rank}`` overriding ``rank`` per path (PEFT semantics:
        the regex matches the end of the module path at a ``/`` boundary).
      alpha_pattern: ``{regex: alpha}`` overriding ``alpha`` per path, likewise.
      trainable: base leaves trained in full beside the adapters (a classifier
        head, biases: PEFT's ``modules_to_save``), in any of the forms of ``targets``;
        ``jlora.init`` puts a copy of each in the adapters tree.
      dora: DoRA (weight-decomposed LoRA): each adapter also trains a magnitude per
        output feature, ``W' = (m / ‖W + s·A·B‖) ⊙ (W + s·A·B)``, with ``m`` starting at
        the weight's column norms (PEFT's ``use_dora``).
      experts: ``E > 0`` makes each adapter a mixture of ``E`` LoRA experts of rank
        ``rank`` with a trained router (:class:`jlora.MixtureAdapter`, MoLoRA);
        ``0``: one LoRA per target.
      top_k: with ``experts``, route each token to its ``top_k`` most probable
        experts, renormalised (MixLoRA; ``top_k=1`` keeps the top probability as the
        gate, as Switch does); ``0`` mixes all of them by the softmax.
      share_router: with ``experts``, the targets of one layer (the leaves whose module
        paths share a parent, such as ``layers/query/kernel`` and ``layers/value/kernel``)
        share one router, held by the first of them
        (:class:`jlora.SharedRouterMixture`); each applies it to its own input, so they
        must read inputs of the same width.
      lora_bias: each adapter also trains a bias on its up-projection, moving the
        layer's output by ``s·((x·A)·B + b)`` (:class:`jlora.LoraBiasAdapter`, PEFT's
        ``lora_bias``); ``merge`` adds ``s·b`` to the layer's bias leaf. For dense,
        einsum and convolution layers (PEFT: Linear and Conv), mostly for adapters
        extracted from full fine-tunes whose biases changed.
      trainable_token_indices: train only these rows of an embedding
        (:class:`jlora.TokensAdapter`, PEFT's option of the same name), e.g. for new
        special tokens: ``{name: [indices]}`` with ``name`` a module name of the
        embedding's path (``"embed_tokens"``, ``"wte"``, ``"embed"``), or a list of
        indices for the model's one token embedding (the 2-D leaf whose module name
        holds ``embed``, ``wte`` or ``tok``, position and type tables aside). It composes
        with LoRA targets elsewhere in the model; ``targets=[]`` trains tokens alone.

    Example:
      >>> spec = LoraSpec(rank=4, alpha=8.0, targets=["query", "value"])
      >>> spec.scale_for("encoder/attention/query/kernel")
      2.0
    """

    rank: int = 8
    alpha: float = 16.0
    targets: Selector | None = None
    exclude: Selector | None = None
    dropout: float = 0.0
    init: str = "kaiming"
    rslora: bool = False
    rank_pattern: Mapping[str, int] | None = None
    alpha_pattern: Mapping[str, float] | None = None
    trainable: Selector | None = None
    dora: bool = False
    experts: int = 0
    top_k: int = 0
    share_router: bool = False
    lora_bias: bool = False
    trainable_token_indices: Sequence[int] | Mapping[str, Sequence[int]] | None = None

    def __post_init__(self):
        if self.targets is None:
            raise ValueError(
                "LoraSpec.targets is required: a regex on leaf paths, a list of module "
                "names (e.g. ['query', 'value']) or a callable (path, leaf) -> bool"
            )
        for field in ("targets", "exclude", "trainable"):
            object.__setattr__(self, field, _as_selector(getattr(self, field), field))
        for field in ("targets", "exclude", "trainable"):
            if isinstance(getattr(self, field), str):
                compile_trusted(getattr(self, field), what=f"LoraSpec.{field}")
        if not is_int(self.rank) or self.rank <= 0:
            raise ValueError(f"LoraSpec.rank must be a positive integer; found {self.rank!r}")
        if not is_real(self.dropout) or not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoraSpec.dropout must be in [0, 1); found {self.dropout!r}")
        if not isinstance(self.dora, (bool, np.bool_)):
            raise TypeError(f"LoraSpec.dora must be a bool; found {self.dora!r}")
        if not is_int(self.experts) or self.experts < 0:
            raise ValueError(
                f"LoraSpec.experts must be a non-negative integer (0: no mixture); found "
                f"{self.experts!r}"
            )
        if not is_int(self.top_k) or not 0 <= self.top_k <= self.experts:
            raise ValueError(
                f"LoraSpec.top_k must be an integer in [0, experts={self.experts}] (0: all "
                f"experts by the softmax); found {self.top_k!r}"
            )
        if not isinstance(self.share_router, (bool, np.bool_)):
            raise TypeError(f"LoraSpec.share_router must be a bool; found {self.share_router!r}")
        if self.share_router and not self.experts:
            raise ValueError("LoraSpec.share_router=True needs experts > 0 (a mixture's router)")
        if not isinstance(self.lora_bias, (bool, np.bool_)):
            raise TypeError(f"LoraSpec.lora_bias must be a bool; found {self.lora_bias!r}")
        if self.lora_bias and (self.dora or self.experts):
            raise ValueError(
                "LoraSpec: lora_bias=True does not combine with dora=True or experts > 0 "
                "(PEFT's lora_bias is for plain LoRA layers); choose one"
            )
        if self.experts and self.dora:
            raise ValueError("LoraSpec: dora=True and experts > 0 do not combine (a mixture "
                             "of DoRA experts is not defined); choose one")
        if not isinstance(self.init, str) or (
            self.init not in _INITS
            and re.fullmatch(r"(pissa_niter|loftq_iter)_[1-9]\d*", self.init) is None
        ):
            raise ValueError(
                f"LoraSpec.init must be one of {_INITS}, 'pissa_niter_K' (K ≥ 1 power "
                f"iterations) or 'loftq_iter_K' (K ≥ 1 alternating rounds); found {self.init!r}"
            )
        if self.experts and self.init not in ("kaiming", "gaussian"):
            raise ValueError(
                f"LoraSpec: init={self.init!r} does not apply to a mixture of experts "
                "(experts > 0): use 'kaiming' or 'gaussian'"
            )
        tokens = self.trainable_token_indices
        if tokens is not None:
            groups = tokens.values() if isinstance(tokens, Mapping) else [tokens]
            if isinstance(tokens, Mapping) and not all(isinstance(k, str) for k in tokens):
                raise TypeError(
                    "LoraSpec.trainable_token_indices: keys must be module names; found "
                    f"{list(tokens)!r}"
                )
            for group in groups:
                if isinstance(group, (str, bytes)) or not isinstance(group, Sequence) or (
                    not group or not all(is_int(i) and i >= 0 for i in group)
                ):
                    raise ValueError(
                        "LoraSpec.trainable_token_indices: expected a non-empty list of "
                        f"non-negative token indices (or {{name: list}}); found {group!r}"
                    )
            object.__setattr__(
                self, "trainable_token_indices",
                {k: tuple(int(i) for i in v) for k, v in tokens.items()}
                if isinstance(tokens, Mapping) else tuple(int(i) for i in tokens),
            )  # fmt: skip
        for field in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, field)
            if pattern is not None:
                object.__setattr__(self, field, dict(pattern))
                for regex in pattern:
                    compile_trusted(regex, what=f"LoraSpec.{field} key")
        if not is_real(self.alpha) or not math.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(
                f"LoraSpec.alpha must be a finite non-negative number; found {self.alpha!r}"
            )
        if not isinstance(self.rslora, (bool, np.bool_)):
            raise TypeError(f"LoraSpec.rslora must be a bool; found {self.rslora!r}")
        for regex, rank in (self.rank_pattern or {}).items():
            if not is_int(rank) or rank <= 0:
                raise ValueError(
                    f"LoraSpec.rank_pattern[{regex!r}] must be a positive integer; found {rank!r}"
                )
        for regex, alpha in (self.alpha_pattern or {}).items():
            if not is_real(alpha) or not math.isfinite(alpha) or alpha < 0:
                raise ValueError(
                    f"LoraSpec.alpha_pattern[{regex!r}] must be a finite non-negative "
                    f"number; found {alpha!r}"
                )

    # -- per-path hyper-parameters ---------------------------------------------------

    def rank_for(self, path: Path) -> int:
        """The rank of the adapter at ``path`` (``rank_pattern`` first)."""
        return int(_pattern_value(self.rank_pattern, path, self.rank))

    def alpha_for(self, path: Path) -> float:
        """The alpha of the adapter at ``path`` (``alpha_pattern`` first)."""
        return float(_pattern_value(self.alpha_pattern, path, self.alpha))

    def scale_for(self, path: Path) -> float:
        """``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA) at ``path``."""
        rank = self.rank_for(path)
        return lora_scale(self.alpha_for(path), rank, self.rslora)

    # -- matching ----------------------------------------------------------------------

    def is_target(self, path: Path, leaf: Any) -> bool:
        """Whether the leaf at ``path`` gets an adapter."""
        if not _matches(self.targets, path, leaf, need_matrix=True):
            return False
        return self.exclude is None or not _matches(
            self.exclude, path, leaf, need_matrix=False, weight_names=True
        )

    def is_trainable(self, path: Path, leaf: Any) -> bool:
        """Whether the base leaf at ``path`` is trained in full (``trainable``)."""
        if self.trainable is None:
            return False
        return _matches(self.trainable, path, leaf, need_matrix=False)

    def token_targets(self, params: Params) -> dict[Path, tuple[int, ...]]:
        """``{path: row indices}`` of the embeddings ``trainable_token_indices`` names.

        Raises:
          ValueError: a name that matches no embedding, or one that matches several; a
            list of indices when the model has no token embedding, or more than one.
        """
        tokens = self.trainable_token_indices
        if tokens is None:
            return {}
        leaves = [(p, leaf) for p, leaf in leaves_with_paths(params, is_leaf=is_weight_node)
                  if _eligible(leaf, p) and len(shape_of(leaf)) == 2]  # fmt: skip
        if not isinstance(tokens, Mapping):
            found = [p for p, _ in leaves if _is_token_table(p)]
            if len(found) != 1:
                raise ValueError(
                    "LoraSpec.trainable_token_indices as a list is for the model's one token "
                    f"embedding; found {len(found)} candidates {found[:8]}. Name it: "
                    "trainable_token_indices={'<module name>': [...]}"
                )
            return {found[0]: tokens}
        out: dict[Path, tuple[int, ...]] = {}
        for name, indices in tokens.items():
            found = [p for p, _ in leaves if name in p.split("/")[:-1]]
            if len(found) != 1:
                raise ValueError(
                    f"LoraSpec.trainable_token_indices[{name!r}] names {len(found)} 2-D "
                    f"leaves {found[:8]}; it must name exactly one embedding (a module name "
                    f"of its path). Candidates: {[p for p, _ in leaves][:12]}"
                )
            out[found[0]] = indices
        return out

    def select(self, params: Params) -> list[tuple[Path, Any]]:
        """The targeted ``(path, leaf)`` pairs of ``params``, in flattening order.

        Raises:
          ValueError: nothing matches (the message lists candidate paths), a listed
            name of ``targets`` or ``exclude`` matches nothing (the message lists the
            near names), or a targeted leaf is not a floating-point array.
        """
        leaves = leaves_with_paths(params, is_leaf=is_weight_node)
        if isinstance(self.targets, tuple):
            weights = [p for p, leaf in leaves if _eligible(leaf, p) or _is_integer_weight(leaf)]
            _check_names(self.targets, "targets", weights, "weight (floating, ndim >= 2)",
                         unless_all=True)  # fmt: skip
        if isinstance(self.exclude, tuple):
            _check_names(self.exclude, "exclude", [p for p, _ in leaves], "leaf")
        chosen = [(path, leaf) for path, leaf in leaves if self.is_target(path, leaf)]
        if not chosen:
            integer = [
                (path, leaf)
                for path, leaf in leaves
                if not callable_selector(self.targets)
                and _matches(self.targets, path, leaf, need_matrix=False)
                and getattr(leaf, "dtype", None) is not None
                and not _is_floating(leaf)
                and len(shape_of(leaf)) >= 2
            ]
            if integer:
                path, leaf = integer[0]
                raise ValueError(
                    f"LoraSpec.targets={self.targets!r} names only non-floating leaves, "
                    f"such as {path!r} ({describe(leaf)}): LoRA needs a floating-point "
                    "weight. Dequantize it first, or quantize a floating base with "
                    "jlora.quantize so that jlora knows how to decode it."
                )
            eligible = [p for p, leaf in leaves if _eligible(leaf, p)]
            heading = "Candidate paths (floating, ndim >= 2)"
            if not eligible:
                heading = "No leaf is floating with ndim >= 2; all leaves"
            candidates = eligible or [f"{p} ({describe(leaf)})" for p, leaf in leaves]
            shown = "\n  ".join(candidates[:12])
            more = f"\n  ... and {len(candidates) - 12} more" if len(candidates) > 12 else ""
            near = ""
            if isinstance(self.targets, tuple) and self.targets:
                near = f" Names: {_unmatched(self.targets, eligible)[1]}."
            raise ValueError(
                f"LoraSpec.targets={self.targets!r} matches no leaf of params "
                f"({len(leaves)} leaves).{near} {heading}:\n  {shown}{more}"
            )
        for path, leaf in chosen:
            if not _is_floating(leaf):
                raise ValueError(
                    f"LoraSpec targets {path!r}, a {describe(leaf)} leaf: LoRA needs a "
                    "floating-point weight. Integer or quantized leaves cannot take an "
                    "adapter directly; exclude this path or dequantize it first."
                )
        return chosen

    # -- serialization -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of the spec (a callable selector is stored as its name)."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if callable(value) and not isinstance(value, str):
                value = {"callable": getattr(value, "__qualname__", repr(value))}
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        targets: Selector | None = None,
        source: str | os.PathLike | None = None,
    ) -> LoraSpec:
        """Rebuild a spec from ``to_dict`` output; ``targets`` replaces a callable.

        With ``source`` (the file ``data`` was read from) every value is untrusted:
        regexes must be RE2 (linear-time) patterns, and any bad value raises
        :class:`jlora.FileFormatError` naming ``source`` and the key.
        """
        from jlora.errors import FileFormatError

        if source is not None and not isinstance(data, Mapping):
            raise FileFormatError(source, key="spec", expected="a JSON object", found=data)
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in fields}
        for name in ("targets", "exclude", "trainable"):
            if isinstance(kwargs.get(name), dict):
                kwargs[name] = None
        if targets is not None or kwargs.get("targets") is None:
            kwargs["targets"] = targets if targets is not None else ".*"
        if source is None:
            return cls(**kwargs)
        for name in ("targets", "exclude", "trainable"):
            value = kwargs.get(name)
            if isinstance(value, str):
                compile_untrusted(value, file=source, key=f"spec.{name}")
            elif value is not None and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)
            ):
                raise FileFormatError(
                    source, key=f"spec.{name}", expected="a regex or a list of names", found=value
                )
        for name in ("rank_pattern", "alpha_pattern"):
            value = kwargs.get(name)
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise FileFormatError(
                    source, key=f"spec.{name}", expected="an object {regex: value}", found=value
                )
            for regex in value:
                compile_untrusted(regex, file=source, key=f"spec.{name}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as error:
            raise FileFormatError(source, f"the saved spec is invalid: {error}") from None


def _pattern_value(pattern: Mapping[str, Any] | None, path: Path, default: Any) -> Any:
    if not pattern:
        return default
    module_path = path.rsplit("/", 1)[0] if "/" in path else path
    for regex, value in pattern.items():
        anchored = compile_trusted(rf"(?:.*/)?(?:{regex})", what="LoraSpec pattern key")
        if anchored.fullmatch(module_path) or anchored.fullmatch(path):
            return value
    return default


def callable_selector(selector: Any) -> bool:
    """Whether a selector is a predicate (rather than a regex or a list of names)."""
    return callable(selector) and not isinstance(selector, str)


def _split_leaf(path: Path) -> tuple[list[str], str]:
    """``(module components, leaf name)`` of ``path``; an NNX variable's trailing
    ``value`` (``.../kernel/value``) is not a name of its own."""
    parts = path.split("/")
    if len(parts) > 1 and parts[-1] == "value":
        parts = parts[:-1]
    return parts[:-1], parts[-1]


def _leaf_name(path: Path) -> str:
    return _split_leaf(path)[1]


def _is_floating(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


def _eligible(leaf: Any, path: Path | None = None) -> bool:
    if path is not None and _leaf_name(path) in NOT_WEIGHTS:
        return False
    return _is_floating(leaf) and len(shape_of(leaf)) >= 2


def _is_integer_weight(leaf: Any) -> bool:
    """A non-floating leaf of two or more axes (an integer or quantized weight)."""
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and not _is_floating(leaf) and len(shape_of(leaf)) >= 2


def _is_token_table(path: Path) -> bool:
    """Whether a module name of ``path`` reads as a token embedding (not positions/types)."""
    modules = [part.lower() for part in path.split("/")[:-1]]
    return any(
        re.search(r"embed|wte|tok", m) and not re.search(r"pos|wpe|type", m) for m in modules
    )


#: Leaf names too common to name a weight: a list of names never matches them, so
#: ``["kernel"]`` does not target every dense layer, while ``["gating_einsum"]`` matches
#: the gm.nn weight leaf of that name.
GENERIC_LEAF_NAMES = frozenset({"kernel", "weight", "w", "embedding", "value"})


def path_names(path: Path) -> list[str]:
    """The names a list selector of ``targets`` or ``exclude`` can match in ``path``.

    These are the components of the module path, and the weight's own name unless it is
    one of :data:`GENERIC_LEAF_NAMES`; an NNX variable's trailing ``value`` is not a
    name of its own.
    """
    modules, own = _split_leaf(path)
    return modules + ([] if own in GENERIC_LEAF_NAMES else [own])


def _matches(
    selector: Any, path: Path, leaf: Any, *, need_matrix: bool, weight_names: bool = False
) -> bool:
    """Whether ``selector`` picks ``path``.

    A list of names matches :func:`path_names` for targets (``need_matrix``) and with
    ``weight_names`` (exclude), and any component of the path otherwise (trainable).
    """
    if callable_selector(selector):
        return bool(selector(path, leaf))
    if need_matrix and not _eligible(leaf, path):
        return False
    if isinstance(selector, str):
        return compile_trusted(selector, what="LoraSpec selector").fullmatch(path) is not None
    names = path_names(path) if need_matrix or weight_names else path.split("/")
    return any(name in names for name in selector)


def _unmatched(
    names: tuple[str, ...], paths: Sequence[Path]
) -> tuple[list[str], str, set[str]]:
    """The listed names that match none of ``paths``, a description of each, and the
    names ``paths`` hold."""
    seen = {name for path in paths for name in path_names(path)}
    missing = [name for name in names if name not in seen]
    lines = []
    for name in missing:
        near = difflib.get_close_matches(name, sorted(seen), n=4, cutoff=0.5)
        hint = f" (near: {', '.join(near)})" if near else ""
        generic = (
            " (a generic leaf name, which no list matches: use a regex)"
            if name in GENERIC_LEAF_NAMES else ""
        )  # fmt: skip
        lines.append(f"{name!r}{generic}{hint}")
    return missing, "; ".join(lines), seen


def _check_names(
    names: tuple[str, ...], field: str, paths: Sequence[Path], what: str, *,
    unless_all: bool = False,
) -> None:
    """Raise when a listed name of ``targets``/``exclude`` matches none of ``paths``;
    with ``unless_all``, not when all of them miss (the caller's own message covers it)."""
    missing, described, seen = _unmatched(names, paths)
    if not missing or (unless_all and len(missing) == len(names)):
        return
    shown = sorted(seen)
    more = f" ... and {len(shown) - 24} more" if len(shown) > 24 else ""
    raise ValueError(
        f"LoraSpec.{field}: {len(missing)} of {len(names)} listed names match no {what}: "
        f"{described}. A name matches a module name of a path, or the weight's own "
        f"name unless generic ({', '.join(sorted(GENERIC_LEAF_NAMES))}). Names here: "
        f"{', '.join(shown[:24])}{more}"
    )
