"""The whole UNet in a JAX program: a few optax AdamW steps, then DDIM sampling in lax.scan with
classifier-free guidance, for an epsilon- or a v-prediction model.

An SDXL-style UNet (vector conditioning y, no attention at the first level) at a small width with
random weights: this shows the program, not a picture. Load real weights with flax_sgm.load_unet.

    python examples/unet.py                    # epsilon prediction
    python examples/unet.py --prediction v     # v-prediction (SD 2.x 768, SDXL refiner-style training)
    python examples/unet.py --tiny             # a quick look
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import flax_sgm


def alphas_cumprod(steps: int = 1000):
    """SD's scaled-linear beta schedule."""
    betas = jnp.linspace(0.00085**0.5, 0.012**0.5, steps) ** 2
    return jnp.cumprod(1.0 - betas)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prediction", choices=["eps", "v"], default="eps")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and few steps, for a quick look")
    parser.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance weight")
    args = parser.parse_args()
    width, hw, train_steps, sample_steps = (32, 8, 3, 4) if args.tiny else (64, 16, 10, 20)

    config = flax_sgm.UNetConfig(
        model_channels=width, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), transformer_depth=(0, 2),
        num_head_channels=16, context_dim=32, use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=24,
    )
    unet = flax_sgm.UNetModel(config, rngs=nnx.Rngs(0))  # checkpointing on, as sgm builds it
    keys = iter(jax.random.split(jax.random.key(0), 8))
    context = jax.random.normal(next(keys), (2, 7, 32))
    y = jax.random.normal(next(keys), (2, 24))
    x0 = jax.random.normal(next(keys), (2, hw, hw, 4))
    abar = alphas_cumprod()

    # Training: the diffusion loss on a fixed batch, the target by prediction type.
    optimizer = nnx.Optimizer(unet, optax.adamw(1e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(unet, optimizer, key):
        t_key, n_key = jax.random.split(key)
        t = jax.random.randint(t_key, (2,), 0, 1000)
        noise = jax.random.normal(n_key, x0.shape)
        a = abar[t][:, None, None, None]
        x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise
        target = noise if args.prediction == "eps" else jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x0

        def loss(unet):
            return jnp.mean((unet(x_t, t.astype(jnp.float32), context, y) - target) ** 2)

        value, grads = nnx.value_and_grad(loss)(unet)
        optimizer.update(unet, grads)
        return value

    losses = [float(train_step(unet, optimizer, key)) for key in jax.random.split(next(keys), train_steps)]

    # Sampling: DDIM, the model closed over in lax.scan, guidance on a doubled batch (null context and y).
    timesteps = jnp.linspace(999, 0, sample_steps).astype(jnp.int32)

    def eps_and_x0(x, t):
        batch = jnp.concatenate([x, x])
        out = unet(batch, jnp.full((4,), t, jnp.float32), jnp.concatenate([context, 0 * context]), jnp.concatenate([y, 0 * y]))
        cond, uncond = jnp.split(out, 2)
        out = uncond + args.cfg * (cond - uncond)
        a = abar[t]
        if args.prediction == "eps":
            return out, (x - jnp.sqrt(1 - a) * out) / jnp.sqrt(a)
        x0_hat = jnp.sqrt(a) * x - jnp.sqrt(1 - a) * out  # from v
        return (x - jnp.sqrt(a) * x0_hat) / jnp.sqrt(1 - a), x0_hat

    def step(x, i):
        eps, x0_hat = eps_and_x0(x, timesteps[i])
        a_next = jnp.where(i + 1 < sample_steps, abar[timesteps[jnp.minimum(i + 1, sample_steps - 1)]], 1.0)
        return jnp.sqrt(a_next) * x0_hat + jnp.sqrt(1 - a_next) * eps, jnp.sqrt(jnp.mean(x0_hat**2))

    sample = jax.jit(lambda noise: jax.lax.scan(step, noise, jnp.arange(sample_steps)))
    x, rms = sample(jax.random.normal(next(keys), x0.shape))
    print(f"{args.prediction}-prediction: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {train_steps} AdamW steps; "
          f"{sample_steps} DDIM steps: x {x.shape}, x0 estimate rms {float(rms[0]):.2f} -> {float(rms[-1]):.2f}")
    if not bool(jnp.all(jnp.isfinite(x))):
        raise SystemExit("the sample is not finite")


if __name__ == "__main__":
    main()
