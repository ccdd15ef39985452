"""The whole UNet: flax_sgm's UNetModel under jit against diffusers' UNet2DConditionModel, eager and torch.compile.

One diffusers model of a released configuration (random weights), loaded into
flax_sgm through the conversion table, so both run the same numbers. Forward, and
forward+backward (a scalar loss, gradients of every parameter and of the input; no
optimizer), checkpointing off and on (flax_sgm's `use_checkpoint`, diffusers'
`enable_gradient_checkpointing()`). diffusers runs its default attention (SDPA).
Peak memory: torch's max_memory_allocated on GPU; for JAX the compiled program's
memory analysis. Ratios are torch time / flax_sgm time (above 1: flax_sgm faster).

    python bench/unet.py --config sd15 --dtype float32 --hw 32 --batch 2    # the CPU figure
    python bench/unet.py --config sdxl --dtype bfloat16 --hw 128 --batch 2  # GPU
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common import DIFFUSERS_CONFIGS, emit, environment, jax_peak_bytes, jax_sync, median_ms, torch_median_ms, write_json
from flax_sgm.checkpoints import convert
from flax_sgm.unet.config import UNetConfig
from flax_sgm.unet.diffusers import vector_embedding
from flax_sgm.unet.layout import diffusers_layout
from flax_sgm import models

CONTEXT_TOKENS = 77


def flax_steps(model):
    """Jitted forward and forward+backward over (params, x, t, context, y)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def run(params, x, t, ctx, y):
        return nnx.merge(graphdef, params, rest)(x, t, ctx, y)

    def loss(params, x, t, ctx, y):
        return run(params, x, t, ctx, y).astype(jnp.float32).mean()

    return params, jax.jit(run), jax.jit(jax.grad(loss, argnums=(0, 1)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(DIFFUSERS_CONFIGS), default="sd15")
    parser.add_argument("--dtype", default="float32", help="compute and parameter dtype")
    parser.add_argument("--hw", type=int, default=32, help="latent height = width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--checkpoint", nargs="+", type=lambda s: {"off": False, "on": True}[s], default=[False, True],
                        metavar="off|on", help="gradient checkpointing settings to run (default: off on)")
    parser.add_argument("--json")
    args = parser.parse_args()
    import torch
    from diffusers import UNet2DConditionModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t_dtype, j_dtype = getattr(torch, args.dtype), jnp.dtype(args.dtype)
    torch.manual_seed(0)
    torch_unet = UNet2DConditionModel(**DIFFUSERS_CONFIGS[args.config]).eval()
    base = UNetConfig.from_diffusers(dict(torch_unet.config))
    layout = diffusers_layout(base, vector_embedding(torch_unet.config))
    state = torch_unet.state_dict()
    torch_unet = torch_unet.to(device)
    if t_dtype != torch.float32:  # (a dtype in .to() makes diffusers warn, even float32)
        torch_unet = torch_unet.to(t_dtype)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, base.in_channels, args.hw, args.hw)).astype(np.float32)
    t = np.linspace(1, 999, args.batch).astype(np.float32)
    ctx = rng.standard_normal((args.batch, CONTEXT_TOKENS, base.context_dim)).astype(np.float32)
    pooled = rng.standard_normal((args.batch, 1280)).astype(np.float32)
    time_ids = np.tile(np.array([8 * args.hw, 8 * args.hw, 0, 0, 8 * args.hw, 8 * args.hw], np.float32), (args.batch, 1))
    env = environment() | {"config": args.config, "dtype": args.dtype, "latent": [args.batch, args.hw, args.hw]}

    tx = torch.from_numpy(x).to(device, t_dtype).requires_grad_()
    tt, tc = torch.from_numpy(t).to(device), torch.from_numpy(ctx).to(device, t_dtype)
    added = None
    y = None
    if base.adm_in_channels:  # SDXL: diffusers takes the pooled text and ids; flax_sgm their vector y
        from flax_sgm import sdxl_vector

        added = dict(text_embeds=torch.from_numpy(pooled).to(device, t_dtype), time_ids=torch.from_numpy(time_ids).to(device, t_dtype))
        y = sdxl_vector(jnp.asarray(pooled), jnp.asarray(time_ids), dim=torch_unet.config.addition_time_embed_dim).astype(j_dtype)

    def torch_fwd(module):
        def step():
            with torch.no_grad():
                return module(tx, tt, tc, added_cond_kwargs=added).sample

        return step

    def torch_fwd_bwd(module):
        def step():
            module(tx, tt, tc, added_cond_kwargs=added).sample.float().mean().backward()

        return step

    timing = dict(iters=args.iters, repeats=args.repeats, warmup=1)
    rows = []
    for checkpoint in args.checkpoint:
        config = base.replace(use_checkpoint=checkpoint)
        model = convert.load_torch_state_dict(models.abstract(config, dtype=j_dtype, param_dtype=j_dtype), state, layout=layout)
        params, fwd, fwd_bwd = flax_steps(model)
        jx, jt, jc = jnp.asarray(x.transpose(0, 2, 3, 1), j_dtype), jnp.asarray(t), jnp.asarray(ctx, j_dtype)
        row = {"config": args.config, "checkpoint": checkpoint}
        row["flax fwd ms"] = median_ms(lambda: fwd(params, jx, jt, jc, y), jax_sync, **timing)
        row["flax fwd+bwd ms"] = median_ms(lambda: fwd_bwd(params, jx, jt, jc, y), jax_sync, **timing)
        row["flax fwd+bwd GiB"] = jax_peak_bytes(fwd_bwd, params, jx, jt, jc, y) / 2**30
        del model, params, fwd, fwd_bwd

        torch_unet.train(False)
        if checkpoint:
            torch_unet.enable_gradient_checkpointing()
        else:
            torch_unet.disable_gradient_checkpointing()
        row["torch eager fwd ms"] = torch_median_ms(torch_fwd(torch_unet), **timing)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        row["torch eager fwd+bwd ms"] = torch_median_ms(torch_fwd_bwd(torch_unet), **timing)
        if device == "cuda":
            row["torch eager fwd+bwd GiB"] = torch.cuda.max_memory_allocated() / 2**30
        if not args.no_compile:
            compiled = torch.compile(torch_unet)
            row["torch.compile fwd ms"] = torch_median_ms(torch_fwd(compiled), **timing)
            row["torch.compile fwd+bwd ms"] = torch_median_ms(torch_fwd_bwd(compiled), **timing)
            torch._dynamo.reset()
        row["fwd x eager"] = row["torch eager fwd ms"] / row["flax fwd ms"]
        row["fwd+bwd x eager"] = row["torch eager fwd+bwd ms"] / row["flax fwd+bwd ms"]
        if not args.no_compile:
            row["fwd x compile"] = row["torch.compile fwd ms"] / row["flax fwd ms"]
            row["fwd+bwd x compile"] = row["torch.compile fwd+bwd ms"] / row["flax fwd+bwd ms"]
        rows.append(row)
        if args.json:  # after every row: a run stopped early keeps what it measured
            write_json(rows, env, args.json)
    emit(rows, env, args.json)


if __name__ == "__main__":
    main()
