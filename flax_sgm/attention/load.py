"""Checkpoints in, SpatialTransformers out: `load_pretrained`, `load_stack`, `convert_file`.

A checkpoint (sources.py: a file, a sharded index, a diffusers model directory)
holds stacks; stacks.py plans them (each one's SpatialTransformerConfig, read off
its shapes, its heads from the diffusers config.json or the caller) before any
weight is read. Conversion is convert.py's table, strict. `convert_file` writes the output directory of
output.py; `load_pretrained` reads either kind of input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_sgm.checkpoints import convert, converted as output
from flax_sgm.attention.config import SpatialTransformerConfig
from flax_sgm.errors import CheckpointError
from flax_sgm.checkpoints.sources import Source, open_source
from flax_sgm.attention.stacks import Stack, plan_stacks
from flax_sgm import models

PARAM_DTYPES = ("float32", "bfloat16", "float16")


def _chosen_param_dtype(stack: Stack, param_dtype) -> tuple[np.dtype, bool]:
    return choose_param_dtype(stack.dtype, param_dtype)


def choose_param_dtype(stored, param_dtype) -> tuple[np.dtype, bool]:
    """The parameters' dtype (the caller's, else as `stored`), and whether a narrowing cast is allowed (only when
    the caller picked the dtype)."""
    if param_dtype is None:
        return stored, False
    try:
        dtype = np.dtype(jnp.dtype(param_dtype))
    except TypeError:
        raise CheckpointError(f"param dtype must be one of {PARAM_DTYPES}; got {param_dtype!r}") from None
    if dtype.name not in PARAM_DTYPES:
        raise CheckpointError(f"param dtype must be one of {PARAM_DTYPES}; got {dtype.name}")
    return dtype, True


def stack_plan(source: Source, stack: Stack, model: nnx.Module, allow_downcast: bool) -> list[convert.Step]:
    """The stack's checked conversion_plan into `model`; no tensor is read."""
    return convert.conversion_plan(
        model, {k: source.infos[k] for k in stack.keys}, prefix=stack.prefix, allow_downcast=allow_downcast,
        origin=str(source.path),
    )


def build_stack(source: Source, stack: Stack, *, dtype=None, param_dtype=None, seed: int = 0, **options):
    """The stack's weights in a ready SpatialTransformer, tensor by tensor (convert.load_planned)."""
    param_dtype, downcast = _chosen_param_dtype(stack, param_dtype)
    model = models.abstract(stack.config.replace(**options), dtype=dtype, param_dtype=param_dtype, seed=seed)
    plan = stack_plan(source, stack, model, downcast)
    convert.load_planned(model, plan, source)
    return models.ready(model)


def load_stack(
    path,
    prefix: str | None = None,
    *,
    heads: int | None = None,
    head_dim: int | None = None,
    disable_self_attn: bool | None = None,
    variant: str | None = None,
    dtype=None,
    param_dtype=None,
) -> tuple[Stack, nnx.Module, dict[str, np.ndarray]]:
    """(the stack, its SpatialTransformer, its torch-named weights without the prefix) from a checkpoint.

    For comparing against torch (`flax-sgm verify`): the weights are read once and
    kept. `prefix` may be left out when the checkpoint holds one stack.
    """
    with open_source(path, variant) as source:
        (stack,), _ = plan_stacks(
            source, [prefix] if prefix is not None else [], heads=heads, head_dim=head_dim,
            disable_self_attn=disable_self_attn,
        )
        values = {k: source.read(k) for k in stack.keys}
    param_dtype, downcast = _chosen_param_dtype(stack, param_dtype)
    model = models.abstract(stack.config, dtype=dtype, param_dtype=param_dtype)
    plan = convert.conversion_plan(model, values, prefix=stack.prefix, allow_downcast=downcast)
    convert.load_planned(model, plan, values)
    return stack, models.ready(model), {k[len(stack.prefix):]: v for k, v in values.items()}



def load_pretrained(
    path, prefix: str | None = None, *, heads: int | None = None, head_dim: int | None = None,
    disable_self_attn: bool | None = None, variant: str | None = None, dtype=None, param_dtype=None, seed: int = 0,
    **options,
) -> nnx.Module:
    """A ready SpatialTransformer from a `flax-sgm convert` output or any checkpoint (sources.open_source).

    path: a converted output directory, a checkpoint file (.safetensors, .ckpt, .pt,
        .pth, .bin), a sharded *.safetensors.index.json, or a diffusers model directory
        (its config.json is the spec: diffusers_config.py).
    prefix: the stack's key prefix when there are several ("down_blocks.1.attentions.0").
    heads / head_dim: split the inner dim where no config.json says it (one of them).
    disable_self_attn: force sgm's disable_self_attn (attn1 attends to the context) where
        the weights cannot show it (the context as wide as the inner dim); a diffusers
        config.json says it (only_cross_attention).
    variant: a diffusers directory's variant files ("fp16", or any name it was saved with).
    dtype: the compute dtype (the output's too); param_dtype: the parameters' (default:
        as stored; a narrower one rounds).
    seed: seeds the dropout keys (used after model.train()).
    options: how it runs (SpatialTransformerConfig.OPTIONS): use_checkpoint, sdp_backend, checkpoint_policy,
        attn_type, dropout.

    The stack is returned in inference mode (model.eval(): dropout off), as diffusers'
    from_pretrained returns its models; model.train() turns dropout on.
    """
    SpatialTransformerConfig.check_options(options, str(path))
    if output.is_output(path):
        _nothing_to_read_for_output(path, heads, head_dim, disable_self_attn, variant)
        weights, records = output.read_output(path)
        record = output.select_record(path, output.records_of(path, records, output.STACK_RECORD), prefix)
        return output.load_record(path, weights, record, dtype=dtype, param_dtype=param_dtype, seed=seed, options=options)
    with open_source(path, variant) as source:
        (stack,), _ = plan_stacks(
            source, [prefix] if prefix is not None else [], heads=heads, head_dim=head_dim,
            disable_self_attn=disable_self_attn,
        )
        return build_stack(source, stack, dtype=dtype, param_dtype=param_dtype, seed=seed, **options)


def load_pretrained_all(
    path, *, heads: int | None = None, head_dim: int | None = None, disable_self_attn: bool | None = None,
    variant: str | None = None, dtype=None, param_dtype=None, skip_unsupported: bool = False, seed: int = 0,
    **options,
) -> dict[str, nnx.Module]:
    """Every stack of a `flax-sgm convert` output or a checkpoint, by submodule name as torch's
    `get_submodule` takes it ("down_blocks.1.attentions.0"; "" for a stack at the root).

    `skip_unsupported` leaves out the stacks SpatialTransformer cannot build; the
    other arguments are load_pretrained's. Each stack is in inference mode (model.eval());
    model.train() turns its dropout on.
    """
    SpatialTransformerConfig.check_options(options, str(path))
    if output.is_output(path):
        _nothing_to_read_for_output(path, heads, head_dim, disable_self_attn, variant)
        weights, records = output.read_output(path)
        records = output.records_of(path, records, output.STACK_RECORD)
        return {_name(r.prefix): output.load_record(path, weights, r, dtype=dtype, param_dtype=param_dtype, seed=seed, options=options) for r in records}
    with open_source(path, variant) as source:
        stacks, _ = plan_stacks(
            source, all_stacks=True, skip_unsupported=skip_unsupported, heads=heads, head_dim=head_dim,
            disable_self_attn=disable_self_attn,
        )
        return {
            _name(s.prefix): build_stack(source, s, dtype=dtype, param_dtype=param_dtype, seed=seed, **options)
            for s in stacks
        }


def _name(prefix: str) -> str:
    """'down_blocks.1.attentions.0.' -> 'down_blocks.1.attentions.0', as torch's get_submodule takes it."""
    return prefix.removesuffix(".")


def _nothing_to_read_for_output(path, heads, head_dim, disable_self_attn, variant) -> None:
    given = [f"{name}=" for name, value in (("heads", heads), ("head_dim", head_dim),
             ("disable_self_attn", disable_self_attn), ("variant", variant)) if value is not None]
    if given:
        raise CheckpointError(f"{path}: a converted output says its whole config; leave out {', '.join(given)}")


class ConvertedStack(NamedTuple):
    prefix: str
    config: SpatialTransformerConfig
    param_dtype: str
    params: int
    nbytes: int


def convert_file(
    source_path,
    out,
    prefixes: Iterable[str] = (),
    *,
    all_stacks: bool = False,
    skip_unsupported: bool = False,
    heads: int | None = None,
    head_dim: int | None = None,
    weights: str = "orbax",
    param_dtype: str | None = None,
    disable_self_attn: bool | None = None,
    variant: str | None = None,
    overwrite: bool = False,
    progress: Callable[[int], Any] | None = None,
    on_plan: Callable[[list[Stack], dict[str, str]], Any] | None = None,
) -> list[ConvertedStack]:
    """Convert stacks of a checkpoint into the output directory `out` (output.py); returns what was written.

    `variant` picks a diffusers directory's variant files ("fp16"); the other stack
    arguments are load_pretrained's. Every stack's config and conversion plan is
    checked before any weight is read.
    Stacks are converted one at a time and tensor by tensor; `out` appears only
    when complete.
    """
    if weights not in output.WEIGHT_FORMATS:
        raise CheckpointError(f"weights format must be one of {output.WEIGHT_FORMATS}; got {weights!r}")
    out = Path(out)
    output.check_output(out, overwrite, source_path)
    with open_source(source_path, variant) as source:
        stacks, skipped = plan_stacks(
            source, prefixes, all_stacks=all_stacks, skip_unsupported=skip_unsupported, heads=heads,
            head_dim=head_dim, disable_self_attn=disable_self_attn, offer_all=True,
        )
        plans = []
        for stack in stacks:
            dtype, downcast = _chosen_param_dtype(stack, param_dtype)
            plans.append(stack_plan(source, stack, models.abstract(stack.config, param_dtype=dtype), downcast))
        if on_plan:
            on_plan(stacks, skipped)
        read, private = _Reads(source, progress), source.private
        written = []
        with output.OutputWriter(out, weights, overwrite=overwrite, source=source_path) as writer:
            for stack, plan in zip(stacks, plans):
                model = models.abstract(stack.config, param_dtype=plan[0].dtype)  # traced once per config, then cached
                writer.add_model(stack.prefix, stack.config, convert.load_planned(model, plan, read, copy=not private))
                del model  # written: at most one stack is in memory
                source.release()
                params = sum(math.prod(step.shape) for step in plan)
                written.append(ConvertedStack(stack.prefix, stack.config, plan[0].dtype.name, params, stack.nbytes))
        return written


class _Reads:
    """source[key], reporting the bytes read."""

    def __init__(self, source: Source, progress: Callable[[int], Any] | None):
        self.source, self.progress = source, progress

    def __getitem__(self, key: str) -> np.ndarray:
        value = self.source[key]  # a view of the bytes: load_planned makes the one copy
        if self.progress:
            self.progress(value.nbytes)
        return value
