"""What a checkpoint is verified against: the original implementation where there is one.

  a diffusers model directory (or a file of one)
      diffusers' own model, built by diffusers from that directory (its config.json,
      its variant), the stack taken by its submodule name: a wrong reading of
      config.json by flax_sgm fails. When diffusers is not installed, torch_ref.
  an SGM/LDM file, a sharded index without config.json
      torch_ref's SpatialTransformer of the config read off the weights, holding them.
  a `flax-sgm convert` output
      torch_ref's SpatialTransformer of the output's config, holding its weights.
  a whole UNet (`unet_checkpoint_pair`): a diffusers unet/ or pipeline directory
      diffusers' UNet2DConditionModel built by diffusers from it; flax_sgm's by load_unet.
The returned `source` says which, for the report.
"""

from __future__ import annotations

from pathlib import Path

import torch
from flax import nnx

from flax_sgm.checkpoints import convert, converted as output

from flax_sgm.attention import load as pretrained
from flax_sgm.attention.config import SpatialTransformerConfig
from flax_sgm.checkpoints.sources import diffusers_variant
from flax_sgm.verify import seeded

TORCH_REF = "torch_ref.SpatialTransformer"


def checkpoint_pair(
    checkpoint,
    prefix: str | None = None,
    *,
    heads: int | None = None,
    head_dim: int | None = None,
    disable_self_attn: bool | None = None,
    variant: str | None = None,
    dtype: str = "float32",
    seed: int = 0,
) -> tuple[SpatialTransformerConfig, torch.nn.Module, nnx.Module, dict, dict]:
    """(config, the reference torch module, flax_sgm's stack, seeded inputs, what was used) for `verify_modules`."""
    if output.is_output(checkpoint):
        flax_module = pretrained.load_pretrained(checkpoint, prefix, heads=heads, head_dim=head_dim,
                                                 disable_self_attn=disable_self_attn, variant=variant,
                                                 param_dtype=dtype, use_checkpoint=False)
        _, records = output.read_output(checkpoint)
        record = output.select_record(checkpoint, records, prefix)
        config = record.config.replace(use_checkpoint=False)
        torch_state = convert.to_torch_state_dict(flax_module)
        torch_module, flax_module, inputs = seeded.spatial_transformer_pair(
            config, torch_state, flax_module, dtype=dtype, seed=seed
        )
        source = {"weights": f"{checkpoint} (flax-sgm convert output)", "prefix": record.prefix,
                  "reference": f"{TORCH_REF} of the output's config and weights"}
        return config, torch_module, flax_module, inputs, source
    stack, flax_module, torch_state = pretrained.load_stack(
        checkpoint, prefix, heads=heads, head_dim=head_dim, disable_self_attn=disable_self_attn, variant=variant,
        param_dtype=dtype,
    )
    config = stack.config.replace(use_checkpoint=False)
    source = {"weights": str(checkpoint), "prefix": stack.prefix, "dtype in file": stack.dtype.name}
    directory, file_variant = _diffusers_directory(Path(checkpoint))
    if directory is not None:
        try:
            import diffusers
        except ImportError:
            diffusers = None
        if diffusers is not None:
            torch_module, name = _diffusers_stack(diffusers, directory, variant or file_variant, stack.prefix)
            # Always a context: a stack whose context is as wide as its inner dim attends to it too, and
            # only then does reading only_cross_attention wrong show.
            inputs = seeded.sample_inputs(config.replace(context_dim=config.context_dim or config.inner_dim), seed=seed)
            source["reference"] = f"diffusers {name}, built by diffusers from {directory}"
            return config, torch_module, flax_module, inputs, source
        source["reference"] = f"{TORCH_REF} of the config flax_sgm read (diffusers is not installed)"
    else:
        source["reference"] = f"{TORCH_REF} of the config read off the weights (no diffusers config.json)"
    torch_module, flax_module, inputs = seeded.spatial_transformer_pair(
        config, torch_state, flax_module, dtype=dtype, seed=seed
    )
    return config, torch_module, flax_module, inputs, source


def _diffusers_directory(path: Path) -> tuple[Path | None, str | None]:
    """The diffusers model directory `path` is or lies in (a config.json naming a diffusers model), and the
    variant a file's name carries."""
    from flax_sgm.checkpoints.sources import CONFIG_FILE

    if path.is_dir():
        return (path, None) if (path / CONFIG_FILE).is_file() else (None, None)
    is_diffusers, carried = diffusers_variant(path.name)
    return (path.parent, carried) if is_diffusers and (path.parent / CONFIG_FILE).is_file() else (None, None)


def _diffusers_stack(diffusers, directory: Path, variant: str | None, prefix: str) -> tuple[torch.nn.Module, str]:
    """The stack at `prefix` of diffusers' model loaded from `directory`, in float32, and what it is."""
    import json

    kind = json.loads((directory / "config.json").read_text())["_class_name"]
    model = _from_pretrained(getattr(diffusers, kind), directory, variant)
    name = prefix.removesuffix(".")
    module = model.get_submodule(name)
    return module, f"{kind}" + (f".{name}" if name else "") + (f" (variant {variant})" if variant else "")


def _from_pretrained(cls, directory: Path, variant: str | None) -> torch.nn.Module:
    """diffusers' model of `directory` in float32. low_cpu_mem_usage=False: what diffusers falls back to without
    accelerate anyway, asked for so that it prints no warning about it."""
    return cls.from_pretrained(directory, variant=variant, torch_dtype=torch.float32, low_cpu_mem_usage=False).eval()


def _diffusers_reference(checkpoint, folder: str, kind: str, what: str, variant: str | None):
    """(the directory, diffusers' `kind` built by diffusers from its config.json, what was used) of a diffusers
    `folder`/ directory or a pipeline directory holding one; CheckpointError naming `what` otherwise."""
    import json

    import diffusers

    from flax_sgm.checkpoints.sources import CONFIG_FILE
    from flax_sgm.errors import CheckpointError

    path = Path(checkpoint)
    directory = path / folder if (path / folder / CONFIG_FILE).is_file() else path
    found = json.loads((directory / CONFIG_FILE).read_text()).get("_class_name") if (directory / CONFIG_FILE).is_file() else None
    if found != kind:
        raise CheckpointError(f"{path}: {what} is verified from a diffusers {folder}/ or pipeline directory (diffusers "
                              "builds the reference from its config.json); this is not one")
    source = {"weights": str(directory) + (f" (variant {variant})" if variant else ""),
              "reference": f"diffusers {kind}, built by diffusers from {directory}"}
    return directory, _from_pretrained(getattr(diffusers, kind), directory, variant), source


def unet_checkpoint_pair(checkpoint, *, variant: str | None = None, dtype: str = "float32", seed: int = 0):
    """(config, diffusers' UNet2DConditionModel, flax_sgm's UNetModel, seeded inputs, what was used) of a diffusers
    unet/ or pipeline directory: diffusers builds the reference from its config.json, load_unet reads the same files."""
    from flax_sgm.unet.load import PIPELINE_UNET, load_unet

    directory, torch_unet, source = _diffusers_reference(checkpoint, PIPELINE_UNET, "UNet2DConditionModel",
                                                         "a whole UNet", variant)
    flax_unet = load_unet(directory, variant=variant, dtype=None if dtype == "float32" else dtype, param_dtype=dtype,
                          use_checkpoint=False)
    config = flax_unet.config
    inputs = seeded.unet_inputs(config, seed=seed, hw=(max(8, 2 ** (len(config.channel_mult) - 1)),) * 2)
    return config, torch_unet, flax_unet, inputs, source


def vae_checkpoint_pair(checkpoint, *, variant: str | None = None, dtype: str = "float32", seed: int = 0):
    """(config, diffusers' AutoencoderKL, flax_sgm's AutoencoderKL, seeded images, what was used) of a diffusers
    vae/ or pipeline directory: diffusers builds the reference from its config.json, load_vae reads the same files."""
    from flax_sgm.autoencoder.load import PIPELINE_VAE, load_vae

    directory, torch_vae, source = _diffusers_reference(checkpoint, PIPELINE_VAE, "AutoencoderKL", "an autoencoder",
                                                        variant)
    flax_vae = load_vae(directory, variant=variant, dtype=None if dtype == "float32" else dtype, param_dtype=dtype)
    config = flax_vae.config
    return config, torch_vae, flax_vae, seeded.vae_inputs(config, seed=seed, hw=(max(16, config.downsample_factor),) * 2), source


def text_encoder_checkpoint_pair(checkpoint, *, variant: str | None = None, dtype: str = "float32", seed: int = 0):
    """(config, transformers' CLIPTextModel(WithProjection), flax_sgm's CLIPTextModel, seeded ids, what was used) of a
    diffusers text_encoder/ or text_encoder_2/ directory, or a pipeline's text_encoder/: transformers builds the
    reference from its config.json (its `architectures`), load_text_encoder reads the same files."""
    import json

    from flax_sgm.checkpoints.sources import CONFIG_FILE
    from flax_sgm.errors import CheckpointError
    from flax_sgm.text.load import PIPELINE_TEXT_ENCODERS, load_text_encoder

    path = Path(checkpoint)
    folders = [path / n for n in PIPELINE_TEXT_ENCODERS if (path / n / CONFIG_FILE).is_file()]
    directory = folders[0] if folders else path
    config = json.loads((directory / CONFIG_FILE).read_text()) if (directory / CONFIG_FILE).is_file() else {}
    names = config.get("architectures") or []
    if config.get("model_type") != "clip_text_model" or len(names) != 1:
        raise CheckpointError(f"{path}: a text encoder is verified from a transformers text_encoder/ directory or a "
                              "pipeline holding one (transformers builds the reference from its config.json); this "
                              "is not one")
    import transformers

    if names[0] not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        raise CheckpointError(f"{directory / CONFIG_FILE}: architectures {names} is not a CLIP text tower")
    torch_text = getattr(transformers, names[0]).from_pretrained(directory, variant=variant, dtype=torch.float32).eval()
    flax_text = load_text_encoder(directory, variant=variant, dtype=None if dtype == "float32" else dtype,
                                  param_dtype=dtype)
    source = {"weights": str(directory) + (f" (variant {variant})" if variant else ""),
              "reference": f"transformers {names[0]}, built by transformers from {directory}"}
    return flax_text.config, torch_text, flax_text, seeded.text_inputs(flax_text.config, seed=seed), source


def with_lora(torch_unet, flax_unet, lora, scale: float = 1.0) -> dict:
    """Apply a LoRA file to both: diffusers' loader (lora_state_dict + load_lora_into_unet, what load_lora_weights
    runs; needs peft) on the torch UNet, fused by diffusers' fuse_lora at `scale` and unloaded (plain modules again,
    so the report's rows and gradients are the base weights'), flax_sgm.load_lora (fused) on the Flax one.
    Returns what to say of it in the report's source."""
    from flax_sgm.errors import CheckpointError
    from flax_sgm.lora.load import check_scale, load_lora, read_lora

    scale = check_scale(scale)
    _, placed, _ = read_lora(flax_unet, lora)  # refused here, in one line, before torch sees it
    try:
        from diffusers import StableDiffusionPipeline
        import peft  # noqa: F401
    except ImportError as err:
        raise CheckpointError(f"--lora: verifying a LoRA needs diffusers and peft installed ({err})") from None
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(lora), unet_config=torch_unet.config,
                                                                      return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, torch_unet, adapter_name="verified", metadata=metadata)
    taken = sum(name.endswith("lora_A.verified.weight") for name, _ in torch_unet.named_parameters())
    torch_unet.fuse_lora(lora_scale=scale)
    torch_unet.unload_lora()
    torch_unet.requires_grad_(True)  # peft froze the base weights
    load_lora(flax_unet, lora, scale=scale)
    return {"lora": f"{lora} at scale {scale:g}: {len(placed)} modules (flax_sgm.load_lora), {taken} taken by diffusers"}
