"""Gradient checkpointing of a block, and the policies that say what it keeps.

`checkpointed_call` runs a module method under `jax.checkpoint` as a pure function
of the module's split state: the Params go in as arguments and never come back, so
a model closed over by `jax.jit`, `jax.grad`, `lax.scan` or `jax.export` can be
checkpointed (nnx.remat writes every Param back into the outer module, which a
Param from another trace level refuses). Only state that really changes (dropout
RNG counters; a dropout-free model has none) is written back, once the call has
succeeded, so a failing call leaves the module as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

from flax_sgm.attention.backends import forward_mode_scope, is_forward_mode
from flax_sgm.attention.policy import ATTENTION_OUT, ATTENTION_STATS
from flax_sgm.errors import AbstractModelError

# jax's cuDNN fused-attention forward: its outputs hold the softmax statistics that the
# fused backward reads. Kept by name, or every attention forward runs again in the backward.
CUDNN_FORWARD_PRIMITIVES = ("dot_product_attention_fwd", "dot_product_attention_fwd_wrapper")


def _save_cudnn_forward(prim, *_, **__) -> bool:
    return prim.name in CUDNN_FORWARD_PRIMITIVES


CHECKPOINT_POLICIES: dict[str, Callable] = {
    # What torch's checkpoint does: nothing of the block is kept; the backward reruns it.
    "recompute": jax.checkpoint_policies.nothing_saveable,
    # Keep each attention's output and the statistics its backward needs (cuDNN's or the
    # chunked path's); the projections, norms and feed-forward are recomputed.
    "save_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT, ATTENTION_STATS), _save_cudnn_forward
    ),
}
DEFAULT_CHECKPOINT_POLICY = "save_attention"


def check_policy(name: str) -> str:
    if name not in CHECKPOINT_POLICIES:
        raise ValueError(f"checkpoint_policy must be one of {sorted(CHECKPOINT_POLICIES)}; got {name!r}")
    return name


def checkpointed_call(method: Callable, module: nnx.Module, *args, policy: str, static: Mapping[str, Any] | None = None):
    """`method(module, *args, **static)` under jax.checkpoint with the named policy.

    `args` are arrays or None (traced); `static` are Python values fixed at trace
    time (the cross-frame count). Values and gradients equal the unchecked call's.
    """
    static = dict(static or {})
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    for path, leaf in jax.tree.leaves_with_path(params):  # jax.checkpoint would refuse them deep inside
        if isinstance(leaf, jax.ShapeDtypeStruct):
            name = ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path).removesuffix(".value")
            raise AbstractModelError(f"its {type(module).__name__}'s {name} {list(leaf.shape)}")
    rest_leaves, rest_def = jax.tree.flatten(rest)
    changed: list[bool] = []  # per leaf of `rest`, set while tracing

    def pure(params, rest, *args):
        before = jax.tree.leaves(rest)  # read first: merge shares rest's Variables with the module
        inner = nnx.merge(graphdef, params, rest)
        out = method(inner, *args, **static)
        after = jax.tree.leaves(nnx.state(inner, nnx.Not(nnx.Param)))
        changed[:] = [a is not b for a, b in zip(after, before)]
        return out, [a for a, c in zip(after, changed) if c]

    # jax.checkpoint traces `pure` afresh: tell the attention inside whether this is forward-mode AD.
    with forward_mode_scope(is_forward_mode(params, args)):
        out, updates = jax.checkpoint(pure, policy=CHECKPOINT_POLICIES[check_policy(policy)])(params, rest, *args)
    if updates:  # e.g. dropout RNG counters; unchanged state is never written
        updates = iter(updates)
        nnx.update(module, jax.tree.unflatten(rest_def, [next(updates) if c else v for v, c in zip(rest_leaves, changed)]))
    return out
