"""Sharding: the model over a Mesh of 8 virtual CPU devices gives the single-device forward and gradients.

The multi-device half runs in a subprocess (this file as a script): the device
count (--xla_force_host_platform_device_count=8) must be set before jax starts,
and pytest's jax already has one device. The worker compiles every case once,
runs it, and reports errors, collectives and array sizes of the compiled program
as JSON; the tests below assert on that report.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flax_sgm
from flax_sgm import sharding
from flax_sgm.verify.criteria import REORDERED, REORDERED_GRAD, rel_err  # torch-free: the worker process has no torch

DEVICES = 8
# Tiny SpatialTransformer: 8 heads, so every mesh axis of size <= 8 splits whole heads.
CONFIG = dict(in_channels=32, n_heads=8, d_head=8, depth=1, context_dim=16, use_linear=True)
BATCH, HW, CONTEXT_TOKENS = 8, (8, 8), 12
# The largest activations: the GEGLU projection [b, n, 2 * 4 * inner] and the logits [b, heads, n, n].
BIG_ELEMENTS = BATCH * HW[0] * HW[1] * 2 * 4 * CONFIG["n_heads"] * CONFIG["d_head"]

# (data, seq, model) -> mode. The first four are the (data, model) meshes of the issue.
MESHES = {
    "data8": ((8, 1, 1), "data"),
    "data4-model2": ((4, 1, 2), "tensor"),
    "data2-model4": ((2, 1, 4), "tensor"),
    "model8": ((1, 1, 8), "tensor"),
    "seq8": ((1, 8, 1), "sequence"),
    "data2-seq4": ((2, 4, 1), "sequence"),
    "seq4-model2": ((1, 4, 2), "sequence"),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
RESHARDS = ("all-to-all", "collective-permute")


# The worker: runs in its own process with 8 devices ---------------------------------


def _randomized(model, seed):
    """Every parameter random (proj_out too, which starts at zero); norm scales near 1."""
    rng = np.random.default_rng(seed)
    updates = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = var.get_value().shape
        noise = rng.standard_normal(shape).astype(np.float32)
        if len(shape) > 1:
            value = noise / np.sqrt(np.prod(shape[:-1]))
        else:
            value = (1.0 if path[-1] == "scale" else 0.0) + 0.1 * noise
        updates.append((path, value))
    nnx.update(model, nnx.from_flat_state(updates))
    return model


def _hlo_report(text: str) -> dict:
    """Collectives (with the op that made each) and the largest f32 array of a compiled program."""
    ops = re.findall(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(.*?op_name=\"([^\"]*)\"", text)
    shapes = re.findall(r"f32\[([\d,]+)\]", text)
    return {
        "collectives": {c: sum(op == c for op, _ in ops) for c in COLLECTIVES},
        # What made the resharding collectives (by the jax op in their metadata).
        "reshard_sources": sorted({name.rsplit("/", 1)[-1] for op, name in ops if op in RESHARDS}),
        "max_f32_elements": max(int(np.prod([int(d) for d in s.split(",")])) for s in shapes),
        "shard_map": "shard_map" in text,
    }


def _spec(array) -> list:
    """An array's PartitionSpec as a list: mesh axes of size 1 as None, no trailing Nones."""
    sizes = array.sharding.mesh.shape
    spec = [a if a is not None and sizes[a] > 1 else None for a in array.sharding.spec]
    while spec and spec[-1] is None:
        spec.pop()
    return spec


def _rel_errs(actual, expected) -> list[float]:
    return [rel_err(a, e) for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)]


def _worker() -> dict:
    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == DEVICES, jax.devices()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, *HW, CONFIG["in_channels"])).astype(np.float32)
    ctx = rng.standard_normal((BATCH, CONTEXT_TOKENS, CONFIG["context_dim"])).astype(np.float32)
    cot = rng.standard_normal(x.shape).astype(np.float32)

    def build():
        return _randomized(flax_sgm.SpatialTransformer(**CONFIG, rngs=nnx.Rngs(0)), seed=1)

    def step(graphdef, params, rest, x, ctx, cot):
        def loss(model, x, ctx):
            out = model(x, ctx)
            return jnp.sum(out * cot), out

        model = nnx.merge(graphdef, params, rest)
        (_, out), grads = nnx.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(model, x, ctx)
        return out, grads

    def run(model, *inputs):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        compiled = jax.jit(step, static_argnums=0).lower(graphdef, params, rest, *inputs).compile()
        return compiled(params, rest, *inputs), compiled.as_text()

    (ref_out, ref_grads), _ = run(build(), x, ctx, cot)
    report = {}
    for name, (shape, _) in MESHES.items():
        mesh = sharding.make_mesh(*shape)
        model = sharding.shard_model(build(), mesh)
        xs, cs = sharding.shard_inputs(mesh, x, ctx)
        with sharding.use_mesh(mesh):
            (out, grads), text = run(model, xs, cs, sharding.place(cot, sharding.IMAGE, mesh))
        to_q = model.transformer_blocks[0].attn1.to_q.kernel
        to_q_grad = grads[0]["transformer_blocks"][0]["attn1"]["to_q"]["kernel"]
        report[name] = {
            "forward": _rel_errs(out, ref_out)[0],
            "grad": max(_rel_errs(grads, ref_grads)),
            "out_spec": _spec(out),
            "to_q_spec": _spec(to_q.get_value()),
            "to_q_grad_spec": _spec(to_q_grad.get_value()),
            **_hlo_report(text),
        }
    report["cross-attention-mask"] = _masked_cross_attention()
    report["ten-heads"] = _ten_heads_error()
    return report


def _masked_cross_attention() -> dict:
    """CrossAttention under sequence parallelism: a boolean mask, and 35 query tokens on 8 shards (padded)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 35, 32)).astype(np.float32)
    mask = rng.random((2, 1, 35, 35)) > 0.3
    mask[0, 0, 3] = False  # a query row with every key masked: zeros, as torch
    cot = rng.standard_normal(x.shape).astype(np.float32)

    @nnx.jit
    def forward_and_grads(model, x):
        def loss(model, x):
            out = model(x, mask=mask)
            return jnp.sum(out * cot), out

        (_, out), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
        return out, grads

    def build():
        return _randomized(flax_sgm.CrossAttention(32, heads=8, dim_head=8, rngs=nnx.Rngs(0)), seed=3)

    ref_out, ref_grads = forward_and_grads(build(), x)
    mesh = sharding.make_mesh(1, DEVICES, 1)
    with sharding.use_mesh(mesh):
        out, grads = forward_and_grads(sharding.shard_model(build(), mesh), x)
    return {"forward": _rel_errs(out, ref_out)[0], "grad": max(_rel_errs(grads, ref_grads))}


def _ten_heads_error() -> str:
    """The long-sequence config's 10 heads on a model axis of 4: refused, with the way out."""
    model = nnx.eval_shape(lambda: flax_sgm.SpatialTransformer(64, 10, 8, context_dim=16, rngs=nnx.Rngs(0)))
    try:
        sharding.shard_model(model, sharding.make_mesh(2, 1, 4))
    except ValueError as e:
        return str(e)
    return ""


# The tests ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(MESHES))
def test_same_forward_and_gradients_as_one_device(report, name):
    r = report[name]
    assert r["forward"] <= REORDERED, f"{name}: forward rel err {r['forward']:.3g}"
    assert r["grad"] <= REORDERED_GRAD, f"{name}: gradient rel err {r['grad']:.3g}"


@pytest.mark.parametrize("name", list(MESHES))
def test_large_tensors_are_split(report, name):
    """No array of the compiled program holds more than 1/8 of the largest activation."""
    assert report[name]["max_f32_elements"] <= BIG_ELEMENTS // DEVICES, report[name]["max_f32_elements"]


@pytest.mark.parametrize("name", list(MESHES))
def test_compiled_collectives(report, name):
    (data, seq, model), mode = MESHES[name]
    r = report[name]
    c = r["collectives"]
    assert c["all-reduce"] > 0  # parameter gradients (data, seq), row-parallel to_out / project_out (model)
    assert r["shard_map"] == (mode == "sequence")  # sequence-parallel attention runs under shard_map
    if mode == "sequence":
        assert c["all-gather"] > 0  # keys and values gathered for the local queries
    else:
        assert c["all-gather"] == 0
    # GEGLU's value and gate halves sit back to back in one projection: with its output
    # split over `model`, halving it (and joining the halves' gradients) moves data.
    # Nothing else reshards.
    assert r["reshard_sources"] == (["concatenate", "split"] if model > 1 else []), r["reshard_sources"]


@pytest.mark.parametrize("name", list(MESHES))
def test_output_and_parameter_placement(report, name):
    """Output split by batch and rows; to_q and its gradient split by heads (specs without trailing Nones)."""
    (data, seq, model), _ = MESHES[name]
    r = report[name]
    out_spec = ["data" if data > 1 else None] + (["seq"] if seq > 1 else [])
    assert r["out_spec"] == (out_spec if out_spec != [None] else [])
    assert r["to_q_spec"] == r["to_q_grad_spec"] == ([None, "model"] if model > 1 else [])


def test_sequence_parallel_with_mask_and_padding(report):
    r = report["cross-attention-mask"]
    assert r["forward"] <= REORDERED and r["grad"] <= REORDERED_GRAD, r


def test_heads_that_do_not_split_are_refused(report):
    message = report["ten-heads"]
    assert re.search(r"10 heads \(.*\) do not split over 4 devices", message) and "'seq' or 'data'" in message, message


# Single device, in this process --------------------------------------------------


def test_every_parameter_has_logical_axes():
    known = {name for name, _ in sharding.RULES}
    modules = [
        flax_sgm.SpatialTransformer(32, 2, 8, depth=2, context_dim=16, rngs=nnx.Rngs(0)),
        flax_sgm.BasicTransformerSingleLayerBlock(32, 2, 8, rngs=nnx.Rngs(0)),
        flax_sgm.SpatialSelfAttention(32, rngs=nnx.Rngs(0)),
        flax_sgm.LinearAttention(32, rngs=nnx.Rngs(0)),
    ]
    for module in modules:
        for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
            axes = var.get_metadata().get("out_sharding")
            assert axes is not None and len(axes) == var.get_value().ndim, (path, axes)
            assert set(axes) - {None} <= known, (path, axes)


LAYOUT = {
    ("attn1", "to_q", "kernel"): ("embed", "heads"),
    ("attn2", "to_k", "kernel"): ("embed", "heads"),
    ("attn1", "to_out", "kernel"): ("heads", "embed"),
    ("attn1", "to_out", "bias"): ("embed",),
    ("ff", "project_in", "proj", "kernel"): ("embed", "mlp"),
    ("ff", "project_out", "kernel"): ("mlp", "embed"),
    ("norm1", "scale"): ("embed",),
}


@pytest.mark.parametrize("path", list(LAYOUT), ids=lambda p: ".".join(p))
def test_tensor_parallel_layout(path):
    """q, k, v split by output features, to_out and the feed-forward output by input features."""
    block = nnx.eval_shape(lambda: flax_sgm.BasicTransformerBlock(32, 2, 8, context_dim=16, rngs=nnx.Rngs(0)))
    params = dict(nnx.to_flat_state(nnx.state(block, nnx.Param)))
    assert params[path].get_metadata()["out_sharding"] == LAYOUT[path]


def test_constraints_are_inert_without_a_mesh():
    model = flax_sgm.SpatialTransformer(32, 2, 8, context_dim=16, rngs=nnx.Rngs(0))
    x, ctx = np.zeros((1, 4, 4, 32), np.float32), np.zeros((1, 3, 16), np.float32)
    graphdef, state = nnx.split(model)

    def trace():
        return str(jax.make_jaxpr(lambda s, x, c: nnx.merge(graphdef, s)(x, c))(state, x, ctx))

    jaxpr = trace()
    assert "sharding_constraint" not in jaxpr and "shard_map" not in jaxpr
    with sharding.use_mesh(sharding.make_mesh()):  # the same trace under a (one-device) mesh has them
        assert "sharding_constraint" in trace()


def test_shard_model_on_an_abstract_model():
    """An nnx.eval_shape model gets shardings on its ShapeDtypeStructs (for compile-only planning)."""
    model = nnx.eval_shape(lambda: flax_sgm.SpatialTransformer(32, 2, 8, context_dim=16, rngs=nnx.Rngs(0)))
    sharding.shard_model(model, sharding.make_mesh())
    kernel = model.transformer_blocks[0].ff.project_out.kernel.get_value()
    assert isinstance(kernel, jax.ShapeDtypeStruct) and tuple(kernel.sharding.spec) == ("model", None)


if __name__ == "__main__":
    print(json.dumps(_worker()))
