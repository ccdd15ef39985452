"""Per-device memory of a whole-UNet AdamW training step, data parallel with and without FSDP.

For 1, 2, 4 and 8 devices on the data axis (batch: one item per device): the
training state per device (parameters and AdamW's two moments), read off each
array's sharding (the bytes of its largest shard), and with `--compile` the step
(forward, loss, gradients of every parameter, optax.adamw update, parameters and
optimizer state donated) compiled, not run: `compiled.memory_analysis()` gives
arguments, temporaries and total per device. FSDP (`shard_model(..., fsdp=True)`)
splits parameters, and so the moments, over `data`; plain data parallelism
replicates them.

Measured with the XLA CPU compiler on virtual devices
(--xla_force_host_platform_device_count): the SPMD partitioning is the one a GPU
mesh gets, the buffer assignment is the CPU compiler's.

Compiling SD 1.5's UNet step takes minutes per mesh on a 2-core CPU; SDXL's longer.

Usage: python bench/unet_fsdp_memory.py [--preset sdxl-base] [--devices 1 2 4 8] [--compile --hw 32]
"""

from __future__ import annotations

import argparse
import os
from flax_sgm import models

GIB = 1 << 30


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sdxl-base", help="a UNetConfig preset (sd15, sd21, sdxl-base, sdxl-refiner)")
    parser.add_argument("--hw", type=int, default=32, help="latent height = width")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype (parameters and moments stay float32)")
    parser.add_argument("--compile", action="store_true", help="also compile the step and report memory_analysis()")
    return parser.parse_args()


def shard_bytes(tree) -> int:
    """Bytes of the largest shard of each array, summed: what one device holds."""
    import jax
    import numpy as np

    def one(leaf):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        return int(np.prod(shape)) * leaf.dtype.itemsize

    return sum(one(leaf) for leaf in jax.tree.leaves(tree))


def step_memory(preset: str, devices: int, fsdp: bool, hw: int, dtype, compile_step: bool):
    """Training-state bytes per device, and memory_analysis() of the compiled AdamW step (or None)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import flax_sgm
    from flax_sgm import sharding

    config = flax_sgm.UNetConfig.preset(preset)
    mesh = sharding.make_mesh(data=devices, devices=jax.devices()[:devices])
    model = models.abstract(config, dtype=dtype)  # eval_shape with ref RNG state (see flax_sgm.models.abstract)
    sharding.shard_model(model, mesh, fsdp=fsdp)  # abstract: shardings on the ShapeDtypeStructs
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-4)
    # The moments mirror the parameters, shardings included; the step count is replicated.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_state = optax.tree_map_params(
        tx,
        lambda _, p: p,
        jax.eval_shape(tx.init, params),
        params,
        transform_non_params=lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
    )

    def batch_array(*shape):
        spec = jax.sharding.PartitionSpec("data", *([None] * (len(shape) - 1)))
        return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(mesh, spec))

    b = devices
    batch = dict(
        x=batch_array(b, hw, hw, config.in_channels),
        t=batch_array(b),
        context=batch_array(b, 77, config.context_dim),
        y=batch_array(b, config.adm_in_channels) if config.adm_in_channels else None,
        target=batch_array(b, hw, hw, config.out_channels),
    )

    def step(params, opt_state, batch):
        def loss(params):
            out = nnx.merge(graphdef, params, rest)(batch["x"], batch["t"], batch["context"], batch["y"])
            return jnp.mean(jnp.square(out.astype(jnp.float32) - batch["target"].astype(jnp.float32)))

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return value, optax.apply_updates(params, updates), opt_state

    state = shard_bytes((params, opt_state))
    if not compile_step:
        return state, None
    with sharding.use_mesh(mesh):
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batch).compile()
    return state, compiled.memory_analysis()


def main():
    args = parse_args()
    count = max(args.devices)
    # Virtual devices: must be set before jax starts.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(args.dtype)
    print(f"UNet preset {args.preset}, x b x {args.hw} x {args.hw} (one item per device), context 77 tokens, "
          f"{dtype.name} compute, float32 parameters, optax.adamw, checkpointing on")
    source = "the shardings and compiled.memory_analysis()" if args.compile else "the shardings"
    print(f"jax {jax.__version__}, {jax.device_count()} virtual {jax.devices()[0].platform} devices; per device, from {source}\n")
    compiled_columns = " arguments | temporaries | total |" if args.compile else ""
    print("| devices | parameters | parameters + AdamW moments |" + compiled_columns)
    print("|---:|---|---:|" + "---:|" * (3 if args.compile else 0))
    for devices in args.devices:
        for fsdp in (False, True) if devices > 1 else (False,):
            state, m = step_memory(args.preset, devices, fsdp, args.hw, dtype, args.compile)
            cells = [state]
            if m is not None:
                total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
                cells += [m.argument_size_in_bytes, m.temp_size_in_bytes, total]
            split = "FSDP over data" if fsdp else "replicated"
            print(f"| {devices} | {split} | " + " | ".join(f"{c / GIB:.2f} GiB" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
