"""Running flax_sgm over a jax Mesh: logical axes, parameter placement, sequence-parallel attention.

Every parameter carries logical axis names (`out_sharding` metadata, set by the
layer classes in primitives.py) and activations are constrained with the same
names through `constrain`. RULES maps the logical names onto the mesh axes of
`make_mesh`:

  data   batch: data parallel.
  seq    query tokens (and image rows, which hold them): sequence parallel. The
         attention then runs under shard_map, queries split by token, keys and
         values gathered, one local attention call per shard (cuDNN on GPU).
  model  heads and feed-forward hidden units: tensor parallel. to_q/to_k/to_v and
         the feed-forward input are split by output features, to_out and the
         feed-forward output by input features (one all-reduce each).

`shard_model(..., fsdp=True)` adds fully sharded data parallelism: each parameter
is also split over `data`, on its largest dimension that axis divides and no other
splits, so parameters (and the optimizer state made from them) take 1/data of their
bytes per device; jit gathers each weight where it is used.

Everything here is inert until a mesh and rules are active (`use_mesh`), so
single-device code is unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "seq", "model")

# Logical axis -> mesh axis (None: replicated). Every logical name used in
# flax_sgm is listed; an unknown name is an error, not a silent replica.
RULES = (
    ("batch", "data"),
    ("length", "seq"),  # query tokens n
    ("height", "seq"),  # image rows: tokens are row-major, so rows carry the token split
    ("width", None),
    ("kv_length", None),  # key tokens m: gathered
    ("channels", None),  # image channels (in_channels)
    ("embed", None),  # model width (inner_dim, query_dim, context_dim)
    ("heads", "model"),  # heads, and the fused heads * head_dim features
    ("head_dim", None),
    ("mlp", "model"),  # feed-forward hidden units
)

# Logical axes of the layouts that cross module boundaries.
IMAGE = ("batch", "height", "width", "channels")  # [b, h, w, c]
TOKENS = ("batch", "length", "embed")  # [b, n, dim]
CONTEXT = ("batch", "kv_length", "embed")  # [b, m, context_dim]

# Parameter metadata: logical names only; placement happens in `shard_model`, so
# building a model needs no mesh.
EAGER_SHARDING = False


def param_metadata(*axes: str | None) -> dict:
    """The metadata one parameter is created with: its logical axes."""
    return {"out_sharding": tuple(axes), "eager_sharding": EAGER_SHARDING}


def make_mesh(data: int = 1, seq: int = 1, model: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, seq, model) mesh over the first data * seq * model devices (all of them by default)."""
    devices = list(jax.devices() if devices is None else devices)
    size = data * seq * model
    if size > len(devices):
        raise ValueError(f"make_mesh: data * seq * model = {size} needs {size} devices; {len(devices)} available")
    return jax.make_mesh((data, seq, model), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices[:size])


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=RULES):
    """Trace and run under `mesh` with `rules`: activation constraints and sequence parallelism switch on."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield mesh


def _rule(name: str | None, rules) -> str | tuple[str, ...] | None:
    if name is None:
        return None
    for logical, mesh_axis in rules:
        if logical == name:
            return mesh_axis
    raise ValueError(f"sharding: no rule for logical axis {name!r}; rules cover {[r[0] for r in rules]}")


def _axis_size(mesh, mesh_axis) -> int:
    if mesh_axis is None:
        return 1
    names = (mesh_axis,) if isinstance(mesh_axis, str) else mesh_axis
    return math.prod(mesh.shape[a] for a in names)


def logical_to_spec(axes: Sequence[str | None], rules=RULES) -> PartitionSpec:
    """Logical axis names -> PartitionSpec of mesh axes."""
    return PartitionSpec(*(_rule(a, rules) for a in axes))


def _active():
    """(mesh, rules) when a mesh and rules are set and we are not inside shard_map, else None."""
    rules = spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty or any(t == AxisType.Manual for t in mesh.axis_types):
        return None
    return mesh, rules


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical axes; the identity when no mesh is active.

    A dimension its mesh axes do not divide is left to the compiler.
    """
    active = _active()
    if active is None:
        return x
    mesh, rules = active
    if len(axes) != x.ndim:
        raise ValueError(f"constrain: {len(axes)} logical axes {tuple(axes)} for an array of shape {x.shape}")
    spec = [a if dim % _axis_size(mesh, a) == 0 else None for dim, a in zip(x.shape, logical_to_spec(axes, rules))]
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


# Placement ------------------------------------------------------------------


MAX_LISTED = 4  # problems a placement error lists before counting the rest


def check_divisible(what: str, shape, spec: PartitionSpec, mesh: Mesh) -> list[str]:
    """One line per dimension of `shape` that the mesh axes of `spec` (a name, a tuple of names or None) do not split."""
    return [
        f"{what}: dimension {i} ({dim}) is not divisible by mesh axes {a} ({_axis_size(mesh, a)} devices)"
        for i, (dim, a) in enumerate(zip(shape, spec))
        if dim % _axis_size(mesh, a)
    ]


def _check_heads(model: nnx.Module, mesh: Mesh, rules) -> list[str]:
    """Tensor parallelism splits whole heads: every attention's head count must divide (one line per count)."""
    size = _axis_size(mesh, _rule("heads", rules))
    by_heads: dict[int, list[str]] = {}
    for path, module in nnx.iter_modules(model):
        heads = getattr(module, "heads", None)
        if isinstance(heads, int) and heads > 1 and heads % size:
            by_heads.setdefault(heads, []).append(".".join(map(str, path)) or type(module).__name__)
    return [
        f"{heads} heads ({where[0]}{f' and {len(where) - 1} more attentions' if len(where) > 1 else ''}) do not split "
        f"over {size} devices of the heads axis; put those devices on the 'seq' or 'data' axis instead"
        for heads, where in by_heads.items()
    ]


FSDP_AXIS = "data"


def fsdp_spec(shape, spec: PartitionSpec, mesh: Mesh, axis: str = FSDP_AXIS) -> PartitionSpec:
    """`spec` with `axis` added on the largest dimension of `shape` it divides and no other mesh axis splits.

    A parameter with no such dimension (a bias of odd width) stays as it was: replicated over `axis`.
    """
    size = mesh.shape[axis]
    entries = list(spec) + [None] * (len(shape) - len(spec))
    free = [i for i, (dim, entry) in enumerate(zip(shape, entries)) if entry is None and dim % size == 0]
    if size == 1 or not free:
        return spec
    entries[max(free, key=lambda i: shape[i])] = axis
    return PartitionSpec(*entries)


def param_shardings(model: nnx.Module, mesh: Mesh, rules=RULES, *, fsdp: bool = False) -> nnx.State:
    """NamedSharding of every variable of `model` (unannotated ones are replicated); with `fsdp`, parameters
    are also split over the data axis (`fsdp_spec`)."""
    with nnx.logical_axis_rules(rules):
        shardings = nnx.get_named_sharding(nnx.state(model), mesh)
    if not fsdp:
        return shardings

    def widen(variable, value):
        if not isinstance(variable, nnx.Param):
            return variable
        sharding = variable.get_value()
        return variable.replace(NamedSharding(mesh, fsdp_spec(value.shape, sharding.spec, mesh)))

    values = nnx.state(model)
    return jax.tree.map(widen, shardings, values, is_leaf=lambda v: isinstance(v, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules=RULES, *, fsdp: bool = False) -> nnx.Module:
    """Place `model`'s variables on `mesh` by their logical axes, in place; returns the model.

    An abstract model (nnx.eval_shape) gets the shardings on its ShapeDtypeStructs
    instead, ready for `jax.jit(...).lower`. Raises ValueError listing every
    parameter that does not divide over its mesh axes, and every attention whose
    heads do not divide over the heads axis. `fsdp`: parameters split over `data` too.
    """
    state = nnx.state(model)
    shardings = param_shardings(model, mesh, rules, fsdp=fsdp)
    problems = _check_heads(model, mesh, rules) + _check_row_split_convs(state, mesh, rules)
    for (path, value), (_, sharding) in zip(nnx.to_flat_state(state), nnx.to_flat_state(shardings)):
        value = value.get_value() if isinstance(value, nnx.Variable) else value
        sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
        problems += check_divisible(".".join(map(str, path)), value.shape, sharding.spec, mesh)
    if problems:
        shown = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"] if len(problems) > MAX_LISTED else [])
        raise ValueError("shard_model: the model does not fit the mesh:\n  " + "\n  ".join(shown))

    def put(value, sharding):
        if isinstance(value, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
        return jax.device_put(value, sharding)

    nnx.update(model, jax.tree.map(put, state, shardings))
    return model


def _check_row_split_convs(state: nnx.State, mesh: Mesh, rules) -> list[str]:
    """A 3x3 convolution (a kernel [3, 3, in, out]) over image rows split across devices gets its kernel gradient
    multiplied by the size of any mesh axis the activations do not use (XLA's SPMD partitioner, jax 0.10.2:
    2x on a (2, 2, 2) mesh, 4x on (1, 2, 4); docs/sharding.md). Refused rather than trained wrong: the
    `model` axis splits no image activation, so a UNet takes `seq` or `model`, not both."""
    rows, unused = _axis_size(mesh, dict(rules)["height"]), _axis_size(mesh, dict(rules)["heads"])
    if rows == 1 or unused == 1:
        return []

    def shape(v):
        return (v.get_value() if isinstance(v, nnx.Variable) else v).shape

    convs = [".".join(map(str, p)) for p, v in nnx.to_flat_state(state) if p[-1] == "kernel" and shape(v)[:2] == (3, 3)]
    if not convs:
        return []
    return [f"{convs[0]} (and {len(convs) - 1} more 3x3 convolutions): image rows split over {rows} devices with "
            f"{unused} devices on the heads axis give wrong kernel gradients (XLA's partitioner multiplies them by "
            f"{unused}); use a mesh with seq or model of 1"]


def place(x, axes: Sequence[str | None], mesh: Mesh, rules=RULES) -> jax.Array:
    """Put one array on `mesh` by its logical axes (e.g. IMAGE, TOKENS, CONTEXT)."""
    spec = logical_to_spec(axes, rules)
    problems = check_divisible(f"array of shape {jnp.shape(x)}", jnp.shape(x), spec, mesh)
    if problems:
        raise ValueError("place: " + "; ".join(problems))
    return jax.device_put(x, NamedSharding(mesh, spec))


def shard_inputs(mesh: Mesh, x, context=None, rules=RULES):
    """SpatialTransformer inputs on `mesh`: x [b, h, w, c] split by batch and rows, context by batch."""
    x = place(x, IMAGE, mesh, rules)
    if context is None:
        return x, None
    if isinstance(context, (list, tuple)):
        return x, [place(c, CONTEXT, mesh, rules) for c in context]
    return x, place(context, CONTEXT, mesh, rules)


# Sequence-parallel attention ---------------------------------------------------


def sequence_parallel_axis():
    """The mesh axes the query tokens are split over, or None when sequence parallelism is off."""
    active = _active()
    if active is None:
        return None
    mesh, rules = active
    axis = _rule("length", rules)
    return axis if _axis_size(mesh, axis) > 1 else None


def sequence_parallel_attention(attend: Callable, q, k, v, mask=None, **kwargs) -> jax.Array:
    """`attend(q, k, v, mask, **kwargs)` with the queries split over the sequence axis.

    `attend` is a single-device attention (attention_backends.local_attention): it
    runs once per shard inside shard_map and never sees the mesh.
    q [b, n, heads, d], k and v [b, m, heads, d], mask None or [b|1, heads|1, n|1, m|1]
    (attention_backends.dot_product_attention brings it to rank 4 before calling this).
    Each shard holds n / seq queries and every key and value (gathered), so the
    local call is an ordinary attention (cuDNN on GPU). Batch and heads stay split
    over their axes where they divide. n is padded to a multiple of the axis size;
    padded query rows are dropped.
    """
    active = _active()
    if active is None:
        raise ValueError("sequence_parallel_attention: no active mesh; call it under sharding.use_mesh(mesh)")
    mesh, rules = active
    seq = _rule("length", rules)
    b, n, heads, _ = q.shape

    def split(logical, dim):
        axis = _rule(logical, rules)
        return axis if dim % _axis_size(mesh, axis) == 0 else None

    batch_axis, heads_axis = split("batch", b), split("heads", heads)
    pad = -n % _axis_size(mesh, seq)
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_spec = PartitionSpec(batch_axis, seq, heads_axis, None)  # [b, n, heads, d]
    kv_spec = PartitionSpec(batch_axis, None, heads_axis, None)  # [b, m, heads, d]: every key on every shard

    if mask is None:
        local = lambda q, k, v: attend(q, k, v, None, **kwargs)  # noqa: E731
        operands, specs = (q, k, v), (q_spec, kv_spec, kv_spec)
    else:
        if mask.ndim != 4:
            raise ValueError(f"sequence_parallel_attention: mask must have rank 4; got shape {list(mask.shape)}")
        if mask.shape[2] == n:
            # Padded query rows keep every key, so they stay finite.
            keep = jnp.ones((), mask.dtype) if mask.dtype == jnp.bool_ else jnp.zeros((), mask.dtype)
            mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=keep)
        mask_spec = PartitionSpec(
            batch_axis if mask.shape[0] == b else None,
            heads_axis if mask.shape[1] == heads else None,
            seq if mask.shape[2] == n + pad and n + pad > 1 else None,
            None,
        )
        local = lambda q, k, v, mask: attend(q, k, v, mask, **kwargs)  # noqa: E731
        operands, specs = (q, k, v, mask), (q_spec, kv_spec, kv_spec, mask_spec)

    # check_vma off: the local backends (scans, custom_vjp) carry no varying-axis types.
    out = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(*operands)
    return out[:, :n]
