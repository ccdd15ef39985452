"""The KL autoencoder: flax_sgm's AutoencoderKL under jit against diffusers' AutoencoderKL, eager and torch.compile.

One diffusers model of a released configuration (random weights), loaded into flax_sgm through the conversion
table, so both run the same numbers. Encode (the posterior's mean) and decode of one image at --hw, timed in
one run; peak memory of each side's decode at --memory-hw, each in a fresh process: on CPU the process's peak
resident memory (ru_maxrss) above what it held once the model was built and its inputs made, on GPU torch's
max_memory_allocated and XLA's memory analysis of the compiled program (arguments + outputs + temporaries).
Ratios are torch time / flax_sgm time (above 1: flax_sgm faster).

    python bench/vae.py --config sd --hw 512 --memory-hw 1024               # the CPU figures (fp32)
    python bench/vae.py --config sdxl --dtype bfloat16 --hw 1024 --ops decode --no-compile   # GPU (gpu_all.sh)
    python bench/vae.py --config tiny --hw 64 --memory-hw 64 --iters 1      # a smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common import emit, environment, jax_peak_bytes, jax_sync, median_ms, torch_median_ms, write_json
from flax_sgm import models
from flax_sgm.autoencoder.config import AutoencoderConfig
from flax_sgm.autoencoder.layout import diffusers_layout
from flax_sgm.checkpoints import convert

KL_F8 = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
             down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
CONFIGS = {
    "sd": dict(KL_F8, sample_size=512),
    "sdxl": dict(KL_F8, sample_size=1024, scaling_factor=0.13025, force_upcast=False),  # bf16 stays bf16
    "tiny": dict(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, sample_size=32,
                 down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2),
}


def build(config_name: str, dtype: str):
    """diffusers' model (seeded init) on the device, and flax_sgm's twin holding the same weights."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    torch_vae = AutoencoderKL(**CONFIGS[config_name]).eval()
    config = AutoencoderConfig.from_diffusers(dict(torch_vae.config))
    j_dtype = jnp.dtype(dtype)
    flax_vae = convert.load_torch_state_dict(models.abstract(config, dtype=j_dtype, param_dtype=j_dtype),
                                             torch_vae.state_dict(), layout=diffusers_layout(config),
                                             allow_downcast=True)  # bf16: torch's weights rounded the same way
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_vae = torch_vae.to(device)
    if dtype != "float32":
        torch_vae = torch_vae.to(getattr(torch, dtype))
    return torch_vae, flax_vae, config, device


def flax_programs(vae):
    graphdef, params, rest = nnx.split(vae, nnx.Param, ...)
    encode = jax.jit(lambda params, x: nnx.merge(graphdef, params, rest).encode(x).mean)
    decode = jax.jit(lambda params, z: nnx.merge(graphdef, params, rest).decode(z))
    return params, encode, decode


def inputs(config, hw: int, factor: int):
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (1, config.in_channels, hw, hw)).astype(np.float32)
    latent = rng.standard_normal((1, config.embed_dim, hw // factor, hw // factor)).astype(np.float32)
    return image, latent


def peak(side: str, config_name: str, dtype: str, hw: int) -> dict:
    """One side's decode at `hw` in this (fresh) process: its peak memory, after one warm-up run."""
    import torch

    torch_vae, flax_vae, config, device = build(config_name, dtype)
    _, latent = inputs(config, hw, config.downsample_factor)
    out = {"side": side, "hw": hw}
    if side == "flax":
        params, _, decode = flax_programs(flax_vae)
        del torch_vae
        z = jnp.asarray(latent.transpose(0, 2, 3, 1), dtype)
        out["xla_program_GiB"] = jax_peak_bytes(decode, params, z) / 2**30
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        jax_sync(decode(params, z))
    else:
        del flax_vae
        z = torch.from_numpy(latent).to(device, getattr(torch, dtype))
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.no_grad():
            torch_vae.decode(z)
        if device == "cuda":
            torch.cuda.synchronize()
            out["cuda_max_allocated_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out["rss_peak_GiB"] = after / 2**20
    out["rss_above_built_GiB"] = (after - before) / 2**20
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sd")
    parser.add_argument("--dtype", default="float32", help="compute and parameter dtype")
    parser.add_argument("--hw", type=int, default=512, help="image height = width of the timed runs")
    parser.add_argument("--ops", nargs="+", choices=["encode", "decode"], default=["encode", "decode"])
    parser.add_argument("--memory-hw", type=int, nargs="*", default=[1024],
                        help="image sizes whose decode peak memory is measured, each side in a fresh process")
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--json")
    parser.add_argument("--peak", choices=["flax", "torch"], help=argparse.SUPPRESS)  # the memory subprocess
    args = parser.parse_args()
    if args.peak:
        print(json.dumps(peak(args.peak, args.config, args.dtype, args.memory_hw[0])))
        return
    import torch

    torch_vae, flax_vae, config, device = build(args.config, args.dtype)
    t_dtype, j_dtype = getattr(torch, args.dtype), jnp.dtype(args.dtype)
    f = config.downsample_factor
    image, latent = inputs(config, args.hw, f)
    env = environment() | {"config": args.config, "dtype": args.dtype, "image": [1, args.hw, args.hw]}
    params, encode, decode = flax_programs(flax_vae)
    timing = dict(iters=args.iters, repeats=args.repeats, warmup=1)
    flax_in = {"encode": jnp.asarray(image.transpose(0, 2, 3, 1), j_dtype), "decode": jnp.asarray(latent.transpose(0, 2, 3, 1), j_dtype)}
    torch_in = {"encode": torch.from_numpy(image).to(device, t_dtype), "decode": torch.from_numpy(latent).to(device, t_dtype)}

    def torch_op(module, op):
        def step():
            with torch.no_grad():
                return module.encode(torch_in[op]).latent_dist.mean if op == "encode" else module.decode(torch_in[op]).sample

        return step

    rows = []
    for op in args.ops:
        program = encode if op == "encode" else decode
        row = {"op": op, "image": args.hw}
        row["flax jit ms"] = median_ms(lambda: program(params, flax_in[op]), jax_sync, **timing)
        row["torch eager ms"] = torch_median_ms(torch_op(torch_vae, op), **timing)
        if not args.no_compile:
            compiled = torch.compile(torch_vae)
            row["torch.compile ms"] = torch_median_ms(torch_op(compiled, op), **timing)
            torch._dynamo.reset()
        row["x eager"] = row["torch eager ms"] / row["flax jit ms"]
        if not args.no_compile:
            row["x compile"] = row["torch.compile ms"] / row["flax jit ms"]
        row["flax program GiB"] = jax_peak_bytes(program, params, flax_in[op]) / 2**30
        rows.append(row)
        if args.json:
            write_json(rows, env, args.json)
    del torch_vae, flax_vae, params
    for hw in args.memory_hw:
        row = {"op": "decode peak memory", "image": hw}
        for side in ("flax", "torch"):
            done = subprocess.run([sys.executable, __file__, "--peak", side, "--config", args.config, "--dtype", args.dtype,
                                   "--memory-hw", str(hw)], capture_output=True, text=True)
            if done.returncode:
                row[f"{side} error"] = done.stderr.strip().splitlines()[-1][:200]
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            row |= {f"{side} {k}": v for k, v in result.items() if k not in ("side", "hw")}
        rows.append(row)
        if args.json:
            write_json(rows, env, args.json)
    for row in rows:
        print(json.dumps(row))
    emit([r for r in rows if "flax jit ms" in r], env, args.json and None)
    if args.json:
        write_json(rows, env, args.json)


if __name__ == "__main__":
    main()
