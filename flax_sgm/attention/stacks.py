"""Which SpatialTransformer stacks a checkpoint holds, and each one's config, before any weight is read.

A stack's shape is read off its tensors (layout.py); its heads come from the
diffusers config.json beside the weights (diffusers_config.py) or from the caller.
`plan_stacks` is what loading and conversion (pretrained.py) start from;
`inspect_stacks` is what `flax-sgm inspect` prints.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from flax_sgm.attention import diffusers as diffusers_config, layout
from flax_sgm.attention.config import SpatialTransformerConfig
from flax_sgm.errors import CheckpointError
from flax_sgm.checkpoints.sources import Source, TensorInfo


class Stack(NamedTuple):
    """A stack of a checkpoint: where it is, its config, and its tensors."""

    prefix: str
    config: SpatialTransformerConfig
    keys: tuple[str, ...]
    dtype: np.dtype  # its float tensors promoted: the parameters' dtype unless another is asked for
    nbytes: int


def inspect_stacks(source: Source) -> tuple[list[dict], dict[str, str]]:
    """What every stack's shapes say (and its heads, where a diffusers config.json gives them), and why the
    others cannot be converted."""
    found, unsupported = [], {}
    prefixes = layout.find_stacks(source.infos)
    specs = _config_specs(source, prefixes)
    for prefix in prefixes:
        infos = _under(source, prefix)
        try:
            shape = _read_stack(source, infos, prefix, specs.get(prefix), None)
        except CheckpointError as err:
            unsupported[prefix] = str(err)
            continue
        found.append({
            "prefix": prefix, **shape._asdict(), "heads": specs[prefix].heads.heads if prefix in specs else None,
            "dtype": _float_dtype(infos).name,
            "tensors": len(infos), "bytes": sum(i.nbytes for i in infos.values()),
        })
    return found, unsupported


def select_prefixes(
    source: Source, prefixes: Iterable[str] = (), *, all_stacks: bool = False, offer_all: bool = False
) -> list[str]:
    """The prefixes asked for: the given ones, every stack (`all_stacks`), or the checkpoint's only stack.

    `offer_all`: the caller takes --all, so a refusal may suggest it.
    """
    keys = list(source.infos)
    prefixes = [layout.normalize_prefix(p) for p in prefixes]
    if all_stacks and prefixes:
        raise CheckpointError("give --prefix or --all, not both")
    for prefix in prefixes:
        if not any(k.startswith(prefix) for k in keys):
            raise CheckpointError(f"{source.path}: no key starts with {prefix!r}; {layout.prefix_hint(keys, prefix)}")
    if prefixes:
        return list(dict.fromkeys(prefixes))
    found = layout.find_stacks(keys)
    if not found:
        raise CheckpointError(f"{source.path}: no SpatialTransformer stack found; {layout.prefix_hint(keys, '')}")
    if all_stacks or len(found) == 1:
        return found
    raise CheckpointError(
        f"{source.path} holds {len(found)} SpatialTransformer stacks; choose one with --prefix"
        f"{' (or all with --all)' if offer_all else ''}: "
        f"{layout.listing(found, 6)}"
    )


def plan_stacks(
    source: Source,
    prefixes: Iterable[str] = (),
    *,
    all_stacks: bool = False,
    skip_unsupported: bool = False,
    heads: int | None = None,
    head_dim: int | None = None,
    disable_self_attn: bool | None = None,
    offer_all: bool = False,
) -> tuple[list[Stack], dict[str, str]]:
    """The selected stacks with their configs, checked before any weight is read; and the skipped ones with why.

    Under `all_stacks` a stack SpatialTransformer cannot build is refused, naming
    --prefix, unless `skip_unsupported`. Heads: a diffusers config.json gives them
    per stack (and `heads`/`head_dim` must then agree); otherwise `heads` or
    `head_dim` splits every stack's inner dim.
    """
    selected = select_prefixes(source, prefixes, all_stacks=all_stacks, offer_all=offer_all)
    specs = _config_specs(source, selected)
    stacks, skipped = [], {}
    for prefix in selected:
        infos, spec = _under(source, prefix), specs.get(prefix)
        try:
            shape = _read_stack(source, infos, prefix, spec, disable_self_attn)
        except CheckpointError as err:
            if not all_stacks:
                raise
            if not skip_unsupported:
                raise CheckpointError(
                    f"{err}; convert the other stacks with --prefix, or pass --skip-unsupported to leave it out"
                ) from None
            skipped[prefix] = str(err)
            continue
        stack_heads, stack_head_dim, options = heads, head_dim, {}
        if spec is not None:
            stack_heads, stack_head_dim = _heads_from_config(source, prefix, shape.inner_dim, spec.heads, heads, head_dim)
            options = {"dropout": spec.dropout}
        config = SpatialTransformerConfig.from_weights(
            infos, prefix, heads=stack_heads, head_dim=stack_head_dim, disable_self_attn=shape.disable_self_attn, **options
        )
        stacks.append(Stack(prefix, config, tuple(infos), _float_dtype(infos), sum(i.nbytes for i in infos.values())))
    return stacks, skipped


def _config_specs(source: Source, prefixes: list[str]) -> dict[str, diffusers_config.StackSpec]:
    """What the diffusers config.json beside the weights says about each stack (none without one)."""
    if source.config is None:
        return {}
    return diffusers_config.stack_specs(source.config, prefixes, str(source.config_path))


def _read_stack(source: Source, infos, prefix: str, spec, disable_self_attn: bool | None) -> layout.StackShape:
    """The stack's shape, with the config's only_cross_attention, which the weights cannot always show."""
    if spec is not None:
        if disable_self_attn is not None and disable_self_attn != spec.disable_self_attn:
            raise CheckpointError(
                f"disable_self_attn={disable_self_attn} contradicts {source.config_path}, whose only_cross_attention "
                f"for {prefix!r} is {str(spec.disable_self_attn).lower()}; leave it out"
            )
        disable_self_attn = True if spec.disable_self_attn else disable_self_attn  # False: check_weights says
    shape = layout.read_stack(infos, prefix, disable_self_attn=disable_self_attn)
    if spec is not None:
        diffusers_config.check_weights(spec, shape, prefix, str(source.config_path))
    return shape


def _heads_from_config(source: Source, prefix: str, inner: int, said: layout.Heads, heads, head_dim) -> tuple[int, None]:
    n_heads = said.heads
    gives = f"{source.config_path} gives {prefix!r} {n_heads} heads"
    if said.head_dim is not None and n_heads * said.head_dim != inner:
        raise CheckpointError(f"{gives} of {said.head_dim}, but its weights have an inner dim of {inner}")
    if inner % n_heads:
        raise CheckpointError(f"{gives}, which do not divide the inner dim {inner} of its weights")
    if (heads is not None or head_dim is not None) and layout.resolve_heads(inner, heads, head_dim, prefix) != (
        n_heads, inner // n_heads
    ):
        given = f"heads={heads}" if heads is not None else f"head_dim={head_dim}"
        raise CheckpointError(
            f"{given} contradicts {source.config_path}, which gives {prefix!r} {n_heads} heads of {inner // n_heads}; "
            "leave it out"
        )
    return n_heads, None


def _float_dtype(infos: dict[str, TensorInfo]) -> np.dtype:
    """A stack's float tensors' dtypes, promoted (float32 when it has none)."""
    floats = [i.dtype for i in infos.values() if jnp.issubdtype(i.dtype, jnp.floating)]
    return np.dtype(jnp.result_type(*floats)) if floats else np.dtype("float32")


def _under(source: Source, prefix: str) -> dict[str, TensorInfo]:
    return {k: i for k, i in source.infos.items() if k.startswith(prefix)}
