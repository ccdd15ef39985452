"""`load_text_encoder`: a CLIP / OpenCLIP text tower from the checkpoints users hold, strictly.

Reads through sources.open_source: a diffusers pipeline's `text_encoder/` or `text_encoder_2/` directory
(transformers' config.json beside the weights: transformers.py honours or refuses each field), a whole
pipeline directory, a bare transformers state dict, or an sgm/LDM single file (layout.py: where each of sgm's
embedders sits and in which layout). Every key of the tower is used and every shape checked before a value is
read; the keys beside a tower that are not its (layout.IGNORED) are named in the plan, never dropped unsaid.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from flax_sgm.checkpoints import convert, converted as output
from flax_sgm.checkpoints.convert import KeyLayout
from flax_sgm.errors import CheckpointError
from flax_sgm.checkpoints.sources import CONFIG_FILE
from flax_sgm.attention.load import choose_param_dtype
from flax_sgm.checkpoints.sources import Source, describe_config, open_source
from flax_sgm.text.config import CLIPTextConfig
from flax_sgm.text.config import PRESETS
from flax_sgm.text.layout import KIND_NAMES, choose_tower, config_from_weights, find_towers, ignored_reason
from flax_sgm.text.model import CLIPTextModel
from flax_sgm import models

# A diffusers pipeline's text encoders, in sgm's embedder order (the refiner has text_encoder_2 only: its embedder 0).
PIPELINE_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class TextEncoderPlan(NamedTuple):
    """Where a tower's tensors are and what it is, before a value is read."""

    config: CLIPTextConfig
    prefix: str
    layout: KeyLayout | None
    keys: tuple[str, ...]  # the tower's keys (prefix included)
    ignored: tuple[tuple[str, str], ...]  # (key, why) beside the tower that the model does not use


def _embedder_index(embedder) -> int:
    if not isinstance(embedder, int) or isinstance(embedder, bool) or embedder < 0:
        raise CheckpointError(f"embedder must be sgm's embedder number (0, 1, ...); got {embedder!r}")
    return embedder


def _pipeline_folder(path: Path, embedder: int) -> Path:
    """A pipeline directory's text encoder folder for sgm's embedder number."""
    folders = [path / name for name in PIPELINE_TEXT_ENCODERS if (path / name / CONFIG_FILE).is_file()]
    if not folders:
        return path
    if embedder >= len(folders):
        held = ", ".join(f"{n} ({f.name}/)" for n, f in enumerate(folders))
        raise CheckpointError(f"{path}: embedder={embedder}, but the pipeline's text encoders are {held}")
    return folders[embedder]


def plan_text_encoder(source: Source, *, embedder: int = 0, config: CLIPTextConfig | None = None,
                      **options) -> TextEncoderPlan:
    """The tower of an open Source: its config, prefix, layout, keys and the keys named as ignored."""
    where = str(source.path)
    if source.config is not None:
        cfg_source = str(source.config_path)
        if embedder != 0:
            raise CheckpointError(f"{source.path}: a text encoder directory holds one text encoder; embedder={embedder} "
                                  "picks one of a pipeline's or a single file's")
        if config is not None:
            raise CheckpointError(f"{cfg_source}: config.json says the config; leave out config=")
        if "_class_name" in source.config:
            raise CheckpointError(f"{cfg_source}: {describe_config(source.config)}, not a CLIP text tower")
        tower = choose_tower(list(source.infos), 0, where)
        if tower.prefix:
            raise CheckpointError(f"{where}: a transformers directory whose weights sit under {tower.prefix!r}")
        projection = "text_projection.weight" in source.infos
        cfg = CLIPTextConfig.from_transformers(source.config, source=cfg_source, projection=projection, **options)
    else:
        tower = choose_tower(list(source.infos), embedder, where)
        cfg = config_from_weights(source.infos, tower, config=config, source=where, **options)
    layout = tower.layout(cfg)
    keys, ignored = [], []
    for key in source.infos:
        if not key.startswith(tower.prefix):
            continue
        reason = ignored_reason(key[len(tower.prefix):], tower.kind)
        if reason is None:
            keys.append(key)
        else:
            ignored.append((key, reason))
    return TextEncoderPlan(cfg, tower.prefix, layout, tuple(keys), tuple(ignored))


def load_text_encoder(path, *, embedder: int = 0, config: CLIPTextConfig | None = None, variant: str | None = None,
                      dtype=None, param_dtype=None, **options) -> CLIPTextModel:
    """A ready CLIPTextModel (inference mode) from a checkpoint.

    path: a diffusers `text_encoder/` or `text_encoder_2/` directory (transformers' config.json and weights),
      a whole pipeline directory, or an sgm/LDM single file (.safetensors, .ckpt) or bare state dict.
    embedder: sgm's embedder number. A pipeline: 0 its `text_encoder/`, 1 its `text_encoder_2/` (the SDXL
      refiner, which has only the second, calls it 0 as sgm does). A single file: SD 1.x and 2.x hold one (0);
      SDXL 0 (CLIP ViT-L, `conditioner.embedders.0.transformer.`) and 1 (OpenCLIP ViT-bigG,
      `conditioner.embedders.1.model.`); the refiner 0 (`conditioner.embedders.0.model.`).
    config: a single file's CLIPTextConfig where the shapes are none of the released towers (the weights do not
      say the heads or the activation); checked against the shapes.
    variant: a diffusers directory's variant files ("fp16").
    dtype: the compute dtype; param_dtype: the parameters' (default: as stored; a narrower one rounds).
    options: flax_sgm's own config fields (sdp_backend).
    """
    path = Path(path)
    CLIPTextConfig.check_options(options, str(path))
    embedder = _embedder_index(embedder)
    if output.is_output(path):
        return _restore_output(path, embedder, config, variant, dtype, param_dtype, options)
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        chosen = _pipeline_folder(path, embedder)
        if chosen != path:
            path, embedder = chosen, 0
    with open_source(path, variant) as source:
        plan = plan_text_encoder(source, embedder=embedder, config=config, **options)
        infos = {k: source.infos[k] for k in plan.keys}
        source.prefetch(infos)
        stored = _stored_dtype(infos, path)
        chosen_dtype, downcast = choose_param_dtype(stored, param_dtype)
        model = models.abstract(plan.config, dtype=dtype, param_dtype=chosen_dtype)
        steps = convert.conversion_plan(model, infos, prefix=plan.prefix, layout=plan.layout, allow_downcast=downcast,
                                        origin=str(path))
        convert.load_planned(model, steps, source, copy=not source.private)
    return models.ready(model)


def _stored_dtype(infos, path) -> jnp.dtype:
    dtypes = {info.dtype for info in infos.values() if jnp.issubdtype(info.dtype, jnp.floating)}
    if not dtypes:
        raise CheckpointError(f"{path}: the text encoder holds no floating-point tensors")
    return jnp.dtype(max(dtypes, key=lambda d: jnp.dtype(d).itemsize))



def _restore_output(path: Path, embedder: int, config, variant, dtype, param_dtype, options) -> CLIPTextModel:
    """A text encoder of a `flax-sgm convert --text-encoder` output, by sgm's embedder number."""
    if config is not None or variant is not None:
        raise CheckpointError(f"{path}: a `flax-sgm convert` output records its config; leave out config= and variant=")
    weights, records = output.read_output(path)
    texts = {r.prefix: r for r in output.records_of(path, records, output.TEXT_RECORD)}
    record = texts.get(output.text_record_prefix(embedder))
    if record is None:
        raise CheckpointError(f"{path}: embedder={embedder} is not in this output; it holds {', '.join(texts)}")
    return output.load_record(path, weights, record, dtype=dtype, param_dtype=param_dtype, options=options)


def text_encoder_embedders(path, variant: str | None = None) -> list[int]:
    """sgm's embedder numbers of the text encoders a checkpoint holds (a pipeline's folders, a directory's one,
    a single file's towers)."""
    path = Path(path)
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        folders = [n for n in PIPELINE_TEXT_ENCODERS if (path / n / CONFIG_FILE).is_file()]
        if folders:
            return list(range(len(folders)))
    with open_source(path, variant) as source:
        if source.config is not None:
            return [0]
        towers = find_towers(source.infos)
        if not towers:
            choose_tower(list(source.infos), 0, str(path))  # the one-line error saying what it holds
        return [t.embedder for t in towers]


def convert_text_encoders(path, out, *, embedder: int | None = None, config: CLIPTextConfig | None = None,
                          variant: str | None = None, weights: str = "orbax", param_dtype=None,
                          overwrite: bool = False) -> list[tuple[int, CLIPTextConfig]]:
    """The text encoders of any checkpoint load_text_encoder reads (or the one `embedder` names) into a
    `flax-sgm convert` output, each config recorded, so that load_text_encoder(out, embedder=n) needs no other
    argument. Returns (embedder, config) per encoder written."""
    output.check_output(Path(out), overwrite, path)
    embedders = text_encoder_embedders(path, variant) if embedder is None else [_embedder_index(embedder)]
    written = []
    with output.OutputWriter(out, weights, overwrite=overwrite, source=path) as writer:
        for n in embedders:
            model = load_text_encoder(path, embedder=n, config=config, variant=variant, param_dtype=param_dtype)
            writer.add_model(output.text_record_prefix(n), model.config, model)
            written.append((n, model.config))
    return written


def text_encoder_summaries(source: Source) -> list[dict]:
    """What `flax-sgm inspect` says of each text encoder in an open Source: sgm's embedder number, where it sits,
    its layout, the released tower it is (preset) and its parameters; or why its config cannot be read."""
    if source.config is not None:
        if source.config.get("model_type") != "clip_text_model":
            return []
        found = [0]
    else:
        found = [t.embedder for t in find_towers(source.infos)]
    summaries = []
    for n in found:
        entry = {"embedder": n}
        try:
            plan = plan_text_encoder(source, embedder=n)
        except CheckpointError as err:
            tower = choose_tower(list(source.infos), n, str(source.path))
            keys = [k for k in source.infos
                    if k.startswith(tower.prefix) and ignored_reason(k[len(tower.prefix):], tower.kind) is None]
            entry |= {"prefix": tower.prefix, "layout": KIND_NAMES[tower.kind], "preset": None, "config": None,
                      "problem": str(err).split(": ", 1)[-1]}
        else:
            keys = plan.keys
            preset = next((name for name, p in PRESETS.items() if p == plan.config), None)
            layout = plan.layout.name if plan.layout is not None else "transformers"
            entry |= {"prefix": plan.prefix, "layout": layout, "preset": preset, "config": plan.config.to_dict(),
                      "problem": None, "ignored": [k for k, _ in plan.ignored]}
        entry["parameters"] = int(sum(int(np.prod(source.infos[k].shape)) for k in keys))
        summaries.append(entry)
    return summaries
