"""Attention alone: flax_sgm's dot_product_attention ("auto") against torch SDPA's default, bf16.

Each JAX figure is many chained iterations inside one jitted program (the output
feeds the next call, so nothing is hoisted or eliminated); torch is timed with
CUDA events. TFLOP/s counts 4*b*heads*n*m*d per forward and 3.5x that for
forward+backward, as ../shared/GPU.md does.

    python bench/attention.py --json attention.json
    python bench/attention.py --shapes 1,256,256,2,64 --iters 5   # a CPU smoke run
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from common import emit, environment, jax_sync, median_ms, torch_median_ms, write_json
from flax_sgm.attention.backends import dot_product_attention
from flax_sgm.attention.policy import AttentionProblem, select_backend

# (b, n, m, heads, d): the shapes measured in ../shared/GPU.md.
SHAPES = [
    (2, 4096, 4096, 10, 64),  # SDXL self-attention
    (2, 4096, 77, 10, 64),  # SDXL cross-attention (odd key length)
    (2, 4096, 4096, 8, 40),  # SD1.5 self-attention
    (1, 17776, 17776, 48, 64),  # CogVideoX-class video
    (2, 8192, 8192, 16, 128),
]


def flax_loops(q, k, v, scale, iters):
    """Jitted programs running `iters` chained forward / forward+backward calls."""

    def attend(q, k, v):
        return dot_product_attention(q, k, v, scale=scale, backend="auto")

    @jax.jit
    def forward(q, k, v):
        return jax.lax.fori_loop(0, iters, lambda _, q: attend(q, k, v).astype(q.dtype), q)

    @jax.jit
    def forward_backward(q, k, v):
        def body(_, qkv):
            q, k, v = qkv
            out, vjp = jax.vjp(attend, q, k, v)
            dq, dk, dv = vjp(out)
            # Every gradient feeds the next step, so none of the backward is dead code.
            return tuple((t + 1e-3 * g).astype(t.dtype) for t, g in zip((q, k, v), (dq, dk, dv)))

        return jax.lax.fori_loop(0, iters, body, (q, k, v))

    return forward, forward_backward


def torch_calls(q, k, v):
    import torch.nn.functional as F

    qt, kt, vt = (t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))  # [b, heads, n, d]

    def forward():
        return F.scaled_dot_product_attention(qt, kt, vt)

    def forward_backward():
        out = F.scaled_dot_product_attention(qt, kt, vt)
        out.backward(out)

    return forward, forward_backward


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", help="b,n,m,heads,d (default: the GPU.md shapes)")
    parser.add_argument("--iters", type=int, default=20, help="iterations per timed program")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    import torch

    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment()
    rows = []
    for b, n, m, heads, d in shapes:
        rng = np.random.default_rng(0)
        draw = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
        q32, k32, v32 = draw(b, n, heads, d), draw(b, m, heads, d), draw(b, m, heads, d)
        q, k, v = (jnp.asarray(t, args.dtype) for t in (q32, k32, v32))
        backend = select_backend(
            "auto", AttentionProblem(jax.default_backend(), q.dtype, b, heads, n, m, d, False)
        )
        fwd, fwd_bwd = flax_loops(q, k, v, d**-0.5, args.iters)
        jax_fwd = median_ms(lambda: fwd(q, k, v), jax_sync, iters=1) / args.iters
        jax_fb = median_ms(lambda: fwd_bwd(q, k, v), jax_sync, iters=1) / args.iters
        t_dtype = getattr(torch, args.dtype)
        tq, tk, tv = (torch.from_numpy(t).to(device, t_dtype) for t in (q32, k32, v32))
        t_fwd_fn, t_fb_fn = torch_calls(tq, tk, tv)
        torch_fwd = torch_median_ms(t_fwd_fn, iters=args.iters)
        torch_fb = torch_median_ms(t_fb_fn, iters=args.iters)
        flops = 4 * b * heads * n * m * d
        rows.append(
            {
                "shape (b,n,m,heads,d)": f"{b},{n},{m},{heads},{d}",
                "flax backend": backend,
                "flax fwd ms": jax_fwd,
                "torch fwd ms": torch_fwd,
                "fwd speedup": torch_fwd / jax_fwd,
                "flax fwd TFLOP/s": flops / jax_fwd / 1e9,
                "flax fwd+bwd ms": jax_fb,
                "torch fwd+bwd ms": torch_fb,
                "fwd+bwd speedup": torch_fb / jax_fb,
                "flax fwd+bwd TFLOP/s": 3.5 * flops / jax_fb / 1e9,
            }
        )
        if args.json:  # after every shape: a run stopped by its time limit keeps what it measured
            write_json(rows, env, args.json)
    emit(rows, env, args.json)


if __name__ == "__main__":
    main()
