"""Checkpoint files: read them lazily and safely, find SpatialTransformer stacks, convert, save, load.

Reading:
  .safetensors  the header is parsed and checked here; a tensor's bytes are read
                only when it is converted (no mmap, so memory is what is converted).
  .pt .pth .ckpt .bin
                torch.load(weights_only=True): a pickle that would run code is
                refused before anything runs. Zip checkpoints are memory-mapped.
                A top-level `state_dict` entry is unwrapped. Needs torch.
The format is sniffed from the first bytes, not from the extension.

Converting streams. Each stack's conversion_plan is checked (no weight read) on
a planning thread. Worker threads read the selected tensors in file order a bounded amount
ahead and transpose them (_ReadAhead). Orbax output: a stack at a time is filled
into an nnx.eval_shape model and saved on a thread while the next is converted;
peak memory is about two stacks plus the read-ahead. Flat safetensors output:
each tensor goes from the read-ahead to the file (StreamWriter, O_DIRECT where
the filesystem allows) and its buffer back for the next read; memory is the
read-ahead's, whatever the file size.

A stack is a SpatialTransformer sub-tree: the keys under a prefix such as
`model.diffusion_model.input_blocks.4.1.` (SGM/LDM) or `down_blocks.1.attentions.0.`
(diffusers), with the seed's key names. Its config is read off the shapes, except
the split of the inner dim into heads x head dim, which the caller gives.

Output of `convert` (a directory, written to a temporary path and renamed):
  config.json            format, weights format, and per stack: prefix, config, param dtype
  <stack name>/          Orbax checkpoint of the stack's nnx.Param state, or
  <stack name>.safetensors   a flat file keyed by Flax paths (`transformer_blocks.0.attn1.to_q.kernel`).
`load_pretrained(directory)` rebuilds a ready SpatialTransformer from it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import math
import mmap
import os
import re
import shutil
import threading
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from flax_sgm import convert
from flax_sgm.transformer import SpatialTransformer

FORMAT_NAME = "flax-sgm"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHT_FORMATS = ("orbax", "safetensors")
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
PARAM_DTYPES = ("float32", "bfloat16", "float16")

# safetensors dtype codes; all little-endian.
SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
READ_AHEAD_BYTES = 256 << 20  # how far file reads run ahead of conversion
READ_WORKERS = min(4, os.cpu_count() or 1)  # threads reading and transposing tensors


class CheckpointError(ValueError):
    """A problem with an input or output path, said in one line."""


# ---------------------------------------------------------------------------
# Reading


class TensorInfo(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class SafetensorsReader:
    """A .safetensors file: header checked on open, tensors read on demand."""

    kind = "safetensors"
    owns_arrays = True  # read() returns fresh arrays

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        self._file = open(path, "rb", buffering=0)
        try:
            self.infos, self._offsets, self.metadata = _parse_safetensors_header(path, self._file, size)
        except BaseException:
            self._file.close()
            raise

    def read(self, key: str, alloc: Callable[[int], np.ndarray] = None) -> np.ndarray:
        """The tensor's bytes in a new array from `alloc(nbytes)` (ALIGNMENT-aligned bytes by default).

        Positional reads, so threads may share the reader.
        """
        info, start = self.infos[key], self._offsets[key]
        buf = (alloc or aligned_bytes)(info.nbytes)
        view, done = memoryview(buf), 0
        while done < info.nbytes:
            n = os.preadv(self._file.fileno(), [view[done:]], start + done)
            if not n:
                raise CheckpointError(f"{self.path}: truncated while reading {key}")
            done += n
        return buf.view(info.dtype).reshape(info.shape)

    def file_order(self, keys: Iterable[str]) -> list[str]:
        return sorted(keys, key=self._offsets.__getitem__)

    def close(self) -> None:
        self._file.close()


def _parse_safetensors_header(path: Path, f, size: int):
    """{key: TensorInfo}, {key: absolute byte offset}, metadata; CheckpointError when the file is not sound."""
    bad = f"{path}: not a valid safetensors file"
    head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{bad}: only {size} bytes")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise CheckpointError(f"{bad} (corrupt or truncated): header length {n} in a file of {size} bytes")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{bad} (corrupt): header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad} (corrupt): header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_size = 8 + n, size - 8 - n
    infos, offsets, end_max = {}, {}, 0
    for key, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{bad} (corrupt): bad header entry for {key!r}: {entry!r}") from None
        info = TensorInfo(shape, dtype)
        if min(shape, default=0) < 0 or begin < 0 or end - begin != info.nbytes:
            raise CheckpointError(f"{bad} (corrupt): {key} has shape {list(shape)} but data offsets [{begin}, {end}]")
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: {key} ends at byte {data_start + end}, the file has {size} bytes"
            )
        infos[key], offsets[key], end_max = info, data_start + begin, max(end_max, end)
    if end_max < data_size:
        raise CheckpointError(f"{bad} (corrupt): {data_size - end_max} bytes after the last tensor")
    return infos, offsets, metadata


class TorchReader:
    """A torch.save file loaded with weights_only=True (memory-mapped when it is a zip)."""

    kind = "torch"
    owns_arrays = False  # read() returns views of the loaded tensors

    def __init__(self, path: Path):
        self.path = path
        self.metadata = {}
        tensors = _torch_load_tensors(path)
        self._tensors = tensors
        self.infos = {k: TensorInfo(tuple(t.shape), _torch_dtype_to_numpy(t.dtype)) for k, t in tensors.items()}

    def read(self, key: str, alloc: Callable[[int], np.ndarray] = None) -> np.ndarray:
        """A view of the loaded tensor (`alloc` is unused: nothing is copied)."""
        return convert.to_numpy(self._tensors[key])

    def file_order(self, keys: Iterable[str]) -> list[str]:
        return list(keys)

    def close(self) -> None:
        self._tensors = {}


def _torch_dtype_to_numpy(dtype) -> np.dtype:
    try:
        return convert.numpy_dtype(dtype)
    except TypeError:  # e.g. quantized dtypes: listed by inspect, refused by conversion
        return np.dtype(np.void)


def _torch_load_tensors(path: Path) -> dict:
    import pickle

    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading a torch checkpoint needs torch (pip install 'flax-sgm[torch]')") from None
    is_zip = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused to load: {_unpickling_reason(err)}; nothing in it was run") from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint (corrupt or truncated?): {first}") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    return tensors


def _unpickling_reason(err: Exception) -> str:
    """What torch's weights_only unpickler refused, e.g. 'it calls posix.system'."""
    text = str(err)
    if match := re.search(r"Unsupported global: GLOBAL (\S+)", text):
        return f"the pickle is not plain tensors (it calls {match.group(1)})"
    if match := re.search(r"Unsupported operand (\d+)", text):
        return f"the pickle is not plain tensors (unsupported pickle opcode {match.group(1)})"
    return "the pickle is not plain tensors (torch.load weights_only=True)"


def open_checkpoint(path) -> SafetensorsReader | TorchReader:
    """A reader for `path`; CheckpointError for a missing file, a directory or an unreadable file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*") if p.suffix in (".safetensors", *TORCH_SUFFIXES))
        hint = f" (it holds {', '.join(inside[:5])})" if inside else ""
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file{hint}")
    with open(path, "rb") as f:
        magic = f.read(9)
    if magic[:2] == b"PK" or magic[:1] == b"\x80":  # zip (torch.save) or a bare pickle
        return TorchReader(path)
    if path.suffix in TORCH_SUFFIXES and len(magic) >= 8 and magic[8:9] != b"{":
        raise CheckpointError(f"{path}: not a readable torch checkpoint (neither a zip nor a pickle)")
    return SafetensorsReader(path)


# ---------------------------------------------------------------------------
# Stacks and their configs

STACK_CHILDREN = {"norm", "proj_in", "transformer_blocks", "proj_out"}
_STACK_MARKER = re.compile(r"^(.*?)transformer_blocks\.0\.attn1\.to_q\.weight$")
_BLOCK_INDEX = re.compile(r"^transformer_blocks\.(\d+)\.")


def natural_key(text: str):
    """'input_blocks.10.' after 'input_blocks.2.'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def find_stacks(keys: Iterable[str]) -> list[str]:
    """Prefixes of every SpatialTransformer sub-tree: a first block's attn1 with norm and proj_in beside it."""
    keys = set(keys)
    found = []
    for key in keys:
        match = _STACK_MARKER.match(key)
        if match and {match.group(1) + "norm.weight", match.group(1) + "proj_in.weight"} <= keys:
            found.append(match.group(1))
    return sorted(found, key=natural_key)


def normalize_prefix(prefix: str) -> str:
    """'a.b' -> 'a.b.' so that 'input_blocks.1' does not also select 'input_blocks.10'."""
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


def top_level_prefixes(keys: Iterable[str]) -> list[str]:
    return sorted({k.split(".", 1)[0] + ("." if "." in k else "") for k in keys}, key=natural_key)


def _prefix_hint(keys: list[str], prefix: str) -> str:
    """What the file holds near a prefix that matched nothing."""
    parts, deepest = prefix.rstrip(".").split("."), ""
    for i in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:i]) + "."
        if any(k.startswith(candidate) for k in keys):
            deepest = candidate
            break
    hint = f"top-level prefixes: {_listing(top_level_prefixes(keys))}"
    if deepest:
        children = sorted({k[len(deepest):].split(".", 1)[0] + "." for k in keys if k.startswith(deepest)}, key=natural_key)
        hint = f"under {deepest!r} there are: {_listing(children)}; " + hint
    return hint


def _listing(items: list[str], limit: int = 16) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


class StackShape(NamedTuple):
    """What a stack's weights say about its config (all but the heads split)."""

    prefix: str
    in_channels: int
    inner_dim: int
    depth: int
    context_dim: int | list[int] | None
    use_linear: bool
    disable_self_attn: bool
    keys: tuple[str, ...]
    dtype: np.dtype  # all its float tensors promoted
    nbytes: int

    def summary(self) -> dict:
        return {
            "prefix": self.prefix,
            "in_channels": self.in_channels,
            "inner_dim": self.inner_dim,
            "depth": self.depth,
            "context_dim": self.context_dim,
            "use_linear": self.use_linear,
            "disable_self_attn": self.disable_self_attn,
            "dtype": self.dtype.name,
            "tensors": len(self.keys),
            "bytes": self.nbytes,
        }


def infer_stack(infos: Mapping[str, TensorInfo], prefix: str, *, disable_self_attn: bool | None = None) -> StackShape:
    """Read a stack's config off its shapes.

    use_linear: proj_in is [inner, in] (Linear) or [inner, in, 1, 1] (Conv2d).
    context_dim: attn2.to_k's input width per block; one int when all agree, None
    when that width is the inner dim (the weights cannot tell it from an explicit
    context_dim equal to the inner dim; either way a context is optional).
    disable_self_attn: attn1.to_k's input width differs from the inner dim. When the
    context width equals the inner dim the weights cannot show it: pass
    `disable_self_attn=True` to force it.
    The feed-forward must be the seed's GEGLU with mult 4 (SpatialTransformer has no
    other): ff.net.0.proj is [8 * inner, inner].
    """
    keys = tuple(sorted((k for k in infos if k.startswith(prefix)), key=natural_key))
    local = {k[len(prefix):]: infos[k] for k in keys}
    where = f"prefix {prefix!r}" if prefix else "the file's root"
    needed = ["norm.weight", "proj_in.weight", "transformer_blocks.0.attn1.to_k.weight"]
    absent = [k for k in needed if k not in local]
    if absent:
        inside = find_stacks(keys)
        hint = f"; the stacks under it: {_listing(inside, 6)}" if inside else ""
        raise CheckpointError(f"{where} is not a SpatialTransformer stack: no {', '.join(prefix + k for k in absent)}{hint}")
    foreign = sorted({k.split(".", 1)[0] for k in local} - STACK_CHILDREN)
    if foreign:
        raise CheckpointError(
            f"{where} holds more than a SpatialTransformer: {_listing([prefix + f + '.*' for f in foreign], 4)} "
            "(a video or other variant?)"
        )
    in_channels = local["norm.weight"].shape[0]
    proj_in = local["proj_in.weight"].shape
    if len(proj_in) not in (2, 4) or (len(proj_in) == 4 and proj_in[2:] != (1, 1)) or proj_in[1] != in_channels:
        raise CheckpointError(f"{where}: proj_in.weight has shape {list(proj_in)}, expected [inner, {in_channels}(, 1, 1)]")
    inner = proj_in[0]
    depth = 1 + max(int(m.group(1)) for k in local if (m := _BLOCK_INDEX.match(k)))
    ctx, self_ctx = [], []
    for i in range(depth):
        block = f"transformer_blocks.{i}."
        try:
            ctx.append(local[block + "attn2.to_k.weight"].shape[1])
            self_ctx.append(local[block + "attn1.to_k.weight"].shape[1])
            ff = local[block + "ff.net.0.proj.weight"].shape
        except KeyError as err:
            raise CheckpointError(f"{where}: block {i} has no {prefix}{err.args[0]}") from None
        if ff != (8 * inner, inner):
            kind = "a plain GELU feed-forward (gated_ff=False)" if ff == (4 * inner, inner) else f"ff.net.0.proj {list(ff)}"
            raise CheckpointError(
                f"{where}: block {i} has {kind}; SpatialTransformer builds the seed's GEGLU [8 * {inner}, {inner}] only"
            )
    disabled = [c != inner for c in self_ctx]
    if any(disabled) != all(disabled) or any(s != c for s, c, d in zip(self_ctx, ctx, disabled) if d):
        raise CheckpointError(f"{where}: attn1 key widths {self_ctx} fit no disable_self_attn setting (context {ctx})")
    inferred_disable = all(disabled)
    if disable_self_attn is not None and disable_self_attn != inferred_disable:
        if not disable_self_attn or any(c != inner for c in ctx):
            raise CheckpointError(
                f"{where}: disable_self_attn={disable_self_attn} contradicts the weights (attn1 key width {self_ctx[0]}, "
                f"inner dim {inner}, context width {ctx[0]})"
            )
        inferred_disable = True
    if all(c == inner for c in ctx) and not inferred_disable:
        context_dim = None
    elif len(set(ctx)) == 1:
        context_dim = ctx[0]
    else:
        context_dim = ctx
    float_dtypes = [info.dtype for info in local.values() if jnp.issubdtype(info.dtype, jnp.floating)]
    dtype = np.dtype(jnp.result_type(*float_dtypes)) if float_dtypes else np.dtype("float32")
    return StackShape(
        prefix, in_channels, inner, depth, context_dim, len(proj_in) == 2, inferred_disable,
        keys, dtype, sum(local[k].nbytes for k in local),
    )


def resolve_heads(inner_dim: int, heads: int | None, head_dim: int | None, where: str = "") -> tuple[int, int]:
    """(n_heads, d_head) from one of the two; the weights only show their product."""
    where = f" of {where}" if where else ""
    if (heads is None) == (head_dim is None):
        raise CheckpointError(
            f"give exactly one of --heads or --head-dim: the weights show the inner dim{where} ({inner_dim}), "
            "not how it splits into heads (SD 1.x: --heads 8; SD 2.x and SDXL: --head-dim 64)"
        )
    given, name = (heads, "--heads") if heads is not None else (head_dim, "--head-dim")
    if given <= 0 or inner_dim % given:
        raise CheckpointError(f"{name} {given} does not divide the inner dim {inner_dim}{where}")
    other = inner_dim // given
    return (given, other) if heads is not None else (other, given)


def module_config(stack: StackShape, heads: int | None, head_dim: int | None) -> dict:
    """SpatialTransformer constructor arguments of a stack."""
    n_heads, d_head = resolve_heads(stack.inner_dim, heads, head_dim, repr(stack.prefix) if stack.prefix else "")
    return dict(
        in_channels=stack.in_channels,
        n_heads=n_heads,
        d_head=d_head,
        depth=stack.depth,
        context_dim=stack.context_dim,
        disable_self_attn=stack.disable_self_attn,
        use_linear=stack.use_linear,
    )


def select_stacks(reader, prefixes: Iterable[str] = (), *, all_stacks: bool = False) -> list[str]:
    """The prefixes to convert: the given ones, every stack (`all_stacks`), or the file's only stack."""
    keys = list(reader.infos)
    prefixes = [normalize_prefix(p) for p in prefixes]
    if all_stacks:
        if prefixes:
            raise CheckpointError("give --prefix or --all, not both")
        found = find_stacks(keys)
        if not found:
            raise CheckpointError(f"{reader.path}: no SpatialTransformer stack found; {_prefix_hint(keys, '')}")
        return found
    for prefix in prefixes:
        if not any(k.startswith(prefix) for k in keys):
            raise CheckpointError(f"{reader.path}: no key starts with {prefix!r}; {_prefix_hint(keys, prefix)}")
    if prefixes:
        return list(dict.fromkeys(prefixes))
    found = find_stacks(keys)
    if len(found) == 1:
        return found
    if not found:
        raise CheckpointError(f"{reader.path}: no SpatialTransformer stack found; {_prefix_hint(keys, '')}")
    raise CheckpointError(
        f"{reader.path} holds {len(found)} SpatialTransformer stacks; choose with --prefix (or --all): {_listing(found, 6)}"
    )


# ---------------------------------------------------------------------------
# Converting


ALIGNMENT = 64  # bytes: XLA:CPU shares host buffers aligned this way instead of copying them


def aligned_bytes(nbytes: int) -> np.ndarray:
    """Uninitialized uint8[nbytes] whose data starts ALIGNMENT-aligned (its .base is the whole allocation)."""
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes]


def aligned_empty(shape: tuple[int, ...], dtype, alloc: Callable[[int], np.ndarray] = aligned_bytes) -> np.ndarray:
    """An uninitialized array on bytes from `alloc`."""
    dtype = np.dtype(dtype)
    return alloc(math.prod(shape) * dtype.itemsize).view(dtype).reshape(shape)


class _BufferPool:
    """aligned_bytes buffers kept for reuse, by size.

    Fresh memory costs a page fault per page, and a stack repeats a few tensor
    sizes, so buffers given back are handed out again. At most `limit` bytes wait
    here. Give back only arrays nothing else holds.
    """

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0
        self.free: dict[int, list[np.ndarray]] = {}
        self.lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        with self.lock:
            if spare := self.free.get(nbytes):
                self.held -= nbytes
                return spare.pop()
        return aligned_bytes(nbytes)

    def give(self, array: np.ndarray) -> None:
        """Keep the buffer under `array`, a view of one from `take`."""
        raw = array.base  # numpy collapses view chains to the owning allocation
        if not (isinstance(raw, np.ndarray) and raw.dtype == np.uint8 and raw.ndim == 1 and raw.flags.owndata):
            raise ValueError("not a buffer from this pool")
        start = -raw.ctypes.data % ALIGNMENT
        buf = raw[start : start + raw.size - ALIGNMENT]
        with self.lock:
            if self.held + buf.nbytes <= self.limit:
                self.free.setdefault(buf.nbytes, []).append(buf)
                self.held += buf.nbytes


def conversion_layout(value: np.ndarray, *, owned: bool, tile: tuple[int, int] = (64, 512), alloc=aligned_bytes) -> np.ndarray:
    """`value` as conversion takes it: a private ALIGNMENT-aligned array, column-major if it is a weight matrix.

    Every transform of the conversion table reverses a weight's axes (Linear
    [out, in] -> [in, out], 1x1 conv [out, in, 1, 1] -> [1, 1, in, out]), so on a
    column-major array the transform is a C-ordered view: jax takes it without a
    copy (convert.load_planned with copy=False) and a file takes its bytes as they
    are. The transpose runs here, on a read-ahead thread, in tiles of `tile` source
    (rows, columns) that stay in cache (64 x 512: 15-20% faster than 128 x 128
    over SDXL's fp16 shapes on the 2-core dev VM). `owned`: `value` is a fresh array nobody else holds, kept as it is when
    already in that layout. New arrays are on bytes from `alloc`. Values never change.
    """
    if value.ndim >= 2 and all(d == 1 for d in value.shape[2:]) and not value.flags.f_contiguous:
        out, inner = value.shape[:2]
        flat = value.reshape(out, inner)
        transposed = aligned_empty((inner, out), value.dtype, alloc)  # [in, out]
        rows, cols = tile
        for i in range(0, out, rows):
            for j in range(0, inner, cols):
                transposed[j : j + cols, i : i + rows] = flat[i : i + rows, j : j + cols].T
        return transposed.T.reshape(value.shape)  # F-ordered: reshaping only adds unit axes
    if owned and value.ctypes.data % ALIGNMENT == 0:
        return value
    copy = aligned_empty(value.shape, value.dtype, alloc)
    copy[...] = value
    return copy


class _ReadAhead:
    """Reads `keys` in about file order on worker threads, at most `budget` bytes ahead of the consumer.

    Each worker reads a tensor and puts it in conversion_layout (file reads and
    numpy copies release the GIL, so they overlap each other and the conversion).
    The consumer takes tensors in any order (conversion goes in the model's
    order) and reads one itself when no worker has got to it, so the budget never
    blocks it. A consumer done with a tensor may `recycle` it: its memory then
    serves a later read.
    """

    def __init__(self, reader, keys: Iterable[str], budget: int = READ_AHEAD_BYTES, on_read=None,
                 workers: int = READ_WORKERS):
        self.reader, self.budget, self.on_read = reader, budget, on_read
        self.pool = _BufferPool(limit=max(budget, READ_AHEAD_BYTES))
        self.order = reader.file_order(keys)
        self.sizes = {k: reader.infos[k].nbytes for k in self.order}
        self.next = 0  # index in `order` of the next tensor for a worker
        self.ready: dict[str, Any] = {}
        self.taken: set[str] = set()  # read by the consumer itself
        self.reading: set[str] = set()
        self.ahead = 0
        self.stopped = False
        self.cond = threading.Condition()
        self.threads = [threading.Thread(target=self._run, daemon=True, name=f"flax-sgm-read-{i}") for i in range(workers)]
        for thread in self.threads:
            thread.start()

    def _load(self, key: str) -> np.ndarray:
        owned = self.reader.owns_arrays
        value = self.reader.read(key, alloc=self.pool.take)
        laid = conversion_layout(value, owned=owned, alloc=self.pool.take)
        if owned and laid is not value:
            self.pool.give(value)
        return laid

    def _run(self):
        while True:
            with self.cond:
                if self.next == len(self.order):
                    return
                key = self.order[self.next]
                self.next += 1
                # One tensor may always be ahead, however large.
                self.cond.wait_for(lambda: self.stopped or self.ahead == 0 or self.ahead + self.sizes[key] <= self.budget)
                if self.stopped:
                    return
                if key in self.taken:
                    continue
                self.reading.add(key)
                self.ahead += self.sizes[key]
            try:
                value = self._load(key)
            except BaseException as err:  # the consumer raises it
                value = err
            with self.cond:
                self.ready[key] = value
                self.reading.discard(key)
                self.cond.notify_all()

    def get(self, key: str) -> np.ndarray:
        with self.cond:
            self.cond.wait_for(lambda: key not in self.reading)
            if key in self.ready:
                value = self.ready.pop(key)
                self.ahead -= self.sizes[key]
                self.cond.notify_all()
            else:
                self.taken.add(key)
                value = None
        if value is None:
            value = self._load(key)
        if isinstance(value, BaseException):
            raise value
        if self.on_read:
            self.on_read(value.nbytes)
        return value

    def recycle(self, value: np.ndarray) -> None:
        """`value`, from get, is no longer used by anyone."""
        self.pool.give(value)

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        for thread in self.threads:
            thread.join()


@functools.lru_cache(maxsize=8)
def _abstract_parts(config_json: str, param_dtype: str, dtype: str | None):
    config = json.loads(config_json)

    def build():
        # RNG state as refs: a plain Variable's update compares `.sharding`, which on a
        # tracer raises an error whose message walks the whole trace (quadratic in
        # depth; 0.5 s of SDXL's depth 10 against 0.16 s with refs).
        with nnx.var_defaults(ref=True):
            rngs = nnx.Rngs(0)
        return SpatialTransformer(**config, rngs=rngs, dtype=dtype, param_dtype=jnp.dtype(param_dtype))

    return nnx.split(nnx.eval_shape(build))


def abstract_model(config: Mapping[str, Any], param_dtype, dtype=None, **overrides) -> SpatialTransformer:
    """The module's structure with no weights (nnx.eval_shape), to be filled by conversion.

    Cached per config: an SDXL file repeats a few configs, and tracing one takes a while.
    """
    key = json.dumps(dict(config, **overrides), sort_keys=True)
    graphdef, state = _abstract_parts(key, jnp.dtype(param_dtype).name, None if dtype is None else jnp.dtype(dtype).name)
    return nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf, state))  # fresh Variables, the cache stays abstract


def stack_plan(reader, stack: StackShape, config: Mapping[str, Any], param_dtype) -> list[convert.Step]:
    """The stack's checked conversion_plan into abstract_model(config, param_dtype); no tensor is read."""
    # Narrowing is only allowed when the caller picked the dtype.
    downcast = jnp.promote_types(stack.dtype, param_dtype) != jnp.dtype(param_dtype)
    infos = {k: reader.infos[k] for k in stack.keys}
    model = abstract_model(config, param_dtype)
    return convert.conversion_plan(model, infos, prefix=stack.prefix, allow_downcast=downcast)


def convert_stack(reader, stack: StackShape, config: Mapping[str, Any], param_dtype=None, *, on_read=None) -> SpatialTransformer:
    """The stack's weights in a SpatialTransformer, strictly (convert.conversion_plan), read as conversion takes them."""
    param_dtype = stack.dtype if param_dtype is None else param_dtype
    plan = stack_plan(reader, stack, config, param_dtype)
    source = _ReadAhead(reader, stack.keys, budget=0, on_read=on_read)
    try:
        return fill_stack(abstract_model(config, param_dtype), plan, source)
    finally:
        source.close()


def fill_stack(model: SpatialTransformer, plan: list, source: _ReadAhead) -> SpatialTransformer:
    """`model` filled from the read-ahead along its plan; it keeps the read-ahead's arrays, which are private."""
    return convert.load_planned(model, plan, {step.key: source.get(step.key) for step in plan}, copy=False)


def write_stack_safetensors(target: Path, plan: list, source: _ReadAhead, metadata: Mapping[str, str]) -> None:
    """A stack as a flat safetensors file of Flax paths, streamed tensor by tensor along its plan.

    No jax array is made: each tensor goes from the read-ahead through its
    transform to the file, and its buffer back to the read-ahead.
    """
    by_key = {step.key: step for step in plan}
    plan = [by_key[k] for k in source.reader.file_order(by_key)]  # output in input order: reads stay sequential

    def values():
        for step in plan:
            value = source.get(step.key)
            converted = step.row.transform.to_flax(value)
            yield converted if converted.dtype == step.dtype else converted.astype(step.dtype)
            source.recycle(value)

    layout = {".".join(map(str, step.row.flax_path)): TensorInfo(step.shape, step.dtype) for step in plan}
    write_safetensors(target, layout, values(), metadata)


def stack_name(prefix: str) -> str:
    """Directory/file name of a stack inside the output."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", prefix.rstrip("."))
    return name or "spatial_transformer"


def write_safetensors(
    path: Path, layout: Mapping[str, TensorInfo], values: Iterable[np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """A safetensors file: `layout` (name -> shape and dtype, in file order), then `values` in that order, one at a time."""
    header, offset = {}, 0
    for key, info in layout.items():
        header[key] = {"dtype": SAFETENSORS_CODES[info.dtype], "shape": list(info.shape),
                       "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    with StreamWriter(path) as f:
        f.write(np.frombuffer(len(blob).to_bytes(8, "little") + blob, np.uint8))
        for (key, info), value in zip(layout.items(), values, strict=True):
            if (tuple(value.shape), value.dtype) != (info.shape, info.dtype):
                got, said = f"{value.dtype.name}{list(value.shape)}", f"{info.dtype.name}{list(info.shape)}"
                raise ValueError(f"{key}: got {got}, the header says {said}")
            f.write(np.ascontiguousarray(value).reshape(-1).view(np.uint8))  # little-endian hosts


class StreamWriter:
    """A new file written front to back through two page-aligned staging chunks, one filling while the other is written.

    With `direct` (the default where the OS has it) the file is opened O_DIRECT:
    chunks go from memory to the device, so a multi-GB output neither fills the
    page cache nor leaves gigabytes of dirty pages to flush, and costs almost no
    CPU. Where the filesystem refuses O_DIRECT (tmpfs, some network filesystems)
    it writes through the page cache. The last chunk is padded to the block size
    and the file truncated to the bytes given.
    """

    CHUNK = 8 << 20  # a multiple of every device block size

    def __init__(self, path: Path, *, direct: bool = hasattr(os, "O_DIRECT")):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct, self.fd = direct, None
        if direct:
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError:
                self.direct = False
        if self.fd is None:
            self.fd = os.open(path, flags, 0o644)
        try:
            self.chunks = [np.frombuffer(mmap.mmap(-1, self.CHUNK), np.uint8) for _ in range(2)]  # page-aligned
        except BaseException:
            os.close(self.fd)
            raise
        self.current, self.fill, self.offset = 0, 0, 0  # offset: where the current chunk goes in the file
        self.pending = None
        self.io = ThreadPoolExecutor(1, thread_name_prefix="flax-sgm-write")

    def write(self, data: np.ndarray) -> None:
        """Append `data`, a uint8 vector."""
        done = 0
        while done < data.size:
            n = min(data.size - done, self.CHUNK - self.fill)
            self.chunks[self.current][self.fill : self.fill + n] = data[done : done + n]
            self.fill, done = self.fill + n, done + n
            if self.fill == self.CHUNK:
                self._submit()

    def _submit(self) -> None:
        if self.pending is not None:
            self.pending.result()  # the other chunk is free again
        size = self.fill if not self.direct else -(-self.fill // mmap.PAGESIZE) * mmap.PAGESIZE
        chunk = self.chunks[self.current][:size]
        if size > self.fill:
            chunk[self.fill :] = 0
        self.pending = self.io.submit(self._pwrite, chunk, self.offset)
        self.offset += self.fill
        self.current, self.fill = 1 - self.current, 0

    def _pwrite(self, chunk: np.ndarray, offset: int) -> None:
        view, done = memoryview(chunk), 0
        while done < len(view):
            try:
                done += os.pwrite(self.fd, view[done:], offset + done)
            except OSError as err:
                if not (self.direct and err.errno == errno.EINVAL and offset + done == 0):
                    raise  # a device error is never retried through the page cache
                # Opened O_DIRECT but refused at the first write: go through the page cache.
                import fcntl  # POSIX, like O_DIRECT

                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False

    def close(self) -> None:
        """Write what is left and close; the file then holds exactly the bytes given."""
        try:
            if self.fill:
                self._submit()
            if self.pending is not None:
                self.pending.result()
            os.ftruncate(self.fd, self.offset)
        finally:
            self.abort()

    def abort(self) -> None:
        self.io.shutdown(wait=True)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close() if exc_type is None else self.abort()
        return False


def _orbax():
    import orbax.checkpoint as ocp

    return ocp


def save_orbax(params: nnx.State, target: Path) -> None:
    """One stack's nnx.Param state as an Orbax checkpoint directory."""
    ocp = _orbax()
    # No OCDBT, no compression: several times faster to write, and weights barely compress.
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_compression=False)
    with ocp.Checkpointer(handler) as checkpointer, _quiet_absl():  # it warns that there is no OCDBT to merge
        checkpointer.save(target.absolute(), params)


@contextlib.contextmanager
def _quiet_absl():
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class ConvertedStack(NamedTuple):
    prefix: str
    name: str
    config: dict
    param_dtype: str
    params: int
    nbytes: int


def convert_file(
    source,
    out,
    prefixes: Iterable[str] = (),
    *,
    all_stacks: bool = False,
    heads: int | None = None,
    head_dim: int | None = None,
    weights: str = "orbax",
    param_dtype: str | None = None,
    disable_self_attn: bool | None = None,
    overwrite: bool = False,
    progress: Callable[[int], Any] | None = None,
    on_plan: Callable[[list[StackShape]], Any] | None = None,
) -> list[ConvertedStack]:
    """Convert stacks of `source` into the directory `out` (see the module docstring); returns what was written.

    The selection and every stack's config are checked before any weight is read;
    each stack's conversion_plan before its weights are used. Stacks are converted
    one at a time, so memory stays near the largest one. `out` appears only when
    complete.
    """
    if weights not in WEIGHT_FORMATS:
        raise CheckpointError(f"weights format must be one of {WEIGHT_FORMATS}; got {weights!r}")
    if param_dtype is not None and param_dtype not in PARAM_DTYPES:
        raise CheckpointError(f"param dtype must be one of {PARAM_DTYPES}; got {param_dtype!r}")
    out = Path(out)
    check_output(out, overwrite)
    reader, ahead = open_checkpoint(source), None
    try:
        selected = select_stacks(reader, prefixes, all_stacks=all_stacks)
        stacks = [infer_stack(reader.infos, p, disable_self_attn=disable_self_attn) for p in selected]
        configs = [module_config(s, heads, head_dim) for s in stacks]
        if on_plan:
            on_plan(stacks)
        written = []
        # Orbax: one stack is written on a thread while the next is read and converted,
        # so at most two converted stacks are in memory. Safetensors: tensors stream
        # from the read-ahead to the file, and memory is the read-ahead's.
        ahead = _ReadAhead(reader, [k for s in stacks for k in s.keys], on_read=progress)
        dtypes = [np.dtype(param_dtype or s.dtype).name for s in stacks]
        with (
            staging_dir(out, overwrite) as tmp,
            ThreadPoolExecutor(1, thread_name_prefix="flax-sgm-plan") as planner,
            ThreadPoolExecutor(1, thread_name_prefix="flax-sgm-save") as saver,
        ):
            # Planning traces each config once (about 0.5 s for SDXL's depth 10): on its
            # own thread it overlaps the reads and the first stacks' writes.
            plans = [planner.submit(stack_plan, reader, s, c, d) for s, c, d in zip(stacks, configs, dtypes)]
            try:
                pending = None
                for stack, config, dtype, planned in zip(stacks, configs, dtypes, plans):
                    plan = planned.result()
                    name = stack_name(stack.prefix)
                    record = _stack_record(stack.prefix, name, config, dtype, weights)
                    if weights == "safetensors":
                        write_stack_safetensors(tmp / record["path"], plan, ahead, {"flax_sgm_config": json.dumps(record)})
                    else:
                        state = nnx.state(fill_stack(abstract_model(config, dtype), plan, ahead), nnx.Param)
                        if pending is not None:
                            pending.result()
                        pending = saver.submit(save_orbax, state, tmp / record["path"])
                        del state  # only the saver holds the weights from here
                    params = sum(math.prod(step.shape) for step in plan)
                    written.append(ConvertedStack(stack.prefix, name, config, dtype, params, stack.nbytes))
                if pending is not None:
                    pending.result()
            except BaseException:
                planner.shutdown(cancel_futures=True)  # no more tracing for a failed run
                raise
            document = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "weights": weights,
                "source": str(Path(source).name),
                "stacks": [_stack_record(e.prefix, e.name, e.config, e.param_dtype, weights) for e in written],
            }
            (tmp / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")
        return written
    finally:
        if ahead is not None:
            ahead.close()
        reader.close()


def _stack_record(prefix: str, name: str, config: dict, param_dtype: str, weights: str) -> dict:
    path = name + ".safetensors" if weights == "safetensors" else name
    return {"prefix": prefix, "path": path, "param_dtype": param_dtype, "config": config}


def check_output(out: Path, overwrite: bool) -> None:
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise CheckpointError(f"{out}: already exists (pass --overwrite to replace it)")
    if not out.parent.exists():
        raise CheckpointError(f"{out.parent}: no such directory")


class staging_dir:
    """A hidden directory beside `out`, renamed to `out` on success and removed on any failure.

    An interrupted conversion leaves no `out` (at most a `.<name>.partial-*`
    directory); with `overwrite` the old `out` is replaced only once the new one is complete.
    """

    def __init__(self, out: Path, overwrite: bool):
        self.out, self.overwrite = Path(out), overwrite
        self.tmp = self.out.parent / f".{self.out.name}.partial-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        check_output(self.out, self.overwrite)
        old = None
        if self.out.exists() or self.out.is_symlink():
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
        return False


# ---------------------------------------------------------------------------
# Loading converted output


def read_config(path) -> dict:
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE} (not a `flax-sgm convert` output directory)")
    document = json.loads(config_path.read_text())
    if document.get("format") != FORMAT_NAME or document.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: not a {FORMAT_NAME} v{FORMAT_VERSION} config")
    return document


def load_pretrained(path, prefix: str | None = None, *, dtype=None, seed: int = 0, **overrides) -> SpatialTransformer:
    """A ready SpatialTransformer from a `flax-sgm convert` output directory.

    `prefix` picks a stack when the directory holds several. `dtype` is the compute
    dtype; `overrides` are other constructor arguments (use_checkpoint,
    sdp_backend, checkpoint_policy). `seed` seeds the dropout keys.
    """
    document = read_config(path)
    stacks = document["stacks"]
    if prefix is None and len(stacks) != 1:
        raise CheckpointError(f"{path} holds {len(stacks)} stacks; pass prefix=, one of {[s['prefix'] for s in stacks]}")
    if prefix is not None:
        wanted = normalize_prefix(prefix)
        stacks = [s for s in stacks if s["prefix"] == wanted]
        if not stacks:
            raise CheckpointError(f"{path}: no stack with prefix {wanted!r}; it holds {[s['prefix'] for s in document['stacks']]}")
    return _load_stack(Path(path), stacks[0], document["weights"], dtype, seed, overrides)


def load_pretrained_all(path, *, dtype=None, seed: int = 0, **overrides) -> dict[str, SpatialTransformer]:
    """Every stack of a `flax-sgm convert` output directory, by prefix."""
    document = read_config(path)
    return {
        s["prefix"]: _load_stack(Path(path), s, document["weights"], dtype, seed, overrides) for s in document["stacks"]
    }


def _load_stack(root: Path, record: Mapping, weights: str, dtype, seed: int, overrides) -> SpatialTransformer:
    model = abstract_model(record["config"], record["param_dtype"], dtype, **overrides)
    abstract = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    target = root / record["path"]
    if weights == "safetensors":
        reader = SafetensorsReader(target)
        try:
            values = {tuple(_path_part(p) for p in k.split(".")): reader.read(k) for k in reader.infos}
        finally:
            reader.close()
        wrong = sorted(set(values) ^ set(abstract)) + [
            p for p in values if p in abstract and (values[p].shape, values[p].dtype) != (abstract[p].shape, abstract[p].dtype)
        ]
        if wrong:
            raise CheckpointError(f"{target}: does not match its config at {'.'.join(map(str, wrong[0]))}")
        restored = nnx.from_flat_state({p: jnp.asarray(v) for p, v in values.items()})
    else:
        ocp = _orbax()
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), nnx.state(model, nnx.Param))
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(target.absolute(), params)
    nnx.update(model, restored)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, params, _concrete_rng_state(rest, seed))


def _path_part(part: str):
    return int(part) if part.isdigit() else part


def _concrete_rng_state(state, seed: int):
    """eval_shape leaves the dropout RNG keys and counts abstract; give them values (keys from `seed`)."""
    counter = iter(range(1 << 30))

    def concrete(leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), next(counter)), math.prod(leaf.shape))
            return keys.reshape(leaf.shape)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree.map(concrete, state)
