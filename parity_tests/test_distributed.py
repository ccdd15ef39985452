"""Training past one device: fully sharded data parallelism, and several processes through jax.distributed.

Each run is a fresh process (this file as a script), since the device count and
jax.distributed must be set before jax starts: one device; 8 virtual CPU devices with
parameters split over `data` (FSDP); 8 devices as a (data, seq) = (2, 4) mesh (image rows split) and as
(data, model) = (2, 4) (heads split); and 2 processes x 2 CPU devices joined by
`jax.distributed.initialize` (gloo collectives), each feeding its half of the batch.
Every run takes the same SGD step of a tiny SDXL-style UNet on the same weights and global batch and saves the
loss and the updated parameters, which must equal the one-device run's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax_sgm import models

BATCH = 8  # divides every mesh here


def _step(mesh_shape: dict | None, fsdp: bool, out: Path) -> None:
    """One SGD step of a tiny SDXL-style UNet (checkpointing on, every weight random); saves loss, params, memory."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.experimental import multihost_utils

    import flax_sgm
    from flax_sgm import sharding

    config = flax_sgm.UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), transformer_depth=(0, 1),
        num_head_channels=16, context_dim=24, use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=16,
    )
    model = models.build(config, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
    nnx.update(model, jax.tree.map(lambda p: 0.2 * jax.random.normal(next(keys), p.shape), params))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, 8, 8, 4)).astype(np.float32)
    t = rng.uniform(0, 1000, BATCH).astype(np.float32)
    context = rng.standard_normal((BATCH, 7, 24)).astype(np.float32)
    y = rng.standard_normal((BATCH, 16)).astype(np.float32)
    target = rng.standard_normal((BATCH, 8, 8, 4)).astype(np.float32)
    inputs = (x, t, context, y)

    figures = {}
    if mesh_shape is not None:
        mesh = sharding.make_mesh(**mesh_shape)
        sharding.shard_model(model, mesh, fsdp=fsdp)
        # Each process holds its own rows of the global batch (here: by process index).
        rows = np.array_split(np.arange(BATCH), jax.process_count())[jax.process_index()]

        def global_array(a):
            spec = sharding.logical_to_spec(("batch",) + (None,) * (a.ndim - 1))
            return jax.make_array_from_process_local_data(jax.sharding.NamedSharding(mesh, spec), a[rows], a.shape)

        inputs, target = tuple(global_array(a) for a in inputs), global_array(target)
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
        figures["param_bytes"] = sum(p.nbytes for p in leaves)
        figures["param_bytes_per_device"] = sum(p.addressable_shards[0].data.nbytes for p in leaves)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    def train_step(model, optimizer, inputs, target):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(*inputs) - target) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    step = nnx.jit(train_step)
    if mesh_shape is not None:
        with sharding.use_mesh(mesh):
            compiled = step.lower(model, optimizer, inputs, target).compile()
            figures["argument_bytes_per_device"] = compiled.memory_analysis().argument_size_in_bytes
            # What every device would take in with nothing split (data parallelism's replicas).
            figures["argument_bytes"] = sum(a.nbytes for a in jax.tree.leaves((nnx.state(model), nnx.state(optimizer))))
            loss = step(model, optimizer, inputs, target)
    else:
        loss = step(model, optimizer, inputs, target)
    updated = {".".join(map(str, k)): np.asarray(multihost_utils.process_allgather(v.get_value(), tiled=True))
               for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    if jax.process_index() == 0:
        np.savez(out.with_suffix(".npz"), **updated)
        out.write_text(json.dumps({"loss": float(loss), **figures}))


def _row_split_conv_gradient_ratio() -> float:
    """The XLA defect behind the refusal, in plain JAX: a 3x3 conv's kernel gradient with image rows split over
    `seq` on a (2, 2, 2) mesh, over the same gradient on one device (1.0 once XLA computes it right)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 8, 8, 32)), jnp.float32)
    kernel = jnp.asarray(0.1 * rng.standard_normal((3, 3, 32, 32)), jnp.float32)

    def loss(kernel, x):
        dims = ("NHWC", "HWIO", "NHWC")
        return jnp.sum(jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims) ** 2)

    grad = jax.jit(jax.grad(loss))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "seq", "model"))
    split = grad(jax.device_put(kernel, NamedSharding(mesh, PartitionSpec())),
                 jax.device_put(x, NamedSharding(mesh, PartitionSpec("data", "seq"))))
    return float(jnp.abs(split).max() / jnp.abs(grad(kernel, x)).max())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*args, devices: int = 1, timeout: int = 600) -> list[subprocess.Popen]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, __file__, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait(processes) -> None:
    for p in processes:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run's (figures, params), started together: one device, FSDP over 8 devices, (data, seq) and
    (data, model) meshes of 2 x 4, 2 processes x 2 devices."""
    d = tmp_path_factory.mktemp("distributed")
    port = _free_port()
    started = [
        _run("one", d / "one.json"),
        _run("fsdp", d / "fsdp.json", devices=8),
        _run("mesh", d / "mesh.json", devices=8),
        _run("tensor", d / "tensor.json", devices=8),
        *(_run("process", i, 2, port, d / "processes.json", devices=2) for i in range(2)),
    ]
    _wait(started)
    runs = {name: (json.loads((d / f"{name}.json").read_text()), dict(np.load(d / f"{name}.npz")))
            for name in ("one", "fsdp", "mesh", "tensor", "processes")}
    runs["refused"] = json.loads((d / "mesh.refused").read_text())
    return runs


@pytest.mark.parametrize("name", ["fsdp", "mesh", "tensor", "processes"],
                         ids=["fsdp-8-devices", "data2-seq4", "data2-model4", "2-processes-x-2-devices"])
def test_a_training_step_equals_one_devices(runs, name):
    from conftest import assert_close

    (want, want_params), (got, got_params) = runs["one"], runs[name]
    assert_close(got["loss"], want["loss"], what="loss")
    assert got_params.keys() == want_params.keys()
    for key in want_params:
        assert_close(got_params[key], want_params[key], what=key)


def test_rows_and_heads_split_at_once_are_refused_for_a_unet(runs):
    """XLA multiplies a row-split 3x3 conv's kernel gradient by the unused model axis' size (2x here): refused."""
    refused = runs["refused"]["refused"]
    assert refused.startswith("shard_model: the model does not fit the mesh:")
    assert "input_blocks.0.0.kernel (and 51 more 3x3 convolutions)" in refused and "multiplies them by 2" in refused


def test_the_xla_defect_behind_that_refusal_is_still_there(runs):
    """When this fails, the installed XLA computes the row-split conv right: lift sharding._check_row_split_convs."""
    assert runs["refused"]["xla_gradient_ratio"] == pytest.approx(2.0, rel=1e-4)


def test_fsdp_splits_the_parameters_over_the_data_axis(runs):
    fsdp = runs["fsdp"][0]
    # About 1/8 each: only vectors that 8 does not divide (conv_out's bias of 4) stay whole.
    assert fsdp["param_bytes_per_device"] <= 1.05 * fsdp["param_bytes"] / 8
    # What the compiled step takes in per device (parameters, optimizer state, inputs) falls with them:
    # data parallelism would hold all of the model's state on every device.
    assert fsdp["argument_bytes_per_device"] < 0.25 * fsdp["argument_bytes"]


def _main(argv: list[str]) -> None:
    mode, *rest = argv
    if mode == "one":
        _step(None, False, Path(rest[0]))
    elif mode == "fsdp":
        _step({"data": 8}, True, Path(rest[0]))
    elif mode == "mesh":  # batch and image rows split; rows and heads at once are refused (sharding.py)
        _step({"data": 2, "seq": 4}, False, Path(rest[0]))
        import flax_sgm
        from flax_sgm import sharding

        model = models.abstract(flax_sgm.UNetConfig.preset("sd15"))
        try:
            sharding.shard_model(model, sharding.make_mesh(2, 2, 2))
            refused = "accepted"
        except ValueError as err:
            refused = str(err)
        Path(rest[0]).with_suffix(".refused").write_text(json.dumps(
            {"refused": refused, "xla_gradient_ratio": _row_split_conv_gradient_ratio()}))
    elif mode == "tensor":  # batch and heads (4 per block) split
        _step({"data": 2, "model": 4}, False, Path(rest[0]))
    else:
        process_id, processes, port, out = int(rest[0]), int(rest[1]), int(rest[2]), Path(rest[3])
        import jax

        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=processes, process_id=process_id)
        _step({"data": jax.device_count()}, True, out)
        jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _main(sys.argv[1:])
