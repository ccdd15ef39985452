"""Weight conversion between torch state_dicts (sgm/diffusers names) and flax_sgm modules.

Conversion is data: `conversion_table(model)` lists one Row per parameter,
(torch key, flax path, transform), built by walking the module tree: each module class
names its torch children where they differ (`torch_names`: nn.Sequential indices) and
LEAF_RULES below holds each layer's parameters. Both
directions read the same rows. A KeyLayout renames the rows' keys for another
checkpoint layout of the same model (a UNet under diffusers' names: unet_layout.py).

Strict by default: every source key under the prefix is consumed, every
parameter is filled, shapes and dtypes agree, and one ConversionError lists
every problem at once. Nothing is dropped with only a warning.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from flax_sgm.errors import ConversionError
from flax_sgm.nn.primitives import Conv, Embed, GroupNorm, LayerNorm, Linear


class Transform(NamedTuple):
    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    # (index, count): the row's torch tensor holds `count` parameters stacked along its first axis and the row is
    # the index-th of them (to_flax is handed the whole tensor, to_torch gives the row's slice); see `fused`.
    part: tuple[int, int] | None = None


IDENTITY = Transform("identity", lambda w: w, lambda w: w)
# torch Linear weight [out, in] <-> flax kernel [in, out].
LINEAR = Transform("linear", lambda w: w.T, lambda w: w.T)
# torch Conv2d weight [out, in, kh, kw] <-> flax kernel [kh, kw, in, out] (channels-last).
CONV = Transform("conv", lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1))
# torch norm weight <-> flax scale: same vector.
NORM = Transform("norm", lambda w: w, lambda w: w)
# A layout holding a 1x1 conv's weight as a Linear's: torch [out, in] <-> flax kernel [1, 1, in, out]
# (diffusers' VAE attention to_q/to_k/to_v/to_out.0, where sgm's AttnBlock has 1x1 convs).
LINEAR_AS_CONV1X1 = Transform("linear_as_conv1x1", lambda w: w.T[None, None], lambda w: w[0, 0].T)



def fused(transform: Transform, index: int, count: int) -> Transform:
    """The index-th of `count` equal slices along torch's first axis, then `transform`: torch's
    nn.MultiheadAttention `in_proj_weight` [3 * dim, dim] (open_clip) stacks q, k and v [dim, dim] that way.
    The rows sharing one torch key are written back concatenated in index order (to_torch_state_dict)."""

    def to_flax(w):
        size = w.shape[0] // count
        return transform.to_flax(w[index * size : (index + 1) * size])

    return Transform(f"{transform.name}[{index}/{count}]", to_flax, transform.to_torch, (index, count))


# Layer type -> {flax parameter: (torch parameter, transform)}.
LEAF_RULES: dict[type, dict[str, tuple[str, Transform]]] = {
    Linear: {"kernel": ("weight", LINEAR), "bias": ("bias", IDENTITY)},
    Conv: {"kernel": ("weight", CONV), "bias": ("bias", IDENTITY)},
    LayerNorm: {"scale": ("weight", NORM), "bias": ("bias", IDENTITY)},
    GroupNorm: {"scale": ("weight", NORM), "bias": ("bias", IDENTITY)},
    Embed: {"embedding": ("weight", IDENTITY)},  # torch.nn.Embedding weight [num, features], the same table
}


class Row(NamedTuple):
    torch_key: str
    flax_path: tuple
    transform: Transform


class KeyLayout(NamedTuple):
    """Another checkpoint layout's names for a model's keys: (model's prefix, layout's prefix) pairs.

    A key takes the pair of its longest matching prefix; a key no pair matches is an error.
    """

    name: str
    prefixes: tuple[tuple[str, str], ...]
    # (model's, layout's) prefix of each module the layout holds whole under another name (sgm's ResBlock
    # `input_blocks.1.0.` is diffusers' ResnetBlock2D `down_blocks.0.resnets.0.`): what verify reports.
    modules: tuple[tuple[str, str], ...] = ()
    # (model's key, transform) where the layout stores a tensor otherwise than the model's own names do
    # (open_clip's `text_projection` [in, out], its fused `in_proj_weight`: `fused`).
    transforms: tuple[tuple[str, Transform], ...] = ()

    def row(self, row: Row) -> Row:
        """The row under this layout's name and transform."""
        transform = dict(self.transforms).get(row.torch_key, row.transform)
        return Row(self.rename(row.torch_key), row.flax_path, transform)

    def rename(self, key: str) -> str:
        best = max((p for p in self.prefixes if key.startswith(p[0])), key=lambda p: len(p[0]), default=None)
        if best is None:
            raise TypeError(f"key layout {self.name!r} has no name for {key}")
        return best[1] + key[len(best[0]):]

    def module_name(self, name: str) -> str:
        """The model's name of a module the layout calls `name` ('down_blocks.0.resnets.0' -> 'input_blocks.1.0')."""
        key = name + "."
        ours = next((m for m, theirs in self.modules if theirs == key), None)
        if ours is None:
            best = max((p for p in self.prefixes if key.startswith(p[1])), key=lambda p: len(p[1]), default=None)
            if best is None:
                raise ValueError(f"key layout {self.name!r} has no module {name!r}")
            ours = best[0] + key[len(best[1]):]
        return ours[:-1]

    def part(self, name: str) -> KeyLayout:
        """The layout of the module the layout calls `name`, on its own (its keys without the module's prefix)."""
        ours, theirs = self.module_name(name) + ".", name + "."
        pairs = [(m[len(ours):], t[len(theirs):]) for m, t in self.prefixes if m.startswith(ours) and t.startswith(theirs)]
        # A module inside a renamed one keeps the rest of its names.
        pairs += [("", self.rename(ours)[len(theirs):])] if not pairs else []
        transforms = tuple((k[len(ours):], t) for k, t in self.transforms if k.startswith(ours))
        return KeyLayout(f"{self.name}:{name}", tuple(pairs), transforms=transforms)


def torch_names(node) -> dict[str, str]:
    """A module's torch child names where they differ from its attributes (nn.Sequential indices): each class
    declares its own as `torch_names`, so the engine knows no model family."""
    return getattr(type(node), "torch_names", {})


def _lookup(type_table: Mapping[type, Any], node) -> Any:
    """The table entry of the node's class or its nearest listed base."""
    for cls in type(node).__mro__:
        if cls in type_table:
            return type_table[cls]
    return None


def conversion_table(model: nnx.Module, *, layout: KeyLayout | None = None) -> list[Row]:
    """One Row per parameter of `model`, in the model's parameter order; keys renamed by `layout` if given."""
    return _rows(model, _flat_params(model), layout)


def _flat_params(model: nnx.Module) -> dict[tuple, Any]:
    return dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def _rows(model: nnx.Module, params: Mapping[tuple, Any], layout: KeyLayout | None) -> list[Row]:
    rows = []
    for path in params:
        node, torch_parts = model, []
        for part in path[:-1]:
            renames = torch_names(node)
            torch_parts.append(renames.get(part, str(part)))
            node = node[part] if isinstance(part, int) else getattr(node, part)
        rules = _lookup(LEAF_RULES, node)
        if rules is None or path[-1] not in rules:
            raise TypeError(f"no conversion rule for parameter {'.'.join(map(str, path))} of {type(node).__name__}")
        torch_name, transform = rules[path[-1]]
        row = Row(".".join(torch_parts + [torch_name]), tuple(path), transform)
        rows.append(layout.row(row) if layout else row)
    return rows


def torch_shapes(model: nnx.Module, *, prefix: str = "", layout: KeyLayout | None = None) -> dict[str, tuple[int, ...]]:
    """The torch state dict's key -> shape of `model` (which may be abstract), from the table; nothing is allocated."""
    params = _flat_params(model)
    rows = _rows(model, params, layout)
    return {prefix + row.torch_key: _torch_shape(row, params[row.flax_path].shape) for row in rows}


def _torch_shape(row: Row, flax_shape) -> tuple[int, ...]:
    """The shape of the row's whole torch tensor (all of a fused tensor's parts)."""
    shape = row.transform.to_torch(np.broadcast_to(np.empty((), np.bool_), tuple(flax_shape))).shape
    if row.transform.part is not None:
        shape = (shape[0] * row.transform.part[1], *shape[1:])
    return shape


def flax_submodule(model: nnx.Module, torch_name: str) -> nnx.Module:
    """The flax submodule of a torch submodule name: 'transformer_blocks.0.ff.net.2' -> ...ff.project_out.

    Walks `torch_names` backwards (a torch name may span two parts, `to_out.0`); raises
    ValueError when `model` has no such submodule.
    """
    node, parts = model, [p for p in torch_name.split(".") if p]
    while parts:
        renames = {torch: flax for flax, torch in torch_names(node).items()}
        two = ".".join(parts[:2])
        if len(parts) > 1 and two in renames:
            attr, parts = renames[two], parts[2:]
        else:
            attr, parts = renames.get(parts[0], parts[0]), parts[1:]
        try:
            node = node[int(attr)] if attr.isdigit() else getattr(node, attr)
        except (AttributeError, IndexError, TypeError, KeyError):
            raise ValueError(f"{type(model).__name__} has no submodule for torch's {torch_name!r} (at {attr!r})") from None
        if not isinstance(node, nnx.Module):
            raise ValueError(f"{type(model).__name__}: torch's {torch_name!r} names a {type(node).__name__}, not a module")
    return node


def to_numpy(value) -> np.ndarray:
    """A torch tensor (bfloat16 too) or array-like as a numpy array, without copying where possible."""
    if hasattr(value, "detach") and type(value).__module__.startswith("torch"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            import torch

            return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


def numpy_dtype(dtype) -> np.dtype:
    """A numpy, jax or torch dtype as a numpy dtype (torch.bfloat16 -> ml_dtypes.bfloat16)."""
    if type(dtype).__module__.startswith("torch"):
        name = str(dtype).removeprefix("torch.")
        return np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
    return np.dtype(dtype)


def _shape_dtype(value) -> tuple[tuple[int, ...], np.dtype | str]:
    """Shape and dtype without reading a lazy value; a dtype numpy cannot hold comes back as its name."""
    try:
        return tuple(value.shape), numpy_dtype(value.dtype)
    except (AttributeError, TypeError):
        pass
    try:
        array = to_numpy(value)
    except (TypeError, RuntimeError):  # e.g. torch.qint8
        return tuple(getattr(value, "shape", ())), str(getattr(value, "dtype", type(value).__name__))
    return array.shape, array.dtype


def _is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def _is_widening(src, dst) -> bool:
    """True when every value of `src` is exactly representable in `dst`."""
    return jnp.promote_types(src, dst) == jnp.dtype(dst)


class Step(NamedTuple):
    """One parameter of a checked conversion: read `key`, apply `row.transform.to_flax`, cast to `dtype`."""

    row: Row
    key: str  # the source key, prefix included
    shape: tuple[int, ...]  # the Flax parameter's
    dtype: np.dtype


def conversion_plan(
    model: nnx.Module,
    sources: Mapping[str, Any],
    *,
    prefix: str = "",
    strict: bool = True,
    allow_downcast: bool = False,
    layout: KeyLayout | None = None,
    origin: str = "",
) -> list[Step]:
    """Check torch-named sources against `model` without reading a value; one Step per parameter.

    `sources` maps keys to arrays, torch tensors or anything with `.shape` and
    `.dtype` (jax.ShapeDtypeStruct, a checkpoint's tensor infos); only keys under
    `prefix` count, and only those the model uses are looked at. Raises one
    ConversionError listing every missing, unexpected (when strict), misshapen or
    wrongly typed key. `model` may be abstract. `layout`: the sources' key layout (default: the model's own names).
    `origin`: where the tensors come from (a path), for the error.
    """
    params = _flat_params(model)
    rows = _rows(model, params, layout)
    source = {k[len(prefix):]: v for k, v in sources.items() if k.startswith(prefix)}
    known = {row.torch_key for row in rows}
    missing = [prefix + row.torch_key for row in rows if row.torch_key not in source]
    unexpected = sorted(prefix + k for k in source if k not in known) if strict else []
    mismatched, plan = [], []
    for row in rows:
        if row.torch_key not in source:
            continue
        key = prefix + row.torch_key
        target = params[row.flax_path]
        target_shape, target_dtype = tuple(target.shape), jnp.dtype(target.dtype)
        shape, dtype = _shape_dtype(source[row.torch_key])
        if isinstance(dtype, str) or not _is_float(dtype):
            mismatched.append(f"dtype mismatch: {key} is {dtype}, expected a float dtype ({target_dtype.name})")
            continue
        if not _is_float(target_dtype):  # a float cast to ints or bools is no narrowing: it is zeros
            mismatched.append(f"dtype mismatch: {key} goes to a {target_dtype.name} parameter; the model's must be floats")
            continue
        if not (allow_downcast or _is_widening(dtype, target_dtype)):
            mismatched.append(
                f"dtype mismatch: {key} is {dtype}; casting to the model's {target_dtype.name} would lose "
                "precision (build the model with that param_dtype, or pass allow_downcast=True)"
            )
            continue
        torch_shape_expected = _torch_shape(row, target_shape)
        if shape != torch_shape_expected:
            mismatched.append(
                f"shape mismatch: {key} has shape {list(shape)}, the model needs {list(torch_shape_expected)}"
            )
            continue
        plan.append(Step(row, key, target_shape, target_dtype))
    if missing or unexpected or mismatched:
        where = (f" from {origin}" if origin else "") + (f" (prefix {prefix!r})" if prefix else "")
        raise ConversionError(missing, unexpected, mismatched, context=f" for {type(model).__name__}{where}")
    return plan


def load_torch_state_dict(
    model: nnx.Module,
    state_dict: Mapping[str, Any],
    *,
    prefix: str = "",
    strict: bool = True,
    allow_downcast: bool = False,
    copy: bool = True,
    layout: KeyLayout | None = None,
) -> nnx.Module:
    """Fill `model` in place from torch-named weights and return it.

    `state_dict` values are torch tensors or arrays of any float dtype; each is
    cast to the parameter's dtype when that is lossless (a narrowing cast, e.g.
    float32 -> bfloat16, needs `allow_downcast=True`). Only keys starting with
    `prefix` are read, with the prefix removed. `model` may be abstract (from
    `nnx.eval_shape`). With `strict=False`, keys the model does not have are
    ignored; missing parameters, bad shapes and bad dtypes always raise, before
    any value is read (conversion_plan).
    With `copy=False` the model may share memory with the given arrays (on CPU,
    when they are 64-byte aligned); pass it only for arrays nothing else holds.
    """
    plan = conversion_plan(model, state_dict, prefix=prefix, strict=strict, allow_downcast=allow_downcast, layout=layout)
    return load_planned(model, plan, state_dict, copy=copy)


def load_planned(model: nnx.Module, plan: list[Step], values: Mapping[str, Any], *, copy: bool = True) -> nnx.Module:
    """Fill `model` in place with `values[step.key]` for each step of its conversion_plan; see load_torch_state_dict.

    `values` may read lazily (e.g. views of a file's bytes): the copies run on one thread per CPU, as
    each is a page-faulting memcpy that releases the GIL (1.4-1.6x faster on 2 cores, BENCHMARKS.md).
    `values` with a `file_position(key)` (a sources.Source) are read in their files' order: a cold file's pages then
    arrive as one stream (BENCHMARKS.md).
    """
    position = getattr(values, "file_position", None)
    if position is not None:
        plan = sorted(plan, key=lambda step: position(step.key))
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        arrays = list(pool.map(lambda step: _to_jax(values[step.key], step, copy), plan))
    nnx.update(model, nnx.from_flat_state([(step.row.flax_path, a) for step, a in zip(plan, arrays)]))
    return model


def _to_jax(value, step: Step, copy: bool) -> jax.Array:
    """One parameter in the model's layout and dtype, in one copy of its bytes."""
    # In numpy a transform is a view: a transpose only changes the strides.
    value = step.row.transform.to_flax(to_numpy(value))
    if value.dtype != step.dtype:
        return jax.device_put(value.astype(step.dtype, order="C"))  # the cast lays it out too: an array of our own
    if value.flags.c_contiguous:
        # On CPU, device_put shares 64-byte-aligned host buffers even with may_alias=False
        # (jax-ml/jax#37830): a numpy copy of our own, unless the caller's arrays are private. (jnp.array(copy=True)
        # copies on the device after device_put: 0.2 ms a call, 0.09 s of SD 1.5's 404 vectors.)
        return jax.device_put(np.array(value) if copy else value, may_alias=True)
    # A strided view: device_put lays it out densely as it copies (XLA's host-to-device transpose, with no
    # compiled program per shape).
    return jax.device_put(value)


def to_torch_state_dict(
    model: nnx.Module, params: nnx.State | None = None, *, prefix: str = "", layout: KeyLayout | None = None
) -> dict[str, np.ndarray]:
    """`model`'s parameters (or `params`, e.g. gradients, of the same structure) under torch names and layouts.

    `layout`: another checkpoint layout's names (default: the model's own, sgm's).

    bfloat16 arrays come back as ml_dtypes.bfloat16; `as_torch_tensors` makes torch tensors of them.
    """
    values = dict(nnx.to_flat_state(params if params is not None else nnx.state(model, nnx.Param)))
    out, parts = {}, {}
    for row in conversion_table(model, layout=layout):
        value = values[row.flax_path]
        value = value.get_value() if isinstance(value, nnx.Variable) else value
        torch_value = row.transform.to_torch(np.asarray(value))
        if row.transform.part is not None:  # one slice of a fused tensor: stacked once all are in
            index, count = row.transform.part
            parts.setdefault(prefix + row.torch_key, [None] * count)[index] = torch_value
            continue
        # A writable C-ordered copy: views of jax buffers are read-only.
        out[prefix + row.torch_key] = np.array(torch_value, order="C")
    for key, slices in parts.items():
        if any(s is None for s in slices):
            raise TypeError(f"to_torch_state_dict: {key} is fused from {len(slices)} parameters; the table has fewer")
        out[key] = np.ascontiguousarray(np.concatenate(slices, axis=0))  # transposed slices concatenate F-ordered
    return out


def as_torch_tensors(state_dict: Mapping[str, np.ndarray]) -> dict:
    """numpy arrays (ml_dtypes.bfloat16 included) as torch tensors, bit for bit."""
    import torch

    def one(a):
        a = np.ascontiguousarray(a)
        if a.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    return {k: one(v) for k, v in state_dict.items()}
