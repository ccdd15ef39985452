"""`flax-sgm verify`: torch against flax_sgm, submodule by submodule (flax_sgm.verify does the work)."""

from __future__ import annotations

import sys

import click

from flax_sgm.cli.common import PARITY_FAILED, clean_errors, exclusive_heads, stack_options, to_json, variant_option


# --model values verified whole: (what it is, the diffusers model made in-process); their pairs are
# verify.seeded.<model>_pair and verify.references.<model>_checkpoint_pair ("-" read as "_").
WHOLE_MODELS = {
    "unet": ("a whole UNet", "diffusers UNet2DConditionModel"),
    "vae": ("a whole autoencoder", "diffusers AutoencoderKL"),
    "text-encoder": ("a whole CLIP text encoder", "transformers CLIPTextModelWithProjection"),
}


@click.command(
    short_help="Check Flax against torch, submodule by submodule.",
    epilog="""\b
Examples:
  flax-sgm verify
  flax-sgm verify --json > report.json
  flax-sgm verify --dtype bfloat16
  flax-sgm verify --model unet
  flax-sgm verify --model unet --checkpoint stable-diffusion-xl-base-1.0 --variant fp16
  flax-sgm verify --model vae --checkpoint stable-diffusion-xl-base-1.0
  flax-sgm verify --model text-encoder --checkpoint stable-diffusion-xl-base-1.0/text_encoder_2
  flax-sgm verify --model unet --checkpoint stable-diffusion-v1-5 --lora style.safetensors --lora-scale 0.8
  flax-sgm verify --checkpoint sd_xl_base_1.0.safetensors \\
      --prefix model.diffusion_model.input_blocks.4.1 --head-dim 64
  flax-sgm verify --checkpoint stable-diffusion-v1-5/unet --prefix down_blocks.1.attentions.0

\b
In Python, any torch module (torch_ref, the seed, diffusers) and its twin:
  flax_sgm.verify.verify_modules(torch_module, flax_module, {"x": x, "context": c})"""
)
@click.option("--model", type=click.Choice(["stack", *WHOLE_MODELS]), default="stack", show_default=True,
              help="What runs without --checkpoint: a SpatialTransformer stack, a whole SDXL-style UNet, a KL "
                   "autoencoder or a CLIP text encoder (diffusers' UNet2DConditionModel / AutoencoderKL, "
                   "transformers' CLIPTextModelWithProjection made in-process, random weights) reported per module.")
@click.option("--checkpoint", type=click.Path(),
              help="A checkpoint file (.safetensors, .ckpt, .pt, .pth, .bin), a diffusers model directory, a "
                   "sharded *.safetensors.index.json or a `flax-sgm convert` output; default: seeded random weights.")
@click.option("--prefix", help="Key prefix of the stack in the file (e.g. model.diffusion_model.input_blocks.4.1).")
@stack_options
@variant_option
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="Dtype both sides run in; both are judged against float64 by flax_sgm.verify.criteria.")
@click.option("--lora", type=click.Path(),
              help="With --model unet --checkpoint: a LoRA file applied to both (diffusers' loader with peft on torch's "
                   "side, flax_sgm.load_lora on Flax's).")
@click.option("--lora-scale", type=float, default=1.0, show_default=True, help="The --lora's scale (adapter weight).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the inputs (and of the default's weights).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@clean_errors
def verify(model, checkpoint, prefix, heads, head_dim, disable_self_attn, variant, lora, lora_scale, dtype, seed, as_json):
    """Run torch's SpatialTransformer and its Flax conversion on the same input; report parity.

    Without --checkpoint: an embedded default (SDXL's input_blocks.4.1 widths: 640
    channels, 10 heads of 64, depth 2, context 2048, linear projections) with seeded
    random weights. With --checkpoint: the stack at --prefix, its config read off the
    shapes; its heads from a diffusers config.json, or else --heads or --head-dim; or
    a `flax-sgm convert` output. The reference (printed) is diffusers' own model built
    from a diffusers directory when diffusers is installed, else torch_ref's
    SpatialTransformer of the config read. With --model unet: a whole SDXL-style UNet
    (64 and 128 channels, depth 1 and 2, 16 x 16 latent) against diffusers'
    UNet2DConditionModel, a row per module diffusers holds whole; with --checkpoint, the
    UNet of a diffusers unet/ or pipeline directory, diffusers' model built from it
    (float64 referee: about 8 bytes per parameter of memory). With --model vae: a KL
    autoencoder (32 and 64 channels, 16 x 16 images) against diffusers' AutoencoderKL;
    with --checkpoint, the autoencoder of a diffusers vae/ or pipeline directory. With
    --model text-encoder: a CLIP text tower (OpenCLIP-like, 2 layers of 64, with the
    projection) against transformers' CLIPTextModelWithProjection, every output and
    hidden state; with --checkpoint, a text_encoder/ or text_encoder_2/ directory (or a
    pipeline's text_encoder/), transformers' model built from its config.json.

    Reported per submodule (norm, proj_in, each block's norms, attn1, attn2, ff,
    proj_out) and for the whole model: flax_sgm's and torch's relative error against
    a float64 run of torch's module, of the output (the Flax submodule on torch's
    recorded inputs) and of the worst gradient (its VJP of torch's recorded output
    cotangent), the attention backend that ran, and pass/fail by
    flax_sgm.verify.criteria: an error fails when above both a floor and a few times
    torch's own (bfloat16: no floor, and a bound on the median ratio).
    """
    exclusive_heads(heads, head_dim)
    from flax_sgm.verify import seeded, verify_modules  # needs torch

    if checkpoint is None and any(v is not None for v in (prefix, heads, head_dim, disable_self_attn, variant)):
        raise click.UsageError("--prefix, --heads, --head-dim, --disable-self-attn and --variant need --checkpoint")
    if lora is not None and (model != "unet" or checkpoint is None):
        raise click.UsageError("--lora verifies a LoRA on a UNet checkpoint: it goes with --model unet --checkpoint")
    if model in WHOLE_MODELS:
        what, made = WHOLE_MODELS[model]
        if any(v is not None for v in (prefix, heads, head_dim, disable_self_attn)):
            raise click.UsageError(f"--model {model} verifies {what}: leave out --prefix, --heads, --head-dim and "
                                   "--disable-self-attn")
        if checkpoint is None:
            config, torch_module, flax_module, inputs = getattr(seeded, f"{model.replace('-', '_')}_pair")(dtype=dtype, seed=seed)
            source = {"weights": f"{made} made in-process, seeded random (seed {seed})"}
        else:
            from flax_sgm.verify import references

            config, torch_module, flax_module, inputs, source = getattr(references, f"{model.replace('-', '_')}_checkpoint_pair")(
                checkpoint, variant=variant, dtype=dtype, seed=seed
            )
            if lora is not None:
                source |= references.with_lora(torch_module, flax_module, lora, lora_scale)
    elif checkpoint is None:
        config, source = seeded.VERIFY_DEFAULT, {"weights": f"embedded default, seeded random (seed {seed})"}
        torch_module, flax_module, inputs = seeded.spatial_transformer_pair(config, dtype=dtype, seed=seed)
    else:
        from flax_sgm.verify.references import checkpoint_pair

        config, torch_module, flax_module, inputs, source = checkpoint_pair(
            checkpoint, prefix, heads=heads, head_dim=head_dim, disable_self_attn=disable_self_attn, variant=variant,
            dtype=dtype, seed=seed,
        )
    report = verify_modules(torch_module, flax_module, inputs, dtype=dtype, seed=seed)
    if as_json:
        click.echo(to_json({"config": config.to_dict(), "source": source, **report.to_dict()}))
    else:
        click.echo("\n".join([*_report_head(config, source, report), report.format()]))
    sys.exit(0 if report.passed else PARITY_FAILED)


def _report_head(config, source: dict, report) -> list[str]:
    args = ", ".join(f"{k}={v}" for k, v in config.to_dict().items())
    inputs = ", ".join(f"{k} {v}" for k, v in report.inputs.items())
    layout = " (token ids)" if type(config).__name__ == "CLIPTextConfig" else " (x NCHW for torch, NHWC for flax)"
    source = ", ".join(f"{k} {v}" if k != "weights" else v for k, v in source.items())
    return [
        f"{type(config).__name__}({args})",
        f"weights: {source}",
        f"input: {inputs}{layout}",
        "",
    ]
