"""Lowering flax_sgm for a platform this machine does not have: what JAX decides at trace time.

`jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))` produces the StableHLO
a CUDA GPU would compile, on a CPU-only machine. It shows which attention backend
each call took and why, the lengths padded for cuDNN, and the custom calls of the
program: cuDNN's fused attention is `__cudnn$fmha...` (forward) and
`__cudnn$fmha...Backward`. cuDNN's trace-time refusals (an odd length in the
backward, a head dim) raise here too. It cannot show what XLA does when it compiles
the program, nor speed or numerics on the device.

Two things stand in for the missing GPU, both here and nowhere else:
- the attention backend is chosen for the target platform through
  `attention_backends.target_platform` (the one override in the attention code);
- `cudnn_version_stand_in`: JAX's cuDNN attention asks the installed cuDNN for its
  version at trace time (`check_cudnn_version`, which raises "cuDNN is not
  detected" without the CUDA plugin). Where it raises, the stand-in answers
  CUDNN_VERSION_STAND_IN instead. On a machine with cuDNN the real version is used.
Lowering this way does not go through `jax.export`, so no export safety check (the
one refusing custom calls without a compatibility guarantee) is disabled.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from flax_sgm import sharding

from flax_sgm.attention import backends as attention_backends
from flax_sgm.attention.modules import CrossAttention, SpatialSelfAttention
from flax_sgm.attention.config import Preset, SpatialTransformerConfig
from flax_sgm.unet.config import PRESETS as UNET_CONFIGS
from flax_sgm.unet.config import UNetConfig
from flax_sgm.autoencoder.config import PRESETS as VAE_CONFIGS
from flax_sgm.autoencoder.config import AutoencoderConfig
from flax_sgm.autoencoder.model import AttnBlock, LinAttnBlock
from flax_sgm import models

# The lowering platform (jax's name) -> the platform backend selection sees (jax.default_backend()'s name).
PLATFORMS = {"cuda": "gpu", "rocm": "gpu", "tpu": "tpu", "cpu": "cpu"}
# cuDNN 9.19: the version measured on an H200 with torch 2.11's cuDNN (BENCHMARKS.md).
CUDNN_VERSION_STAND_IN = 91900
CUDNN_PREFIX = "__cudnn$fmha"
# The attention modules: the ones that call attention_backends.dot_product_attention.
ATTENTION_MODULES = (CrossAttention, SpatialSelfAttention, AttnBlock)


def _fused_attention_module():
    """JAX's cuDNN attention module, if it has the version query this file knows (jax 0.10, 0.11)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo
    except ImportError:  # a JAX without cuDNN attention
        return None
    return fused_attention_stablehlo if hasattr(fused_attention_stablehlo, "check_cudnn_version") else None


def installed_cudnn_version() -> int | None:
    """The cuDNN version JAX's cuDNN attention sees on this machine, or None without cuDNN."""
    fused = _fused_attention_module()
    if fused is None:
        return None
    try:
        return fused.check_cudnn_version()
    except RuntimeError:  # "cuDNN is not detected."
        return None


@contextlib.contextmanager
def cudnn_version_stand_in(version: int = CUDNN_VERSION_STAND_IN):
    """JAX's cuDNN version query answers `version` while the block runs, if this machine has no cuDNN.

    Only the version query (jax._src.cudnn.fused_attention_stablehlo.check_cudnn_version)
    is replaced, and put back afterwards; where cuDNN is installed nothing is replaced.
    """
    fused = _fused_attention_module()
    if fused is None or installed_cudnn_version() is not None:
        yield
        return
    real = fused.check_cudnn_version
    fused.check_cudnn_version = lambda: version
    try:
        yield
    finally:
        fused.check_cudnn_version = real


@dataclasses.dataclass(frozen=True)
class Program:
    """One lowered program: the attention calls traced, and its custom calls by target."""

    calls: list[attention_backends.AttentionCall]
    custom_calls: dict[str, int]
    # The custom calls inside shard_map bodies (the per-shard program of sequence parallelism).
    per_shard_custom_calls: dict[str, int]
    lowered: Any  # jax.stages.Lowered

    def cudnn_calls(self) -> dict[str, int]:
        return cudnn_calls(self.custom_calls)


def cudnn_calls(custom_calls: dict[str, int]) -> dict[str, int]:
    """The cuDNN attention kernels among custom-call counts (a Program's, or a report's JSON)."""
    return {t: c for t, c in custom_calls.items() if t.startswith(CUDNN_PREFIX)}


def lower(fn: Callable, *args, platform: str = "cuda") -> Program:
    """jax.jit(fn) traced on `args` (arrays or ShapeDtypeStructs) and lowered for `platform`.

    Backends are chosen for that platform; for "cuda" without cuDNN here, the version
    stand-in answers JAX's cuDNN version query.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"lower: platform must be one of {sorted(PLATFORMS)}; got {platform!r}")
    stand_in = cudnn_version_stand_in() if platform == "cuda" else contextlib.nullcontext()
    with (
        stand_in,
        attention_backends.target_platform(PLATFORMS[platform]),
        attention_backends.record_attention_calls() as calls,
    ):
        # A fresh function: jit's trace cache is keyed on it, not on the platform or scopes set above.
        lowered = jax.jit(lambda *a: fn(*a)).trace(*args).lower(lowering_platforms=(platform,))
    total, per_shard = count_custom_calls(lowered.compiler_ir("stablehlo"))
    return Program(list(calls), total, per_shard, lowered)


def count_custom_calls(module) -> tuple[dict[str, int], dict[str, int]]:
    """Custom-call targets of a StableHLO module (an MLIR ir.Module), counted from its entry function.

    A call to a private function counts that function's custom calls again. Returns
    (all custom calls, those inside shard_map bodies: sdy.manual_computation regions,
    or the shmap_body functions of the older partitioner).
    """
    functions = {}
    for op in module.body.operations:
        if op.operation.name == "func.func":
            functions[op.attributes["sym_name"].value] = op.operation
    total, per_shard = collections.Counter(), collections.Counter()

    def visit(op, in_shard: bool):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    inner = inner.operation
                    name = inner.name
                    if name == "stablehlo.custom_call":
                        target = inner.attributes["call_target_name"].value
                        total[target] += 1
                        if in_shard:
                            per_shard[target] += 1
                    elif name == "func.call":
                        callee = inner.attributes["callee"].value
                        visit(functions[callee], in_shard or callee.startswith("shmap_body"))
                    visit(inner, in_shard or name == "sdy.manual_computation")

    visit(functions["main"], False)
    return dict(sorted(total.items())), dict(sorted(per_shard.items()))


def attention_modules(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """(path, module) of every attention module of `model`, in the order the model calls them.

    nnx walks attributes sorted by name, which for flax_sgm's modules is their call
    order: blocks by index, attn1 before attn2. `name_calls` checks the match.
    """
    return [
        (".".join(map(str, path)) or type(module).__name__, module)
        for path, module in nnx.iter_modules(model)
        if isinstance(module, ATTENTION_MODULES)
    ]


def _module_shape(module) -> tuple[int, int]:
    if isinstance(module, (SpatialSelfAttention, AttnBlock)):
        return 1, module.in_channels
    return module.heads, module.head_dim


def name_calls(model: nnx.Module, calls: Sequence[attention_backends.AttentionCall]) -> list[str]:
    """The module path of each attention call of one forward pass of `model`, traced in call order.

    Raises ValueError if the calls do not match the model's attention modules one to
    one (count, heads and head dim): a name is never guessed.
    """
    modules = attention_modules(model)
    if len(modules) != len(calls):
        raise ValueError(
            f"name_calls: {len(calls)} attention calls traced for {len(modules)} attention modules "
            f"({', '.join(p for p, _ in modules)}); give one forward pass"
        )
    for (path, module), call in zip(modules, calls):
        got = (call.problem.heads, call.problem.head_dim)
        if got != _module_shape(module):
            raise ValueError(
                f"name_calls: the call matched to {path} has heads x head_dim {got[0]} x {got[1]}; "
                f"the module has {_module_shape(module)[0]} x {_module_shape(module)[1]}"
            )
    return [path for path, _ in modules]


# A SpatialTransformer, abstract, lowered: what `flax-sgm lower` reports ----------------------


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The sizes a SpatialTransformer is lowered at: x [batch, *hw, in_channels], context [batch, context_tokens, .]."""

    batch: int
    hw: tuple[int, int]
    context_tokens: int
    dtype: Any = jnp.bfloat16


def _context_shapes(config: SpatialTransformerConfig, inputs: Inputs):
    if config.context_dim is None:
        return None
    dims = config.context_dim if isinstance(config.context_dim, tuple) else (config.context_dim,)
    shapes = [(inputs.batch, inputs.context_tokens, d) for d in dims]
    return shapes if len(shapes) > 1 else shapes[0]


def _abstract(shape, dtype, mesh, axes, what):
    if mesh is None:
        return jax.ShapeDtypeStruct(shape, dtype)
    spec = sharding.logical_to_spec(axes)
    problems = sharding.check_divisible(f"{what} {list(shape)}", shape, spec, mesh)
    if problems:
        raise ValueError("; ".join(problems))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def lowering_mesh(data: int, seq: int, model: int) -> jax.sharding.Mesh:
    """A (data, seq, model) mesh for lowering: this machine's devices, or its CPU devices if too few.

    The devices only place the shards; the program is lowered for the target platform.
    More CPU devices than one need jax_num_cpu_devices set before JAX starts (`flax-sgm lower` does).
    """
    size = data * seq * model
    devices = jax.devices() if len(jax.devices()) >= size else jax.devices("cpu")
    return sharding.make_mesh(data, seq, model, devices=devices)


def lower_spatial_transformer(
    config: SpatialTransformerConfig,
    inputs: Inputs,
    *,
    platform: str = "cuda",
    backward: bool = False,
    mesh: jax.sharding.Mesh | None = None,
) -> dict:
    """Lower a SpatialTransformer of `config` with abstract weights (nothing allocated); a JSON-ready report.

    Parameters are stored in the compute dtype. The forward program is the model's
    output; the backward program is forward + backward: gradients of a scalar loss
    with respect to every parameter, x and the context.
    """
    dtype = jnp.dtype(inputs.dtype)
    model = models.abstract(config, dtype=dtype, param_dtype=dtype)
    if mesh is not None:
        sharding.shard_model(model, mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x_shape = (inputs.batch, *inputs.hw, config.in_channels)
    x = _abstract(x_shape, dtype, mesh, sharding.IMAGE, "x")
    context = _context_shapes(config, inputs)
    if isinstance(context, list):
        context = [_abstract(s, dtype, mesh, sharding.CONTEXT, "context") for s in context]
    elif context is not None:
        context = _abstract(context, dtype, mesh, sharding.CONTEXT, "context")

    def forward(params, rest, x, context):
        return nnx.merge(graphdef, params, rest)(x, context=context)

    def loss(params, rest, x, context):
        return forward(params, rest, x, context).astype(jnp.float32).mean()

    fwd_bwd = jax.grad(loss, argnums=(0, 2, 3) if context is not None else (0, 2))
    mesh_scope = sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with mesh_scope:
        programs = {"forward": lower(forward, params, rest, x, context, platform=platform)}
        if backward:
            programs["backward"] = lower(fwd_bwd, params, rest, x, context, platform=platform)
    report = _report(model, programs, platform, config.to_dict(), {
        "x": list(x_shape),
        "context": (
            None if context is None
            else [list(c.shape) for c in context] if isinstance(context, list) else list(context.shape)
        ),
        "dtype": dtype.name,
    })
    report["mesh"] = dict(mesh.shape) if mesh is not None else None
    if mesh is not None:
        report["custom_calls_per_shard"] = {
            "forward": programs["forward"].per_shard_custom_calls,
            "backward": programs["backward"].per_shard_custom_calls if backward else None,
        }
    return report


def _report(model: nnx.Module, programs: dict[str, Program], platform: str, config: dict, inputs: dict) -> dict:
    """What `flax-sgm lower` reports of the lowered programs of `model`: each attention call, the custom calls."""
    cudnn_version = installed_cudnn_version() if platform == "cuda" else None
    stand_in = platform == "cuda" and cudnn_version is None
    if stand_in:
        cudnn_version = CUDNN_VERSION_STAND_IN
    forward_calls = programs["forward"].calls
    attention = [
        {
            "module": name,
            "backend": call.backend,
            "reason": call.reason,
            "platform": call.problem.platform,
            "dtype": jnp.dtype(call.problem.dtype).name,
            "batch": call.problem.batch,
            "heads": call.problem.heads,
            "n": call.problem.n,
            "m": call.problem.m,
            "head_dim": call.problem.head_dim,
            "padded": {"n": call.padded[0], "m": call.padded[1]},
        }
        for name, call in zip(name_calls(model, forward_calls), forward_calls)
    ]
    return {
        "platform": platform,
        "attention_platform": PLATFORMS[platform],
        "cudnn_version": {"version": cudnn_version, "stand_in": stand_in},
        "config": config,
        "inputs": inputs,
        "mesh": None,
        "attention": attention,
        "custom_calls": {
            "forward": programs["forward"].custom_calls,
            "backward": programs["backward"].custom_calls if "backward" in programs else None,
        },
    }


# `flax-sgm lower --config NAME-unet`: the whole UNet of a released model at its native latent, batch 2,
# 77 context tokens (flax_sgm.attention.config.Preset's fields).
UNET_PRESETS = {
    "sd15-unet": Preset(UNET_CONFIGS["sd15"], 2, (64, 64), 77),
    "sd21-unet": Preset(UNET_CONFIGS["sd21"], 2, (96, 96), 77),
    "sdxl-unet": Preset(UNET_CONFIGS["sdxl-base"], 2, (128, 128), 77),
    "sdxl-refiner-unet": Preset(UNET_CONFIGS["sdxl-refiner"], 2, (128, 128), 77),
}


def lower_unet(config: UNetConfig, inputs: Inputs, *, platform: str = "cuda", backward: bool = False) -> dict:
    """Lower a whole UNetModel of `config` with abstract weights; the report of lower_spatial_transformer.

    x [batch, *hw, in_channels], float32 timesteps [batch], context [batch, context_tokens,
    context_dim] and, for a model with a vector y, y [batch, adm_in_channels]. The backward
    program: gradients of a scalar loss with respect to every parameter, x and the context.
    """
    dtype = jnp.dtype(inputs.dtype)
    model = models.abstract(config, dtype=dtype, param_dtype=dtype)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    b = inputs.batch
    x = jax.ShapeDtypeStruct((b, *inputs.hw, config.in_channels), dtype)
    t = jax.ShapeDtypeStruct((b,), jnp.float32)
    context = jax.ShapeDtypeStruct((b, inputs.context_tokens, config.context_dim), dtype)
    y = jax.ShapeDtypeStruct((b, config.adm_in_channels), dtype) if config.adm_in_channels else None

    def forward(params, rest, x, t, context, y):
        return nnx.merge(graphdef, params, rest)(x, t, context, y)

    def loss(params, rest, x, t, context, y):
        return forward(params, rest, x, t, context, y).astype(jnp.float32).mean()

    programs = {"forward": lower(forward, params, rest, x, t, context, y, platform=platform)}
    if backward:
        programs["backward"] = lower(jax.grad(loss, argnums=(0, 2, 4)), params, rest, x, t, context, y, platform=platform)
    shapes = {"x": list(x.shape), "timesteps": list(t.shape), "context": list(context.shape)}
    shapes |= {"y": list(y.shape)} if y is not None else {}
    return _report(model, programs, platform, config.to_dict(), shapes | {"dtype": dtype.name})


# `flax-sgm lower --config NAME-vae`: a released autoencoder's decode of one latent at the model's own size
# (SDXL: 128 x 128, a 1024 x 1024 image; its mid-block attention runs over 16,384 pixels). No context.
VAE_PRESETS = {
    "sd-vae": Preset(VAE_CONFIGS["sd"], 1, (64, 64), 0),
    "sdxl-vae": Preset(VAE_CONFIGS["sdxl"], 1, (128, 128), 0),
}


def lower_vae(config: AutoencoderConfig, inputs: Inputs, *, platform: str = "cuda", backward: bool = False) -> dict:
    """Lower an AutoencoderKL's decode of latents [batch, *hw, embed_dim] with abstract weights; the report of
    lower_spatial_transformer (its attention calls named inside the decoder). The backward program: gradients
    of a scalar loss with respect to every parameter and the latent (training through the decoder)."""
    if any(isinstance(m, LinAttnBlock) for _, m in nnx.iter_modules(models.abstract(config))):
        raise ValueError("lower_vae: linear attention (attn_type 'linear') calls no attention kernel to report")
    dtype = jnp.dtype(inputs.dtype)
    model = models.abstract(config, dtype=dtype, param_dtype=dtype)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    z = jax.ShapeDtypeStruct((inputs.batch, *inputs.hw, config.embed_dim), dtype)

    def forward(params, rest, z):
        return nnx.merge(graphdef, params, rest).decode(z)

    def loss(params, rest, z):
        return forward(params, rest, z).astype(jnp.float32).mean()

    programs = {"forward": lower(forward, params, rest, z, platform=platform)}
    if backward:
        programs["backward"] = lower(jax.grad(loss, argnums=(0, 2)), params, rest, z, platform=platform)
    return _report(model.decoder, programs, platform, config.to_dict(), {"z": list(z.shape), "dtype": dtype.name})
