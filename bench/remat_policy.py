"""Which remat policy: compiled peak memory (and optionally time) of forward+backward per policy.

Memory comes from XLA's memory analysis of the compiled program (arguments +
outputs + temporaries), so it can be read without running on the device. On CPU it
is a proxy for the GPU schedule; bench/gpu_all.sh measures the GPU.

    python bench/remat_policy.py --config sdxl --dtype bfloat16
    python bench/remat_policy.py --config cpu-small --dtype float32 --time
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re

import jax
import jax.numpy as jnp
from flax import nnx

import flax_sgm
from flax_sgm import models
from jax.ad_checkpoint import print_saved_residuals

from common import emit, environment, jax_sync, median_ms
from module import CONFIGS, flax_steps, jax_peak_bytes


ITEMSIZE = {"f64": 8, "f32": 4, "i32": 4, "u32": 4, "bf16": 2, "f16": 2, "bool": 1, "i8": 1, "u8": 1}


def saved_activation_bytes(model, x, ctx) -> int:
    """Bytes of the residuals the backward keeps beyond weights and inputs, from jax's own report."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(lambda x: model(x, context=ctx).astype(jnp.float32).mean(), x)
    total = 0
    for line in out.getvalue().splitlines():
        match = re.match(r"(\w+)\[([\d,]*)\]", line)
        if match and "from a constant" not in line and "from the argument" not in line:
            size = 1
            for d in filter(None, match.group(2).split(",")):
                size *= int(d)
            total += size * ITEMSIZE[match.group(1)]
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sdxl")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--time", action="store_true", help="also run and time each program")
    parser.add_argument("--json")
    args = parser.parse_args()
    preset = CONFIGS[args.config]
    dtype = jnp.dtype(args.dtype)
    x = jnp.zeros((preset.batch, *preset.hw, preset.config.in_channels), dtype)
    ctx = jnp.zeros((preset.batch, preset.context_tokens, preset.config.context_dim), dtype)
    rows = []
    for policy in [None, *sorted(flax_sgm.CHECKPOINT_POLICIES)]:
        config = preset.config.replace(use_checkpoint=policy is not None, checkpoint_policy=policy or "recompute")
        model = models.build(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
        params, _, fwd_bwd = flax_steps(model)
        row = {
            "config": args.config,
            "policy": policy or "no checkpoint",
            "saved activations MiB": saved_activation_bytes(model, x, ctx) / 2**20,
            "fwd+bwd GiB": jax_peak_bytes(fwd_bwd, params, x, ctx) / 2**30,
        }
        if args.time:
            row["fwd+bwd ms"] = median_ms(lambda: fwd_bwd(params, x, ctx), jax_sync, iters=3, repeats=3)
        rows.append(row)
    emit(rows, environment(), args.json)


if __name__ == "__main__":
    main()
