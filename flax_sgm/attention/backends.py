"""The one attention function: dispatch, masks, cuDNN padding, and the scopes a trace can set.

Every attention in flax_sgm calls `dot_product_attention`. It takes
q [b, n, heads, head_dim], k and v [b, m, heads, head_dim], and an optional mask that
broadcasts to [b, heads, n, m] as torch SDPA broadcasts it: boolean (True keeps a
key) or float (added to the scaled logits). A query row with every key masked
gives zeros, as torch SDPA does.

Backends:
  "xla"      jax.nn.dot_product_attention(implementation="xla"): the full logits.
  "cudnn"    cuDNN fused attention (CUDA GPU, bf16/fp16). Odd lengths are padded to
             even and hidden with query/key_value_seq_lengths, masks are broadcast
             to full size, so forward and backward both run.
  "chunked"  flax_sgm.attention.chunked: an online softmax over key blocks in pure JAX,
             memory linear in sequence length, any dtype, jax.grad and jax.jvp alike.
  "auto"     one of the three, chosen by flax_sgm.attention.policy.choose_backend: a
             pure function of the platform, dtype, sizes, mask and forward mode.

What the policy is told comes from the call's arrays, plus three things a trace
cannot see in them, each a public scope (exported from flax_sgm):
  `target_platform(p)`       choose for platform p (lowering for CUDA on a CPU machine);
  `forward_mode_scope(True)` forward-mode AD is traced outside a JAX boundary that
                             hides it (jax.vmap, lax.scan, your own jax.jit);
  `record_attention_calls()` collect what each call ran, and why.
Under a mesh with a sequence axis (flax_sgm.sharding.use_mesh) the entry point hands
`local_attention`, which never looks at the mesh, to `sharding.sequence_parallel_attention`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
# jax.interpreters.ad is JAX's public module for primitive authors: a jax.jvp trace hands a function
# JVPTracers. cuDNN attention has a VJP only, so forward mode is seen here (test_lowering's jvp tests fail
# if JAX changes this).
from jax.interpreters.ad import JVPTracer

from flax_sgm import sharding

from flax_sgm.nn import numerics
from flax_sgm.attention.policy import (CUDNN_MAX_HEAD_DIM, CUDNN_MAX_HEAD_DIM_BEFORE_HOPPER, MASK_VALUE,
                                      AttentionProblem, Backend, choose_backend)
from flax_sgm.attention.chunked import chunked_attention

_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("flax_sgm_target_platform", default=None)
_FORWARD_MODE: contextvars.ContextVar[bool] = contextvars.ContextVar("flax_sgm_forward_mode", default=False)
_RECORDERS: contextvars.ContextVar[tuple[list, ...]] = contextvars.ContextVar("flax_sgm_attention_recorders", default=())


@contextlib.contextmanager
def target_platform(platform: str):
    """Choose backends for `platform` ("cpu", "gpu", "tpu") instead of jax.default_backend() while tracing."""
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield platform
    finally:
        _TARGET_PLATFORM.reset(token)


def current_platform() -> str:
    return _TARGET_PLATFORM.get() or jax.default_backend()


@functools.cache
def cudnn_max_head_dim() -> int:
    """cuDNN's largest head dim on this machine, as JAX's cuDNN attention checks it while tracing
    (check_compute_capability("9.0") of its default backend): 256 on Hopper or later, else 128."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_compute_capability

        hopper = check_compute_capability("9.0")
    except (ImportError, RuntimeError):  # a JAX without cuDNN attention, or no GPU to ask
        hopper = False
    return CUDNN_MAX_HEAD_DIM if hopper else CUDNN_MAX_HEAD_DIM_BEFORE_HOPPER


def is_forward_mode(*trees) -> bool:
    """True when the arrays are being traced for forward-mode AD (jax.jvp, jax.jacfwd), here or outside a
    trace boundary of ours (remat, shard_map) that said so through `forward_mode_scope`.

    jax.grad and jax.linearize trace with LinearizeTracers instead, so reverse mode is not taken for it.
    """
    return _FORWARD_MODE.get() or any(isinstance(leaf, JVPTracer) for leaf in jax.tree.leaves(trees))


@contextlib.contextmanager
def forward_mode_scope(active: bool):
    """Carry `is_forward_mode` into a function traced anew (jax.checkpoint, shard_map), whose tracers hide it."""
    token = _FORWARD_MODE.set(_FORWARD_MODE.get() or active)
    try:
        yield
    finally:
        _FORWARD_MODE.reset(token)


class AttentionCall(NamedTuple):
    """One dot_product_attention call as traced: what ran and why."""

    backend: str
    reason: str
    problem: AttentionProblem
    padded: tuple[int, int]  # query and key tokens added for cuDNN's even-length rule


@contextlib.contextmanager
def record_attention_calls():
    """Collect an AttentionCall for every attention traced or run inside the block (in call order).

    The record is made when a call is traced: under jit, once per compilation.
    """
    calls: list[AttentionCall] = []
    token = _RECORDERS.set(_RECORDERS.get() + (calls,))
    try:
        yield calls
    finally:
        _RECORDERS.reset(token)


def _record(call: AttentionCall) -> None:
    for calls in _RECORDERS.get():
        calls.append(call)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    scale: float,
    backend: Backend = "auto",
) -> jax.Array:
    """Scaled dot-product attention; [b, n, heads, d] x [b, m, heads, d] -> [b, n, heads, d].

    `mask`: boolean (True keeps a key) or additive, broadcasting to [b, heads, n, m].
    """
    if mask is not None:
        mask = jnp.asarray(mask)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # [b|1, heads|1, n|1, m|1]
    if sharding.sequence_parallel_axis() is not None:
        # The one place sequence parallelism enters: queries split over the mesh's
        # sequence axis, `local_attention` once per shard inside shard_map.
        with forward_mode_scope(is_forward_mode(q, k, v)):
            return sharding.sequence_parallel_attention(local_attention, q, k, v, mask, scale=scale, backend=backend)
    return local_attention(q, k, v, mask, scale=scale, backend=backend)


def local_attention(q, k, v, mask, *, scale: float, backend: Backend) -> jax.Array:
    """Attention over the arrays as they are on this device: choose the backend, record the call, run it.

    `mask` is None or rank 4, [b|1, heads|1, n|1, m|1]. No mesh is consulted here.
    """
    b, n, heads, head_dim = q.shape
    m = k.shape[1]
    problem = AttentionProblem(
        current_platform(), q.dtype, b, heads, n, m, head_dim, mask is not None, is_forward_mode(q, k, v),
        cudnn_max_head_dim(),
    )
    choice = choose_backend(backend, problem)
    padded = (n % 2, m % 2) if choice.backend == "cudnn" else (0, 0)
    _record(AttentionCall(choice.backend, choice.reason, problem, padded))
    bias, row_valid = _mask_to_bias(mask, (b, heads, n, m))
    if choice.backend == "xla":
        out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation="xla")
    elif choice.backend == "cudnn":
        out = padded_attention(q, k, v, bias, scale=scale, implementation="cudnn")
    else:
        out = chunked_attention(q, k, v, bias, scale=scale)
    if row_valid is not None:
        out = jnp.where(row_valid, out, jnp.zeros((), out.dtype))
    return out


def _mask_to_bias(mask, full_shape):
    """A boolean or additive mask [b|1, heads|1, n|1, m|1] as a finite float bias, plus the rows that keep a key.

    An additive mask keeps its gradient (torch SDPA differentiates `attn_mask` too).

    Returns (bias of the mask's shape or None, row_valid [b, n, heads, 1] or None).
    """
    if mask is None:
        return None, None
    if mask.dtype == jnp.bool_:
        keep = mask
        bias = jnp.where(mask, 0.0, MASK_VALUE).astype(jnp.float32)
    else:
        mask = mask.astype(numerics.stats_dtype(mask.dtype))
        keep = jax.lax.stop_gradient(mask) > -jnp.inf
        bias = jnp.maximum(mask, MASK_VALUE)
    row_valid = jnp.any(jnp.broadcast_to(keep, full_shape), axis=-1, keepdims=True)  # [b, heads, n, 1]
    return bias, jnp.transpose(row_valid, (0, 2, 1, 3))


def padded_attention(q, k, v, bias, *, scale, implementation):
    """jax.nn.dot_product_attention with even lengths and a full-size bias (what cuDNN needs).

    Odd query/key lengths are padded by one; the pad is hidden with
    query_seq_lengths / key_value_seq_lengths, so the result is exact. Parametrized
    by `implementation` so the padding logic is tested with "xla" on CPU.
    """
    b, n, heads, _ = q.shape
    m = k.shape[1]
    n_pad, m_pad = n % 2, m % 2

    def pad(t, amount):
        return jnp.pad(t, ((0, 0), (0, amount), (0, 0), (0, 0))) if amount else t

    q, k, v = pad(q, n_pad), pad(k, m_pad), pad(v, m_pad)
    if bias is not None:
        bias = jnp.broadcast_to(bias, (b, heads, n, m))
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, n_pad), (0, m_pad))).astype(q.dtype)
    lengths = {}
    if n_pad or m_pad:
        # Zeros computed from q, not a constant: under jax.vmap they are batched as q is, which
        # the cuDNN call's batching rule assumes (a constant raised a reshape error there).
        zero = jax.lax.stop_gradient(q[:, 0, 0, 0]).astype(jnp.int32) * 0  # [b]
        lengths = dict(query_seq_lengths=zero + n, key_value_seq_lengths=zero + m)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation=implementation, **lengths)
    return out[:, :n]
