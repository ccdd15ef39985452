"""`load_unet`: a whole UNet from the checkpoints users hold, strictly.

Reads through sources.open_source: a diffusers `unet/` directory (config.json beside
one weights file or a sharded index), a whole pipeline directory (its `unet/`), or an
sgm/LDM single file holding the UNet under `model.diffusion_model.` beside the VAE
and the text encoders. A diffusers config.json is a spec (UNetConfig.from_diffusers);
a single file's config is read off its shapes (unet_layout.config_from_weights).
Every UNet key is used and every shape checked before a value is read. A `flax-sgm convert
--unet` output (convert_unet) records its UNetConfig and is read back as written.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax.numpy as jnp

from flax_sgm.checkpoints import convert, converted as output
from flax_sgm.errors import CheckpointError
from flax_sgm.checkpoints.sources import CONFIG_FILE, open_source
from flax_sgm.unet.model import UNetModel
from flax_sgm.unet.config import PRESETS, UNetConfig
from flax_sgm.unet.diffusers import vector_embedding
from flax_sgm.unet.layout import BESIDE_PRESET, COND_PROJ, SGM_PREFIX, UNET_MARK, config_from_weights, diffusers_layout
from flax_sgm import models

PIPELINE_UNET = "unet"  # a diffusers pipeline directory's UNet


def load_unet(path, *, heads: int | None = None, head_dim: int | None = None, config: UNetConfig | None = None,
              variant: str | None = None, dtype=None, param_dtype=None, seed: int = 0, **options) -> UNetModel:
    """A ready UNetModel from a checkpoint.

    `heads`/`head_dim` (sgm's num_heads / num_head_channels) only for a single file that is
    not one of the four released models by its shapes; or a single file's whole `config`
    (e.g. UNetConfig.preset("sdxl-base")), which its shapes must fit. `variant` picks a diffusers directory's
    variant files ("fp16": diffusion_pytorch_model.fp16.safetensors, or its sharded index), as
    diffusers' from_pretrained(variant=...) does. `dtype` is the compute dtype,
    `param_dtype` the parameters' (default: as stored). `options` set UNetConfig's own
    fields (use_checkpoint, checkpoint_policy, sdp_backend); `seed` seeds dropout keys.

    The model is returned in inference mode (model.eval(): dropout off), as diffusers'
    from_pretrained returns its UNet; model.train() turns dropout on.
    """
    path = Path(path)
    UNetConfig.check_options(options, str(path))
    if path.is_dir() and not (path / CONFIG_FILE).is_file() and (path / PIPELINE_UNET / CONFIG_FILE).is_file():
        path = path / PIPELINE_UNET
    if output.is_output(path):
        if heads is not None or head_dim is not None or config is not None or variant is not None:
            raise CheckpointError(
                f"{path}: a `flax-sgm convert` output records its config; leave out heads=, head_dim=, config= and variant="
            )
        weights, records = output.read_output(path)
        unets = output.records_of(path, records, output.UNET_RECORD)
        return output.load_record(path, weights, unets[0], dtype=dtype, param_dtype=param_dtype, seed=seed, options=options)
    with open_source(path, variant) as source:
        if source.config is not None:
            if heads is not None or head_dim is not None or config is not None:
                raise CheckpointError(f"{source.config_path}: config.json says the config; leave out heads=, head_dim= and config=")
            config = UNetConfig.from_diffusers(source.config, source=str(source.config_path), **options)
            layout, prefix = diffusers_layout(config, vector_embedding(source.config)), ""
        else:
            prefix = "" if UNET_MARK in source.infos else SGM_PREFIX  # a bare sgm state_dict, or a whole checkpoint
            config = config_from_weights(source.infos, prefix, heads=heads, head_dim=head_dim, config=config, source=str(path),
                                         **options)
            layout = None
        source.prefetch(k for k in source.infos if k.startswith(prefix))
        stored = _stored_dtype(source, path)
        model = models.abstract(config, dtype=dtype, param_dtype=param_dtype or stored, seed=seed)
        plan = convert.conversion_plan(model, source.infos, prefix=prefix, layout=layout,
                                       allow_downcast=param_dtype is not None, origin=str(path))
        convert.load_planned(model, plan, source, copy=not source.private)
    return models.ready(model)


def _stored_dtype(source, path) -> jnp.dtype:
    dtypes = {info.dtype for info in source.infos.values() if jnp.issubdtype(info.dtype, jnp.floating)}
    if not dtypes:
        raise CheckpointError(f"{path}: holds no floating-point tensors")
    return jnp.dtype(max(dtypes, key=lambda d: jnp.dtype(d).itemsize))


def convert_unet(path, out, *, heads: int | None = None, head_dim: int | None = None, variant: str | None = None,
                 weights: str = "orbax", param_dtype=None, overwrite: bool = False, prepare=None) -> UNetConfig:
    """A whole UNet from any checkpoint load_unet reads into a `flax-sgm convert` output directory (output.py),
    its UNetConfig recorded, so that load_unet(out) needs no arguments. `prepare(model)`, if given, runs on the
    loaded model before it is written (`flax-sgm convert --lora` fuses LoRA files there). Returns the config written."""
    output.check_output(Path(out), overwrite, path)
    model = load_unet(path, heads=heads, head_dim=head_dim, variant=variant, param_dtype=param_dtype)
    if prepare is not None:
        prepare(model)
    with output.OutputWriter(out, weights, overwrite=overwrite, source=path) as writer:
        writer.add_model("", model.config, model)
    return model.config


# What in/out channels other than 4 mean in the released families (diffusers' pipelines feed them so).
IN_CHANNELS = {
    9: "inpainting: latents, mask, masked-image latents",
    8: "InstructPix2Pix: latents, image latents",
    5: "depth: latents, depth map",
}
OUT_CHANNELS = {8: "learned sigma: the prediction and the variance"}


def channel_notes(in_channels: int, out_channels: int, time_cond_proj_dim: int | None = None) -> list[str]:
    """What a UNet's input and output channels (and an LCM's guidance embedding) say it takes and returns."""
    notes = [f"in {in_channels} channels" + (f" ({IN_CHANNELS[in_channels]})" if in_channels in IN_CHANNELS else ""),
             f"out {out_channels}" + (f" ({OUT_CHANNELS[out_channels]})" if out_channels in OUT_CHANNELS else "")]
    if time_cond_proj_dim is not None:
        notes.append(f"LCM: timestep_cond of {time_cond_proj_dim} (flax_sgm.guidance_scale_embedding)")
    return notes


def unet_summary(source) -> dict | None:
    """What `flax-sgm inspect` says of a whole UNet in an open Source: its config, the released model it is
    (preset), its in/out channels, or the one-line reason its config cannot be read (heads); None when it holds
    no UNet."""
    if source.config is not None:
        if source.config.get("_class_name") != "UNet2DConditionModel":
            return None
        prefix, conv_in, conv_out = "", "conv_in.weight", "conv_out.weight"
    else:
        prefix = "" if UNET_MARK in source.infos else SGM_PREFIX
        if prefix + UNET_MARK not in source.infos:
            return None
        conv_in, conv_out = prefix + UNET_MARK, prefix + "out.2.weight"
    params = sum(math.prod(i.shape) for k, i in source.infos.items() if k.startswith(prefix))
    channels = {"in_channels": source.infos[conv_in].shape[1] if conv_in in source.infos else None,
                "out_channels": source.infos[conv_out].shape[0] if conv_out in source.infos else None}
    cond = source.infos.get(prefix + (COND_PROJ if source.config is None else "time_embedding.cond_proj.") + "weight")
    summary = {"preset": None, "parameters": params, **channels,
               "time_cond_proj_dim": cond.shape[1] if cond is not None else None, "config": None, "problem": None}
    try:
        if source.config is not None:
            config = UNetConfig.from_diffusers(source.config, source=str(source.config_path))
        else:
            config = config_from_weights(source.infos, prefix, source=str(source.path))
    except CheckpointError as err:
        return summary | {"problem": str(err)}
    preset = next((name for name, p in PRESETS.items()
                   if p == config.replace(**{k: getattr(p, k) for k in BESIDE_PRESET})), None)
    return summary | {"preset": preset, "config": config.to_dict(), "in_channels": config.in_channels,
                      "out_channels": config.out_channels, "time_cond_proj_dim": config.time_cond_proj_dim}
