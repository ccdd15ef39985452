"""The directory `flax-sgm convert` writes, and reading it back.

  config.json           format, version, weights format, source file name, and per stack:
                        prefix, path, param dtype, SpatialTransformerConfig, the size of each
                        file written for it (checked before reading: truncated or missing)
  <stack>/              an Orbax checkpoint of the stack's nnx.Param state
                        (orbax's StandardCheckpointer, for both save and restore), or
  <stack>.safetensors   a flat file keyed by Flax paths (`transformer_blocks.0.attn1.to_q.kernel`).

It is written to a hidden staging directory beside the target and renamed into
place only when complete; a damaged one is reported in one line naming the file.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_sgm.config import SpatialTransformerConfig
from flax_sgm.layout import CheckpointError, normalize_prefix

FORMAT_NAME = "flax-sgm"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHT_FORMATS = ("orbax", "safetensors")
CONFIG_METADATA = "flax_sgm_config"  # a flat safetensors file's own record, in its metadata

T = TypeVar("T")


class StackRecord(NamedTuple):
    """One stack of an output directory, as its config.json lists it."""

    prefix: str
    path: str  # relative to the directory
    param_dtype: str
    config: SpatialTransformerConfig
    files: tuple[tuple[str, int], ...] = ()  # (path relative to the directory, size in bytes), as written

    def to_dict(self) -> dict:
        record = {"prefix": self.prefix, "path": self.path, "param_dtype": self.param_dtype, "config": self.config.to_dict()}
        return record | ({"files": dict(self.files)} if self.files else {})


def stack_name(prefix: str) -> str:
    """Directory or file name of a stack inside the output."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", prefix.rstrip(".")) or "spatial_transformer"


def check_output(out: Path, overwrite: bool) -> None:
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise CheckpointError(f"{out}: already exists (pass --overwrite to replace it)")
    if not out.parent.is_dir():
        raise CheckpointError(f"{out.parent}: no such directory")


class OutputWriter:
    """Writes an output directory stack by stack; `out` appears only when the `with` block completes.

    Orbax saves run in the background (StandardCheckpointer is asynchronous); `wait`
    waits for them, so that a caller can hold one stack at a time. Any failure removes the staging
    directory; with `overwrite` an old `out` is replaced only by a complete new one.
    """

    def __init__(self, out, weights: str, *, overwrite: bool = False, source: str = ""):
        if weights not in WEIGHT_FORMATS:
            raise CheckpointError(f"weights format must be one of {WEIGHT_FORMATS}; got {weights!r}")
        self.out, self.weights, self.overwrite, self.source = Path(out), weights, overwrite, source
        check_output(self.out, overwrite)
        self.tmp = self.out.parent / f".{self.out.name}.partial-{uuid.uuid4().hex[:8]}"
        self.records: list[StackRecord] = []
        self.checkpointer = None

    def __enter__(self) -> OutputWriter:
        self.tmp.mkdir()
        return self

    def add_model(self, prefix: str, config: SpatialTransformerConfig, model: nnx.Module) -> None:
        """Save a filled model's parameters (Orbax or safetensors)."""
        params = nnx.state(model, nnx.Param)
        dtype = _param_dtype(params)
        if self.weights == "safetensors":
            arrays = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}
            self.add_arrays(prefix, config, arrays, dtype)
            return
        record = StackRecord(prefix, stack_name(prefix), dtype, config)
        if self.checkpointer is None:
            self.checkpointer = _orbax().StandardCheckpointer()
        path = (self.tmp / record.path).absolute()
        self._orbax_write(prefix, lambda: self.checkpointer.save(path, params))  # waits for the previous save
        self.records.append(record)

    def wait(self) -> None:
        """Until the stacks given so far are written (Orbax saves in the background)."""
        if self.checkpointer is not None:
            self._orbax_write(None, self.checkpointer.wait_until_finished)

    def add_arrays(self, prefix: str, config: SpatialTransformerConfig, arrays: Mapping[str, np.ndarray], dtype: str):
        """A flat safetensors file of `arrays`, keyed by Flax paths."""
        from safetensors.numpy import save_file

        record = StackRecord(prefix, stack_name(prefix) + ".safetensors", dtype, config)
        with self._writing(prefix):
            save_file(dict(arrays), self.tmp / record.path, metadata={CONFIG_METADATA: json.dumps(record.to_dict())})
        self.records.append(record)

    @contextlib.contextmanager
    def _writing(self, prefix: str | None):
        try:
            yield
        except Exception as err:
            raise self._write_error(prefix, _first_line(err)) from None

    def _orbax_write(self, prefix: str | None, call: Callable[[], Any]) -> None:
        def attempt():
            try:
                call()
            except Exception:
                # Its failed background tasks go with it, collected while Orbax's noise is held.
                checkpointer, self.checkpointer = self.checkpointer, None
                with contextlib.suppress(Exception):
                    checkpointer.close()
                raise

        _, error = _quietly(attempt)
        if error is not None:
            raise self._write_error(prefix, error)

    def _write_error(self, prefix: str | None, reason: str) -> CheckpointError:
        """A write error as one line naming the output, never the staging directory."""
        what = f"stack {prefix!r}" if prefix is not None else "the last stack"
        reason = reason.replace(str(self.tmp.absolute()), str(self.out)).replace(str(self.tmp), str(self.out))
        return CheckpointError(f"{self.out}: could not write {what}: {_clip(reason)}")

    def __exit__(self, exc_type, exc, tb):
        try:
            if self.checkpointer is not None:
                self._orbax_write(None, self.checkpointer.wait_until_finished)
                self._orbax_write(None, self.checkpointer.close)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        document = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "weights": self.weights,
            "source": self.source,
            "stacks": [r._replace(files=_written_files(self.tmp, r.path)).to_dict() for r in self.records],
        }
        (self.tmp / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")
        try:
            check_output(self.out, self.overwrite)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        old = None
        if self.out.exists() or self.out.is_symlink():
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
        return False


def _written_files(root: Path, stack_path: str) -> tuple[tuple[str, int], ...]:
    top = root / stack_path
    files = sorted(top.rglob("*")) if top.is_dir() else [top]
    return tuple((p.relative_to(root).as_posix(), p.stat().st_size) for p in files if p.is_file())


def _param_dtype(params: nnx.State) -> str:
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
        if document.get("format") != FORMAT_NAME or document.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"{config_path}: not a {FORMAT_NAME} v{FORMAT_VERSION} config")
        weights = document["weights"]
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"unknown weights format {weights!r}")
        records = [
            StackRecord(s["prefix"], s["path"], jnp.dtype(s["param_dtype"]).name,
                        SpatialTransformerConfig.from_dict(s["config"], source=f"stack {s['prefix']!r}"),
                        tuple((str(name), int(size)) for name, size in s.get("files", {}).items()))
            for s in document["stacks"]
        ]
    except CheckpointError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        what = f"missing {err}" if isinstance(err, KeyError) else str(err).splitlines()[0]
        raise CheckpointError(f"{config_path}: damaged flax-sgm config ({what})") from None
    return weights, records


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


def restore(path, weights: str, record: StackRecord, model: nnx.Module) -> nnx.Module:
    """Fill the abstract `model` (of record.config, in record.param_dtype) from the stack's files."""
    target = Path(path) / record.path
    if not target.exists():
        raise CheckpointError(f"{target}: missing (the output directory is damaged)")
    _check_sizes(Path(path), record)
    abstract = nnx.state(model, nnx.Param)
    if weights == "safetensors":
        restored = _restore_safetensors(target, abstract)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        wanted = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)

        def read():
            with _orbax().StandardCheckpointer() as checkpointer:
                return checkpointer.restore(target.absolute(), wanted)

        restored, error = _quietly(read)
        if error is not None:
            raise CheckpointError(f"{target}: damaged Orbax checkpoint ({_clip(error)})")
    nnx.update(model, restored)
    return model


def _check_sizes(path: Path, record: StackRecord) -> None:
    """Missing or truncated files, found before a reader meets them (Orbax would fail noisily, or worse)."""
    for name, size in record.files:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (the output directory is damaged)")
        if (found := file.stat().st_size) != size:
            raise CheckpointError(f"{file}: {found} bytes, {path / CONFIG_FILE} records {size} (the output directory is damaged)")


def _restore_safetensors(target: Path, abstract: nnx.State) -> nnx.State:
    from safetensors import safe_open

    expected = dict(nnx.to_flat_state(abstract))
    try:
        with safe_open(target, framework="numpy") as f:
            values = {tuple(int(p) if p.isdigit() else p for p in k.split(".")): f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors' own error type
        raise CheckpointError(f"{target}: damaged safetensors file ({_short(err)})") from None
    for path in sorted(set(values) | set(expected), key=str):
        got, want = values.get(path), expected.get(path)
        if got is None or want is None or (got.shape, got.dtype) != (tuple(want.shape), jnp.dtype(want.dtype)):
            raise CheckpointError(f"{target}: does not match its config at {'.'.join(map(str, path))}")
    return nnx.from_flat_state({p: jnp.asarray(v) for p, v in values.items()})


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].split(". See full TensorStore details")[0] if text else type(err).__name__


def _clip(line: str) -> str:
    return line if len(line) <= 200 else line[:200] + "..."


def _short(err: BaseException) -> str:
    return _clip(_first_line(err))


def _orbax():
    import orbax.checkpoint as ocp

    return ocp


def _quietly(call: Callable[[], T]) -> tuple[T | None, str | None]:
    """`(call(), None)`, or `(None, the error in one line)`, with Orbax's noise kept from the user.

    Orbax logs through absl; after a failure, the tensorstore operations it abandoned print
    "Event loop is closed" tracebacks from their callbacks, and its coroutines complain when
    collected, at random. All of it goes to sys.stderr, which is held for the call (process-wide):
    passed on after a success, dropped after a failure, which the caller reports in one line.
    After a failure, sys.stderr is given back once the abandoned work has settled; a failed Orbax
    task collected even later is kept out of the asyncio log by `_OrbaxTaskFilter`.
    """
    _install_task_filter()
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    stderr, held = sys.stderr, io.StringIO()
    sys.stderr = held
    result, error = None, None
    try:
        try:
            result = call()
        except Exception as err:  # tensorstore and orbax raise many types
            error = _first_line(err)
        if error is not None:
            _settle(held)
    finally:
        sys.stderr = stderr
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    if error is None:
        stderr.write(held.getvalue())
    return result, error


def _settle(held: io.StringIO, quiet_s: float = 1.0, limit_s: float = 10.0) -> None:
    """Until nothing more is printed for `quiet_s` (at most `limit_s`), collecting what a failure abandoned.

    The tensorstore operations a failed Orbax call leaves behind finish on their own threads, each
    printing its callback's traceback as it does; their coroutines are finalized with them.
    """
    start = last_change = time.monotonic()
    size = -1
    while time.monotonic() - last_change < quiet_s and time.monotonic() - start < limit_s:
        gc.collect()
        if held.tell() != size:
            size, last_change = held.tell(), time.monotonic()
        time.sleep(0.02)


class _OrbaxTaskFilter(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for Orbax's own tasks: their failure was
    already reported in one line; the task was only collected late."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Task exception was never retrieved") and "/orbax/" in message)


def _install_task_filter() -> None:
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _OrbaxTaskFilter) for f in logger.filters):
        logger.addFilter(_OrbaxTaskFilter())
