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
