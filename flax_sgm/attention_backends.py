"""The one attention function, and where its backend is chosen.

Every attention in flax_sgm calls `dot_product_attention`. It takes
q [b, n, heads, d_head], k and v [b, m, heads, d_head], and an optional mask that
broadcasts to [b, heads, n, m] as torch SDPA broadcasts it: boolean (True keeps a
key) or float (added to the scaled logits). A query row with every key masked
gives zeros, as torch SDPA does.

Backends:
  "xla"      jax.nn.dot_product_attention(implementation="xla"): the full logits.
  "cudnn"    cuDNN fused attention (CUDA GPU, bf16/fp16). Odd lengths are padded to
             even and hidden with query/key_value_seq_lengths, masks are broadcast
             to full size, so forward and backward both run.
  "chunked"  online softmax over key blocks in pure JAX, with a forward-mode rule whose
             transpose recomputes each block: memory linear in sequence length, any
             dtype, jax.grad and jax.jvp alike.
  "auto"     `select_backend` picks one of the three (a pure function of the
             platform, dtype, shapes and mask, tested on CPU).

The seed's names map onto these in `resolve_backend`.

`dot_product_attention` is the entry point; `local_attention` is the attention on
one device's arrays. Under a mesh with a sequence axis (flax_sgm.sharding) the entry
point hands `local_attention` to `sharding.sequence_parallel_attention`, which runs
it once per shard; otherwise it calls `local_attention` directly.

The platform the choice is made for is `jax.default_backend()`, or the one set by
`target_platform(...)` (the single override: lowering for CUDA on a CPU machine).
`record_attention_calls()` collects what each call really ran, and why.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.interpreters.ad import JVPTracer

from flax_sgm import numerics, sharding

Backend = Literal["auto", "xla", "cudnn", "chunked"]
BACKENDS = ("auto", "xla", "cudnn", "chunked")

# The seed's torch choices (SDPBackend member names, BasicTransformerBlock attn_mode).
SEED_BACKENDS = {
    None: "auto",
    "MATH": "xla",
    "FLASH_ATTENTION": "cudnn",
    "EFFICIENT_ATTENTION": "cudnn",
    "CUDNN_ATTENTION": "cudnn",
    "softmax": "auto",
    "softmax-xformers": "auto",
}

# "auto" leaves the XLA path when its float32 logits would need more than this.
LOGITS_BUDGET_BYTES = 1 << 30
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 256
CHUNK_SIZE = 512
# Masked logits: finite, so a fully masked row stays NaN-free (it is zeroed after).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

# Names given to tensors for the remat policies (remat.CHECKPOINT_POLICIES).
ATTENTION_OUT = "attention_out"  # each attention's output, heads merged [b, n, heads * d_head]
ATTENTION_STATS = "attention_stats"  # what the chunked backward needs: output and log-sum-exp per query

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


def resolve_backend(backend) -> Backend:
    """Map a flax_sgm name, a seed name or a torch SDPBackend member to a backend."""
    if backend in BACKENDS:
        return backend
    key = getattr(backend, "name", backend)  # torch.nn.attention.SDPBackend.MATH -> "MATH"
    if key in SEED_BACKENDS:
        return SEED_BACKENDS[key]
    raise ValueError(
        f"attention backend must be one of {BACKENDS} or a seed name {sorted(k for k in SEED_BACKENDS if k)}; got {backend!r}"
    )


class AttentionProblem(NamedTuple):
    """What backend selection looks at; nothing else."""

    platform: str  # jax.default_backend(): "cpu", "gpu", "tpu"
    dtype: np.dtype
    batch: int
    heads: int
    n: int  # query tokens
    m: int  # key tokens
    d_head: int
    has_mask: bool
    forward_mode: bool = False  # traced for jax.jvp / jax.jacfwd

    @property
    def logits_bytes(self) -> int:
        return self.batch * self.heads * self.n * self.m * 4


def cudnn_unsupported_reason(p: AttentionProblem) -> str | None:
    """Why cuDNN cannot take this problem, or None if it can."""
    if p.platform != "gpu":
        return f"cuDNN attention needs a CUDA GPU; running on {p.platform}"
    if jnp.dtype(p.dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
        return f"cuDNN attention takes bfloat16 or float16; got {jnp.dtype(p.dtype).name}"
    if p.d_head % 8 or p.d_head > CUDNN_MAX_HEAD_DIM:
        return f"cuDNN attention needs a head dim that is a multiple of 8 and <= {CUDNN_MAX_HEAD_DIM}; got {p.d_head}"
    if p.forward_mode:
        return "cuDNN attention has no forward-mode AD (jax.jvp); use backend 'chunked' or 'xla'"
    return None


def is_static(size) -> bool:
    """A concrete size, not a jax.export symbolic dimension."""
    return isinstance(size, (int, np.integer))


class Choice(NamedTuple):
    backend: str  # "xla", "cudnn" or "chunked"
    reason: str  # why, in a few words


def choose_backend(requested: Backend, p: AttentionProblem, *, budget_bytes: int = LOGITS_BUDGET_BYTES) -> Choice:
    """The backend that runs `p` and why: the requested one, or for "auto" the fastest that fits.

    An explicit "cudnn" that cannot run raises ValueError with the reason.
    """
    requested = resolve_backend(requested)
    if requested == "cudnn":
        reason = cudnn_unsupported_reason(p)
        if reason:
            raise ValueError(f"attention backend 'cudnn' cannot run this input: {reason}")
        return Choice("cudnn", "requested")
    if requested != "auto":
        return Choice(requested, "requested")
    if not all(is_static(size) for size in (p.batch, p.heads, p.n, p.m, p.d_head)):
        # A symbolic size (jax.export) cannot be compared with the budget or cuDNN's limits:
        # take the path that is exact and memory-bounded at every size.
        return Choice("chunked", "auto: symbolic sizes; the memory-bounded path holds at every size")
    cudnn_reason = cudnn_unsupported_reason(p)
    if cudnn_reason is None:
        return Choice("cudnn", "auto: cuDNN takes this input")
    if jnp.dtype(p.dtype) == jnp.float64:
        # jax.nn.dot_product_attention's XLA path takes its softmax in float32.
        return Choice("chunked", f"auto: {cudnn_reason}; float64 keeps float64 statistics on the chunked path only")
    if p.logits_bytes > budget_bytes:
        return Choice("chunked", f"auto: {cudnn_reason}; the float32 logits exceed {budget_bytes} bytes")
    # Measured on CPU (BENCHMARKS.md): the chunked path's own backward beats XLA's
    # autodiff of the softmax, except with many query blocks over few keys.
    if p.platform == "cpu" and (p.n <= CHUNK_SIZE or p.m >= CHUNK_SIZE):
        return Choice("chunked", f"auto: {cudnn_reason}; on CPU the chunked path is faster at these lengths")
    return Choice("xla", f"auto: {cudnn_reason}; the logits fit in memory")


def select_backend(requested: Backend, p: AttentionProblem, *, budget_bytes: int = LOGITS_BUDGET_BYTES) -> str:
    """The backend name of `choose_backend`."""
    return choose_backend(requested, p, budget_bytes=budget_bytes).backend


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
    b, n, heads, d_head = q.shape
    m = k.shape[1]
    problem = AttentionProblem(
        current_platform(), q.dtype, b, heads, n, m, d_head, mask is not None, is_forward_mode(q, k, v)
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
        mask = mask.astype(_accumulation_dtype(mask.dtype))
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


def chunked_attention(q, k, v, bias=None, *, scale, chunk_size: int | None = None):
    """Memory-bounded attention: query blocks mapped, key blocks scanned with an online softmax.

    Peak memory is O(chunk_size ** 2) logits per (batch, head); the backward pass
    recomputes each block from the saved log-sum-exp instead of storing logits.
    `bias` is float and broadcasts to [b, heads, n, m]. Statistics are float32, or
    float64 for float64 inputs. `chunk_size` defaults to CHUNK_SIZE as it is at the call.
    """
    chunk_size = chunk_size or CHUNK_SIZE
    b, n, heads, d = q.shape
    m = k.shape[1]
    # A symbolic length (jax.export) takes whole chunks: min() of it cannot be decided.
    bq = min(chunk_size, n) if is_static(n) else chunk_size
    bk = min(chunk_size, m) if is_static(m) else chunk_size
    n_blocks, m_blocks = -(-n // bq), -(-m // bk)
    n_total, m_total = n_blocks * bq, m_blocks * bk

    if bias is None:
        bias = jnp.zeros((1, 1, 1, 1), jnp.float32)
    # Padded keys are masked; padded query rows are computed and dropped.
    key_pad = jnp.where(jnp.arange(m_total) < m, 0.0, MASK_VALUE).astype(jnp.float32)
    if bias.shape[-1] == m:
        bias = jnp.pad(bias, ((0, 0),) * 3 + ((0, m_total - m),), constant_values=MASK_VALUE)
    else:
        bias = bias + key_pad  # [..., m_total]
    q = jnp.pad(q, ((0, 0), (0, n_total - n), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, m_total - m), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, m_total - m), (0, 0), (0, 0)))

    q_blocks = q.reshape(b, n_blocks, bq, heads, d).swapaxes(0, 1)  # [n_blocks, b, bq, heads, d]
    bias_per_query = not is_static(bias.shape[2]) or bias.shape[2] != 1  # else one row for every query
    if bias_per_query:
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, n_total - n), (0, 0)))
        bias_blocks = bias.reshape(*bias.shape[:2], n_blocks, bq, m_total).transpose(2, 0, 1, 3, 4)
        out = jax.lax.map(lambda xs: _attend_block(xs[0], k, v, xs[1], scale, bk), (q_blocks, bias_blocks))
    else:
        out = jax.lax.map(lambda qb: _attend_block(qb, k, v, bias, scale, bk), q_blocks)
    return out.swapaxes(0, 1).reshape(b, n_total, heads, d)[:, :n]


def _accumulation_dtype(dtype) -> np.dtype:
    """Softmax statistics: float32 (numerics.STATS_DTYPE), float64 for float64 inputs (jax_enable_x64)."""
    return jnp.promote_types(dtype, numerics.STATS_DTYPE)


def _key_blocks(t, bk):
    """[b, m, heads, d] -> [m_blocks, b, bk, heads, d]."""
    b, m, heads, d = t.shape
    return t.reshape(b, m // bk, bk, heads, d).swapaxes(0, 1)


def _bias_block(bias, j, bk):
    """The j-th key block of a bias whose last axis is m_total (or 1)."""
    if bias.shape[-1] == 1:
        return bias
    return jax.lax.dynamic_slice_in_dim(bias, j * bk, bk, axis=-1)


# symbolic_zeros: an input without a tangent (k and v from a fixed context, a constant bias)
# arrives as a SymbolicZero and its terms are never built. Instantiated zero tangents were
# a dot against broadcast(0.0), which XLA:CPU's YNNPACK fusion (jaxlib 0.10.2) computed as
# garbage (1e30, -inf) at single-block sizes such as 256 x 256; see test_chunked_jvp.
@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _attend_block(q, k, v, bias, scale, bk):
    return _online_softmax(q, k, v, bias, scale, bk)[0]


def _online_softmax(q, k, v, bias, scale, bk):
    """One query block against every key block: out [b, bq, heads, d] and lse [b, heads, bq]."""
    b, bq, heads, d = q.shape
    f32 = _accumulation_dtype(q.dtype)

    def step(carry, xs):
        running_max, denom, acc = carry
        j, kb, vb = xs
        s = jnp.einsum("bnhd,bmhd->bhnm", q, kb, preferred_element_type=f32) * scale + _bias_block(bias, j, bk)
        new_max = jnp.maximum(running_max, s.max(-1))
        correction = jnp.exp(running_max - new_max)
        p = jnp.exp(s - new_max[..., None])
        denom = denom * correction + p.sum(-1)
        acc = acc * correction[..., None] + jnp.einsum("bhnm,bmhd->bhnd", p, vb.astype(f32))
        return (new_max, denom, acc), None

    init = (
        jnp.full((b, heads, bq), -jnp.inf, f32),
        jnp.zeros((b, heads, bq), f32),
        jnp.zeros((b, heads, bq, d), f32),
    )
    kbs, vbs = _key_blocks(k, bk), _key_blocks(v, bk)
    (running_max, denom, acc), _ = jax.lax.scan(step, init, (jnp.arange(kbs.shape[0]), kbs, vbs))
    out = (acc / denom[..., None]).transpose(0, 2, 1, 3).astype(q.dtype)  # [b, bq, heads, d]
    return out, running_max + jnp.log(denom)


def _is_zero(t) -> bool:
    return isinstance(t, jax.custom_derivatives.SymbolicZero)


@functools.partial(_attend_block.defjvp, symbolic_zeros=True)
def _attend_block_jvp(scale, bk, primals, tangents):
    """Forward-mode rule; reverse mode is its transpose, so one rule serves jax.jvp and jax.grad.

    With P = softmax(S), S = q k^T * scale + bias and dS = (dq k^T + q dk^T) * scale + dbias:
      d out = sum_j [P_j dv_j + (P_j * dS_j) v_j] - c * out,   c = sum_j rowsum(P_j * dS_j).
    Each key block's P_j is recomputed from the saved log-sum-exp inside a checkpointed
    step, so the transpose (the backward pass) also holds one [bq, bk] block at a time:
    reverse-mode memory stays linear in the sequence length. Terms of absent tangents
    (symbolic zeros) are left out, so every combination of q, k, v and bias tangents
    builds only what it needs.
    """
    q, k, v, bias = primals
    dq, dk, dv, dbias = tangents
    out, lse = _online_softmax(q, k, v, bias, scale, bk)
    # Named for remat policies: what the backward needs, so it need not rerun the forward.
    out, lse = checkpoint_name(out, ATTENTION_STATS), checkpoint_name(lse, ATTENTION_STATS)
    if all(_is_zero(t) for t in tangents):
        return out, jax.custom_derivatives.SymbolicZero(jax.typeof(out))
    f32 = _accumulation_dtype(q.dtype)
    has_ds = not (_is_zero(dq) and _is_zero(dk) and _is_zero(dbias))
    # The dot operands: the query block's, and the key blocks' (scanned); tangents only where present.
    primal = ({"q": q}, {"k": k, "v": v})
    tangent = ({} if _is_zero(dq) else {"dq": dq}, {name: t for name, t in (("dk", dk), ("dv", dv)) if not _is_zero(t)})

    @jax.checkpoint
    def step(carry, xs):
        acc, c = carry
        j, (kp, kt) = xs
        # Barriers (primal and tangent apart, so the transpose sees a linear one), so a tangent
        # that is zero without being symbolic (jnp.zeros_like passed by the caller) reaches each
        # dot as a buffer, not as the broadcast(0.0) that XLA:CPU's YNNPACK fusion miscomputes.
        (qp, kp), (qt, kt) = jax.lax.optimization_barrier((primal[0], kp)), jax.lax.optimization_barrier((tangent[0], kt))
        qb, kb = qp | qt, kp | kt
        s = jnp.einsum("bnhd,bmhd->bhnm", qb["q"], kb["k"], preferred_element_type=f32) * scale + _bias_block(bias, j, bk)
        p = jnp.exp(s - lse[..., None])  # [b, heads, bq, bk]
        if "dv" in kb:
            acc = acc + jnp.einsum("bhnm,bmhd->bhnd", p, kb["dv"].astype(f32))
        if has_ds:
            ds = jnp.zeros((), f32)
            if "dq" in qb:
                ds = ds + jnp.einsum("bnhd,bmhd->bhnm", qb["dq"], kb["k"], preferred_element_type=f32) * scale
            if "dk" in kb:
                ds = ds + jnp.einsum("bnhd,bmhd->bhnm", qb["q"], kb["dk"], preferred_element_type=f32) * scale
            if not _is_zero(dbias):
                ds = ds + _bias_block(dbias, j, bk)
            pds = p * ds
            acc = acc + jnp.einsum("bhnm,bmhd->bhnd", pds, kb["v"].astype(f32))
            c = c + pds.sum(-1)
        return (acc, c), None

    b, bq, heads, d = q.shape
    init = (jnp.zeros((b, heads, bq, d), f32), jnp.zeros((b, heads, bq), f32))
    blocks = tuple({name: _key_blocks(t, bk) for name, t in part[1].items()} for part in (primal, tangent))
    xs = (jnp.arange(k.shape[1] // bk), blocks)
    (acc, c), _ = jax.lax.scan(step, init, xs)
    dout = acc - c[..., None] * out.transpose(0, 2, 1, 3).astype(f32) if has_ds else acc
    return out, dout.transpose(0, 2, 1, 3).astype(q.dtype)
