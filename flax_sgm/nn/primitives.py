"""Primitives: the layers every tier uses (Linear, Conv, LayerNorm, GroupNorm, Embed), GEGLU and FeedForward.

Each layer takes keyword-only `rngs`, `dtype` (compute) and `param_dtype` (storage),
and the logical axis names of its parameters (`axes`: in and out features; `axis`:
normalized features), which sharding.RULES maps onto a mesh. The layers subclass flax's (Linear
and Conv set only their parameters; flax's other attributes are class constants). Numerical choices
that differ between torch and flax come from `numerics`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as flax_dtypes
from jax.custom_derivatives import SymbolicZero

from flax_sgm.errors import AbstractModelError
from flax_sgm.nn import numerics
from flax_sgm.nn.checks import expect_equal
from flax_sgm.sharding import constrain, param_metadata

Dtype = Any
Axes = tuple[str | None, str | None]

# Building a model for a loader to fill needs its tree and shapes only: under `shapes_only()` every layer's
# initializers return ShapeDtypeStructs, so nothing is computed or allocated (and nothing is traced, which
# nnx.eval_shape would do for every initializer).
_SHAPES_ONLY = contextvars.ContextVar("shapes_only", default=False)


@contextlib.contextmanager
def shapes_only():
    token = _SHAPES_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPES_ONLY.reset(token)


def _shape_of(key, shape, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


class _NoKeys:
    """The `rngs` a flax layer draws its parameter keys from under `shapes_only()`: none, as the shape-only
    initializers ignore keys. A real stream would run two RNG ops per parameter (on SD 1.5's UNet 686 fold_ins,
    0.1 s, and 0.1 s more to compile them in a fresh process) for keys nothing reads."""

    def params(self) -> None:
        return None


class LazyRngs:
    """nnx.Rngs(seed), made when a layer first needs it: an abstract model draws no parameter keys, so only dropout
    (rate > 0) asks, and most released models have none. (Making one compiles two ops, 0.04 s of a fresh process.)"""

    def __init__(self, seed: int):
        self.seed, self._rngs = seed, None

    def __call__(self) -> nnx.Rngs:
        if self._rngs is None:
            self._rngs = nnx.Rngs(self.seed)
        return self._rngs


def _real(rngs: nnx.Rngs | LazyRngs) -> nnx.Rngs:
    return rngs() if isinstance(rngs, LazyRngs) else rngs


def initializers(rngs: nnx.Rngs | LazyRngs, *names: str) -> dict:
    """A flax layer's `rngs` and initializer arguments `names`: shape-only ones and no keys under `shapes_only()`;
    else `rngs` and flax's initializers."""
    return {"rngs": _NoKeys(), **dict.fromkeys(names, _shape_of)} if _SHAPES_ONLY.get() else {"rngs": _real(rngs)}


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """y + bias (over the last axis) in float32, rounded once: its gradient is summed in float32 as torch does.

    In bf16, XLA sums the bias gradient over every token in bf16: 3-4x torch's error.
    """
    return numerics.in_float32(jnp.add, y, bias)


def with_bias(op, x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """op(x, kernel) + bias over the last axis, accumulated in float32 and rounded once, as torch's fused CPU
    kernels (oneDNN) do: rounding the product and then the sum made a bf16 conv's error 1.4x torch's.

    `op(x, kernel, preferred_element_type=None)` is linear in each argument (a matmul, a convolution). The
    tangent runs `op` in the compute dtype, so the backward pass (its transpose) keeps bf16 matmuls and
    convolutions, as torch's does; the bias gradient is summed in float32 (add_bias). In float32 this is
    op(x, kernel) + bias.
    """
    acc = numerics.stats_dtype(x.dtype)

    @jax.custom_jvp
    def biased(x, kernel, bias):
        return (op(x, kernel, preferred_element_type=acc) + bias.astype(acc)).astype(x.dtype)

    def tangent(primals, tangents):
        x, kernel, bias = primals
        tx, tk, tb = (None if isinstance(t, SymbolicZero) else t for t in tangents)
        terms = ([op(tx, kernel)] if tx is not None else []) + ([op(x, tk)] if tk is not None else [])
        out = biased(x, kernel, bias)
        t = sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out)
        return out, t if tb is None else add_bias(t, tb)

    biased.defjvp(tangent, symbolic_zeros=True)
    return biased(x, kernel, bias)


def filled(layer: nnx.Module, param: nnx.Variable) -> nnx.Variable:
    """`param`, checked to hold an array: an abstract model's (models.abstract) holds a ShapeDtypeStruct, which
    called would fail deep inside flax with a TypeError on ShapeDtypeStruct."""
    value = param.get_value()
    if isinstance(value, jax.ShapeDtypeStruct):
        raise AbstractModelError(f"its {type(layer).__name__} {list(value.shape)}")
    return param


def _dense(layer: _Projection, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x @ kernel [in, out] over the last axis, plus the layer's bias; compute dtype as flax's layers."""
    bias = None if layer.bias is None else layer.bias[...]
    x, kernel, bias = layer.promote_dtype((x, kernel, bias), dtype=layer.dtype)

    def matmul(x, kernel, preferred_element_type=None):
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        return jax.lax.dot_general(x, kernel, dims, precision=layer.precision, preferred_element_type=preferred_element_type)

    return matmul(x, kernel) if bias is None else with_bias(matmul, x, kernel, bias)


def adapted(layer: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
    """`y`, the layer's output for `x`, plus what each of the layer's adapters adds (flax_sgm.lora sets
    `layer.adapters`, name -> a module called as adapter(layer, x)); a layer without adapters is untouched."""
    for adapter in getattr(layer, "adapters", {}).values():
        y = y + adapter(layer, x)
    return y


_KERNEL_INIT, _BIAS_INIT = nnx.initializers.lecun_normal(), nnx.initializers.zeros_init()  # flax's Linear/Conv defaults


class _Projection:
    """What Linear and Conv share: flax's nnx.Linear/nnx.Conv parameters (`kernel`, `bias`) and initializers
    (lecun normal, zeros; drawn in the same order), set by `_init_weights` instead of flax's constructor. NNX checks
    every attribute set on a module (flax's constructors set 11 and 19): here only the parameters and `dtype` are
    set; flax's other attributes are class constants or views of the parameters, so a layer still reads as
    flax's (isinstance, `use_bias`, `param_dtype`, ...). Building SD 1.5's UNet for a loader got 0.06 s faster
    (BENCHMARKS.md), and every graph walk (nnx.split, nnx.state) shorter."""

    precision = None  # jax.lax's default, as flax's layers
    preferred_element_type = None
    promote_dtype = staticmethod(flax_dtypes.promote_dtype)
    kernel_init, bias_init = _KERNEL_INIT, _BIAS_INIT

    def _init_weights(self, kernel_shape: tuple[int, ...], *, axes: tuple, use_bias: bool, rngs: nnx.Rngs,
                      dtype: Dtype, param_dtype: Dtype) -> None:
        init = {"kernel_init": _KERNEL_INIT, "bias_init": _BIAS_INIT} | initializers(rngs, "kernel_init", "bias_init")
        keys = init["rngs"]
        self.kernel = nnx.Param(init["kernel_init"](keys.params(), kernel_shape, param_dtype), **param_metadata(*axes))
        self.bias = nnx.Param(init["bias_init"](keys.params(), kernel_shape[-1:], param_dtype),
                              **param_metadata(axes[-1])) if use_bias else nnx.data(None)
        self.dtype = dtype

    @property
    def in_features(self) -> int:
        return self.kernel.shape[-2]

    @property
    def out_features(self) -> int:
        return self.kernel.shape[-1]

    @property
    def use_bias(self) -> bool:
        return self.bias is not None

    @property
    def param_dtype(self):
        return self.kernel.dtype


class Linear(_Projection, nnx.Linear):
    """torch.nn.Linear; the kernel is stored [in, out] (torch: weight [out, in]).

    `axes`: the logical names of the in and out features (sharding.RULES maps them onto a mesh).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: Axes,
        use_bias: bool = True,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        self._init_weights((in_features, out_features), axes=axes, use_bias=use_bias, rngs=rngs, dtype=dtype,
                           param_dtype=param_dtype)

    dot_general = staticmethod(jax.lax.dot_general)

    def __call__(self, x: jax.Array) -> jax.Array:
        return adapted(self, x, _dense(self, x, filled(self, self.kernel)[...]))


class Conv(_Projection, nnx.Conv):
    """torch.nn.Conv2d(kernel_size, stride, padding) on channels-last input; kernel [k, k, in, out].

    `padding` defaults to k // 2 on every side (torch's padding=1 for a 3x3); a pair of pairs
    ((top, bottom), (left, right)) for an asymmetric one. `axes`: the logical names of the in and out channels.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        kernel_size: int,
        axes: Axes,
        strides: int = 1,
        padding: int | tuple[tuple[int, int], tuple[int, int]] | None = None,
        use_bias: bool = True,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        pad = kernel_size // 2 if padding is None else padding
        if isinstance(pad, str):
            raise ValueError(f"Conv: padding={pad!r}: torch's padding, an int or ((top, bottom), (left, right))")
        self._init_weights((kernel_size, kernel_size, in_features, out_features), axes=(None, None, *axes),
                           use_bias=use_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.strides = (strides, strides)
        self.padding = ((pad, pad), (pad, pad)) if isinstance(pad, int) else tuple(map(tuple, pad))

    input_dilation = kernel_dilation = feature_group_count = 1
    mask = None
    conv_general_dilated = staticmethod(jax.lax.conv_general_dilated)

    @property
    def kernel_size(self) -> tuple[int, int]:
        return tuple(self.kernel.shape[:2])

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return tuple(self.kernel.shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        filled(self, self.kernel)
        if self.kernel_size == (1, 1) and self.strides == (1, 1) and self.padding == ((0, 0), (0, 0)):
            # A 1x1 convolution on channels-last input is a matmul over the channel axis.
            return adapted(self, x, _dense(self, x, self.kernel[...][0, 0]))
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)

        def conv(x, kernel, preferred_element_type=None):
            return jax.lax.conv_general_dilated(
                x, kernel, self.strides, self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                precision=self.precision, preferred_element_type=preferred_element_type,
            )

        return adapted(self, x, conv(x, kernel) if bias is None else with_bias(conv, x, kernel, bias))


def _norm_options(axis: str, epsilon: float, rngs, param_dtype) -> dict:
    """flax's norm arguments for torch's numbers: exact variance, statistics in the dtype in_float32 gives the
    input (float32, or float64 for float64), the parameters' logical axis."""
    return dict(epsilon=epsilon, use_fast_variance=numerics.USE_FAST_VARIANCE, dtype=None, param_dtype=param_dtype,
                scale_metadata=param_metadata(axis), bias_metadata=param_metadata(axis),
                **initializers(rngs, "scale_init", "bias_init"))


class _InFloat32:
    """A flax norm computed in float32 and rounded once to `out_dtype` (None: the input's dtype promoted with the
    parameters'), as torch normalizes bf16."""

    def __call__(self, x: jax.Array) -> jax.Array:
        filled(self, self.scale)
        out_dtype = self.out_dtype or jnp.result_type(x.dtype, self.param_dtype)
        return numerics.in_float32(super().__call__, x, out_dtype=out_dtype)


class LayerNorm(_InFloat32, nnx.LayerNorm):
    """torch.nn.LayerNorm(dim): eps 1e-5 (flax's default is 1e-6), exact variance; `axis`: the features' logical name.

    `epsilon`: a model whose config says another (transformers' `layer_norm_eps`). Computed in float32 (float64 for
    float64 inputs) and rounded once to `dtype` (None: the input's dtype promoted with the parameters'), as torch
    normalizes bf16.
    """

    def __init__(
        self,
        dim: int,
        *,
        axis: str = "embed",
        epsilon: float = numerics.LAYER_NORM_EPS,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        super().__init__(dim, **_norm_options(axis, epsilon, rngs, param_dtype))
        self.out_dtype = dtype


class GroupNorm(_InFloat32, nnx.GroupNorm):
    """The seed's Normalize: GroupNorm, 32 groups, eps 1e-6, exact variance, affine; channels-last.

    `axis`: the channels' logical name; `epsilon`: sgm's UNet uses torch's 1e-5
    (numerics.UNET_GROUP_NORM_EPS); `num_groups`: the seed's Normalize argument (diffusers' norm_num_groups).
    Computed in float32 and rounded once, as LayerNorm.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        axis: str = "channels",
        epsilon: float = numerics.GROUP_NORM_EPS,
        num_groups: int = numerics.GROUP_NORM_GROUPS,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        if in_channels % num_groups:
            raise ValueError(
                f"Normalize (GroupNorm): `in_channels` must be divisible by {num_groups} groups; got {in_channels}"
            )
        super().__init__(in_channels, num_groups=num_groups, **_norm_options(axis, epsilon, rngs, param_dtype))
        self.out_dtype = dtype


Normalize = GroupNorm  # the seed's name for it


class Embed(nnx.Embed):
    """torch.nn.Embedding(num, features): a table [num, features] (the same layout as torch's weight), rows by id.

    `axes`: the logical names of the rows and the features. Ids out of range give NaN rows (jnp.take's "fill"
    mode), not a clamped row: a model checks concrete ids before it looks them up.
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        axes: Axes = (None, "embed"),
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        super().__init__(
            num_embeddings,
            features,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_metadata=param_metadata(*axes),
            **initializers(rngs, "embedding_init"),
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        (table,) = self.promote_dtype((filled(self, self.embedding)[...],), dtype=self.dtype, inexact=False)
        return jnp.take(table, ids, axis=0, mode="fill", fill_value=jnp.nan)


def Dropout(rate: float, *, rngs: nnx.Rngs) -> nnx.Dropout:
    """nnx.Dropout holding an RNG stream only when it drops something.

    At rate 0 it keeps no RNG state, so a model without dropout has only
    parameters: remat, jax.jit over split/merged state and sharding see no RNG counters.
    """
    return nnx.Dropout(rate, rngs=_real(rngs) if rate > 0 else None)


def zero_module(module: nnx.Module) -> nnx.Module:
    """Zero out the parameters of a module in place and return it."""
    params = nnx.state(module, nnx.Param)
    nnx.update(module, jax.tree.map(lambda p: p if isinstance(p, jax.ShapeDtypeStruct) else jnp.zeros_like(p), params))
    return module


class GELU(nnx.Module):
    """Linear then exact GELU: the seed's `nn.Sequential(nn.Linear, nn.GELU())`."""

    torch_names = {"proj": "0"}  # nn.Sequential(Linear, GELU)

    def __init__(self, dim_in: int, dim_out: int, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        self.proj = Linear(dim_in, dim_out, axes=("embed", "mlp"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return numerics.gelu(self.proj(x))


class GEGLU(nnx.Module):
    """x * gelu(gate), both halves of one projection (value first, as torch's chunk)."""

    def __init__(self, dim_in: int, dim_out: int, *, rngs: nnx.Rngs, dtype: Dtype = None, param_dtype: Dtype = jnp.float32):
        self.dim_in = dim_in
        self.proj = Linear(dim_in, dim_out * 2, axes=("embed", "mlp"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        expect_equal("GEGLU", "the last axis of `x`", x.shape[-1], self.dim_in)
        x, gate = jnp.split(self.proj(x), 2, axis=-1)
        return x * numerics.gelu(gate)


class FeedForward(nnx.Module):
    """project_in (GELU or GEGLU) -> dropout -> project_out; torch's `net.0`, `net.1`, `net.2`."""

    torch_names = {"project_in": "net.0", "project_out": "net.2"}  # nn.Sequential(in, Dropout, Linear)

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        mult: float = 4,
        glu: bool = False,
        dropout: float = 0.0,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        self.dim = dim
        project_in_cls = GEGLU if glu else GELU
        self.project_in = project_in_cls(dim, inner_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dropout = Dropout(dropout, rngs=rngs)
        self.project_out = Linear(inner_dim, dim_out, axes=("mlp", "embed"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        expect_equal("FeedForward", "the last axis of `x`", x.shape[-1], self.dim)
        hidden = constrain(self.project_in(x), ("batch", "length", "mlp"))  # [b, n, inner_dim]
        return self.project_out(self.dropout(hidden))
