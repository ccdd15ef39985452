"""The attention function's backends on CPU: selection for every branch, the chunked and padded paths vs XLA."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, criteria
from flax_sgm.attention import backends as ab
from flax_sgm.attention import policy as attention_policy
from flax_sgm.attention.policy import AttentionProblem, select_backend
from flax_sgm.attention.chunked import chunked_attention


def problem(platform="gpu", dtype=jnp.bfloat16, b=2, heads=10, n=4096, m=4096, d=64, has_mask=False):
    return AttentionProblem(platform, jnp.dtype(dtype), b, heads, n, m, d, has_mask)


SELECTIONS = {
    # (requested, problem) -> backend
    "auto-gpu-bf16": ("auto", problem(), "cudnn"),
    "auto-gpu-fp16-odd-cross": ("auto", problem(dtype=jnp.float16, m=77), "cudnn"),
    "auto-gpu-masked": ("auto", problem(has_mask=True), "cudnn"),
    "auto-gpu-fp32": ("auto", problem(dtype=jnp.float32, n=1024, m=1024), "xla"),
    "auto-gpu-fp32-long": ("auto", problem(dtype=jnp.float32, b=1, heads=48, n=17776, m=17776), "chunked"),
    "auto-gpu-head-dim-40": ("auto", problem(d=40), "cudnn"),
    "auto-gpu-head-dim-12": ("auto", problem(d=12, n=64, m=64), "xla"),
    "auto-gpu-head-dim-320": ("auto", problem(d=320, n=64, m=64), "xla"),
    "auto-cpu-one-query-block": ("auto", problem(platform="cpu", n=64, m=64), "chunked"),
    "auto-cpu-many-keys": ("auto", problem(platform="cpu", b=1, heads=1, n=2048, m=1024), "chunked"),
    "auto-cpu-many-queries-few-keys": ("auto", problem(platform="cpu", n=4096, m=77), "xla"),
    "auto-cpu-long": ("auto", problem(platform="cpu", dtype=jnp.float32), "chunked"),
    "auto-tpu": ("auto", problem(platform="tpu", n=64, m=64), "xla"),
    "xla-explicit-long": ("xla", problem(platform="cpu", dtype=jnp.float32), "xla"),
    "chunked-explicit": ("chunked", problem(n=8, m=8), "chunked"),
    "cudnn-explicit": ("cudnn", problem(), "cudnn"),
    "seed-math": ("MATH", problem(), "xla"),
    "seed-flash": ("FLASH_ATTENTION", problem(), "cudnn"),
    "seed-efficient": ("EFFICIENT_ATTENTION", problem(), "cudnn"),
    "seed-none": (None, problem(), "cudnn"),
    "seed-xformers-mode": ("softmax-xformers", problem(), "cudnn"),
}


@pytest.mark.parametrize("case", list(SELECTIONS))
def test_select_backend(case):
    requested, p, expected = SELECTIONS[case]
    assert select_backend(requested, p) == expected


def test_budget_is_the_switch_between_xla_and_chunked():
    p = problem(platform="gpu", dtype=jnp.float32, b=1, heads=1, n=1024, m=1024)
    assert select_backend("auto", p, budget_bytes=p.logits_bytes + 1) == "xla"
    assert select_backend("auto", p, budget_bytes=p.logits_bytes) == "chunked"


def test_a_1024_image_vae_attention_goes_chunked_on_gpu():
    """SDXL's VAE at 1024 x 1024: one head of 512 (cuDNN takes 256 at most) over 16,384 pixels, logits exactly
    the budget: the full matrix is never built."""
    p = problem(platform="gpu", dtype=jnp.bfloat16, b=1, heads=1, n=128 * 128, m=128 * 128, d=512)
    assert select_backend("auto", p) == "chunked"


@pytest.mark.parametrize(
    "p,reason",
    [
        (problem(platform="cpu"), "needs a CUDA GPU; running on cpu"),
        (problem(dtype=jnp.float32), "takes bfloat16 or float16; got float32"),
        (problem(d=12), "multiple of 8 and <= 256; got 12"),
    ],
    ids=["cpu", "fp32", "head-dim"],
)
def test_explicit_cudnn_names_why_it_cannot_run(p, reason):
    with pytest.raises(ValueError, match=f"attention backend 'cudnn' cannot run this input: .*{reason}"):
        select_backend("cudnn", p)


def test_a_head_dim_over_128_takes_cudnn_on_hopper_only():
    """SD 1.5's head dim of 160 at its lowest level: cuDNN on Hopper (256 at most), XLA's path before it (128),
    where JAX's cuDNN attention would refuse it while tracing; this machine has no Hopper GPU."""
    sd15 = problem(heads=8, n=64, m=64, d=160)
    assert select_backend("auto", sd15) == "cudnn"
    older = sd15._replace(cudnn_max_head_dim=attention_policy.CUDNN_MAX_HEAD_DIM_BEFORE_HOPPER)
    assert attention_policy.choose_backend("auto", older) == ("xla", "auto: cuDNN attention needs a head dim that is a "
                                                              "multiple of 8 and <= 128 (no Hopper GPU here); got 160; "
                                                              "the logits fit in memory")
    gpu = jax.devices()[0] if jax.default_backend() == "gpu" else None
    hopper = gpu is not None and float(getattr(gpu, "compute_capability", "0")) >= 9.0
    assert ab.cudnn_max_head_dim() == (256 if hopper else 128)


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match=r"attention backend must be one of .*; got 'flash'"):
        select_backend("flash", problem())


def test_torch_sdp_backend_members_map_by_name():
    from torch.nn.attention import SDPBackend

    assert attention_policy.resolve_backend(SDPBackend.MATH) == "xla"
    assert attention_policy.resolve_backend(SDPBackend.FLASH_ATTENTION) == "cudnn"
    assert attention_policy.resolve_backend(SDPBackend.EFFICIENT_ATTENTION) == "cudnn"


def qkv(rng, b=2, n=37, m=29, heads=3, d=8, dtype=np.float32):
    def draw(*shape):
        return jnp.asarray(rng.standard_normal(shape).astype(dtype))

    return draw(b, n, heads, d), draw(b, m, heads, d), draw(b, m, heads, d)


def masks(rng, b, heads, n, m):
    keep = rng.random((b, 1, n, m)) > 0.3
    keep[..., 0] = True
    keep[0, 0, 3] = False  # one fully masked row
    additive = np.where(rng.random((1, heads, 1, m)) > 0.2, rng.standard_normal((1, heads, 1, m)), -np.inf)
    additive[..., 0] = 0.0
    return {"none": None, "bool-b1nm": jnp.asarray(keep), "float-1h1m": jnp.asarray(additive.astype(np.float32))}


def output_and_grads(fn, q, k, v):
    """fn's output and the gradients of <fn(q, k, v), cot> with respect to q, k, v."""
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape).astype(np.float32))
    out, vjp = jax.vjp(fn, q, k, v)
    return [out, *vjp(cot)]


@pytest.mark.parametrize("mask_kind", ["none", "bool-b1nm", "float-1h1m"])
@pytest.mark.parametrize("chunk", [8, 16, 64], ids=["chunk8", "chunk16", "chunk64"])
def test_chunked_matches_xla_forward_and_gradients(chunk, mask_kind, rng, monkeypatch):
    q, k, v = qkv(rng)
    mask = masks(rng, 2, 3, 37, 29)[mask_kind]
    monkeypatch.setattr(attention_policy, "CHUNK_SIZE", chunk)
    scale = 8**-0.5

    def run(backend):
        return output_and_grads(lambda q, k, v: ab.dot_product_attention(q, k, v, mask, scale=scale, backend=backend), q, k, v)

    assert_close(run("chunked"), run("xla"))


def test_chunked_directly_with_long_sequences_is_exact(rng):
    q, k, v = qkv(rng, b=1, n=1500, m=1300, heads=2, d=16)
    out = chunked_attention(q, k, v, scale=0.25, chunk_size=512)
    ref = jax.nn.dot_product_attention(q, k, v, scale=0.25, implementation="xla")
    assert_close([out], [ref])


def test_chunked_memory_is_bounded():
    """The compiled forward+backward of the chunked path never holds [b, heads, n, m] logits."""
    b, n, heads, d = 1, 4096, 2, 32
    spec = jax.ShapeDtypeStruct((b, n, heads, d), jnp.float32)

    def loss(backend):
        return jax.grad(lambda q, k, v: ab.dot_product_attention(q, k, v, scale=0.2, backend=backend).sum(), argnums=(0, 1, 2))

    logits_bytes = b * heads * n * n * 4
    chunked = jax.jit(loss("chunked")).lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes
    xla = jax.jit(loss("xla")).lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes
    assert xla >= logits_bytes  # the full logits are there
    assert chunked < logits_bytes / 4


@pytest.mark.parametrize("n,m", [(37, 29), (36, 77), (7, 8), (1, 1)], ids=["odd-odd", "even-odd", "odd-even", "one-one"])
@pytest.mark.parametrize("mask_kind", ["none", "bool-b1nm", "float-1h1m"])
def test_padded_path_is_exact(n, m, mask_kind, rng):
    """cuDNN's padding (odd lengths to even, hidden by seq lengths) checked through the XLA implementation."""
    q, k, v = qkv(rng, n=n, m=m)
    mask = masks(rng, 2, 3, n, m)[mask_kind] if n > 3 else None
    bias, row_valid = ab._mask_to_bias(mask, (2, 3, n, m))
    valid = jnp.ones((), bool) if row_valid is None else row_valid  # fully masked rows are zeroed after

    def padded(q, k, v):
        return jnp.where(valid, ab.padded_attention(q, k, v, bias, scale=0.3, implementation="xla"), 0)

    def plain(q, k, v):
        return jnp.where(valid, jax.nn.dot_product_attention(q, k, v, bias=bias, scale=0.3, implementation="xla"), 0)

    assert_close(output_and_grads(padded, q, k, v), output_and_grads(plain, q, k, v))


@pytest.mark.parametrize("backend", ["xla", "chunked"])
def test_fully_masked_rows_give_zeros_and_finite_gradients(backend, rng):
    q, k, v = qkv(rng, n=5, m=4)
    for mask in (jnp.zeros((5, 4), bool), jnp.full((5, 4), -jnp.inf)):
        out, *grads = output_and_grads(
            lambda q, k, v: ab.dot_product_attention(q, k, v, mask, scale=0.3, backend=backend), q, k, v
        )
        assert not np.any(np.asarray(out))
        assert all(np.all(np.isfinite(g)) for g in grads)


def test_recorded_call_is_what_ran_and_platform_override_is_scoped():
    import jax.numpy as jnp

    from flax_sgm.attention.backends import (
        current_platform,
        dot_product_attention,
        record_attention_calls,
        target_platform,
    )

    q = jnp.ones((1, 5, 2, 8), jnp.bfloat16)
    with record_attention_calls() as calls:
        dot_product_attention(q, q, q, scale=0.3, backend="xla")
        with target_platform("gpu"):
            assert current_platform() == "gpu"
            # Chosen for the GPU, then refused by jax's cuDNN version check on this CPU machine.
            with pytest.raises(RuntimeError, match="cuDNN"):
                jax.jit(lambda q: dot_product_attention(q, q, q, scale=0.3)).trace(q)
    assert current_platform() == jax.default_backend()
    assert [(c.backend, c.padded) for c in calls] == [("xla", (0, 0)), ("cudnn", (1, 1))]
    assert calls[1].reason.startswith("auto:") and calls[1].problem.platform == "gpu"


def test_symbolic_sizes_choose_the_bounded_path_without_comparing():
    from jax import export

    b, n = export.symbolic_shape("b, n")
    for platform, dtype in [("cpu", jnp.float32), ("gpu", jnp.bfloat16)]:
        choice = attention_policy.choose_backend("auto", problem(platform=platform, dtype=dtype, b=b, n=n, m=77))
        assert choice.backend == "chunked" and "symbolic" in choice.reason


def _softmax_reference(q, k, v, bias, scale):
    """Attention written out with the full logits: the reference for mask gradients and float64."""
    s = jnp.einsum("bnhd,bmhd->bhnm", q, k) * scale + bias
    return jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(s, axis=-1), v)


@pytest.mark.parametrize("backend", ["xla", "chunked"])
@pytest.mark.parametrize("mask_shape", [(2, 3, 70, 50), (1, 1, 1, 50)], ids=["full", "per-key"])
def test_additive_mask_gets_its_gradient(backend, mask_shape, rng, monkeypatch):
    """torch SDPA differentiates a float attn_mask (a learned bias); so does every backend here."""
    monkeypatch.setattr(attention_policy, "CHUNK_SIZE", 16)  # several query and key blocks
    q = jnp.asarray(rng.standard_normal((2, 70, 3, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 50, 3, 8)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(rng.standard_normal(mask_shape), jnp.float32)
    cot = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)

    def loss(mask, attend):
        return (attend(mask) * cot).sum()

    got = jax.grad(loss)(mask, lambda m: ab.dot_product_attention(q, k, v, m, scale=0.3, backend=backend))
    want = jax.grad(loss)(mask, lambda m: _softmax_reference(q, k, v, m, 0.3))
    assert np.abs(want).max() > 0
    assert_close([got], [want])
    _, tangent = jax.jvp(lambda m: ab.dot_product_attention(q, k, v, m, scale=0.3, backend=backend), (mask,), (mask,))
    _, want_tangent = jax.jvp(lambda m: _softmax_reference(q, k, v, m, 0.3), (mask,), (mask,))
    assert_close([tangent], [want_tangent])


def test_float64_inputs_keep_float64_accuracy(rng, monkeypatch):
    monkeypatch.setattr(attention_policy, "CHUNK_SIZE", 16)
    with jax.enable_x64(True):
        q = jnp.asarray(rng.standard_normal((1, 40, 2, 8)), jnp.float64)
        k, v = (jnp.asarray(rng.standard_normal((1, 33, 2, 8)), jnp.float64) for _ in range(2))
        want = _softmax_reference(q, k, v, 0.0, 0.5)
        # "auto" takes the chunked path: jax's XLA attention computes its softmax in float32.
        for backend in ("chunked", "auto"):
            got = ab.dot_product_attention(q, k, v, scale=0.5, backend=backend)
            assert got.dtype == jnp.float64
            assert_close([got], [want], criteria.REORDERED_FLOAT64)


# Forward mode with some inputs fixed: cross-attention to a fixed text context holds k and v
# fixed, a constant mask has no tangent. Sizes (queries, keys, chunk): one block each way
# above 36 queries at the default chunk (where instantiated zero tangents went wrong on
# XLA:CPU), and both axes across chunk edges with a smaller chunk. A set without "bias" runs
# without a mask and with a fixed one.
TANGENT_SETS = [names for r in range(1, 5) for names in itertools.combinations(("q", "k", "v", "bias"), r)]
# The default run: each input alone (q alone is the fixed-context JVP that once went wrong) and all four; the
# pairs and triples under -m slow.
TANGENT_PARAMS = [pytest.param(v, id="+".join(v), marks=[pytest.mark.slow] if 1 < len(v) < 4 else []) for v in TANGENT_SETS]
JVP_SIZES = [(256, 256, attention_policy.CHUNK_SIZE), (100, 90, 32)]


def _attention_cases(varying, rng):
    """(primals, tangents) per size and mask: every input random, the mask None or an additive bias."""
    for n, m, chunk in JVP_SIZES:
        shapes = dict(q=(1, n, 2, 8), k=(1, m, 2, 8), v=(1, m, 2, 8), bias=(1, 2, n, m))
        primals = {name: jnp.asarray(rng.standard_normal(s), jnp.float32) for name, s in shapes.items()}
        tangents = {name: jnp.asarray(rng.standard_normal(s), jnp.float32) for name, s in shapes.items()}
        for with_mask in (True,) if "bias" in varying else (False, True):
            yield chunk, primals | ({} if with_mask else {"bias": None}), tangents


def _attention_of(backend, primals, varying):
    """Attention as a function of the `varying` inputs, the others closed over (no tangent)."""

    def f(*args):
        inputs = primals | dict(zip(varying, args))
        return ab.dot_product_attention(inputs["q"], inputs["k"], inputs["v"], inputs["bias"], scale=8**-0.5, backend=backend)

    return f


@pytest.mark.parametrize("varying", TANGENT_PARAMS)
def test_chunked_forward_mode_for_every_set_of_tangents(varying, rng, monkeypatch):
    """jax.jvp with tangents on `varying` only: absent ones closed over, and passed as explicit zeros."""
    for chunk, primals, tangents in _attention_cases(varying, rng):
        monkeypatch.setattr(attention_policy, "CHUNK_SIZE", chunk)
        at = tuple(primals[k] for k in varying)
        along = tuple(tangents[k] for k in varying)
        want, got = (
            jax.jit(lambda *t: jax.jvp(_attention_of(backend, primals, varying), at, t)[1])(*along)
            for backend in ("xla", "chunked")
        )
        assert_close([got], [want])
        # Every input varying, the absent tangents zeros made inside the jitted program.
        every = [k for k, value in primals.items() if value is not None]

        @jax.jit
        def explicit(*t):
            zeros_or_tangent = tuple(t[varying.index(k)] if k in varying else jnp.zeros_like(primals[k]) for k in every)
            return jax.jvp(_attention_of("chunked", primals, every), tuple(primals[k] for k in every), zeros_or_tangent)[1]

        assert_close([explicit(*along)], [want])


@pytest.mark.parametrize("varying", TANGENT_PARAMS)
def test_chunked_reverse_mode_for_every_set_of_inputs(varying, rng, monkeypatch):
    """jax.grad (the transpose of the forward-mode rule) w.r.t. `varying` only, the rest closed over."""
    for chunk, primals, tangents in _attention_cases(varying, rng):
        monkeypatch.setattr(attention_policy, "CHUNK_SIZE", chunk)
        cot = tangents["q"]

        def grads(backend):
            f = _attention_of(backend, primals, varying)
            loss = lambda *a: (f(*a) * cot).sum()  # noqa: E731
            return jax.jit(jax.grad(loss, argnums=tuple(range(len(varying)))))(*[primals[k] for k in varying])

        assert_close(grads("chunked"), grads("xla"))
