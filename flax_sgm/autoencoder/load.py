"""`load_vae`: a KL autoencoder from the checkpoints users hold, strictly.

Reads through sources.open_source: a diffusers `vae/` directory (config.json beside one weights file or a
sharded index, variants too), a whole pipeline directory (its `vae/`), or an sgm/LDM single file holding the
autoencoder under `first_stage_model.` beside the UNet and text encoders (or a bare VAE file). A diffusers
config.json is a spec (AutoencoderConfig.from_diffusers); a single file's config is read off its shapes
(autoencoder/layout.py), and its scaling factor off the model the file is recognised as. Every key is used
and every shape checked before a value is read.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from flax_sgm.checkpoints import convert
from flax_sgm.checkpoints import converted as output
from flax_sgm.autoencoder.config import PRESETS, AutoencoderConfig
from flax_sgm.autoencoder.layout import SGM_PREFIX, TRAINING_LOSS, VAE_MARK, config_from_weights, diffusers_layout
from flax_sgm.autoencoder.model import AutoencoderKL
from flax_sgm.errors import CheckpointError
from flax_sgm.checkpoints.sources import CONFIG_FILE, open_source
from flax_sgm import models

PIPELINE_VAE = "vae"  # a diffusers pipeline directory's autoencoder
# The released UNets a single file is recognised by (unet_config.PRESETS) -> the autoencoder preset beside them.
VAE_OF_UNET = {"sd15": "sd", "sd21": "sd", "sdxl-base": "sdxl", "sdxl-refiner": "sdxl"}


def load_vae(path, *, variant: str | None = None, dtype=None, param_dtype=None, scaling_factor: float | None = None,
             seed: int = 0, **options) -> AutoencoderKL:
    """A ready AutoencoderKL (eval mode) from a checkpoint.

    `variant` picks a diffusers directory's variant files ("fp16"). `dtype` is the compute dtype,
    `param_dtype` the parameters' (default: as stored). `scaling_factor` overrides the config's; a single
    file that is not recognised as a released model (by its UNet) needs it. `options` set
    AutoencoderConfig's own fields (use_checkpoint, checkpoint_policy, sdp_backend, force_upcast).
    """
    path = Path(path)
    if path.is_dir() and not (path / CONFIG_FILE).is_file() and (path / PIPELINE_VAE / CONFIG_FILE).is_file():
        path = path / PIPELINE_VAE
    AutoencoderConfig.check_options(options, str(path))
    if scaling_factor is not None:
        options["scaling_factor"] = scaling_factor
    if output.is_output(path):
        return _restore_output(path, variant, dtype, param_dtype, seed, options)
    with open_source(path, variant) as source:
        if source.config is not None:
            where = str(source.config_path)
            try:
                config = AutoencoderConfig.from_diffusers(source.config, source=where, **options)
                layout = diffusers_layout(config)
            except CheckpointError:
                raise
            except ValueError as err:  # the config's own checks
                raise CheckpointError(f"{where}: {err}") from None
            prefix, infos = "", source.infos
        else:
            prefix = "" if VAE_MARK in source.infos else SGM_PREFIX  # a bare VAE file, or a whole checkpoint
            infos = {k: v for k, v in source.infos.items() if not k.startswith(prefix + TRAINING_LOSS)}
            known = released_vae_fields(source.infos, str(path)) if "scaling_factor" not in options else {}
            config = config_from_weights(infos, prefix, source=str(path), **(known | options))
            if config.scaling_factor is None:
                raise CheckpointError(
                    f"{path}: an autoencoder of no recognised model (no released UNet beside it): give scaling_factor= "
                    f"({PRESETS['sd'].scaling_factor} for SD 1.x/2.x, {PRESETS['sdxl'].scaling_factor} for SDXL)"
                )
            layout = None
        source.prefetch(k for k in infos if k.startswith(prefix))
        model = models.abstract(config, dtype=dtype, param_dtype=param_dtype or _stored_dtype(infos, path),
                                seed=seed)
        plan = convert.conversion_plan(model, infos, prefix=prefix, layout=layout, allow_downcast=param_dtype is not None,
                                       origin=str(path))
        convert.load_planned(model, plan, source, copy=not source.private)
    return models.ready(model)


def _restore_output(path: Path, variant, dtype, param_dtype, seed: int, options) -> AutoencoderKL:
    """A `flax-sgm convert --vae` output: its recorded config and weights, bit for bit."""
    if variant is not None:
        raise CheckpointError(f"{path}: a `flax-sgm convert` output has no variants; leave out variant=")
    weights, records = output.read_output(path)
    record = output.records_of(path, records, output.VAE_RECORD)[0]
    return output.load_record(path, weights, record, dtype=dtype, param_dtype=param_dtype, seed=seed, options=options)


def convert_vae(path, out, *, variant: str | None = None, weights: str = "orbax", param_dtype=None,
                scaling_factor: float | None = None, overwrite: bool = False) -> AutoencoderConfig:
    """An autoencoder from any checkpoint load_vae reads into a `flax-sgm convert` output directory, its
    AutoencoderConfig (scaling factor included) recorded, so that load_vae(out) needs no arguments."""
    output.check_output(Path(out), overwrite, path)
    model = load_vae(path, variant=variant, param_dtype=param_dtype, scaling_factor=scaling_factor)
    with output.OutputWriter(out, weights, overwrite=overwrite, source=path) as writer:
        writer.add_model("", model.config, model)
    return model.config


def vae_summary(source) -> dict | None:
    """What `flax-sgm inspect` says of the KL autoencoder in an open Source (a diffusers AutoencoderKL directory,
    or an sgm single file's first_stage_model.): its config, the preset it is, or why it cannot be read; None
    when it holds none."""
    if source.config is not None:
        if source.config.get("_class_name") != "AutoencoderKL":
            return None
        prefix, where = "", str(source.config_path)
        try:
            config = AutoencoderConfig.from_diffusers(source.config, source=where)
        except (CheckpointError, ValueError) as err:
            return {"prefix": prefix, "config": None, "preset": None, "parameters": None, "problem": str(err)}
    else:
        prefix = "" if VAE_MARK in source.infos else SGM_PREFIX
        if prefix + VAE_MARK not in source.infos:
            return None
        infos = {k: v for k, v in source.infos.items() if not k.startswith(prefix + TRAINING_LOSS)}
        known = released_vae_fields(source.infos)
        try:
            config = config_from_weights(infos, prefix, **known)  # scaling_factor None: not a released model
        except CheckpointError as err:
            return {"prefix": prefix, "config": None, "preset": None, "parameters": None, "problem": str(err)}
    keys = [k for k in source.infos if k.startswith(prefix) and not k.startswith(prefix + TRAINING_LOSS)]
    if prefix == "":
        keys = list(source.infos)
    parameters = sum(int(np.prod(source.infos[k].shape)) for k in keys)
    preset = next((name for name, p in PRESETS.items() if p == config), None)
    return {"prefix": prefix, "config": config.to_dict(), "preset": preset, "parameters": parameters, "problem": None}


def released_vae_fields(shapes, source: str = "checkpoint") -> dict:
    """The scaling factor and float16 behaviour of the released model whose UNet a single file holds (by its
    shapes, sgm-named); scaling_factor None (asked of the caller) for any other file."""
    from flax_sgm.unet.config import PRESETS as UNETS
    from flax_sgm.unet.layout import SGM_PREFIX as UNET_PREFIX
    from flax_sgm.unet.layout import UNET_MARK
    from flax_sgm.unet.layout import config_from_weights as unet_config

    if UNET_PREFIX + UNET_MARK not in shapes:
        return {"scaling_factor": None}
    try:
        unet = unet_config(shapes, UNET_PREFIX, source=source)  # a released UNet's shapes, or an error
    except CheckpointError:
        return {"scaling_factor": None}
    name = next(n for n, p in UNETS.items() if p == unet.replace(in_channels=p.in_channels, out_channels=p.out_channels))
    preset = PRESETS[VAE_OF_UNET[name]]
    return {"scaling_factor": preset.scaling_factor, "force_upcast": preset.force_upcast,
            "tile_sample_size": preset.tile_sample_size}


def _stored_dtype(infos, path) -> jnp.dtype:
    dtypes = {info.dtype for info in infos.values() if jnp.issubdtype(info.dtype, jnp.floating)}
    if not dtypes:
        raise CheckpointError(f"{path}: holds no floating-point tensors")
    return jnp.dtype(max(dtypes, key=lambda d: jnp.dtype(d).itemsize))
