"""The sampling loop: one lax.scan over the scheduler's steps, the model closed over."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from flax_sgm.sampling import schedules
from flax_sgm.sampling.config import SchedulerConfig
from flax_sgm.sampling.plans import Plan, scheduler_plan
from flax_sgm.sampling.sgm import SgmSamplerConfig, sgm_plan


def _check_steps(n) -> None:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_inference_steps must be a positive int; got {n!r}")


def make_plan(cfg: SchedulerConfig | SgmSamplerConfig, n: int, start: int = 0) -> Plan:
    """The plan of `n` inference steps of a diffusers scheduler (SchedulerConfig) or one of sgm's samplers
    (SgmSamplerConfig); `start` is the first index into its timesteps that runs."""
    _check_steps(n)
    if isinstance(cfg, SgmSamplerConfig):
        return sgm_plan(cfg, int(n), start)
    return scheduler_plan(cfg, int(n), start)


def timesteps_for(cfg: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
    """The timesteps diffusers' `set_timesteps(num_inference_steps)` gives (Heun's repeated ones included)."""
    return make_plan(cfg, num_inference_steps).timesteps


def _start_index(cfg: SchedulerConfig, num_inference_steps: int, start_step: int) -> int:
    _check_steps(num_inference_steps)
    if not isinstance(start_step, (int, np.integer)) or not 0 <= start_step < num_inference_steps:
        raise ValueError(f"start_step must be an int in [0, {num_inference_steps}); got {start_step!r}")
    return int(start_step) * cfg.order


def add_noise(cfg: SchedulerConfig, num_inference_steps: int, clean, noise, start_step: int):
    """The noisy latents img2img starts from at `start_step`, as diffusers' `scheduler.add_noise` at
    `timesteps[start_step * order]` (after `set_begin_index`) gives them."""
    if isinstance(cfg, SgmSamplerConfig):
        raise ValueError("add_noise: sgm samplers have no img2img start here (sgm's discretization wrappers are "
                         "not supported)")
    i = _start_index(cfg, num_inference_steps, start_step)
    plan = make_plan(cfg, num_inference_steps, i)
    clean, noise = jnp.asarray(clean), jnp.asarray(noise)
    dtype = clean.dtype
    if "sigma_in" in plan.rows and cfg.kind != "dpmpp_2m":  # variance exploding: x + sigma * noise
        sigma = jnp.asarray(plan.rows["sigma_in"][i], dtype)
        return clean + noise * sigma
    if cfg.kind == "dpmpp_2m":
        sigma = jnp.asarray(plan.rows["sigma_in"][i], dtype)
        alpha = 1 / (sigma**2 + 1) ** 0.5
        return alpha * clean + (sigma * alpha) * noise
    a = jnp.asarray(schedules.alphas_cumprod(cfg)[int(plan.timesteps[i])], dtype)
    return a**0.5 * clean + (1 - a) ** 0.5 * noise


def step_noise(key, index: int, shape):
    """The noise a stochastic sampler adds at step `index` of its timesteps: a public contract, so a
    reference can be fed the same noise."""
    return jax.random.normal(jax.random.fold_in(key, index), shape, jnp.float32)


def sample(model: Callable, noise, cfg: SchedulerConfig, num_inference_steps: int, *, key=None,
           start_step: int = 0, progress: Callable | None = None, noised: bool = False,
           ordered: bool = True):
    """Run the sampler. `model(x [b, h, w, c], t [b] float32) -> output` as `cfg.prediction_type` says
    (SchedulerConfig), or sgm's network output, which the plan's denoiser scaling reads (SgmSamplerConfig).

    `noise` is diffusers' `latents` argument (unscaled); at `start_step` > 0 (img2img) it is the
    output of `add_noise` and is used as is, as it is at start_step 0 with `noised` (img2img at
    strength 1: diffusers scales add_noise's output by no init_noise_sigma). Stochastic samplers
    (`cfg.stochastic`) take `key`; the noise of step i of the timesteps (sgm: of network evaluation i) is
    `step_noise(key, i, shape)`. `progress(i)` is called from the compiled loop after each step (`ordered`: in
    step order; jax refuses ordered callbacks on several devices, so a sharded loop passes False and its steps
    may be heard out of order). Arithmetic is float32; the result has noise's dtype.
    """
    if not isinstance(cfg, (SchedulerConfig, SgmSamplerConfig)):
        raise ValueError(f"sample: cfg must be a SchedulerConfig or an SgmSamplerConfig; got {type(cfg).__name__}")
    if cfg.stochastic and key is None:
        raise ValueError(f"sample: the {cfg.kind} sampler is stochastic and needs key=jax.random.key(...)")
    start = _start_index(cfg, num_inference_steps, start_step)
    plan = make_plan(cfg, num_inference_steps, start)
    noise = jnp.asarray(noise)
    if noise.ndim != 4:
        raise ValueError(f"sample: noise must be [b, h, w, c]; got shape {noise.shape}")
    dtype = noise.dtype
    x = noise.astype(jnp.float32)
    if start == 0 and not noised:
        x = x * jnp.float32(plan.init_noise_sigma)
    rows = {k: jnp.asarray(v[start:]) for k, v in plan.rows.items()}
    rows["t"] = jnp.asarray(plan.timesteps[start:], jnp.float32)
    rows["index"] = jnp.arange(start, len(plan.timesteps))
    batch = noise.shape[0]

    def body(carry, row):
        eps = step_noise(key, row["index"], noise.shape) if cfg.stochastic else None
        if plan.prepare is not None:
            carry = plan.prepare(carry, row, eps)
        x_in = plan.model_input(carry["x"], row).astype(dtype)
        out = jnp.asarray(model(x_in, jnp.full((batch,), row["t"], jnp.float32))).astype(jnp.float32)
        if out.shape != x_in.shape:  # it broadcast silently, or failed in scan's carry check
            raise ValueError(f"sample: the model returned shape {out.shape} for latents {x_in.shape}; it must return "
                             "one output per latent (a guided model combines its [uncond, cond] halves itself)")
        carry = plan.step(carry, row, out, eps)
        if progress is not None:
            jax.debug.callback(progress, row["index"], ordered=ordered)
        return carry, None

    carry, _ = jax.lax.scan(body, plan.init_carry(x), rows)
    return carry["x"].astype(dtype)
