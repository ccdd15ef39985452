"""Train a LoRA on a tiny UNet with optax, only the adapters moving, then save it as a file diffusers loads.

The base weights stay bit for bit as they were; the loss must fall on a fixed batch (the script exits non-zero if
it does not); the saved file applied by load_lora to the untouched base answers as the trained model.

    python examples/lora.py            # a few steps on a tiny UNet (CI runs this)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flax_sgm
from flax_sgm.lora import LoRAParam, add_adapters


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--format", choices=["diffusers", "kohya"], default="diffusers")
    args = parser.parse_args()

    config = flax_sgm.UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), transformer_depth=(0, 1),
        num_head_channels=16, context_dim=32, use_linear_in_transformer=True, use_checkpoint=False,
    )
    base = flax_sgm.UNetModel(config, rngs=nnx.Rngs(0))
    # Stand-in pretrained weights: sgm zero-initialises proj_out and the output conv, where no gradient passes.
    rng = np.random.default_rng(1)
    nnx.update(base, jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape, np.float32), nnx.state(base, nnx.Param)))
    unet = nnx.clone(base)
    adapted = add_adapters(unet, rank=4, alpha=4.0, targets=["to_q", "to_k", "to_v", "to_out.0"])
    optimizer = nnx.Optimizer(unet, optax.adam(1e-2), wrt=LoRAParam)  # the adapters alone

    keys = iter(jax.random.split(jax.random.key(0), 4))
    x = jax.random.normal(next(keys), (2, 8, 8, 4))
    context = jax.random.normal(next(keys), (2, 7, 32))
    target = jax.random.normal(next(keys), x.shape)
    t = jnp.array([10, 500])

    @nnx.jit
    def train_step(unet, optimizer):
        def loss_fn(unet):
            return jnp.mean((unet(x, t, context) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, LoRAParam))(unet)
        optimizer.update(unet, grads)
        return loss

    losses = [float(train_step(unet, optimizer)) for _ in range(args.steps)]
    print(f"{len(adapted)} adapted modules; loss {losses[0]:.4f} -> {losses[-1]:.4f} in {args.steps} steps")
    if not losses[-1] < losses[0]:
        raise SystemExit(f"the loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}")
    same = jax.tree.map(np.array_equal, nnx.state(base, nnx.Param), nnx.state(unet, nnx.Param))
    if not all(jax.tree.leaves(same)):
        raise SystemExit("a base weight moved")

    with tempfile.TemporaryDirectory() as tmp:
        path = flax_sgm.save_lora(unet, Path(tmp) / "lora.safetensors", format=args.format)
        fused = flax_sgm.load_lora(nnx.clone(base), path)  # what a user of the file gets
        forward = jax.jit(lambda m: m(x, t, context))
        error = float(jnp.max(jnp.abs(forward(fused) - forward(unet))))
    print(f"saved {path.name} ({args.format}); the fused file's output within {error:.1e} of the trained model's")
    if not error < 1e-4:
        raise SystemExit(f"the saved LoRA answers otherwise: {error}")


if __name__ == "__main__":
    main()
