"""Whole SpatialTransformer: flax_sgm under jit against torch_ref eager and under torch.compile.

Forward, and forward+backward (a scalar loss, gradients of every parameter and the
input; no optimizer), with and without gradient checkpointing. Peak memory: torch's
max_memory_allocated on GPU; for JAX the compiled program's memory analysis
(arguments + outputs + temporaries).

    python bench/module.py --config sdxl --json sdxl.json          # GPU, bf16
    python bench/module.py --config sd15 --dtype float32 --no-compile  # the CPU figure (SD1.5-like)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import flax_sgm
import torch_ref
from common import emit, environment, jax_peak_bytes, jax_sync, median_ms, torch_median_ms, write_json
from flax_sgm.checkpoints import convert
from flax_sgm.attention.config import PRESETS, Preset, SpatialTransformerConfig
from flax_sgm import models

# name -> Preset(config, batch, hw, context tokens): flax_sgm.attention.config's presets (sdxl, long, sd15,
# default), plus the small config of the first CPU table.
CONFIGS = dict(PRESETS) | {
    "cpu-small": Preset(SpatialTransformerConfig(128, 4, 32, depth=1, context_dim=256, use_linear=True), 1, (16, 16), 77),
}


def flax_steps(model):
    """Jitted forward and forward+backward over (params, x, context)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def run(params, x, ctx):
        return nnx.merge(graphdef, params, rest)(x, context=ctx)

    def loss(params, x, ctx):
        return run(params, x, ctx).astype(jnp.float32).mean()

    forward = jax.jit(run)
    forward_backward = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return params, forward, forward_backward


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sdxl")
    parser.add_argument("--dtype", default="bfloat16", help="compute and parameter dtype")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--policy", default="save_attention", choices=sorted(flax_sgm.CHECKPOINT_POLICIES))
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--checkpoint", nargs="+", type=lambda s: {"off": False, "on": True}[s], default=[False, True],
                        metavar="off|on", help="gradient checkpointing settings to run (default: off on)")
    parser.add_argument("--json")
    args = parser.parse_args()
    import torch

    preset = CONFIGS[args.config]
    batch, (h, w), m = preset.batch, preset.hw, preset.context_tokens
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t_dtype, j_dtype = getattr(torch, args.dtype), jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, preset.config.in_channels, h, w)).astype(np.float32)
    ctx = rng.standard_normal((batch, m, preset.config.context_dim)).astype(np.float32)
    env = environment()
    rows = []
    for checkpoint in args.checkpoint:
        config = preset.config.replace(use_checkpoint=checkpoint, checkpoint_policy=args.policy)
        torch.manual_seed(0)
        t = torch_ref.SpatialTransformer(**config.seed_args()).to(device, t_dtype)
        abstract = models.abstract(config, dtype=j_dtype, param_dtype=j_dtype)
        model = convert.load_torch_state_dict(abstract, t.state_dict())
        params, fwd, fwd_bwd = flax_steps(model)
        jx = jnp.asarray(x.transpose(0, 2, 3, 1), j_dtype)  # NCHW -> NHWC at the torch boundary
        jc = jnp.asarray(ctx, j_dtype)
        row = {"config": args.config, "checkpoint": checkpoint}
        row["flax fwd ms"] = median_ms(lambda: fwd(params, jx, jc), jax_sync, iters=args.iters)
        row["flax fwd+bwd ms"] = median_ms(lambda: fwd_bwd(params, jx, jc), jax_sync, iters=args.iters)
        row["flax fwd+bwd GiB"] = jax_peak_bytes(fwd_bwd, params, jx, jc) / 2**30

        tx = torch.from_numpy(x).to(device, t_dtype).requires_grad_()
        tc = torch.from_numpy(ctx).to(device, t_dtype)

        def torch_fb(module):
            def step():
                module(tx, context=tc).float().mean().backward()

            return step

        def torch_fwd(module):
            def step():
                with torch.no_grad():
                    return module(tx, context=tc)

            return step

        row["torch eager fwd ms"] = torch_median_ms(torch_fwd(t), iters=args.iters)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        row["torch eager fwd+bwd ms"] = torch_median_ms(torch_fb(t), iters=args.iters)
        if device == "cuda":
            row["torch eager fwd+bwd GiB"] = torch.cuda.max_memory_allocated() / 2**30
        if not args.no_compile:
            compiled = torch.compile(t)
            row["torch.compile fwd ms"] = torch_median_ms(torch_fwd(compiled), iters=args.iters)
            row["torch.compile fwd+bwd ms"] = torch_median_ms(torch_fb(compiled), iters=args.iters)
        row["fwd x eager"] = row["torch eager fwd ms"] / row["flax fwd ms"]
        row["fwd+bwd x eager"] = row["torch eager fwd+bwd ms"] / row["flax fwd+bwd ms"]
        if not args.no_compile:
            row["fwd x compile"] = row["torch.compile fwd ms"] / row["flax fwd ms"]
            row["fwd+bwd x compile"] = row["torch.compile fwd+bwd ms"] / row["flax fwd+bwd ms"]
        rows.append(row)
        if args.json:  # after every row: a run stopped by its time limit keeps what it measured
            write_json(rows, env, args.json)
    emit(rows, env, args.json)


if __name__ == "__main__":
    main()
