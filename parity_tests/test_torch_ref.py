"""torch_ref against the seed file itself: same weights give the same outputs, gradients and errors.

The seed is markdown around one ```py block. The `seed` fixture runs that block as a
module after the smallest changes that let it import and run: SpatialTransformer.forward
is moved out of __init__, the missing relative `checkpoint` import is stubbed, omegaconf
is faked when it is not installed, and xformers' attention call is written out in torch.
torch_ref's deviations from the seed, and the seed bugs it keeps (A, B, C), are listed in
torch_ref/attention.py. Set SGM_SEED_FILE where the seed is not at its default path.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.util
import io
import os
import pathlib
import sys
import types
import warnings
from typing import Any

import pytest
import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn.attention import SDPBackend

import torch_ref
from conftest import CRITERIA, assert_close, randomize_
from flax_sgm.verify import criteria

# The seed lies in ../shared beside the repository (as on CI), unless SGM_SEED_FILE says otherwise.
DEFAULT_SEED_FILE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "seed" / "000_e65850759413b9c4.txt"
SEED_FILE = pathlib.Path(os.environ.get("SGM_SEED_FILE", DEFAULT_SEED_FILE))
SEED_IMPORT = "from .diffusionmodules.util import checkpoint"

# The seed calls the deprecated torch.backends.cuda.sdp_kernel (still importable in
# torch 2.13, so it runs unchanged); it warns on every call.
pytestmark = pytest.mark.filterwarnings("ignore:.*sdp_kernel:FutureWarning")

# The seed's MemoryEfficientCrossAttention (softmax written out in the fake xformers) against
# torch_ref's SDPA fallback: the CPU kernel sums in another order. Measured: bit-identical at
# d_head 16, 3.5e-7 of the largest value at d_head 64 (forward and gradients).
FALLBACK_REL_TOL = criteria.REORDERED

CLASSES = [
    "GEGLU",
    "FeedForward",
    "LinearAttention",
    "SpatialSelfAttention",
    "CrossAttention",
    "MemoryEfficientCrossAttention",
    "BasicTransformerBlock",
    "BasicTransformerSingleLayerBlock",
    "SpatialTransformer",
]


# ---------------------------------------------------------------------------
# The seed harness


def seed_checkpoint(func, inputs, params, flag):
    """Stand-in for the seed's diffusionmodules.util.checkpoint (not part of the seed file)."""
    del params
    if flag:
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def memory_efficient_attention(q, k, v, attn_bias=None, op=None):
    """xformers.ops.memory_efficient_attention on [B, M, K]: softmax(q k^T / sqrt(K)) v, written out."""
    assert attn_bias is None and op is None
    weights = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
    return weights @ v


FAKE_XFORMERS = types.SimpleNamespace(ops=types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention))


class ListConfig(collections.UserList):
    """Stand-in for omegaconf.ListConfig: a sequence that is not a list."""


def seed_source(text: str, fix_forward: bool = True) -> str:
    """The seed's python block, its relative import removed, its SpatialTransformer.forward made a method."""
    code = text.split("```py\n", 1)[1].rsplit("\n```", 1)[0]
    assert code.count(SEED_IMPORT) == 1
    code = code.replace(SEED_IMPORT, "# checkpoint: put in the module's namespace by the test harness")
    if not fix_forward:
        return code
    lines = code.split("\n")
    spatial = lines.index("class SpatialTransformer(nn.Module):")
    start = lines.index("        def forward(self, x, context=None):", spatial)
    # The seed indents forward, and everything after it, 4 spaces too deep: inside __init__.
    assert all(line.startswith("    ") or not line.strip() for line in lines[start:])
    lines[start:] = [line[4:] for line in lines[start:]]
    return "\n".join(lines)


def exec_seed(code: str) -> types.ModuleType:
    module = types.ModuleType("sgm_seed_attention")
    module.checkpoint = seed_checkpoint
    with contextlib.redirect_stdout(io.StringIO()):  # "no module 'xformers'. Processing without..."
        exec(compile(code, str(SEED_FILE), "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def seed_text() -> str:
    if not SEED_FILE.exists():
        pytest.skip(f"seed file not found at {SEED_FILE} (set SGM_SEED_FILE)")
    return SEED_FILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def seed(seed_text):
    """The seed file, run as a module."""
    with pytest.MonkeyPatch.context() as mp:
        if importlib.util.find_spec("omegaconf") is None:
            # SpatialTransformer.__init__ imports omegaconf.ListConfig on every construction.
            omegaconf = types.ModuleType("omegaconf")
            omegaconf.ListConfig = ListConfig
            mp.setitem(sys.modules, "omegaconf", omegaconf)
        module = exec_seed(seed_source(seed_text))
        # No xformers kernel runs here, and without xformers installed the seed's
        # MemoryEfficientCrossAttention.forward has no `xformers` to call. XFORMERS_IS_AVAILABLE
        # is left as imported, as in torch_ref: BasicTransformerBlock falls back alike in both.
        module.xformers = FAKE_XFORMERS
        yield module


@pytest.fixture(params=["torch_ref", "seed"])
def impl(request):
    """torch_ref, then the seed: a kept seed bug shows in both."""
    return torch_ref if request.param == "torch_ref" else request.getfixturevalue("seed")


def test_seed_needs_the_forward_fix(seed_text):
    unfixed = exec_seed(seed_source(seed_text, fix_forward=False))
    assert "forward" not in vars(unfixed.SpatialTransformer)
    assert "forward" in vars(exec_seed(seed_source(seed_text)).SpatialTransformer)


# ---------------------------------------------------------------------------
# Inputs: specs turned into tensors by a seeded generator


def gaussian(*shape):
    return lambda gen: torch.randn(shape, generator=gen)


def bool_mask(*shape):
    def make(gen):
        mask = torch.rand(shape, generator=gen) > 0.5
        mask[..., 0] = True  # no fully masked row: its softmax is NaN, and NaN != NaN
        return mask

    return make


def materialize(spec, gen):
    if callable(spec):
        return spec(gen)
    if isinstance(spec, dict):
        return {k: materialize(v, gen) for k, v in spec.items()}
    if isinstance(spec, list):
        return [materialize(s, gen) for s in spec]
    return spec


@dataclasses.dataclass(frozen=True)
class Case:
    cls: str
    kwargs: dict[str, Any]
    inputs: dict[str, Any]  # forward argument -> spec (gaussian, bool_mask, list of specs, or a plain value)
    method: str = "forward"


ATTN = dict(query_dim=32, heads=2, dim_head=16)
BLOCK = dict(dim=32, n_heads=2, d_head=16)
SPATIAL = dict(in_channels=32, n_heads=2, d_head=16)
TOKENS = {"x": gaussian(2, 35, 32)}  # [b, n, c]: 5x7 image tokens
CONTEXT = {"x": gaussian(2, 35, 32), "context": gaussian(2, 9, 24)}  # [b, m, 24]
IMAGE = {"x": gaussian(2, 32, 5, 7)}  # NCHW


def case(id_, cls, kwargs, inputs, method="forward"):
    return pytest.param(Case(cls, kwargs, inputs, method), id=f"{cls}-{id_}")


CASES = [
    case("32-48", "GEGLU", dict(dim_in=32, dim_out=48), TOKENS),
    case("gelu", "FeedForward", dict(dim=32), TOKENS),
    case("glu", "FeedForward", dict(dim=32, glu=True), TOKENS),
    case("dim-out-mult", "FeedForward", dict(dim=32, dim_out=24, mult=2), TOKENS),
    case("glu-dim-out-mult", "FeedForward", dict(dim=32, dim_out=24, mult=2, glu=True), TOKENS),
    case("dropout", "FeedForward", dict(dim=32, dropout=0.1), TOKENS),
    case("64", "Normalize", dict(in_channels=64), {"input": gaussian(2, 64, 5, 7)}),  # a GroupNorm
    case("default", "LinearAttention", dict(dim=32), IMAGE),
    case("heads2-d16", "LinearAttention", dict(dim=32, heads=2, dim_head=16), IMAGE),
    case("32", "SpatialSelfAttention", dict(in_channels=32), IMAGE),
    case("64", "SpatialSelfAttention", dict(in_channels=64), {"x": gaussian(2, 64, 5, 7)}),
    case("defaults-self", "CrossAttention", dict(query_dim=32), TOKENS),
    case("self", "CrossAttention", ATTN, TOKENS),
    case("context", "CrossAttention", dict(ATTN, context_dim=24), CONTEXT),
    case("bool-mask", "CrossAttention", dict(ATTN, context_dim=24), dict(CONTEXT, mask=bool_mask(2, 1, 35, 9))),
    case("float-mask", "CrossAttention", dict(ATTN, context_dim=24), dict(CONTEXT, mask=gaussian(2, 2, 35, 9))),
    case("additional-tokens", "CrossAttention", ATTN, dict(TOKENS, additional_tokens=gaussian(2, 3, 32))),
    case(
        "context-additional-tokens",
        "CrossAttention",
        dict(ATTN, context_dim=24),
        dict(CONTEXT, additional_tokens=gaussian(2, 3, 32)),
    ),
    case("math", "CrossAttention", dict(ATTN, backend=SDPBackend.MATH), TOKENS),
    case("math-bool-mask", "CrossAttention", dict(ATTN, backend=SDPBackend.MATH), dict(TOKENS, mask=bool_mask(35, 35))),
    case("flash", "CrossAttention", dict(ATTN, backend=SDPBackend.FLASH_ATTENTION), TOKENS),
    case(
        "flash-float-mask",
        "CrossAttention",
        dict(ATTN, backend=SDPBackend.FLASH_ATTENTION),
        dict(TOKENS, mask=gaussian(35, 35)),
    ),
    case("crossframe-b2-n2", "CrossAttention", ATTN, {"x": gaussian(2, 35, 32), "n_times_crossframe_attn_in_self": 2}),
    case("crossframe-b4-n2", "CrossAttention", ATTN, {"x": gaussian(4, 35, 32), "n_times_crossframe_attn_in_self": 2}),
    case("dropout", "CrossAttention", dict(ATTN, dropout=0.1), TOKENS),
    case("defaults-self", "MemoryEfficientCrossAttention", dict(query_dim=32), TOKENS),
    case("self", "MemoryEfficientCrossAttention", ATTN, TOKENS),
    case("context", "MemoryEfficientCrossAttention", dict(ATTN, context_dim=24), CONTEXT),
    case(
        "additional-tokens",
        "MemoryEfficientCrossAttention",
        ATTN,
        dict(TOKENS, additional_tokens=gaussian(2, 3, 32)),
    ),
    case(
        "crossframe-b4-n2",
        "MemoryEfficientCrossAttention",
        ATTN,
        {"x": gaussian(4, 35, 32), "n_times_crossframe_attn_in_self": 2},
    ),
    case(
        "crossframe-b6-n2",
        "MemoryEfficientCrossAttention",
        ATTN,
        {"x": gaussian(6, 35, 32), "n_times_crossframe_attn_in_self": 2},
    ),
    case("default", "BasicTransformerBlock", BLOCK, TOKENS),
    case("gelu-ff", "BasicTransformerBlock", dict(BLOCK, gated_ff=False), TOKENS),
    case("context", "BasicTransformerBlock", dict(BLOCK, context_dim=24), CONTEXT),
    case("disable-self-attn", "BasicTransformerBlock", dict(BLOCK, context_dim=24, disable_self_attn=True), CONTEXT),
    case("no-checkpoint", "BasicTransformerBlock", dict(BLOCK, checkpoint=False), TOKENS),
    case("no-checkpoint-context", "BasicTransformerBlock", dict(BLOCK, context_dim=24, checkpoint=False), CONTEXT),
    case(
        "softmax-xformers",  # falls back to CrossAttention in both: xformers is not available
        "BasicTransformerBlock",
        dict(BLOCK, context_dim=24, attn_mode="softmax-xformers"),
        CONTEXT,
    ),
    case("math", "BasicTransformerBlock", dict(BLOCK, sdp_backend=SDPBackend.MATH), TOKENS),
    case("flash", "BasicTransformerBlock", dict(BLOCK, sdp_backend=SDPBackend.FLASH_ATTENTION), TOKENS),
    case("dropout", "BasicTransformerBlock", dict(BLOCK, context_dim=24, dropout=0.1), CONTEXT),
    case(
        "forward-additional-tokens",
        "BasicTransformerBlock",
        BLOCK,
        dict(TOKENS, additional_tokens=gaussian(2, 3, 32)),
    ),
    case(
        "_forward-additional-tokens",
        "BasicTransformerBlock",
        BLOCK,
        dict(TOKENS, additional_tokens=gaussian(2, 3, 32)),
        method="_forward",
    ),
    case(
        "_forward-crossframe-b4-n2",
        "BasicTransformerBlock",
        BLOCK,
        {"x": gaussian(4, 35, 32), "n_times_crossframe_attn_in_self": 2},
        method="_forward",
    ),
    case("default", "BasicTransformerSingleLayerBlock", BLOCK, TOKENS),
    case("context", "BasicTransformerSingleLayerBlock", dict(BLOCK, context_dim=24), CONTEXT),
    case(
        "gelu-ff-no-checkpoint",
        "BasicTransformerSingleLayerBlock",
        dict(BLOCK, gated_ff=False, checkpoint=False),
        TOKENS,
    ),
    case(
        "softmax-xformers",  # no fallback here: MemoryEfficientCrossAttention in both
        "BasicTransformerSingleLayerBlock",
        dict(BLOCK, context_dim=24, attn_mode="softmax-xformers"),
        CONTEXT,
    ),
    case("conv", "SpatialTransformer", SPATIAL, IMAGE),
    case("linear", "SpatialTransformer", dict(SPATIAL, use_linear=True), IMAGE),
    case("no-checkpoint", "SpatialTransformer", dict(SPATIAL, use_checkpoint=False), IMAGE),
    case("64ch-4x8", "SpatialTransformer", dict(in_channels=64, n_heads=4, d_head=8), {"x": gaussian(2, 64, 5, 7)}),
    case("depth2", "SpatialTransformer", dict(SPATIAL, depth=2), IMAGE),
    case("context", "SpatialTransformer", dict(SPATIAL, context_dim=24), dict(IMAGE, context=gaussian(2, 9, 24))),
    case(
        "linear-depth2-shared-context",
        "SpatialTransformer",
        dict(SPATIAL, depth=2, context_dim=24, use_linear=True),
        dict(IMAGE, context=gaussian(2, 9, 24)),
    ),
    case(
        "depth2-context-per-block",
        "SpatialTransformer",
        dict(SPATIAL, depth=2, context_dim=[24, 40]),
        dict(IMAGE, context=[gaussian(2, 9, 24), gaussian(2, 11, 40)]),
    ),
    case(
        "depth2-context-dim-repeated",
        "SpatialTransformer",
        dict(SPATIAL, depth=2, context_dim=[24]),
        dict(IMAGE, context=[gaussian(2, 9, 24)]),
    ),
    case(
        "disable-self-attn",
        "SpatialTransformer",
        dict(SPATIAL, context_dim=24, disable_self_attn=True),
        dict(IMAGE, context=gaussian(2, 9, 24)),
    ),
    case("softmax-xformers", "SpatialTransformer", dict(SPATIAL, attn_type="softmax-xformers"), IMAGE),
    case("math", "SpatialTransformer", dict(SPATIAL, sdp_backend=SDPBackend.MATH), IMAGE),
    case(
        "dropout",
        "SpatialTransformer",
        dict(SPATIAL, context_dim=24, dropout=0.1),
        dict(IMAGE, context=gaussian(2, 9, 24)),
    ),
]


# ---------------------------------------------------------------------------
# Running a pair


def build_pair(seed, cls: str, kwargs: dict, weights: int = 0):
    """The seed's module with every weight random (proj_out too), and torch_ref's with those weights."""
    seed_module = randomize_(getattr(seed, cls)(**kwargs), seed=weights)
    ref_module = getattr(torch_ref, cls)(**kwargs)
    ref_module.load_state_dict(seed_module.state_dict(), strict=True)
    return seed_module, ref_module


def forward_and_grads(module: nn.Module, method: str, inputs: dict) -> tuple[torch.Tensor, dict]:
    """Output, and the gradients of every float input (masks aside) and parameter for a fixed cotangent."""
    leaves = {}

    def leaf(name, t):
        if not torch.is_tensor(t) or not t.is_floating_point() or name == "mask":
            return t
        leaves[name] = t.detach().clone().requires_grad_(True)
        return leaves[name]

    args = {
        k: [leaf(f"{k}.{i}", t) for i, t in enumerate(v)] if isinstance(v, list) else leaf(k, v)
        for k, v in inputs.items()
    }
    torch.manual_seed(0)  # dropout draws the same masks in both
    out = getattr(module, method)(**args)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * cotangent).sum().backward()
    grads = {f"input:{k}": t.grad for k, t in leaves.items()}
    grads |= {k: p.grad for k, p in module.named_parameters()}
    return out.detach(), grads


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str, rel_tol: float = 0.0) -> None:
    """Bit-identical, or within rel_tol of the largest |expected| where rel_tol is given."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
    if rel_tol == 0.0:
        assert torch.equal(actual, expected), f"{what}: max abs diff {diff:.3g}"
    else:
        assert diff <= rel_tol * expected.abs().max().item(), f"{what}: max abs diff {diff:.3g}"


def assert_same_run(actual, expected, rel_tol: float = 0.0) -> None:
    (out_a, grads_a), (out_e, grads_e) = actual, expected
    assert_equal(out_a, out_e, "output", rel_tol)
    assert grads_a.keys() == grads_e.keys()
    for name, g in grads_e.items():
        assert (grads_a[name] is None) == (g is None), f"gradient of {name} in one run only"
        if g is not None:
            assert_equal(grads_a[name], g, f"gradient of {name}", rel_tol)


# ---------------------------------------------------------------------------
# Parity with the seed, for every class and option


@pytest.mark.parametrize("case", CASES)
def test_same_outputs_and_gradients_as_seed(seed, case):
    seed_module, ref_module = build_pair(seed, case.cls, case.kwargs)
    inputs = materialize(case.inputs, torch.Generator().manual_seed(1))
    fallbacks = [m for m in ref_module.modules() if isinstance(m, torch_ref.MemoryEfficientCrossAttention)]
    # The same ops run in both, so results are bit-identical; except where the seed's
    # MemoryEfficientCrossAttention runs the written-out fake xformers and torch_ref's runs SDPA.
    rel_tol = FALLBACK_REL_TOL if fallbacks else 0.0
    assert_same_run(
        forward_and_grads(ref_module, case.method, inputs), forward_and_grads(seed_module, case.method, inputs), rel_tol
    )
    assert all(m.last_attention_impl == "sdpa" for m in fallbacks)


@pytest.mark.parametrize("case", CASES)
def test_same_state_dict_as_seed(seed, case):
    # Same layers built in the same order: same keys, shapes, and the same initial weights.
    torch.manual_seed(0)
    seed_state = getattr(seed, case.cls)(**case.kwargs).state_dict()
    torch.manual_seed(0)
    ref_state = getattr(torch_ref, case.cls)(**case.kwargs).state_dict()
    assert {k: v.shape for k, v in ref_state.items()} == {k: v.shape for k, v in seed_state.items()}
    for k, v in seed_state.items():
        assert_equal(ref_state[k], v, f"initial {k}")


def test_list_config_context_dim(seed):
    list_config = importlib.import_module("omegaconf").ListConfig  # the real one, or the fixture's stand-in
    kwargs = dict(SPATIAL, depth=2, context_dim=list_config([24, 40]))
    seed_module, ref_module = build_pair(seed, "SpatialTransformer", kwargs)
    inputs = dict(IMAGE, context=[gaussian(2, 9, 24), gaussian(2, 11, 40)])
    inputs = materialize(inputs, torch.Generator().manual_seed(1))
    assert_same_run(forward_and_grads(ref_module, "forward", inputs), forward_and_grads(seed_module, "forward", inputs))


@pytest.mark.parametrize("use_linear", [False, True], ids=["conv", "linear"])
def test_proj_out_starts_at_zero_as_in_seed(seed, use_linear):
    for impl in (seed, torch_ref):
        module = impl.SpatialTransformer(**SPATIAL, use_linear=use_linear)
        assert all(not p.any() for p in module.proj_out.parameters())
        x = torch.randn(2, 32, 5, 7)
        assert_equal(module(x), x, "untrained SpatialTransformer output")  # the identity


def test_zero_module_as_in_seed(seed):
    for impl in (seed, torch_ref):
        layer = randomize_(nn.Linear(8, 8), seed=0)
        assert impl.zero_module(layer) is layer
        assert all(not p.any() for p in layer.parameters())


# ---------------------------------------------------------------------------
# checkpoint


@pytest.mark.parametrize("with_context", [False, True], ids=["context-None", "context"])
def test_checkpoint_flag_keeps_values_and_gradients(with_context):
    attn = randomize_(torch_ref.CrossAttention(**ATTN), seed=0)
    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 35, 32, generator=gen), torch.randn(2, 9, 32, generator=gen)
    calls = []

    def func(x, context):
        calls.append(1)
        return attn(x, context=context)

    runs = {}
    for flag in (False, True):
        calls.clear()
        attn.zero_grad(set_to_none=True)
        args = {
            "x": x.clone().requires_grad_(True),
            "context": context.clone().requires_grad_(True) if with_context else None,
        }
        out = torch_ref.checkpoint(func, tuple(args.values()), attn.parameters(), flag)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
        grads = {f"input:{k}": v.grad for k, v in args.items() if v is not None}
        runs[flag] = out.detach(), grads | {k: p.grad for k, p in attn.named_parameters()}
        runs[flag, "calls"] = len(calls)
    assert runs[False, "calls"] == 1 and runs[True, "calls"] == 2  # flag True recomputes in backward
    assert_same_run(runs[True], runs[False])


def checkpointed(id_, cls, kwargs, flag, inputs):
    return pytest.param(cls, kwargs, flag, inputs, id=f"{cls}-{id_}")


CHECKPOINTED = [
    checkpointed("self", "BasicTransformerBlock", BLOCK, "checkpoint", TOKENS),
    checkpointed(
        "context-dropout", "BasicTransformerBlock", dict(BLOCK, context_dim=24, dropout=0.1), "checkpoint", CONTEXT
    ),
    checkpointed("self", "BasicTransformerSingleLayerBlock", BLOCK, "checkpoint", TOKENS),
    checkpointed("depth2-self", "SpatialTransformer", dict(SPATIAL, depth=2), "use_checkpoint", IMAGE),
    checkpointed(
        "depth2-context-per-block-dropout",
        "SpatialTransformer",
        dict(SPATIAL, depth=2, context_dim=[24, 40], dropout=0.1),
        "use_checkpoint",
        dict(IMAGE, context=[gaussian(2, 9, 24), gaussian(2, 11, 40)]),
    ),
]


@pytest.mark.parametrize("cls,kwargs,flag,inputs", CHECKPOINTED)
def test_checkpointing_keeps_values_and_gradients(cls, kwargs, flag, inputs):
    on = randomize_(getattr(torch_ref, cls)(**kwargs, **{flag: True}), seed=0)
    off = getattr(torch_ref, cls)(**kwargs, **{flag: False})
    off.load_state_dict(on.state_dict(), strict=True)
    inputs = materialize(inputs, torch.Generator().manual_seed(1))
    assert_same_run(forward_and_grads(on, "forward", inputs), forward_and_grads(off, "forward", inputs))


# ---------------------------------------------------------------------------
# The seed bugs torch_ref keeps


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(lambda gen: {"additional_tokens": torch.randn(4, 3, 32, generator=gen)}, id="additional_tokens"),
        pytest.param(lambda gen: {"n_times_crossframe_attn_in_self": 2}, id="n_times_crossframe_attn_in_self"),
    ],
)
def test_bug_a_block_forward_drops_arguments(impl, extra):
    block = randomize_(impl.BasicTransformerBlock(**BLOCK, checkpoint=False), seed=0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 35, 32, generator=gen)  # b == n * n, so cross-frame runs (bug B)
    kwargs = extra(gen)
    with torch.no_grad():
        assert_equal(block(x, **kwargs), block(x), "forward with and without the argument")
        assert max_diff(block._forward(x, **kwargs), block._forward(x)) > CRITERIA["float32"].forward  # honoured


def crossframe_as_intended(module: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    """Each item attends to the keys and values of the first item of its group of n consecutive items."""
    per_item = torch_ref.CrossAttention(**ATTN)  # same parameters as both attention classes
    per_item.load_state_dict(module.state_dict(), strict=True)
    return torch.cat([per_item(x[i : i + 1], context=x[i - i % n : i - i % n + 1]) for i in range(len(x))])


@pytest.mark.parametrize(
    "cls,b",
    [
        pytest.param("CrossAttention", 2, id="CrossAttention-b2-n2"),  # b == n: SDPA broadcasts the one first frame
        pytest.param("CrossAttention", 4, id="CrossAttention-b4-n2"),  # b == n * n: b // n == n
        pytest.param("MemoryEfficientCrossAttention", 2, id="MemoryEfficientCrossAttention-b2-n2"),
        pytest.param("MemoryEfficientCrossAttention", 4, id="MemoryEfficientCrossAttention-b4-n2"),
        pytest.param("MemoryEfficientCrossAttention", 6, id="MemoryEfficientCrossAttention-b6-n2"),
    ],
)
def test_bug_b_crossframe_as_intended(impl, cls, b):
    attn = randomize_(getattr(impl, cls)(**ATTN), seed=0)
    x = torch.randn(b, 35, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # Per-item attention batches differently from the fused call: equal up to float rounding.
        assert_close(attn(x, n_times_crossframe_attn_in_self=2), crossframe_as_intended(attn, x, 2))


def test_bug_b_crossframe_b_3n_fails_in_cross_attention(impl):
    attn = randomize_(impl.CrossAttention(**ATTN), seed=0)
    x = torch.randn(6, 35, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), pytest.raises(RuntimeError):  # 3 first frames repeated 3 times: 9 keys for 6 queries
        attn(x, n_times_crossframe_attn_in_self=2)


def test_bug_c_memory_efficient_attention_rejects_masks(impl):
    attn = impl.MemoryEfficientCrossAttention(**ATTN, context_dim=24)
    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 35, 32, generator=gen), torch.randn(2, 9, 24, generator=gen)
    attn(x, context=context)  # runs without a mask
    with pytest.raises(NotImplementedError):
        attn(x, context=context, mask=torch.ones(2, 1, 35, 9, dtype=torch.bool))


# ---------------------------------------------------------------------------
# Printing and errors


def printing(id_, cls, kwargs):
    return pytest.param(cls, kwargs, id=f"{cls}-{id_}")


# Configurations in which the seed prints while constructing.
SEED_PRINTS = [
    printing("checkpoint", "BasicTransformerBlock", dict(BLOCK, checkpoint=True)),
    printing("softmax-xformers", "BasicTransformerBlock", dict(BLOCK, checkpoint=False, attn_mode="softmax-xformers")),
    printing("softmax-xformers", "BasicTransformerSingleLayerBlock", dict(BLOCK, attn_mode="softmax-xformers")),
    printing("default", "MemoryEfficientCrossAttention", ATTN),
    printing("default", "SpatialTransformer", SPATIAL),
    printing("context-dim-repeated", "SpatialTransformer", dict(SPATIAL, depth=2, context_dim=[24])),
]


@pytest.mark.parametrize("cls,kwargs", SEED_PRINTS)
def test_torch_ref_is_silent_where_seed_prints(seed, capfd, cls, kwargs):
    getattr(seed, cls)(**kwargs)
    assert capfd.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        getattr(torch_ref, cls)(**kwargs)
    assert capfd.readouterr() == ("", "")


def test_torch_ref_never_prints(capfd):
    # Every class and option of the parity table, constructed and run.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        for param in CASES:
            c = param.values[0]
            module = getattr(torch_ref, c.cls)(**c.kwargs)
            getattr(module, c.method)(**materialize(c.inputs, torch.Generator().manual_seed(1)))
    assert capfd.readouterr() == ("", "")


def bad(id_, cls, kwargs, inputs, error):
    """`inputs` None: the constructor raises `error`; else the forward on those inputs does."""
    return pytest.param(cls, kwargs, inputs, error, id=f"{cls}-{id_}")


CONTEXT_24 = dict(ATTN, context_dim=24)
WRONG_CONTEXT = dict(CONTEXT, context=gaussian(2, 9, 16))  # 16 wide, not 24
EFFICIENT = SDPBackend.EFFICIENT_ATTENTION  # no CPU kernel: RuntimeError in both
CROSSFRAME_B3_N2 = {"x": gaussian(3, 35, 32), "n_times_crossframe_attn_in_self": 2}

BAD = [
    bad("wrong-channels", "SpatialTransformer", SPATIAL, {"x": gaussian(2, 64, 5, 7)}, RuntimeError),
    bad("3d-input", "SpatialTransformer", SPATIAL, {"x": gaussian(2, 32, 35)}, ValueError),
    bad(
        "wrong-context-width",
        "SpatialTransformer",
        dict(SPATIAL, context_dim=24),
        dict(IMAGE, context=gaussian(2, 9, 16)),
        RuntimeError,
    ),
    bad("mixed-context-dims", "SpatialTransformer", dict(SPATIAL, depth=3, context_dim=[24, 40]), None, AssertionError),
    bad("bad-attn-type", "SpatialTransformer", dict(SPATIAL, attn_type="flash"), None, AssertionError),
    bad("48-channels", "SpatialTransformer", dict(SPATIAL, in_channels=48), None, ValueError),
    bad("48-channels", "Normalize", dict(in_channels=48), None, ValueError),
    bad("wrong-context-width", "CrossAttention", CONTEXT_24, WRONG_CONTEXT, RuntimeError),
    bad("wrong-mask-shape", "CrossAttention", ATTN, dict(TOKENS, mask=bool_mask(2, 1, 35, 8)), RuntimeError),
    bad("efficient-on-cpu", "CrossAttention", dict(ATTN, backend=EFFICIENT), TOKENS, RuntimeError),
    bad("crossframe-b3-n2", "CrossAttention", ATTN, CROSSFRAME_B3_N2, AssertionError),
    bad("crossframe-b3-n2", "MemoryEfficientCrossAttention", ATTN, CROSSFRAME_B3_N2, AssertionError),
    bad("wrong-context-width", "MemoryEfficientCrossAttention", CONTEXT_24, WRONG_CONTEXT, RuntimeError),
    bad("bad-attn-mode", "BasicTransformerBlock", dict(BLOCK, attn_mode="flash"), None, AssertionError),
    bad("backend-not-enum", "BasicTransformerBlock", dict(BLOCK, sdp_backend="math"), None, AssertionError),
    bad("efficient-on-cpu", "BasicTransformerBlock", dict(BLOCK, sdp_backend=EFFICIENT), TOKENS, RuntimeError),
    bad("bad-attn-mode", "BasicTransformerSingleLayerBlock", dict(BLOCK, attn_mode="flash"), None, AssertionError),
    bad("wrong-width", "FeedForward", dict(dim=32), {"x": gaussian(2, 35, 24)}, RuntimeError),
    bad("wrong-width", "GEGLU", dict(dim_in=32, dim_out=48), {"x": gaussian(2, 35, 24)}, RuntimeError),
    bad("wrong-channels", "LinearAttention", dict(dim=32), {"x": gaussian(2, 24, 5, 7)}, RuntimeError),
    bad("wrong-channels", "SpatialSelfAttention", dict(in_channels=32), {"x": gaussian(2, 64, 5, 7)}, RuntimeError),
]


@pytest.mark.parametrize("cls,kwargs,inputs,error", BAD)
def test_bad_input_raises_what_seed_raises(seed, cls, kwargs, inputs, error):
    for impl in (seed, torch_ref):
        with pytest.raises(error) as raised:
            module = getattr(impl, cls)(**kwargs)
            if inputs is not None:
                module(**materialize(inputs, torch.Generator().manual_seed(1)))
        assert raised.type is error, f"{impl.__name__} raised {raised.type.__name__}, not {error.__name__}"


# ---------------------------------------------------------------------------
# Exports


def test_exports():
    for name in [*CLASSES, "Normalize", "zero_module", "checkpoint"]:
        assert name in torch_ref.__all__
        assert getattr(torch_ref, name) is getattr(torch_ref.attention, name)


def test_exports_every_seed_class(seed):
    defined = [v for v in vars(seed).values() if isinstance(v, type) and v.__module__ == seed.__name__]
    assert {c.__name__ for c in defined if issubclass(c, nn.Module)} == set(CLASSES)
