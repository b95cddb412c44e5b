"""A mixture of LoRA experts (MoLoRA): E adapters per weight and a router that mixes them.

At a use ``x·W`` the adapter adds ``Σ_e g_e(x)·s·(x·A_e)·B_e`` with gates
``g(x) = softmax(x·W_g)`` over the ``E`` experts, or, with ``top_k = k``, those
probabilities kept at each token's ``k`` largest and renormalised to sum to one
(MixLoRA); with ``top_k = 1`` the top probability is kept as it is (Switch), because a
renormalised single gate is the constant 1 and would give the router no gradient.
The ``E`` products ``x·A_e`` are one matmul against ``A`` laid out as ``(in, E·r)``,
and the gated sum is one matmul against ``B`` as ``(E·r, out)``: the cost is that of
one LoRA of rank ``E·r`` plus the router's ``x·W_g``.

Each use also records the Switch Transformer's load-balancing loss
``E·Σ_e f_e·P_e`` (``f_e``: the share of the token-to-expert assignments that went to
expert ``e``; ``P_e``: the mean router probability of ``e``), returned by
``jlora.lora(fn, aux=True)`` beside ``fn``'s outputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jlora._adapter import KINDS, LoraAdapter, Signature, wide_float
from jlora._types import Array, is_int

__all__ = ["MixtureAdapter", "SharedRouterMixture"]


@dataclasses.dataclass
class MixtureAdapter(LoraAdapter):
    """``E`` LoRA experts of one weight and their router (a mixture of LoRA experts).

    Attributes:
      lora_a: ``(*stack, E, in_features, r)``: each expert's down-projection.
      lora_b: ``(*stack, E, r, out_features)``: each expert's up-projection, zero at
        init, so a fresh mixture gives the base output.
      router: ``(*stack, in_features, E)``: the router's weight ``W_g``, trained.
      experts: ``E`` (static).
      top_k: route each token to its ``top_k`` most probable experts, the kept
        probabilities renormalised (``top_k = 1``: the top probability unrenormalised,
        Switch's gate); ``0`` mixes all ``E`` by the softmax (static).

    A mixture's update depends on the input, so it has no single ``delta``: it cannot be
    merged into the base or written as a PEFT LoRA file.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> spec = jlora.LoraSpec(rank=2, targets="w", experts=4, top_k=2)
      >>> node = jlora.init(spec, {"w": jnp.ones((8, 3))}, jax.random.key(0))["w"]
      >>> node.lora_a.shape, node.lora_b.shape, node.router.shape, node.top_k
      ((4, 8, 2), (4, 2, 3), (8, 4), 2)
    """

    router: Array | None = None
    experts: int = 1
    top_k: int = 0

    KIND: ClassVar[str] = "mixture"
    SIGNATURES: ClassVar[dict[str, Signature]] = {
        "lora_a": ("S", "E", "I", "R"),
        "lora_b": ("S", "E", "R", "O"),
        "router": ("S", "I", "E"),
    }
    EXTRA_META: ClassVar[tuple[str, ...]] = ("experts", "top_k")

    @classmethod
    def extra_sizes_from(cls, meta: Any) -> dict[str, int]:
        return {"E": int(meta["experts"])}  # the expert axis

    @classmethod
    def meta_problem(cls, meta: Any, rank: int) -> tuple[str, str] | None:
        experts, top_k = meta.get("experts"), meta.get("top_k")
        if not is_int(experts) or experts < 1:
            return "experts", "a positive integer"
        if not is_int(top_k) or not 0 <= top_k <= experts:
            return "top_k", f"an integer in [0, experts={experts}]"
        return None

    # -- routing -------------------------------------------------------------------------

    def gates(self, logits: Array) -> tuple[Array, Array, Array]:
        """``(gates, probabilities, assignments)`` from router ``logits (..., E)``.

        ``probabilities`` is the softmax (float32 or wider); ``gates`` the weights the experts
        are mixed with (the probabilities; the top-k of them renormalised; for
        ``top_k = 1`` the top probability itself, as Switch Transformer does, since a
        renormalised single gate is always 1 and gives the router no gradient);
        ``assignments`` the share of each token's routing that went to each expert
        (``1/k`` per chosen expert; the argmax with ``top_k = 0``), for the balance loss.
        """
        probs = jax.nn.softmax(logits.astype(wide_float(logits.dtype)), axis=-1)
        if self.top_k:
            _, chosen = jax.lax.top_k(probs, self.top_k)
            mask = jnp.sum(jax.nn.one_hot(chosen, self.experts, dtype=probs.dtype), axis=-2)
            kept = probs * mask
            # Renormalised, one expert's gate would be 1 whatever the router says, and the
            # task loss would never reach the router: top-1 keeps the probability (Switch).
            gates = kept if self.top_k == 1 else kept / jnp.sum(kept, axis=-1, keepdims=True)
            assignments = mask / self.top_k
        else:
            gates = probs
            top = jnp.argmax(probs, axis=-1)
            assignments = jax.nn.one_hot(top, self.experts, dtype=probs.dtype)
        return gates, probs, assignments

    def balance_loss(self, probs: Array, assignments: Array) -> Array:
        """Switch's ``E·Σ_e f_e·P_e`` over all tokens of one use (1 when balanced)."""
        tokens = tuple(range(probs.ndim - 1))
        share = jnp.mean(jax.lax.stop_gradient(assignments), axis=tokens)
        mean_prob = jnp.mean(probs, axis=tokens)
        return self.experts * jnp.sum(share * mean_prob)

    # -- the engine's term -----------------------------------------------------------------

    def output(self, use: Any, x: Array, base: Array, weight: Any) -> tuple | None:
        """``base + Σ_e g_e(x)·s·(x·A_e)·B_e``, gates from the undropped activation."""
        contract = getattr(use, "contract_inputs", None)  # only a dot_general use has it
        if contract is None or use.contracted != "I":
            raise ValueError(
                "a mixture of LoRA experts is used where its router cannot read the "
                "activation (a convolution, a lookup or a transposed use, x·Wᵀ); jlora "
                "routes only matmuls that contract the weight's input axes"
            )
        n_stack = len(self.layout.stack_axes)
        logits = contract(use.x, self.router, n_stack)  # (*batch, *x_free, E)
        gates, probs, assignments = self.gates(logits)
        use.ctx.add_aux(self.balance_loss(probs, assignments))
        t = contract(x, self.lora_a, n_stack + 1)  # (*batch, *x_free, E, r)
        weights = gates * jnp.asarray(self.scale, gates.dtype)
        t = t * weights[..., None].astype(t.dtype)
        return base, use.project_outputs(t, self.lora_b, 2)

    def delta(self) -> Array:
        raise ValueError(
            "a mixture of LoRA experts has no single delta: its update depends on the "
            "input through the router, so it cannot be merged into the base weight"
        )


@dataclasses.dataclass
class SharedRouterMixture(MixtureAdapter):
    """A mixture whose router is another target's (``LoraSpec(share_router=True)``).

    It holds its own experts (``lora_a``, ``lora_b``) but no router: at each use, the
    router of the mixture at ``router_of`` (a target of the same layer, reading inputs
    of the same width) is applied to this target's own input. The router is one array,
    so its gradient sums the contributions of every target that shares it.

    Attributes:
      router_of: the path of the target whose :class:`MixtureAdapter` holds the router.

    Example:
      >>> import jax, jax.numpy as jnp, jlora
      >>> params = {"layer": {"q": jnp.ones((8, 4)), "v": jnp.ones((8, 4))}}
      >>> spec = jlora.LoraSpec(rank=2, targets=["layer"], experts=2, share_router=True)
      >>> adapters = jlora.init(spec, params, jax.random.key(0))
      >>> type(adapters["layer"]["v"]).__name__, adapters["layer"]["v"].router_of
      ('SharedRouterMixture', 'layer/q')
    """

    router_of: str = ""

    KIND: ClassVar[str] = "mixture_shared"
    SIGNATURES: ClassVar[dict[str, Signature]] = {
        "lora_a": ("S", "E", "I", "R"),
        "lora_b": ("S", "E", "R", "O"),
    }
    EXTRA_META: ClassVar[tuple[str, ...]] = ("experts", "top_k", "router_of")

    @classmethod
    def meta_problem(cls, meta: Any, rank: int) -> tuple[str, str] | None:
        if not isinstance(meta.get("router_of"), str) or not meta.get("router_of"):
            return "router_of", "the path of the target holding the shared router"
        return super().meta_problem(meta, rank)

    def resolve(self, nodes: dict[str, Any], path: str) -> MixtureAdapter:
        owner = nodes.get(self.router_of)
        if type(owner) is not MixtureAdapter:
            found = "nothing" if owner is None else f"a {type(owner).__name__}"
            raise ValueError(
                f"the mixture at {path!r} shares the router of {self.router_of!r}, but the "
                f"adapters tree holds {found} there; keep the router's target in the tree"
            )
        want = MixtureAdapter.field_shape("router", self.layout, self.rank, E=self.experts)
        if tuple(owner.router.shape) != want or owner.experts != self.experts:
            raise ValueError(
                f"the mixture at {path!r} needs a router of shape {list(want)} ({self.experts} "
                f"experts); the one at {self.router_of!r} is {list(owner.router.shape)} "
                f"({owner.experts} experts)"
            )
        return MixtureAdapter(
            lora_a=self.lora_a, lora_b=self.lora_b, scale=self.scale, layout=self.layout,
            dropout=self.dropout, router=owner.router, experts=self.experts,
            top_k=self.top_k,
        )  # fmt: skip


jax.tree_util.register_dataclass(
    SharedRouterMixture,
    data_fields=["lora_a", "lora_b"],
    # ``router`` is the field MixtureAdapter declares, always None here.
    meta_fields=["scale", "layout", "dropout", "router", "experts", "top_k", "router_of"],
)
KINDS[SharedRouterMixture.KIND] = SharedRouterMixture


jax.tree_util.register_dataclass(
    MixtureAdapter,
    data_fields=["lora_a", "lora_b", "router"],
    meta_fields=["scale", "layout", "dropout", "experts", "top_k"],
)
KINDS[MixtureAdapter.KIND] = MixtureAdapter
