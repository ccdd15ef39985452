"""Train a SpatialTransformer with optax AdamW: bf16 compute, fp32 parameters, checkpointing on (the default).

The loss must fall on a fixed target; the script exits non-zero if it does not.

    python examples/train.py            # SD1.5-like widths on a 16 x 16 latent
    python examples/train.py --tiny     # a quick look (CI runs the default size)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import flax_sgm


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a tiny model and few steps, for a quick look")
    parser.add_argument("--steps", type=int)
    args = parser.parse_args()
    channels, heads, d_head, hw, steps = (64, 2, 32, 6, 30) if args.tiny else (320, 8, 40, 16, 100)
    steps = args.steps or steps

    model = flax_sgm.SpatialTransformer(
        channels, heads, d_head, context_dim=96, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0)
    )
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3, weight_decay=1e-4), wrt=nnx.Param)

    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (4, hw, hw, channels))
    context = jax.random.normal(keys[1], (4, 77, 96))
    target = jax.random.normal(keys[2], x.shape)

    @nnx.jit
    def train_step(model, optimizer, x, context, target):
        def loss_fn(model):
            out = model(x, context).astype(jnp.float32)
            return jnp.mean((out - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, x, context, target)) for _ in range(steps)]
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {steps} steps")
    if not losses[-1] < 0.9 * losses[0]:
        raise SystemExit(f"the loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
