"""Per-chip memory of a LoRA run of ``train.py``: base, adapters, activations.

    python tpu_scripts/sizes.py --preset llama-3-8b --chips 16 --hbm-gib 16 \\
        --batch 32 --seq 2048 --rank 16

The estimate follows what ``train.py`` keeps live (FSDP over all chips, optional
tensor parallelism, every layer rematerialised):

* base: ``params × bytes(param dtype) / chips`` (every weight is split over
  fsdp × tensor; norms are replicated and negligible), plus one layer's weights
  gathered in full while it runs (FSDP all-gathers a layer at a time; XLA may
  prefetch the next one, so twice that is counted);
* with ``--quantize nf4`` the layers' kernels (everything but the embeddings and the
  head) are stored as NF4 with double quantization, 4.127 bits a weight
  (``jlora.quantize``), and the gathered layer is decoded to bf16 one use at a time,
  so the gathered-layer term is the NF4 bytes plus one decoded kernel;
* adapters: factors, gradients and Adam's two moments, all float32:
  ``16 bytes × adapter params / chips`` (factors are split like their weights);
* activations, per sequence held by the chip (``batch / (data × fsdp)``):
  the residual stream saved at each layer boundary ``L × seq × d × 2`` bytes, one
  layer's recomputed attention scores in float32 plus their softmax and gradient
  ``≈ 10 × heads × seq² / tensor`` bytes, the MLP's three ``seq × ffn`` bf16 tensors
  ``/ tensor``, and the float32 logits, log-softmax and their gradient
  ``12 × seq × vocab / tensor`` bytes.

XLA's real peak differs by its buffer reuse; ``train.py`` prints the measured peak on
TPU (``device 0 memory: peak ...``) at the end of a run.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import llama

GIB = 2**30
# NF4 with double quantization: a 4-bit code per weight, an 8-bit absmax per block of 64,
# and a float32 scale per 256 blocks: 4.127 bits a weight.
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def adapter_params(cfg: llama.LlamaConfig, rank: int, targets=TARGETS) -> int:
    """``rank × (in + out)`` for every targeted kernel of every layer."""
    d, hd, ffn = cfg.hidden_size, cfg.dim_per_head, cfg.intermediate_size
    shapes = {
        "q": (d, cfg.num_attention_heads * hd),
        "k": (d, cfg.num_key_value_heads * hd),
        "v": (d, cfg.num_key_value_heads * hd),
        "o": (cfg.num_attention_heads * hd, d),
        "gate": (d, ffn),
        "up": (d, ffn),
        "down": (ffn, d),
    }
    per_layer = sum(rank * sum(shapes[t]) for t in targets)
    return cfg.num_hidden_layers * per_layer


def estimate(
    cfg: llama.LlamaConfig,
    *,
    chips: int,
    batch: int,
    seq: int,
    rank: int,
    tensor: int = 1,
    data: int = 1,
    param_bytes: int = 2,
    act_bytes: int = 2,
    quantize: str | None = None,
) -> dict[str, float]:
    """Bytes per chip, by part (see the module docstring for each formula)."""
    embeddings = 2 * cfg.vocab_size * cfg.hidden_size
    layer_params = (cfg.params() - embeddings) / cfg.num_hidden_layers
    sequences = batch / (chips // tensor)  # per chip: the batch is split over data × fsdp
    del data  # data and fsdp split the batch alike
    if quantize == "nf4":
        kernel_bytes = NF4_BITS / 8
        stored = embeddings * param_bytes + (cfg.params() - embeddings) * kernel_bytes
        largest_kernel = cfg.hidden_size * cfg.intermediate_size * param_bytes
        gathered = 2 * layer_params * kernel_bytes / tensor + largest_kernel / tensor
        base = stored / chips + gathered
    elif quantize is None:
        base = cfg.params() * param_bytes / chips + 2 * layer_params * param_bytes / tensor
    else:
        raise ValueError(f"quantize must be None or 'nf4'; found {quantize!r}")
    adapters = 16 * adapter_params(cfg, rank) / chips
    saved = cfg.num_hidden_layers * seq * cfg.hidden_size * act_bytes
    attention = 10 * cfg.num_attention_heads * seq * seq / tensor
    mlp = 3 * seq * cfg.intermediate_size * act_bytes / tensor
    logits = 12 * seq * cfg.vocab_size / tensor
    activations = sequences * (saved + attention + mlp + logits)
    return {
        "base": base,
        "adapters": adapters,
        "activations": activations,
        "per_sequence": saved + attention + mlp + logits,
        "total": base + adapters + activations,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama-3-8b", choices=sorted(llama.PRESETS))
    parser.add_argument("--chips", type=int, required=True)
    parser.add_argument("--hbm-gib", type=float, help="HBM per chip, to say whether it fits")
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--batch", type=int, required=True, help="global batch")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--param-bytes", type=int, default=2, help="2 for bfloat16")
    parser.add_argument("--quantize", choices=["nf4"], help="an NF4 base (QLoRA)")
    args = parser.parse_args(argv)
    cfg = llama.PRESETS[args.preset]
    parts = estimate(
        cfg,
        chips=args.chips,
        batch=args.batch,
        seq=args.seq,
        rank=args.rank,
        tensor=args.tensor,
        param_bytes=args.param_bytes,
        quantize=args.quantize,
    )
    print(
        f"{args.preset}: {cfg.params() / 1e9:.2f} B params, "
        f"{adapter_params(cfg, args.rank) / 1e6:.1f} M adapter params (rank {args.rank})"
    )
    for name in ("base", "adapters", "activations", "total"):
        print(f"  {name:<12} {parts[name] / GIB:8.2f} GiB per chip")
    print(f"  ({parts['per_sequence'] / GIB:.2f} GiB of activations per sequence)")
    if args.hbm_gib:
        verdict = "fits" if parts["total"] < 0.9 * args.hbm_gib * GIB else "does NOT fit"
        print(f"  {verdict} in {args.hbm_gib:g} GiB (keeping 10 % for XLA's buffers)")


if __name__ == "__main__":
    main()
