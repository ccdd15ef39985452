"""Which attention runs, and why: a pure function of the problem.

`choose_backend(requested, problem)` looks at nothing but its arguments: the
platform, dtype, sizes, whether there is a mask and whether forward-mode AD is
traced (`AttentionProblem`). `resolve_backend` maps the seed's names (torch
SDPBackend members, attn_mode strings) onto flax_sgm's. The constants the kernels
share live here too: the chunk size, the masked-logit value and the names remat
policies save tensors by.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax.numpy as jnp
import numpy as np


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

# "auto" takes the XLA path only while its float32 logits stay under this: a 1024 x 1024 image's VAE
# attention (16,384 pixels, one head: exactly 1 GiB) goes chunked.
LOGITS_BUDGET_BYTES = 1 << 30
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# cuDNN's largest head dim as JAX checks it while tracing: 256 on a GPU of compute capability 9.0 (Hopper) or later,
# 128 on older ones, and 128 where JAX finds no CUDA GPU (lowering for CUDA on a CPU machine).
CUDNN_MAX_HEAD_DIM = 256
CUDNN_MAX_HEAD_DIM_BEFORE_HOPPER = 128
CHUNK_SIZE = 512
# Masked logits: finite, so a fully masked row stays NaN-free (it is zeroed after).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

# Names given to tensors for the remat policies (remat.CHECKPOINT_POLICIES).
ATTENTION_OUT = "attention_out"  # each attention's output, heads merged [b, n, heads * head_dim]
ATTENTION_STATS = "attention_stats"  # what the chunked backward needs: output and log-sum-exp per query


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
    head_dim: int
    has_mask: bool
    forward_mode: bool = False  # traced for jax.jvp / jax.jacfwd
    cudnn_max_head_dim: int = CUDNN_MAX_HEAD_DIM  # the GPU's (backends.cudnn_max_head_dim): 128 before Hopper

    @property
    def logits_bytes(self) -> int:
        return self.batch * self.heads * self.n * self.m * 4


def cudnn_unsupported_reason(p: AttentionProblem) -> str | None:
    """Why cuDNN cannot take this problem, or None if it can."""
    if p.platform != "gpu":
        return f"cuDNN attention needs a CUDA GPU; running on {p.platform}"
    if jnp.dtype(p.dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
        return f"cuDNN attention takes bfloat16 or float16; got {jnp.dtype(p.dtype).name}"
    if p.head_dim % 8 or p.head_dim > p.cudnn_max_head_dim:
        where = "" if p.cudnn_max_head_dim >= CUDNN_MAX_HEAD_DIM else " (no Hopper GPU here)"
        return (f"cuDNN attention needs a head dim that is a multiple of 8 and <= {p.cudnn_max_head_dim}{where}; "
                f"got {p.head_dim}")
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
    if not all(is_static(size) for size in (p.batch, p.heads, p.n, p.m, p.head_dim)):
        # A symbolic size (jax.export) cannot be compared with the budget or cuDNN's limits:
        # take the path that is exact and memory-bounded at every size.
        return Choice("chunked", "auto: symbolic sizes; the memory-bounded path holds at every size")
    cudnn_reason = cudnn_unsupported_reason(p)
    if cudnn_reason is None:
        return Choice("cudnn", "auto: cuDNN takes this input")
    if jnp.dtype(p.dtype) == jnp.float64:
        # jax.nn.dot_product_attention's XLA path takes its softmax in float32.
        return Choice("chunked", f"auto: {cudnn_reason}; float64 keeps float64 statistics on the chunked path only")
    if p.logits_bytes >= budget_bytes:
        return Choice("chunked", f"auto: {cudnn_reason}; the float32 logits need {budget_bytes} bytes or more")
    # Measured on CPU (BENCHMARKS.md): the chunked path's own backward beats XLA's
    # autodiff of the softmax, except with many query blocks over few keys.
    if p.platform == "cpu" and (p.n <= CHUNK_SIZE or p.m >= CHUNK_SIZE):
        return Choice("chunked", f"auto: {cudnn_reason}; on CPU the chunked path is faster at these lengths")
    return Choice("xla", f"auto: {cudnn_reason}; the logits fit in memory")


def select_backend(requested: Backend, p: AttentionProblem, *, budget_bytes: int = LOGITS_BUDGET_BYTES) -> str:
    """The backend name of `choose_backend`."""
    return choose_backend(requested, p, budget_bytes=budget_bytes).backend
