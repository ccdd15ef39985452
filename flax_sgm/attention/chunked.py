"""Memory-bounded attention in pure JAX: an online softmax over key blocks, with its forward-mode rule.

Query blocks are mapped, key blocks scanned; peak memory is O(chunk ** 2) logits
per (batch, head). Forward-mode AD has its own rule (`_attend_block_jvp`) and
reverse mode is that rule's transpose, recomputing each block from the saved
log-sum-exp, so jax.jvp and jax.grad both stay linear in the sequence length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from flax_sgm.attention import policy as attention_policy

from flax_sgm.nn import numerics
from flax_sgm.attention.policy import ATTENTION_STATS, MASK_VALUE, is_static


def chunked_attention(q, k, v, bias=None, *, scale, chunk_size: int | None = None):
    """Memory-bounded attention: query blocks mapped, key blocks scanned with an online softmax.

    Peak memory is O(chunk_size ** 2) logits per (batch, head); the backward pass
    recomputes each block from the saved log-sum-exp instead of storing logits.
    `bias` is float and broadcasts to [b, heads, n, m]. Statistics are float32, or
    float64 for float64 inputs. `chunk_size` defaults to attention_policy.CHUNK_SIZE as it is at the call.
    """
    chunk_size = chunk_size or attention_policy.CHUNK_SIZE
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
    f32 = numerics.stats_dtype(q.dtype)

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
    f32 = numerics.stats_dtype(q.dtype)
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
