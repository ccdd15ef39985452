"""The directory `flax-sgm convert` writes, and reading it back.

  config.json           format, version, weights format, source file name, and per stack: prefix, path,
                        param dtype, SpatialTransformerConfig, the size of each file written for it
  <stack>/              an Orbax composite checkpoint: `params` (the stack's nnx.Param state) and
                        `config` (the stack's entry in config.json), or
  <stack>.safetensors   a flat file keyed by Flax paths (`transformer_blocks.0.attn1.to_q.kernel`),
                        the stack's entry in its metadata.

Orbax finalises each stack's checkpoint itself (a temporary directory, renamed when complete). The
directory as a whole is written to a temporary directory beside `out` and renamed into place when every
stack is written: no library finalises several checkpoints at once, and a single Orbax save of every
stack would hold the whole model in memory. Reading checks each file's recorded size and the checkpoint's
Orbax metadata first, so a damaged output is one line naming what is wrong before Orbax reads it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_sgm.attention.config import SEED_NAMES, SpatialTransformerConfig
from flax_sgm import config_io, models
from flax_sgm.attention.layout import normalize_prefix
from flax_sgm.errors import CheckpointError, first_line
from flax_sgm.checkpoints.sources import CONFIG_FILE

FORMAT_NAME = "flax-sgm"
FORMAT_VERSION = 3  # 2: a stack's config named its heads as the seed does; 1: a bare Orbax directory (refused)
WEIGHT_FORMATS = ("orbax", "safetensors")
CONFIG_METADATA = "flax_sgm_config"  # a flat safetensors file's own record, in its metadata
UNET_RECORD = "UNetModel"  # a record's "model" when it holds a whole UNet
STACK_RECORD = "SpatialTransformer"  # what a record without "model" holds
TEXT_RECORD = "CLIPTextModel"  # a record's "model" when it holds a text encoder (prefix: text_record_prefix)
VAE_RECORD = "AutoencoderKL"  # a record's "model" when it holds a KL autoencoder
# A record's "model" -> the name of its config class (config_io.CONFIGS: no family is imported here).
CONFIG_OF = {STACK_RECORD: "SpatialTransformerConfig", UNET_RECORD: "UNetConfig", TEXT_RECORD: "CLIPTextConfig",
             VAE_RECORD: "AutoencoderConfig"}
# A whole model's config class name -> (its record's "model", its default name in the output).
WHOLE_MODELS = {"UNetConfig": (UNET_RECORD, "unet"), "CLIPTextConfig": (TEXT_RECORD, "text_encoder"),
                "AutoencoderConfig": (VAE_RECORD, "vae")}


# What each record holds, and the loader that reads it back.
HOLDS = {STACK_RECORD: ("SpatialTransformer stacks", "load_pretrained"), UNET_RECORD: ("a whole UNet", "load_unet"),
         TEXT_RECORD: ("text encoders", "load_text_encoder"), VAE_RECORD: ("an autoencoder", "load_vae")}


def records_of(path, records: list, model: str) -> list:
    """The records of `model` (a *_RECORD) in an output; CheckpointError, naming what the output holds instead and
    the loader that reads it, when there are none."""
    model_of = {name: m for m, name in CONFIG_OF.items()}
    found = [r for r in records if model_of[type(r.config).__name__] == model]
    if not found:
        held = sorted({model_of[type(r.config).__name__] for r in records})
        what, loader = HOLDS[held[0]] if held else ("nothing", "flax-sgm convert")
        raise CheckpointError(f"{path}: holds {what}, not {HOLDS[model][0]}; load it with {loader}")
    return found


def _config_class(model: str):
    return config_io.CONFIGS[CONFIG_OF[model]]


def text_record_prefix(embedder: int) -> str:
    """The prefix of a convert output's record of sgm's text embedder `embedder`."""
    return f"conditioner.embedders.{embedder}."


class StackRecord(NamedTuple):
    """One stack of an output directory, as its config.json lists it."""

    prefix: str
    path: str  # relative to the directory
    param_dtype: str
    config: SpatialTransformerConfig
    files: tuple[tuple[str, int], ...] = ()  # (path relative to the directory, size in bytes), as written

    def to_dict(self) -> dict:
        record = {"prefix": self.prefix, "path": self.path, "param_dtype": self.param_dtype, "config": self.config.to_dict()}
        whole = WHOLE_MODELS.get(type(self.config).__name__)
        record |= {"model": whole[0]} if whole else {}
        return record | ({"files": dict(self.files)} if self.files else {})


def stack_name(prefix: str, config=None) -> str:
    """Directory or file name of a stack (or whole UNet) inside the output."""
    default = WHOLE_MODELS.get(type(config).__name__, (None, "spatial_transformer"))[1]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", prefix.rstrip(".")) or default


def check_output(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """`out` may be written: absent, or (overwrite) an earlier output; never the checkpoint read or a folder
    holding it, and never another file or directory (--overwrite replaced them, an input included)."""
    out = Path(out)
    if source is not None:
        where, read = out.resolve(), Path(source).resolve()
        if where == read or where in read.parents:
            raise CheckpointError(f"{out}: is the checkpoint being converted{'' if where == read else ' or holds it'} "
                                  f"({source}); write the output elsewhere")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise CheckpointError(f"{out}: already exists (pass --overwrite to replace it)")
        if not is_output(out):
            raise CheckpointError(f"{out}: exists and is not a flax-sgm convert output; --overwrite replaces only "
                                  "those (remove it yourself, or write elsewhere)")
    if not out.parent.is_dir():
        raise CheckpointError(f"{out.parent}: no such directory")


class OutputWriter:
    """Writes an output directory stack by stack; `out` appears only when the `with` block completes.

    Each `add_model` returns once its stack is written, so a caller can hold one stack at a time. Any
    failure removes what was written; with `overwrite` an old `out` is replaced only by a complete new one.
    """

    def __init__(self, out, weights: str, *, overwrite: bool = False, source=None):
        if weights not in WEIGHT_FORMATS:
            raise CheckpointError(f"weights format must be one of {WEIGHT_FORMATS}; got {weights!r}")
        self.out, self.weights, self.overwrite = Path(out), weights, overwrite
        self.source = None if source is None else Path(source)  # the checkpoint read, never written over
        check_output(self.out, overwrite, self.source)
        self.records: list[StackRecord] = []

    def __enter__(self) -> OutputWriter:
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=self.out.parent))
        self.checkpointer = _checkpointer() if self.weights == "orbax" else None
        return self

    def add_model(self, prefix: str, config, model: nnx.Module) -> None:
        """Write a filled model's parameters (Orbax or safetensors): a stack, a whole UNet or a text encoder."""
        params = nnx.state(model, nnx.Param)
        suffix = ".safetensors" if self.weights == "safetensors" else ""
        record = StackRecord(prefix, stack_name(prefix, config) + suffix, _stored_dtype_name(params), config)
        target = (self.tmp / record.path).absolute()
        try:
            _reserve(self.tmp, sum(v.get_value().nbytes for _, v in nnx.to_flat_state(params)))
            if self.checkpointer is None:
                from safetensors.numpy import save_file

                arrays = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}
                save_file(arrays, target, metadata={CONFIG_METADATA: json.dumps(record.to_dict())})
            else:
                from orbax.checkpoint import args

                self.checkpointer.save(target, args.Composite(params=args.StandardSave(params), config=args.JsonSave(record.to_dict())))
        except Exception as err:  # tensorstore, orbax and safetensors raise many types
            reason = _first_line(err).replace(str(self.tmp.absolute()), str(self.out))
            raise CheckpointError(f"{self.out}: could not write stack {prefix!r}: {_clip(reason)}") from None
        self.records.append(record._replace(files=_written_files(self.tmp, record.path)))

    def __exit__(self, exc_type, exc, tb):
        try:
            if self.checkpointer is not None:
                self.checkpointer.close()
            if exc_type is None:
                document = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "weights": self.weights,
                            "source": self.source.name if self.source else "", "stacks": [r.to_dict() for r in self.records]}
                (self.tmp / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")
                check_output(self.out, self.overwrite, self.source)
                _replace(self.tmp, self.out)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)  # already gone once renamed into place
        return False


def _reserve(directory: Path, nbytes: int) -> None:
    """OSError if `directory` has no room for a file of `nbytes` (plus a margin): a full disk, quota or file
    size limit is found before Orbax writes, whose failed writes leave tensorstore callbacks printing to stderr."""
    fd, name = tempfile.mkstemp(dir=directory)
    try:
        os.posix_fallocate(fd, 0, nbytes + nbytes // 64 + (1 << 20))
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
    finally:
        os.close(fd)
        os.unlink(name)


def _checkpointer():
    """Orbax's synchronous checkpointer of a stack: `params` (a pytree of arrays) and `config` (JSON)."""
    import orbax.checkpoint as ocp

    registry = ocp.DefaultCheckpointHandlerRegistry()  # each item's handler, from its args
    for item, args in [("params", ocp.args.StandardSave), ("params", ocp.args.StandardRestore),
                       ("config", ocp.args.JsonSave), ("config", ocp.args.JsonRestore)]:
        registry.add(item, args)
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=registry))


def umask_modes(root: Path) -> None:
    """Give `root` and everything under it the modes a plain open() or mkdir() would have (0o666 / 0o777 less the
    umask): mkstemp and mkdtemp make them private to the owner (0o600 / 0o700), and a rename keeps that."""
    umask = os.umask(0)
    os.umask(umask)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _replace(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an old `out` is moved aside first and removed only after."""
    umask_modes(new)
    old = None
    if out.exists() or out.is_symlink():
        old = new.with_name(new.name + ".old")
        os.replace(out, old)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def _written_files(root: Path, stack_path: str) -> tuple[tuple[str, int], ...]:
    top = root / stack_path
    files = sorted(top.rglob("*")) if top.is_dir() else [top]
    return tuple((p.relative_to(root).as_posix(), p.stat().st_size) for p in files if p.is_file())


def _stored_dtype_name(params: nnx.State) -> str:
    dtypes = {jnp.dtype(v.get_value().dtype).name for _, v in nnx.to_flat_state(params)}
    return dtypes.pop() if len(dtypes) == 1 else str(jnp.result_type(*dtypes))


# Reading --------------------------------------------------------------------------------------


def is_output(path) -> bool:
    """A `flax-sgm convert` output directory (it may still be damaged)."""
    config = Path(path) / CONFIG_FILE
    try:
        # The text, not the JSON: a damaged config.json still says whose it is.
        return config.is_file() and re.search(rf'"format":\s*"{FORMAT_NAME}"', config.read_text()) is not None
    except (OSError, UnicodeDecodeError):
        return False


def read_output(path) -> tuple[str, list[StackRecord]]:
    """The weights format and the stacks of an output directory; CheckpointError naming what is wrong."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_FILE} (not a `flax-sgm convert` output directory)")
    try:
        document = json.loads(config_path.read_text())
        version = document.get("version")
        if document.get("format") != FORMAT_NAME or version not in (2, FORMAT_VERSION):
            raise CheckpointError(f"{config_path}: not a {FORMAT_NAME} v2 or v{FORMAT_VERSION} config (convert again)")
        weights = document["weights"]
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"unknown weights format {weights!r}")
        records = [
            StackRecord(s["prefix"], s["path"], jnp.dtype(s["param_dtype"]).name,
                        _config_class(s.get("model", STACK_RECORD)).from_dict(
                            _migrated(s, version), source=f"stack {s['prefix']!r}"),
                        tuple((str(name), int(size)) for name, size in s["files"].items()))
            for s in document["stacks"]
        ]
    except CheckpointError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        what = f"missing {err}" if isinstance(err, KeyError) else str(err).splitlines()[0]
        raise CheckpointError(f"{config_path}: damaged flax-sgm config ({what})") from None
    return weights, records


def _migrated(stack: dict, version: int) -> dict:
    """A stack record's config as this version names it."""
    config = stack["config"]
    if version != 2 or "model" in stack:
        return config
    if clash := sorted(set(config) & set(SEED_NAMES.values())):
        raise ValueError(f"a v2 record with the v{FORMAT_VERSION} keys {clash}")
    return {SEED_NAMES.get(k, k): v for k, v in config.items()}


def select_record(path, records: list[StackRecord], prefix: str | None) -> StackRecord:
    if prefix is None:
        if len(records) != 1:
            raise CheckpointError(f"{path} holds {len(records)} stacks; pass prefix=, one of {[r.prefix for r in records]}")
        return records[0]
    wanted = normalize_prefix(prefix)
    for record in records:
        if record.prefix == wanted:
            return record
    raise CheckpointError(f"{path}: no stack with prefix {wanted!r}; it holds {[r.prefix for r in records]}")


def load_record(path, weights: str, record: StackRecord, *, dtype=None, param_dtype=None, seed: int = 0,
                options=None) -> nnx.Module:
    """A record of an output as the model a loader returns: restored in its stored dtype, cast to `param_dtype`
    if another, dropout keys from `seed`, in inference mode. `options` set the config's run-time fields."""
    type(record.config).check_options(options or {}, str(path))
    config = record.config.replace(**(options or {}))
    model = restore(path, weights, record, models.abstract(config, dtype=dtype, param_dtype=record.param_dtype,
                                                           seed=seed))
    if param_dtype is not None and jnp.dtype(param_dtype) != jnp.dtype(record.param_dtype):
        cast = models.abstract(config, dtype=dtype, param_dtype=param_dtype, seed=seed)
        nnx.update(cast, jax.tree.map(lambda v: v.astype(param_dtype), nnx.state(model, nnx.Param)))
        model = cast
    return models.ready(model)


def restore(path, weights: str, record: StackRecord, model: nnx.Module) -> nnx.Module:
    """Fill the abstract `model` (of record.config, in record.param_dtype) from the stack's files."""
    target = Path(path) / record.path
    if not target.exists():
        raise CheckpointError(f"{target}: missing (the output directory is damaged)")
    _check_sizes(Path(path), record)
    abstract = nnx.state(model, nnx.Param)
    restore_stack = _restore_safetensors if weights == "safetensors" else _restore_orbax
    nnx.update(model, restore_stack(target, abstract))
    return model


def _check_sizes(path: Path, record: StackRecord) -> None:
    """Missing or truncated files, found before a reader meets them."""
    for name, size in record.files:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (the output directory is damaged)")
        if (found := file.stat().st_size) != size:
            raise CheckpointError(f"{file}: {found} bytes, {path / CONFIG_FILE} records {size} (the output directory is damaged)")


def _restore_orbax(target: Path, abstract: nnx.State) -> nnx.State:
    """The `params` item, once Orbax's own metadata says it holds what `abstract` wants."""
    from orbax.checkpoint import args

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    wanted = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)
    try:
        with _checkpointer() as checkpointer:
            stored = checkpointer.metadata(target.absolute()).item_metadata["params"]
            _check_arrays(target, _shapes(stored), _shapes(wanted))
            items = checkpointer.restore(target.absolute(), args.Composite(params=args.StandardRestore(wanted)))
    except CheckpointError:
        raise
    except Exception as err:  # tensorstore and orbax raise many types
        raise CheckpointError(f"{target}: damaged Orbax checkpoint ({_short(err)})") from None
    return items["params"]


def _shapes(tree) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Flax path (`proj_in.kernel`) -> (shape, dtype) of a tree of arrays, abstract arrays or their metadata."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(p, simple=True, separator=".").removesuffix(".value"): (tuple(x.shape), np.dtype(x.dtype))
            for p, x in leaves}


def _check_arrays(target: Path, found: dict, wanted: dict) -> None:
    for name in sorted(found.keys() | wanted.keys()):
        if found.get(name) != wanted.get(name):
            raise CheckpointError(f"{target}: does not match its config at {name}")


def _restore_safetensors(target: Path, abstract: nnx.State) -> nnx.State:
    from safetensors import safe_open

    try:
        with safe_open(target, framework="numpy") as f:
            values = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors' own error type
        raise CheckpointError(f"{target}: damaged safetensors file ({_short(err)})") from None
    _check_arrays(target, _shapes(values), _shapes(abstract))
    return nnx.from_flat_state({tuple(int(p) if p.isdigit() else p for p in k.split(".")): jnp.asarray(v) for k, v in values.items()})


def _first_line(err: BaseException) -> str:
    return first_line(err).split(". See full TensorStore details")[0]


def _clip(line: str) -> str:
    return line if len(line) <= 200 else line[:200] + "..."


def _short(err: BaseException) -> str:
    return _clip(_first_line(err))
