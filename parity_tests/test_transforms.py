"""Modules built with their defaults (checkpointing on) inside the JAX programs users write.

Each module runs through every transform twice: closed over, as users write it
first, and passed in as an argument (the model itself, or its split state). Every
result is compared with the eager module (values) or with eager autodiff of an
unchecked, plain-XLA-attention twin holding the same weights (derivatives), within
the fp32 tolerances.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.nnx import bridge
from jax import export

import flax_sgm
from conftest import CRITERIA, REORDERED, assert_close, criteria

# Every program computes the eager module's float32 math in another order: values within
# REORDERED, derivatives within REORDERED_GRAD. A derivative against a float64 central
# difference is judged by the float32 gradient floor.
TOL = {"y": REORDERED, "loop": REORDERED, "grad_x": criteria.REORDERED_GRAD, "grad_params": criteria.REORDERED_GRAD,
       "jvp": criteria.REORDERED_GRAD}
FD_TOL = CRITERIA["float32"].grad

# Tiny widths, odd lengths: (constructor, kwargs, x shape, context shape).
MODULES = {
    "SpatialTransformer": (flax_sgm.SpatialTransformer, dict(in_channels=32, n_heads=2, d_head=16, context_dim=24), (2, 3, 5, 32)),
    "BasicTransformerBlock": (flax_sgm.BasicTransformerBlock, dict(dim=32, n_heads=2, d_head=16, context_dim=24), (2, 15, 32)),
    "BasicTransformerSingleLayerBlock": (
        flax_sgm.BasicTransformerSingleLayerBlock,
        dict(dim=32, n_heads=2, d_head=16, context_dim=24),
        (2, 15, 32),
    ),
    "CrossAttention": (flax_sgm.CrossAttention, dict(query_dim=32, context_dim=24, heads=2, dim_head=16), (2, 15, 32)),
}
CONTEXT = (2, 5, 24)
CHECKPOINT_ARG = {"SpatialTransformer": "use_checkpoint", "BasicTransformerBlock": "checkpoint",
                  "BasicTransformerSingleLayerBlock": "checkpoint"}


def build(kind: str, *, checkpoint: bool | None = None, xla: bool = False):
    """The module with default arguments (and random weights from seed 0, proj_out included)."""
    cls, kwargs, _ = MODULES[kind]
    kwargs = dict(kwargs)
    if checkpoint is not None:
        kwargs[CHECKPOINT_ARG[kind]] = checkpoint
    model = cls(**kwargs, rngs=nnx.Rngs(0))
    if xla:  # plain XLA attention, no custom rules: the reference for derivatives
        for _, attention in nnx.iter_modules(model):
            if isinstance(attention, flax_sgm.CrossAttention):
                attention.backend = "xla"
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    random = [0.3 * jax.random.normal(key, leaf.shape, leaf.dtype) for key, leaf in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, random))
    return model


@dataclasses.dataclass
class Case:
    kind: str
    model: nnx.Module
    x: jax.Array
    c: jax.Array
    t: jax.Array  # a tangent / cotangent shaped like x
    ref: dict  # eager references


def loss(model, x, c, t):
    return (model(x, c) * t).sum()


def references(kind, x, c, t) -> dict:
    twin = build(kind, checkpoint=False, xla=True) if kind in CHECKPOINT_ARG else build(kind, xla=True)
    y = twin(x, c)
    graphdef, params = nnx.split(twin, nnx.Param)
    rest = nnx.state(twin, nnx.Not(nnx.Param))
    grad_params, grad_x = jax.grad(lambda p, x: loss(nnx.merge(graphdef, p, rest), x, c, t), argnums=(0, 1))(params, x)
    _, tangent = jax.jvp(lambda x: twin(x, c), (x,), (t,))
    step = lambda x: 0.5 * x + 0.1 * twin(x, c)  # noqa: E731  (a sampler step)
    return dict(y=y, grad_x=grad_x, grad_params=grad_params, jvp=tangent, loop=step(step(x)))


# Transforms through which checkpointing changes the program (the backward pass, remat itself, an export of both);
# the forward-only ones run without checkpointing under -m slow (the checkpointed module takes them by default).
CHECKPOINT_SENSITIVE = {"jax.grad-input", "jax.grad-params", "jax.checkpoint", "jax.export-symbolic-batch", "nnx.grad"}


def slow_case(item) -> bool:
    """conftest's hook: which cases of this file's grids run only under -m slow."""
    params = getattr(item, "callspec", None)
    params = params.params if params else {}
    if item.originalname == "test_transform_matches_eager":
        kind, checkpoint = params["case"]
        return kind == "SpatialTransformer" and checkpoint is False and params["transform"] not in CHECKPOINT_SENSITIVE
    if item.originalname == "test_forward_mode_above_one_chunk":  # jvp at both sizes both ways; the others once
        return params["mode"] != "jax.jvp" and not (params["hw"] == 16 and params["varying"] == "x")
    return False


def _case_param(kind: str, checkpoint: bool | None):
    """The default run takes SpatialTransformer (whose blocks are BasicTransformerBlocks) both ways, the single-layer
    block as built by default, and CrossAttention; the blocks on their own, and the single-layer block without
    checkpointing, run under -m slow."""
    slow = kind == "BasicTransformerBlock" or (kind == "BasicTransformerSingleLayerBlock" and checkpoint is False)
    name = kind + ("" if checkpoint is None else ("-checkpoint" if checkpoint else "-no-checkpoint"))
    return pytest.param((kind, checkpoint), id=name, marks=[pytest.mark.slow] if slow else [])


@pytest.fixture(scope="module", params=[_case_param(k, ck) for k in MODULES
                                        for ck in ((True, False) if k in CHECKPOINT_ARG else (None,))])
def case(request):
    kind, checkpoint = request.param
    rng = np.random.default_rng(0)
    x_shape = MODULES[kind][2]
    x, t = (jnp.asarray(rng.standard_normal(x_shape), jnp.float32) for _ in range(2))
    c = jnp.asarray(rng.standard_normal(CONTEXT), jnp.float32)
    model = build(kind, checkpoint=checkpoint)
    if checkpoint is None:
        assert kind == "CrossAttention"
    elif checkpoint:  # the seed's default, kept
        assert all(b.checkpoint for _, b in nnx.iter_modules(model) if hasattr(b, "checkpoint"))
    return Case(kind, model, x, c, t, references(kind, x, c, t))


# Each transform: (closed-over program, argument-passing program); each returns {reference name: value}.


def _jit(s: Case):
    closed = jax.jit(lambda x, c: s.model(x, c))(s.x, s.c)
    passed = jax.jit(lambda m, x, c: m(x, c))(s.model, s.x, s.c)
    return {"y": closed}, {"y": passed}


def _grad_input(s: Case):
    closed = jax.grad(lambda x: loss(s.model, x, s.c, s.t))(s.x)
    graphdef, state = nnx.split(s.model)
    passed = jax.grad(lambda x, st: loss(nnx.merge(graphdef, st), x, s.c, s.t))(s.x, state)
    return {"grad_x": closed}, {"grad_x": passed}


def _grad_params(s: Case):
    graphdef, params, rest = nnx.split(s.model, nnx.Param, ...)
    grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest), s.x, s.c, s.t))(params)
    jitted = jax.jit(jax.grad(lambda p, x: loss(nnx.merge(graphdef, p, rest), x, s.c, s.t)))(params, s.x)
    return {"grad_params": grads}, {"grad_params": jitted}


def _vmapped(vmap: Callable) -> Callable:
    """Per-example calls through `vmap` (jax.vmap or nnx.vmap)."""

    def run(s: Case):
        one = lambda m, x, c: m(x[None], c[None])[0]  # noqa: E731
        closed = vmap(lambda x, c: one(s.model, x, c))(s.x, s.c)
        passed = vmap(one, in_axes=(None, 0, 0))(s.model, s.x, s.c)
        return {"y": closed}, {"y": passed}

    return run


def _scan(s: Case):
    closed, _ = jax.lax.scan(lambda x, _: (0.5 * x + 0.1 * s.model(x, s.c), None), s.x, length=2)
    graphdef, state = nnx.split(s.model)

    def body(carry, _):
        x, st = carry
        return (0.5 * x + 0.1 * nnx.merge(graphdef, st)(x, s.c), st), None

    (passed, _), _ = jax.lax.scan(body, (s.x, state), length=2)
    return {"loop": closed}, {"loop": passed}


def _fori_loop(s: Case):
    closed = jax.lax.fori_loop(0, 2, lambda i, x: 0.5 * x + 0.1 * s.model(x, s.c), s.x)
    graphdef, state = nnx.split(s.model)
    passed = jax.lax.fori_loop(0, 2, lambda i, x: 0.5 * x + 0.1 * nnx.merge(graphdef, state)(x, s.c), s.x)
    return {"loop": closed}, {"loop": passed}


def _eval_shape(s: Case):
    closed = jax.eval_shape(lambda x, c: s.model(x, c), s.x, s.c)
    passed = jax.eval_shape(lambda m, x, c: m(x, c), s.model, s.x, s.c)
    # Shapes and dtypes against eager, carried as zeros of the abstract result.
    return {"y": jnp.zeros(closed.shape, closed.dtype) + s.ref["y"]}, {"y": jnp.zeros(passed.shape, passed.dtype) + s.ref["y"]}


def _checkpoint(s: Case):
    closed = jax.grad(jax.checkpoint(lambda x: loss(s.model, x, s.c, s.t)))(s.x)
    passed = jax.grad(jax.checkpoint(lambda x, m: loss(m, x, s.c, s.t)))(s.x, s.model)
    return {"grad_x": closed}, {"grad_x": passed}


def _jvp(s: Case):
    _, closed = jax.jvp(lambda x: s.model(x, s.c), (s.x,), (s.t,))
    _, passed = jax.jvp(lambda m, x: m(x, s.c), (s.model, s.x), (jax.tree.map(jnp.zeros_like, s.model), s.t))
    return {"jvp": closed}, {"jvp": passed}


def _linearize(s: Case):
    _, closed = jax.linearize(lambda x: s.model(x, s.c), s.x)
    _, passed = jax.linearize(lambda x, m: m(x, s.c), s.x, s.model)
    return {"jvp": closed(s.t)}, {"jvp": passed(s.t, jax.tree.map(jnp.zeros_like, s.model))}


def _jacfwd(s: Case):
    # d/ds model(x + s t) at s = 0 is the JVP along t: a one-column forward Jacobian.
    closed = jax.jacfwd(lambda step: s.model(s.x + step * s.t, s.c))(0.0)
    passed = jax.jacfwd(lambda step, m: m(s.x + step * s.t, s.c))(0.0, s.model)
    return {"jvp": closed}, {"jvp": passed}


def _export(s: Case):
    b, *rest = export.symbolic_shape("b, " + ", ".join(map(str, s.x.shape[1:])) + ", " + ", ".join(map(str, s.c.shape[1:])))
    x_spec = jax.ShapeDtypeStruct((b, *rest[: s.x.ndim - 1]), jnp.float32)
    c_spec = jax.ShapeDtypeStruct((b, *rest[s.x.ndim - 1 :]), jnp.float32)
    closed = export.export(jax.jit(lambda x, c: s.model(x, c)))(x_spec, c_spec)
    graphdef, state = nnx.split(s.model)
    leaves, treedef = jax.tree.flatten(state)  # serving passes the weights as a flat list
    passed = export.export(jax.jit(lambda w, x, c: nnx.merge(graphdef, jax.tree.unflatten(treedef, w))(x, c)))(
        leaves, x_spec, c_spec
    )
    # Serialized, read back, run at two batch sizes.
    closed, passed = (export.deserialize(e.serialize()) for e in (closed, passed))
    for n in (1, 3):
        xs, cs = jnp.concatenate([s.x] * 2)[:n], jnp.concatenate([s.c] * 2)[:n]
        assert_close(closed.call(xs, cs), s.model(xs, cs), what=f"export at batch {n}")
        assert_close(passed.call(leaves, xs, cs), s.model(xs, cs), what=f"export (weights passed) at batch {n}")
    return {"y": closed.call(s.x, s.c)}, {"y": passed.call(leaves, s.x, s.c)}


def _nnx_jit(s: Case):
    closed = nnx.jit(lambda x, c: s.model(x, c))(s.x, s.c)
    passed = nnx.jit(lambda m, x, c: m(x, c))(s.model, s.x, s.c)
    # Guidance inside nnx.jit: jax.grad w.r.t. the input of a model merged inside the trace.
    guided = nnx.jit(lambda m, x: jax.grad(lambda x: loss(m, x, s.c, s.t))(x))(s.model, s.x)
    assert_close(guided, s.ref["grad_x"], TOL["grad_x"], "jax.grad inside nnx.jit")
    return {"y": closed}, {"y": passed}


def _nnx_grad(s: Case):
    closed = nnx.grad(lambda x: loss(s.model, x, s.c, s.t))(s.x)
    passed = nnx.grad(lambda m: loss(m, s.x, s.c, s.t))(s.model)
    return {"grad_x": closed}, {"grad_params": nnx.state(passed, nnx.Param)}


def _nnx_scan(s: Case):
    step = nnx.scan(lambda x: 0.5 * x + 0.1 * s.model(x, s.c), in_axes=nnx.Carry, out_axes=nnx.Carry, length=2)
    closed = step(s.x)

    def passed_step(carry):
        m, x = carry
        return m, 0.5 * x + 0.1 * m(x, s.c)

    _, passed = nnx.scan(passed_step, in_axes=nnx.Carry, out_axes=nnx.Carry, length=2)((s.model, s.x))
    return {"loop": closed}, {"loop": passed}


def _linen(s: Case):
    cls, kwargs, _ = MODULES[s.kind]
    kwargs = dict(kwargs)

    class Wrapper(nn.Module):  # a Linen codebase holding a flax_sgm module
        @nn.compact
        def __call__(self, x, c):
            return bridge.to_linen(cls, **kwargs, name="inner")(x, c)

    variables = Wrapper().init(jax.random.key(0), s.x, s.c)
    # Give the Linen copy the test's weights, then init / apply / grad through Linen.
    params = nnx.state(s.model, nnx.Param)
    inner = jax.tree.map(lambda meta, p: meta.replace(value=p) if hasattr(meta, "replace") else p,
                         variables["params"]["inner"], nnx.to_pure_dict(params),
                         is_leaf=lambda v: isinstance(v, nn.meta.AxisMetadata))
    variables = {"params": {"inner": inner}}
    y = Wrapper().apply(variables, s.x, s.c)
    grad_x = jax.grad(lambda x: (Wrapper().apply(variables, x, s.c) * s.t).sum())(s.x)
    return {"y": y}, {"grad_x": grad_x}


TRANSFORMS: dict[str, Callable] = {
    "jax.jit": _jit,
    "jax.grad-input": _grad_input,
    "jax.grad-params": _grad_params,
    "jax.vmap": _vmapped(jax.vmap),
    "lax.scan": _scan,
    "lax.fori_loop": _fori_loop,
    "jax.eval_shape": _eval_shape,
    "jax.checkpoint": _checkpoint,
    "jax.jvp": _jvp,
    "jax.linearize": _linearize,
    "jax.jacfwd": _jacfwd,
    "jax.export-symbolic-batch": _export,
    "nnx.jit": _nnx_jit,
    "nnx.grad": _nnx_grad,
    "nnx.vmap": _vmapped(nnx.vmap),
    "nnx.scan": _nnx_scan,
    "nnx.bridge.to_linen": _linen,
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_transform_matches_eager(case: Case, transform: str):
    eager_y = case.model(case.x, case.c)  # and the module still works eagerly after every transform
    assert_close(eager_y, case.ref["y"], what="eager")
    closed, passed = TRANSFORMS[transform](case)
    for style, results in (("closed over", closed), ("passed in", passed)):
        for name, value in results.items():
            assert_close(value, case.ref[name], TOL[name], f"{transform}, model {style}: {name}")
    assert_close(case.model(case.x, case.c), eager_y, 0.0, "eager after the transform")


@pytest.mark.parametrize("kind", ["SpatialTransformer", "BasicTransformerBlock"])
def test_export_with_symbolic_spatial_sizes_runs_at_every_size(kind):
    model = build(kind)
    if kind == "SpatialTransformer":
        b, h, w = export.symbolic_shape("b, h, w")
        spec = jax.ShapeDtypeStruct((b, h, w, 32), jnp.float32)
        sizes = [(1, 3, 5), (2, 4, 4), (3, 7, 2), (1, 40, 30)]  # the last: 1200 tokens, several chunks
    else:
        b, n = export.symbolic_shape("b, n")
        spec = jax.ShapeDtypeStruct((b, n, 32), jnp.float32)
        sizes = [(1, 1), (2, 15), (1, 1100)]
    c_spec = jax.ShapeDtypeStruct((b, 5, 24), jnp.float32)
    exported = export.export(jax.jit(lambda x, c: model(x, c)))(spec, c_spec)
    rng = np.random.default_rng(0)
    for size in sizes:
        x = jnp.asarray(rng.standard_normal((*size, 32)), jnp.float32)
        c = jnp.asarray(rng.standard_normal((size[0], 5, 24)), jnp.float32)
        assert_close(exported.call(x, c), model(x, c), what=f"exported at {size}")


def _spatial_transformer(hw: int, *, xla: bool = False, seed: int = 0):
    """A default-built SpatialTransformer (checkpointing on) with every weight random, and its inputs.

    77 context tokens; `hw` x `hw` pixels: 16 x 16 is one 256-query block, 24 x 24 crosses the chunk edge.
    """
    model = flax_sgm.SpatialTransformer(64, 2, 32, context_dim=48, sdp_backend="xla" if xla else None, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)]))
    rng = np.random.default_rng(seed)
    x, dx = (jnp.asarray(rng.standard_normal((2, hw, hw, 64)), jnp.float32) for _ in range(2))
    c, dc = (jnp.asarray(rng.standard_normal((2, 77, 48)), jnp.float32) for _ in range(2))
    return model, (x, c), (dx, dc)


FORWARD_MODES = {
    "jax.jvp": lambda f, at, along: jax.jvp(f, at, along)[1],
    "jax.linearize": lambda f, at, along: jax.linearize(f, *at)[1](*along),
    # d/ds f(at + s along) at s = 0: a one-column forward Jacobian.
    "jax.jacfwd": lambda f, at, along: jax.jacfwd(lambda s: f(*(a + s * t for a, t in zip(at, along))))(0.0),
}


@pytest.mark.parametrize("hw", [16, 24], ids=["256-tokens", "576-tokens"])
@pytest.mark.parametrize("varying", ["x", "x+context"], ids=["context-fixed", "all-varying"])
@pytest.mark.parametrize("mode", list(FORWARD_MODES))
def test_forward_mode_above_one_chunk(mode, varying, hw):
    """Forward mode on the model closed over in jax.jit, the context held fixed (the user's case, as in
    consistency-model training) and varying, against the XLA-attention twin and a float64 central difference."""
    model, (x, c), (dx, dc) = _spatial_transformer(hw)
    twin, *_ = _spatial_transformer(hw, xla=True)
    if varying == "x":
        at, along, f, g = (x,), (dx,), (lambda x: model(x, c)), (lambda x: twin(x, c))
    else:
        at, along, f, g = (x, c), (dx, dc), model, twin
    derivative = FORWARD_MODES[mode]
    got = jax.jit(lambda *t: derivative(f, at, t))(*along)
    assert_close(got, derivative(g, at, along), TOL["jvp"], f"{mode} against the XLA backend")

    with jax.enable_x64(True):
        model64 = nnx.clone(model)
        nnx.update(model64, jax.tree.map(lambda p: p.astype(jnp.float64), nnx.state(model64, nnx.Param)))
        at64, along64 = ([jnp.asarray(a, jnp.float64) for a in args] for args in (at, along))
        h = 1e-4
        plus, minus = ([a + s * h * t for a, t in zip(at64, along64)] for s in (1, -1))
        call = (lambda x: model64(x, jnp.asarray(c, jnp.float64))) if varying == "x" else model64
        finite_difference = (call(*plus) - call(*minus)) / (2 * h)
        assert_close(got, finite_difference, FD_TOL, f"{mode} against a float64 central difference")


# The whole UNet in the same programs: a tiny SDXL-style UNet (vector y, attention at one level, depth 2),
# built with its defaults (checkpointing on), every weight random; each program closed over and passed in.
def _unet():
    config = flax_sgm.UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), transformer_depth=(0, 2),
        num_head_channels=16, context_dim=24, use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=16,
    )
    unet = flax_sgm.UNetModel(config, rngs=nnx.Rngs(0))
    params = nnx.state(unet, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
    nnx.update(unet, jax.tree.map(lambda p: 0.2 * jax.random.normal(next(keys), p.shape), params))
    rng = np.random.default_rng(0)
    x, v = (jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32) for _ in range(2))
    t = jnp.asarray([10.0, 700.0])
    c = jnp.asarray(rng.standard_normal((2, 7, 24)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((2, 16)), jnp.float32)
    return unet, x, v, (t, c, y)


@pytest.fixture(scope="module")
def unet_case():
    unet, x, v, cond = _unet()
    graphdef, params, rest = nnx.split(unet, nnx.Param, ...)
    loss = lambda p, x: (nnx.merge(graphdef, p, rest)(x, *cond) * v).sum()  # noqa: E731
    grad_params, grad_x = jax.grad(loss, argnums=(0, 1))(params, x)
    ref = dict(y=unet(x, *cond), grad_x=grad_x, grad_params=grad_params, jvp=jax.jvp(lambda x: unet(x, *cond), (x,), (v,))[1])
    return unet, x, v, cond, ref


def _unet_programs(unet, x, v, cond):
    t, c, y = cond
    graphdef, state = nnx.split(unet)
    merged = lambda st: nnx.merge(graphdef, st)  # noqa: E731
    step = lambda m, x: x - 0.1 * m(x, t, c, y)  # noqa: E731
    return {
        "jax.jit": lambda: (("y", jax.jit(lambda x: unet(x, t, c, y))(x)), ("y", jax.jit(lambda m, x: m(x, t, c, y))(unet, x))),
        "jax.grad-input": lambda: (("grad_x", jax.grad(lambda x: (unet(x, t, c, y) * v).sum())(x)),
                                   ("grad_x", jax.jit(jax.grad(lambda x, st: (merged(st)(x, t, c, y) * v).sum()))(x, state))),
        "jax.vmap": lambda: (("y", jax.vmap(lambda *a: unet(*(b[None] for b in a))[0])(x, t, c, y)),
                             ("y", jax.vmap(lambda m, *a: m(*(b[None] for b in a))[0], in_axes=(None, 0, 0, 0, 0))(unet, x, t, c, y))),
        "lax.scan": lambda: (("y", (jax.lax.scan(lambda x, _: (step(unet, x), None), x, length=1)[0] - x) / -0.1),
                             ("y", (jax.lax.scan(lambda x, _: (step(merged(state), x), None), x, length=1)[0] - x) / -0.1)),
        "jax.jvp": lambda: (("jvp", jax.jvp(lambda x: unet(x, t, c, y), (x,), (v,))[1]),
                            ("jvp", jax.jit(lambda st, x: jax.jvp(lambda x: merged(st)(x, t, c, y), (x,), (v,))[1])(state, x))),
    }


# vmap and scan recompile the whole UNet; they run under -m slow to keep CI's time.
@pytest.mark.parametrize(
    "transform",
    ["jax.jit", "jax.grad-input", "jax.jvp", pytest.param("jax.vmap", marks=pytest.mark.slow), pytest.param("lax.scan", marks=pytest.mark.slow)],
)
def test_unet_transform_matches_eager(unet_case, transform):
    unet, x, v, cond, ref = unet_case
    for style, (name, value) in zip(("closed over", "passed in"), _unet_programs(unet, x, v, cond)[transform]()):
        tol = REORDERED if name == "y" else criteria.REORDERED_GRAD
        # scan's step is recovered from x - 0.1 * y: its rounding is x's, relative to y's scale
        tol = max(tol, 1e-5) if transform == "lax.scan" else tol
        assert_close(value, ref[name], tol, f"UNet {transform}, model {style}: {name}")


def test_unet_export_with_a_symbolic_batch_and_an_nnx_training_step(unet_case):
    unet, x, v, (t, c, y), ref = unet_case
    b = export.symbolic_shape("b")[0]
    specs = [jax.ShapeDtypeStruct((b, *a.shape[1:]), a.dtype) for a in (x, t, c, y)]
    exported = export.deserialize(export.export(jax.jit(lambda *a: unet(*a)))(*specs).serialize())
    for n in (1, 2):
        assert_close(exported.call(x[:n], t[:n], c[:n], y[:n]), ref["y"][:n], REORDERED, f"exported UNet at batch {n}")

    model = nnx.clone(unet)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
        grads = nnx.grad(lambda m: (m(x, t, c, y) * v).sum())(model)
        optimizer.update(model, grads)

    train_step(model, optimizer)
    updated = jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(unet, nnx.Param), ref["grad_params"])
    assert_close(nnx.state(model, nnx.Param), updated, criteria.REORDERED_GRAD, "UNet nnx.jit SGD step")
