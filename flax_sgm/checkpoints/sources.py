"""Reading checkpoints as users hold them, through the libraries made for them.

Accepted inputs (`open_source`):
  a file        `.safetensors` through safetensors.safe_open (lazy, per key; needs no
                torch), or a torch.save pickle through torch.load(weights_only=True),
                so a pickle that would run code is refused before anything runs. The
                format is whichever library accepts the file. A top-level
                `state_dict` entry is unwrapped.
  a sharded index
                `*.safetensors.index.json` (diffusers' and transformers' layout above the
                shard size; diffusers' variants: `*.safetensors.index.fp16.json`): its
                `weight_map` names the shard of every key. A JSON file is only ever read
                as an index.
  a diffusers model directory
                `config.json` beside the weights (one file or a sharded index); the
                config is the spec of its stacks (diffusers_config.py). `variant`
                picks diffusers' variant files (`diffusion_pytorch_model.fp16.safetensors`,
                `diffusion_pytorch_model.safetensors.index.fp16.json` and its shards), as
                diffusers' `from_pretrained(variant=...)` does. A transformers model directory
                (a pipeline's `text_encoder/`: `model.safetensors` or `pytorch_model.bin`, their
                variants `model.fp16.safetensors` and shards) is read the same way.
A diffusers weights file or index passed on its own takes the config.json beside it.

A Source gives each tensor two ways: `source[key]`, a read-only numpy view of a safetensors file's
bytes (memory-mapped; what loading copies from, once, into the model's layout), and `source.read(key)`,
an array of its own.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import threading
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from flax_sgm.errors import CheckpointError, first_line

CONFIG_FILE = "config.json"  # beside a diffusers model's weights, and in a `flax-sgm convert` output

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
# safe_open maps a file, and the pages read stay in the process's memory while it is open: reopen it
# after this many bytes.
MAPPED_BYTES = 64 << 20
INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")  # sharded safetensors, sharded torch


def _names(stem: str) -> tuple[re.Pattern, ...]:
    """A library's file names with the variant they carry: a shard, a weights file, a sharded index."""
    return (
        re.compile(rf"^{stem}(?:\.(?P<variant>[^.]+))?-\d+-of-\d+\.(?:safetensors|bin)$"),
        re.compile(rf"^{stem}(?:\.(?P<variant>[^.]+))?\.(?:safetensors|bin)$"),
        re.compile(rf"^{stem}\.(?:safetensors|bin)\.index(?:\.(?P<variant>[^.]+))?\.json$"),
    )


_DIFFUSERS_NAMES = _names("diffusion_pytorch_model")
_MODEL_NAMES = _names("(?:diffusion_pytorch_model|model|pytorch_model)")  # diffusers' and transformers'
_SHARD_NAME = _MODEL_NAMES[0]


def diffusers_variant(name: str) -> tuple[bool, str | None]:
    """(whether `name` is a diffusers weights file, index or shard, the variant it carries)."""
    return _match(_DIFFUSERS_NAMES, name)


def weights_variant(name: str) -> tuple[bool, str | None]:
    """(whether `name` is a diffusers or transformers weights file, index or shard, the variant it carries)."""
    return _match(_MODEL_NAMES, name)


def _match(patterns, name: str) -> tuple[bool, str | None]:
    for pattern in patterns:
        if match := pattern.match(name):
            return True, match.group("variant")
    return False, None


def _weight_files(variant: str | None) -> tuple[str, ...]:
    """diffusers' names, then transformers', of a model's weights (of `variant`), by preference: safetensors before
    torch's pickles, a sharded index before one file."""
    v = f".{variant}" if variant else ""
    stems = (("diffusion_pytorch_model", "diffusion_pytorch_model"), ("model", "pytorch_model"))  # safetensors, torch
    return tuple(name for stem, pickled in stems for name in (
        f"{stem}.safetensors.index{v}.json", f"{stem}{v}.safetensors", f"{pickled}.bin.index{v}.json", f"{pickled}{v}.bin"))

# safe_open reports dtypes by safetensors' code.
SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}


class Bytes(NamedTuple):
    """Where a safetensors tensor's bytes are: its file, and the offset of its first byte."""

    path: Path
    offset: int


class TensorInfo(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype  # np.void for what numpy cannot hold (e.g. torch.qint8): listed, refused by conversion

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class Source:
    """The tensors of one checkpoint by key: shapes and dtypes up front, values read on demand.

    `config` is the diffusers model's config.json (a dict) when the input had one,
    `config_path` where it came from.
    """

    def __init__(self, path: Path, kind: str, infos: dict[str, TensorInfo], places: dict[str, Any],
                 config: dict | None = None, config_path: Path | None = None, metadata: Mapping | None = None):
        self.path, self.kind, self.infos = path, kind, infos
        # What the file says beside its tensors: a safetensors header's __metadata__, a torch checkpoint's
        # top-level numbers and strings (an sgm/LDM file's global_step).
        self.metadata = dict(metadata or {})
        self._places = places  # key -> its Bytes in a safetensors file, or the {key: torch tensor} dict holding it
        self._handles: dict[Path, Any] = {}  # open safe_open handles, by file
        self._mapped = 0  # bytes read through them
        self.config, self.config_path = config, config_path

    @property
    def private(self) -> bool:
        """Whether `source[key]` returns arrays nothing else holds: never (views of the file, or torch's tensors)."""
        return False

    def read(self, key: str) -> np.ndarray:
        """The tensor as a numpy array of its own (bfloat16 as ml_dtypes.bfloat16)."""
        place = self._places[key]
        if isinstance(place, dict):
            from flax_sgm.checkpoints.convert import to_numpy

            return to_numpy(place[key])
        try:
            if place.path not in self._handles:
                from safetensors import safe_open

                self._handles[place.path] = safe_open(place.path, framework="numpy")
            value = self._handles[place.path].get_tensor(key)  # a copy
        except Exception as err:  # safetensors raises its own error type
            raise CheckpointError(f"{place.path}: cannot read {key}: {first_line(err)}") from None
        self._mapped += value.nbytes
        if self._mapped > MAPPED_BYTES:
            self.release()
        return value

    def prefetch(self, keys: Iterable[str]) -> None:
        """Start the kernel reading these tensors' bytes into the page cache (posix_fadvise WILLNEED, on a thread),
        so a cold file's reads overlap building the model that will hold them. The page cache is not the process's
        memory, and a file already cached costs nothing. Only safetensors files; a no-op where the OS has no fadvise."""
        spans: dict[Path, list[tuple[int, int]]] = {}
        for key in keys:
            place = self._places.get(key)
            if isinstance(place, Bytes):
                spans.setdefault(place.path, []).append((place.offset, self.infos[key].nbytes))
        if spans and hasattr(os, "posix_fadvise"):
            threading.Thread(target=_will_need, args=(spans,), daemon=True).start()

    def file_position(self, key: str) -> tuple[str, int]:
        """Where the tensor's bytes lie (file, offset): keys read in this order read each file front to back, the
        order prefetch asks the kernel for them. A torch checkpoint's tensors, in memory already, all sit at ("", 0)."""
        place = self._places[key]
        return (str(place.path), place.offset) if isinstance(place, Bytes) else ("", 0)

    def __getitem__(self, key: str) -> np.ndarray:
        """The tensor without a copy, for convert.load_planned: a read-only view of the file's bytes (its own
        memory map, unmapped when the view goes), or torch's tensor as numpy."""
        place = self._places[key]
        if isinstance(place, dict):
            return self.read(key)
        info = self.infos[key]
        if info.nbytes == 0:  # mmap cannot map nothing
            return np.empty(info.shape, info.dtype)
        try:
            return np.asarray(np.memmap(place.path, info.dtype, "r", place.offset, info.shape))
        except (OSError, ValueError) as err:  # a file shorter than its header says, or gone
            raise CheckpointError(f"{place.path}: cannot read {key}: {first_line(err)}") from None

    def release(self) -> None:
        """Unmap the files read so far (safe_open maps them, and mapped pages count as the process's memory)."""
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles, self._mapped = {}, 0

    def close(self) -> None:
        self.release()
        self._places = {}

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _will_need(spans: dict[Path, list[tuple[int, int]]]) -> None:
    for path, parts in spans.items():
        merged: list[list[int]] = []  # adjacent tensors as one request
        for offset, size in sorted(parts):
            if merged and offset <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], offset + size)
            else:
                merged.append([offset, offset + size])
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # the read itself will say what is wrong
        try:
            for begin, end in merged:
                os.posix_fadvise(fd, begin, end - begin, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def open_source(path, variant: str | None = None) -> Source:
    """A Source for a file, a sharded index or a diffusers model directory; CheckpointError when it is none.

    `variant` ("fp16", or any name diffusers saved with) picks a diffusers directory's variant files.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if variant is not None and (not isinstance(variant, str) or not re.fullmatch(r"[A-Za-z0-9_]+", variant)):
        raise CheckpointError(f"variant must be a name such as 'fp16'; got {variant!r}")
    if path.is_dir():
        source = _open_directory(path, variant)
    else:
        is_diffusers, carried = diffusers_variant(path.name)
        if variant is not None and carried != variant:
            raise CheckpointError(
                f"{path}: variant {variant!r} picks a diffusers directory's files; this file is "
                f"{'the ' + repr(carried) + ' variant' if carried else 'not a variant'} (pass its directory)"
            )
        if path.name == CONFIG_FILE:
            raise CheckpointError(f"{path}: a model config, not weights; pass its directory {path.parent}")
        if path.suffix == ".json":  # never handed to safetensors: an index names the files that hold the tensors
            source = _open_index(path, path)
        else:
            infos, places, kind, metadata = _open_file(path)
            source = Source(path, kind, infos, places, metadata=metadata)
        if is_diffusers and (path.parent / CONFIG_FILE).is_file():
            source.config, source.config_path = _read_model_config(path.parent / CONFIG_FILE), path.parent / CONFIG_FILE
    return source


def _open_directory(path: Path, variant: str | None) -> Source:
    config_path = path / CONFIG_FILE
    # diffusers' own names first: a model repository often holds variants beside them (.bin, .fp16.safetensors).
    chosen = [path / name for name in _weight_files(variant) if (path / name).is_file()][:1]
    indexes = [p for p in chosen if p.suffix == ".json"]
    weights = [p for p in chosen if p.suffix != ".json"]
    if variant is not None and not chosen:
        raise CheckpointError(f"{path}: has no {variant!r} variant ({_variants_here(path)})")
    if not chosen:  # other names: any sharded index, else any one checkpoint file
        indexes = sorted(p for suffix in INDEX_SUFFIXES for p in path.glob("*" + suffix))
        if not indexes:
            weights = sorted(
                p for p in path.iterdir()
                if p.suffix in (".safetensors", *TORCH_SUFFIXES) and not weights_variant(p.name)[1]
                and not _SHARD_NAME.match(p.name)
            )
        if not indexes and not weights and _variants(path):
            raise CheckpointError(
                f"{path}: holds diffusers variants only ({', '.join(_variants(path))}); pass variant="
            )
    if not indexes and not weights:
        models = sorted(p.name for p in path.iterdir() if (p / CONFIG_FILE).is_file())
        hint = f" (a pipeline? its models: {', '.join(models)}/)" if models else ""
        raise CheckpointError(f"{path}: a directory with no checkpoint file or sharded index{hint}")
    if len(indexes) > 1 or (not indexes and len(weights) > 1):
        found = [p.name for p in (indexes or weights)]
        raise CheckpointError(f"{path}: holds several checkpoints ({', '.join(found[:5])}); pass one of them")
    config = _read_model_config(config_path) if config_path.is_file() else None
    if indexes:
        source = _open_index(indexes[0], path)
    else:
        infos, places, kind, metadata = _open_file(weights[0])
        source = Source(path, kind, infos, places, metadata=metadata)
    source.config, source.config_path = config, config_path if config is not None else None
    return source


def _variants(path: Path) -> list[str]:
    """The variants of diffusers' files in a directory."""
    return sorted({v for p in path.iterdir() if (v := weights_variant(p.name)[1])})


def _variants_here(path: Path) -> str:
    found = _variants(path)
    return f"its variants: {', '.join(found)}" if found else "it holds no variant files"


def describe_config(config: Mapping) -> str:
    """What a model's config.json is, for an error: 'an AutoencoderKL config' (diffusers' class), 'a transformers
    clip_text_model config' (a model_type), or 'a config with no `_class_name`'."""
    kind = config.get("_class_name") or (f"transformers {config['model_type']}" if config.get("model_type") else None)
    if kind is None:
        return "a config with no `_class_name`"
    return f"{'an' if str(kind)[0].lower() in 'aeiou' else 'a'} {kind} config"


def _read_model_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable JSON file ({first_line(err)})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a model config (a JSON {type(config).__name__}, expected an object)")
    return config


def _open_index(index: Path, shown: Path) -> Source:
    """A sharded checkpoint: `index` maps every key to a shard file beside it."""
    try:
        document = json.loads(index.read_text())
        if not isinstance(document, dict) or not isinstance(document.get("weight_map"), dict):
            raise TypeError("no weight_map object")
        weight_map = document["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{index}: not a sharded checkpoint index ({first_line(err)})") from None
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        shards.setdefault(shard, []).append(key)
    infos, places = {}, {}
    for shard, keys in shards.items():
        file = index.parent / shard
        if not file.is_file():
            raise CheckpointError(f"{index}: lists shard {shard}, which does not exist ({file})")
        shard_infos, shard_places, kind, _ = _open_file(file, torch_too=index.name.endswith(INDEX_SUFFIXES[1]))
        absent = [k for k in keys if k not in shard_infos]
        if absent:
            raise CheckpointError(f"{file}: has no {absent[0]}, which {index.name} places there")
        infos |= {k: shard_infos[k] for k in keys}
        places |= {k: shard_places[k] for k in keys}
    return Source(shown, f"{kind}, {len(shards)} shards", infos, places)


def _open_file(path: Path, *, torch_too: bool = True):
    """(infos, places, kind, metadata) through whichever library accepts the file."""
    try:
        return _open_safetensors(path)
    except CheckpointError as err:
        refused = err
    if not torch_too:
        raise refused
    try:
        import torch  # noqa: F401
    except ImportError:
        if path.suffix in TORCH_SUFFIXES:
            raise CheckpointError(f"{path}: reading a torch checkpoint needs torch (pip install 'flax-sgm[torch]')") from None
        raise refused from None
    try:
        tensors, metadata = _torch_load(path)
    except CheckpointError:
        if path.suffix in TORCH_SUFFIXES:
            raise
        raise refused from None
    infos = {k: TensorInfo(tuple(t.shape), _torch_dtype(t.dtype)) for k, t in tensors.items()}
    return infos, {k: tensors for k in tensors}, "torch", metadata


def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as handle:
            infos = {}
            for key in handle.keys():
                part = handle.get_slice(key)
                dtype = SAFETENSORS_DTYPES.get(part.get_dtype(), np.dtype(np.void))
                infos[key] = TensorInfo(tuple(part.get_shape()), dtype)
            metadata = handle.metadata() or {}
    except Exception as err:  # safetensors' own error type, or an OSError
        reason = first_line(err).removeprefix("Error while deserializing header: ")
        if "not fully covered" in reason or "invalid header length" in reason:
            reason += "; truncated?"
        raise CheckpointError(f"{path}: not a valid safetensors file ({reason})") from None
    starts = _data_starts(path)
    return infos, {k: Bytes(path, starts[k]) for k in infos}, "safetensors", metadata


def _data_starts(path: Path) -> dict[str, int]:
    """Each tensor's first byte in the file, which safe_open checks but does not tell: the file is an 8-byte
    little-endian header size, the JSON header (`data_offsets` from the end of the header), then the data."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: 8 + size + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def _torch_dtype(dtype) -> np.dtype:
    from flax_sgm.checkpoints.convert import numpy_dtype

    try:
        return numpy_dtype(dtype)
    except TypeError:  # quantized dtypes
        return np.dtype(np.void)


def _torch_load(path: Path) -> tuple[dict, dict]:
    """(the tensors, the top-level numbers and strings beside them) of a torch checkpoint."""
    import torch

    is_zip = zipfile.is_zipfile(path)  # torch.save's zip layout can be memory-mapped
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused to load: {_unpickling_reason(err)}; nothing in it was run") from None
    except Exception as err:  # torch raises many types (and hands safetensors files to safetensors)
        raise CheckpointError(f"{path}: not a readable torch checkpoint (corrupt or truncated?): {first_line(err)}") from None
    metadata = {}
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        metadata = {str(k): v for k, v in obj.items() if isinstance(v, (int, float, str))}
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    return tensors, metadata


def _unpickling_reason(err: Exception) -> str:
    """What torch's weights_only unpickler refused, e.g. 'it calls posix.system'."""
    text = str(err)
    if match := re.search(r"Unsupported global: GLOBAL (\S+)", text):
        return f"the pickle is not plain tensors (it calls {match.group(1)})"
    if match := re.search(r"Unsupported operand (\d+)", text):
        return f"the pickle is not plain tensors (unsupported pickle opcode {match.group(1)})"
    return "the pickle is not plain tensors (torch.load weights_only=True)"
