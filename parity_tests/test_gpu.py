"""GPU-only checks: cuDNN is really used, bf16 error no worse than torch's, fp32 parity at full precision.

Skipped without a CUDA GPU visible to both jax and torch. Run on the lent GPU with
`bash bench/gpu_all.sh` (which also runs the benchmarks).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_sgm
import torch_ref
from conftest import assert_parity, compare, flax_twin, nchw_to_nhwc, nhwc_to_nchw, randomize_
from flax_sgm import convert
from flax_sgm.attention_backends import dot_product_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        jax.default_backend() != "gpu" or not torch.cuda.is_available(),
        reason="needs a CUDA GPU visible to both jax and torch (CI and the dev machines have none)",
    ),
]

# bf16 slack over torch's own bf16 error against the float64 reference: different
# (equally valid) bf16 rounding orders in fused kernels; a factor, not an offset.
BF16_SLACK = 1.5


@pytest.mark.parametrize("n,m", [(4096, 4096), (4096, 77), (77, 77)], ids=["self", "cross-77", "odd-both"])
def test_auto_bf16_lowers_to_cudnn_forward_and_backward(n, m):
    q = jnp.ones((2, n, 10, 64), jnp.bfloat16)
    k = v = jnp.ones((2, m, 10, 64), jnp.bfloat16)

    def loss(q, k, v):
        return dot_product_attention(q, k, v, scale=0.125).astype(jnp.float32).sum()

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).as_text()
    assert "__cudnn$fmha" in text  # the cuDNN fused-attention custom calls
    jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))  # and it runs


def float64_reference(t_module, inputs):
    """Forward and input/param gradients of the torch module in float64 on the CPU."""
    ref = t_module.double().cpu()
    ts = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in inputs.items()}
    out = ref(**ts)
    cot = torch.from_numpy(np.random.default_rng(1).standard_normal(out.shape))
    (out * cot).sum().backward()
    grads = {f"input:{k}": t.grad.numpy() for k, t in ts.items()} | {k: p.grad.numpy() for k, p in ref.named_parameters()}
    return out.detach().numpy(), grads, cot.numpy()


def bf16_errors_torch(t_module, inputs, cot):
    t = t_module.to("cuda", torch.bfloat16)
    for p in t.parameters():
        p.grad = None
    ts = {k: torch.tensor(v).to("cuda", torch.bfloat16).requires_grad_() for k, v in inputs.items()}
    out = t(**ts)
    (out.float() * torch.from_numpy(cot).cuda().float()).sum().backward()
    grads = {f"input:{k}": v.grad.float().cpu().numpy() for k, v in ts.items()}
    grads |= {k: p.grad.float().cpu().numpy() for k, p in t.named_parameters()}
    return out.float().detach().cpu().numpy(), grads


def bf16_errors_flax(f_module, inputs, cot, image):
    xs = {k: jnp.asarray(nchw_to_nhwc(v) if image and k == "x" else v, jnp.bfloat16) for k, v in inputs.items()}
    f_cot = jnp.asarray(nchw_to_nhwc(cot) if image else cot, jnp.float32)

    def loss(m, xs):
        out = m(**xs)
        return (out.astype(jnp.float32) * f_cot).sum(), out

    (_, out), (gm, gx) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(f_module, xs)
    out = np.asarray(out.astype(jnp.float32))
    grads = {f"input:{k}": np.asarray(g.astype(jnp.float32)) for k, g in gx.items()}
    if image:
        out, grads["input:x"] = nhwc_to_nchw(out), nhwc_to_nchw(grads["input:x"])
    grads |= {k: v.astype(np.float32) for k, v in convert.to_torch_state_dict(f_module, gm).items()}
    return out, grads


def worst(errs_a, errs_b, ref):
    """{name: (rel err of a, rel err of b)} against the float64 reference."""

    def rel(a, b):
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))

    return {k: (rel(errs_a[k], ref[k]), rel(errs_b[k], ref[k])) for k in ref}


CASES = {
    "cross-attention": (lambda: torch_ref.CrossAttention(640, 2048, 10, 64), flax_sgm.CrossAttention, (640, 2048, 10, 64), {}, False,
                        lambda r: {"x": r.standard_normal((2, 1024, 640)), "context": r.standard_normal((2, 77, 2048))}),
    "block": (lambda: torch_ref.BasicTransformerBlock(640, 10, 64, context_dim=2048, checkpoint=False), flax_sgm.BasicTransformerBlock,
              (640, 10, 64), dict(context_dim=2048, checkpoint=False), False,
              lambda r: {"x": r.standard_normal((2, 1024, 640)), "context": r.standard_normal((2, 77, 2048))}),
    "single-layer-block": (lambda: torch_ref.BasicTransformerSingleLayerBlock(640, 10, 64, checkpoint=False),
                           flax_sgm.BasicTransformerSingleLayerBlock, (640, 10, 64), dict(checkpoint=False), False,
                           lambda r: {"x": r.standard_normal((2, 1024, 640))}),
    "spatial-transformer": (lambda: torch_ref.SpatialTransformer(640, 10, 64, depth=2, context_dim=2048, use_linear=True, use_checkpoint=False),
                            flax_sgm.SpatialTransformer, (640, 10, 64), dict(depth=2, context_dim=2048, use_linear=True, use_checkpoint=False), True,
                            lambda r: {"x": r.standard_normal((2, 640, 32, 32)), "context": r.standard_normal((2, 77, 2048))}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_error_no_worse_than_torch(case):
    make_torch, flax_cls, args, kwargs, image, make_inputs = CASES[case]
    inputs = {k: v.astype(np.float32) for k, v in make_inputs(np.random.default_rng(0)).items()}
    # Both frameworks and the float64 reference start from the same bf16-rounded weights.
    bf16_state = {k: v.to(torch.bfloat16) for k, v in randomize_(make_torch(), seed=0).state_dict().items()}

    def torch_module():
        t = make_torch()
        t.load_state_dict({k: v.float() for k, v in bf16_state.items()})
        return t

    f = nnx.eval_shape(lambda: flax_cls(*args, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, **kwargs))
    convert.load_torch_state_dict(f, bf16_state)
    ref_out, ref_grads, cot = float64_reference(torch_module(), inputs)
    t_out, t_grads = bf16_errors_torch(torch_module(), inputs, cot)
    f_out, f_grads = bf16_errors_flax(f, inputs, cot, image)
    errs = worst({"out": f_out} | f_grads, {"out": t_out} | t_grads, {"out": ref_out} | ref_grads)
    print(f"\n{case}: worst (flax, torch) bf16 rel err vs float64:", max(errs.items(), key=lambda kv: kv[1][0]))
    bad = {k: v for k, v in errs.items() if v[0] > BF16_SLACK * v[1]}
    assert not bad, bad


def test_fp32_gpu_matches_torch_at_full_precision(rng):
    """flax_sgm in fp32 on the GPU, matmuls pinned to full precision (no TF32), against torch's exact fp32.

    torch runs on the CPU, where fp32 is exact with no TF32 switch to forget.
    """
    with jax.default_matmul_precision("highest"):
        t = randomize_(torch_ref.SpatialTransformer(64, 4, 16, depth=2, context_dim=32, use_linear=True), seed=3)
        f = flax_twin(t, flax_sgm.SpatialTransformer, 64, 4, 16, depth=2, context_dim=32, use_linear=True)
        x = rng.standard_normal((2, 64, 9, 7)).astype(np.float32)
        ctx = rng.standard_normal((2, 11, 32)).astype(np.float32)
        result = compare(t, f, {"x": x, "context": ctx}, image_inputs=("x",), image_output=True)
        assert_parity(result, "SpatialTransformer (GPU fp32)")
