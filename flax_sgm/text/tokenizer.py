"""Prompts to token ids through transformers' CLIPTokenizer, read from a folder (nothing is downloaded).

As diffusers' pipelines tokenize: padded to the tokenizer's model_max_length (77) with its pad token (SD's
first tokenizer pads with the end token; SDXL's second with "!", id 0, as open_clip), truncated there, with
a warning naming what was cut.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from flax_sgm.errors import CheckpointError

PIPELINE_TOKENIZERS = ("tokenizer", "tokenizer_2")  # sgm's embedder order, as load.PIPELINE_TEXT_ENCODERS
TOKENIZER_JSON, BPE_FILES = "tokenizer.json", ("vocab.json", "merges.txt")  # a CLIP tokenizer's files: either


def load_tokenizer(path, *, embedder: int = 0):
    """transformers' CLIPTokenizer from a tokenizer folder, or a pipeline's (`embedder` 0: tokenizer/, 1: tokenizer_2/)."""
    try:
        from transformers import CLIPTokenizer
    except ImportError:
        raise CheckpointError("tokenizing needs transformers (pip install transformers)") from None
    path = Path(path)
    folders = [path / name for name in PIPELINE_TOKENIZERS if (path / name).is_dir()]
    if folders:
        if embedder >= len(folders):
            raise CheckpointError(f"{path}: embedder={embedder}, but the pipeline's tokenizers are "
                                  f"{', '.join(f'{n} ({f.name}/)' for n, f in enumerate(folders))}")
        path = folders[embedder]
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a tokenizer folder (a single-file checkpoint holds none: pass a pipeline's "
                              "tokenizer/ folder)")
    # transformers 5 builds an empty tokenizer (every word unknown) from a folder without these, silently.
    if not (path / TOKENIZER_JSON).is_file() and not all((path / f).is_file() for f in BPE_FILES):
        raise CheckpointError(f"{path}: not a CLIP tokenizer folder (no {TOKENIZER_JSON}, nor {' and '.join(BPE_FILES)})")
    try:
        return CLIPTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: not a CLIP tokenizer folder ({str(err).strip().splitlines()[0]})") from None


def tokenize(tokenizer, prompts: str | list[str]) -> np.ndarray:
    """int ids [b, model_max_length] as diffusers' encode_prompt makes them; a long prompt is cut, with a warning."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="np").input_ids
    full = tokenizer(prompts, padding="longest", return_tensors="np").input_ids
    if full.shape[-1] > n:
        cut = tokenizer.batch_decode(full[:, n - 1 : -1])
        warnings.warn(f"the prompt was cut at {n} tokens (CLIP's positions); dropped: {cut}", stacklevel=2)
    return ids.astype(np.int32)


def pipeline_tokenizers(path: Path, tokenizer, encoders: list[str], index: dict) -> list:
    """One tokenizer per text encoder: the directory's tokenizer/ for text_encoder/, tokenizer_2/ for
    text_encoder_2/ (as diffusers pairs them), or the user's."""
    wanted = [PIPELINE_TOKENIZERS[("text_encoder", "text_encoder_2").index(e)] for e in encoders]
    if tokenizer is None:
        missing = [w for w in wanted if not (path / w).is_dir()]
        if missing:
            raise CheckpointError(f"{path}: no {missing[0]}/ folder; pass tokenizer= (a tokenizer folder or a pipeline "
                                  "directory holding one)")
        return [_read_tokenizer(path / w) for w in wanted]
    given = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else None
    if given is None:  # one path: a pipeline directory (its folders by name) or one folder for every encoder
        root = Path(tokenizer)
        if any((root / w).is_dir() for w in wanted):
            return [_read_tokenizer(root / w) for w in wanted]
        given = [root] * len(wanted)
    if len(given) != len(wanted):
        raise CheckpointError(f"tokenizer=: {len(given)} given for {len(wanted)} text encoders ({', '.join(encoders)})")
    return [_read_tokenizer(Path(t)) if isinstance(t, (str, Path)) else t for t in given]


def _read_tokenizer(folder: Path):
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a tokenizer folder")
    return load_tokenizer(folder)
