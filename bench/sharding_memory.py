"""Per-device memory of a SpatialTransformer training step over 1, 2, 4 and 8 devices.

The long-sequence config (in_channels 640, 10 heads of 64, depth 1, context_dim
4096, linear projections; x 1 x 128 x 128 x 640 = 16,384 tokens, context
1 x 226 x 4096; bfloat16 compute, float32 parameters): forward and backward (a
scalar loss, gradients of every parameter) compiled, not run, for each mesh, and
the per-device bytes read from `compiled.memory_analysis()`.

Measured with the XLA CPU compiler on virtual devices
(--xla_force_host_platform_device_count), which is what runs without a
multi-GPU machine: the partitioning is the same SPMD program a GPU mesh gets,
but the buffer assignment is the CPU compiler's and attention is the "chunked"
backend (memory linear in the sequence, as cuDNN's flash attention is on GPU).

The batch is 1, so no row splits data. 10 heads do not split over 4 or 8
devices (whole heads only; padding heads would change the weights), so those
rows put the extra devices on the sequence axis.

Usage: python bench/sharding_memory.py [--devices 1 2 4 8] [--hw 128]
"""

from __future__ import annotations

import argparse
import os

# (data, seq, model) meshes per device count, and what each one exercises.
MESHES = {
    1: [((1, 1, 1), "one device")],
    2: [((1, 1, 2), "tensor (heads 5/device)"), ((1, 2, 1), "sequence")],
    4: [((1, 4, 1), "sequence"), ((1, 2, 2), "sequence x tensor")],
    8: [((1, 8, 1), "sequence"), ((1, 4, 2), "sequence x tensor")],
}
CONFIG = dict(in_channels=640, n_heads=10, d_head=64, depth=1, context_dim=4096, use_linear=True)
CONTEXT_TOKENS = 226
GIB = 1 << 30


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=sorted(MESHES), choices=sorted(MESHES))
    parser.add_argument("--hw", type=int, default=128, help="latent height = width (128: 16,384 tokens)")
    parser.add_argument("--backend", default="chunked", help="attention backend (default: chunked)")
    return parser.parse_args()


def step_memory(mesh_shape, hw: int, backend: str):
    """memory_analysis() of the compiled forward + backward on a (data, seq, model) mesh."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import flax_sgm
    from flax_sgm import sharding

    mesh = sharding.make_mesh(*mesh_shape)
    model = nnx.eval_shape(
        lambda: flax_sgm.SpatialTransformer(**CONFIG, sdp_backend=backend, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    )
    sharding.shard_model(model, mesh)  # abstract: shardings on the ShapeDtypeStructs
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def abstract(shape, axes):
        spec = sharding.logical_to_spec(axes)
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=jax.sharding.NamedSharding(mesh, spec))

    x = abstract((1, hw, hw, CONFIG["in_channels"]), sharding.IMAGE)
    ctx = abstract((1, CONTEXT_TOKENS, CONFIG["context_dim"]), sharding.CONTEXT)

    def grads(params, rest, x, ctx):
        def loss(model):
            return jnp.mean(jnp.square(model(x, ctx).astype(jnp.float32)))

        return nnx.grad(loss)(nnx.merge(graphdef, params, rest))

    with sharding.use_mesh(mesh):
        compiled = jax.jit(grads).lower(params, rest, x, ctx).compile()
    return compiled.memory_analysis()


def main():
    args = parse_args()
    count = max(args.devices)
    # Virtual devices: must be set before jax starts.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    tokens = args.hw * args.hw
    print(f"SpatialTransformer {CONFIG}, x 1x{args.hw}x{args.hw}x{CONFIG['in_channels']} ({tokens} tokens), "
          f"context 1x{CONTEXT_TOKENS}x{CONFIG['context_dim']}, bf16 compute, fp32 params, attention {args.backend}")
    print(f"jax {jax.__version__}, {jax.device_count()} virtual {jax.devices()[0].platform} devices; "
          "forward + backward, per device, from compiled.memory_analysis()\n")
    print("| devices | mesh (data, seq, model) | split | arguments | outputs | temporaries | total |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for devices in args.devices:
        for shape, mode in MESHES[devices]:
            m = step_memory(shape, args.hw, args.backend)
            total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
            cells = [m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes, total]
            print(f"| {devices} | {shape} | {mode} | " + " | ".join(f"{c / GIB:.2f} GiB" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
